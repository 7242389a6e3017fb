"""Small file helpers shared by the tokenizers, the data shards and the JSONL files."""

from __future__ import annotations

import os


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to path via a temporary file and a rename, so readers never see half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
