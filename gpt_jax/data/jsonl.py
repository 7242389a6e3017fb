"""JSONL files: one JSON value per line (the stages' tasks, comparisons, prompts and samples)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from gpt_jax.errors import DataError
from gpt_jax.files import write_atomic


def read_jsonl(path: str) -> Iterator[tuple[str, object]]:
  """Yields (where, row) for each non-blank line of a JSONL file, where = "path:line";
  a line that is not JSON raises DataError naming it."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield where, json.loads(line)
      except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def write_jsonl(path: str, rows: Iterable) -> int:
  """Writes one JSON value per line, atomically (write_atomic); returns the number of rows."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
  write_atomic(path, "".join(lines).encode("utf-8"))
  return len(lines)
