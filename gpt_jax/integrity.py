"""Integrity records: the size and crc32 of every file of a finished directory, checked before it is used.

  <dir>/_INTEGRITY.json   {"format": 1, "files": {relative path: [size, crc32]}}

A directory written in several steps (an orbax save, an import) gets its record last, once it is
complete; a directory without a record, or whose files do not match it (truncated, overwritten,
removed by a bad disk or a partial copy), is reported with a one-line reason instead of being loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib

RECORD_FILE = "_INTEGRITY.json"
NO_RECORD = f"no {RECORD_FILE} (save never finished)"  # check()'s reason for a directory without a record
_CHUNK = 16 << 20


def _crc32(path: str) -> int:
  """Returns the crc32 of a file, read in chunks (zlib's crc32 runs at GB/s, enough to verify on load)."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _list_files(directory: str) -> list[str]:
  """Returns the sorted relative paths of all files under directory except the record (and its tmp file)."""
  out = []
  for root, _, files in os.walk(directory):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if not rel.startswith(RECORD_FILE):
        out.append(rel)
  return sorted(out)


def write_record(directory: str) -> None:
  """Writes <directory>/_INTEGRITY.json listing every file's size and crc32; atomic (tmp + fsync + rename)."""
  files = {
    rel: [os.path.getsize(os.path.join(directory, rel)), _crc32(os.path.join(directory, rel))]
    for rel in _list_files(directory)
  }
  tmp = os.path.join(directory, RECORD_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 1, "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, RECORD_FILE))
  with contextlib.suppress(OSError):  # Directory fsync makes the rename durable; not supported everywhere.
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def check(directory: str, *, hashes: bool = True) -> str | None:
  """Returns None when directory matches its record, else a one-line reason naming the file.

  hashes=False compares sizes only (cheap; catches truncation and missing files, not changed bytes).
  """
  record_path = os.path.join(directory, RECORD_FILE)
  if not os.path.isdir(directory):
    return "directory is missing"
  if not os.path.isfile(record_path):
    return NO_RECORD
  try:
    with open(record_path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{RECORD_FILE} is unreadable ({type(e).__name__})"
  for rel, (size, crc) in sorted(files.items()):
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      return f"file {rel} is missing"
    actual = os.path.getsize(path)
    if actual != size:
      return f"file {rel} has {actual} bytes, expected {size}"
    if hashes and _crc32(path) != crc:
      return f"file {rel} has a wrong crc32 (corrupted bytes)"
  return None


def _stat_signature(directory: str) -> tuple:
  """Returns (path, size, mtime_ns) of every file: a cheap key to cache a verification result."""
  sig = []
  for rel in _list_files(directory) + [RECORD_FILE]:
    try:
      st = os.stat(os.path.join(directory, rel))
      sig.append((rel, st.st_size, st.st_mtime_ns))
    except OSError:
      sig.append((rel, -1, -1))
  return tuple(sig)


class Cache:
  """`check` that remembers the directories that passed: one whose files' sizes and mtimes are unchanged
  since is not read and hashed again."""

  def __init__(self, *, hashes: bool = True):
    self.hashes = hashes
    self._passed: dict[str, tuple] = {}  # directory -> stat signature when it last passed

  def check(self, directory: str) -> str | None:
    """Returns None when directory matches its record (see `check`), else a one-line reason."""
    sig = _stat_signature(directory) if os.path.isdir(directory) else None
    if sig is not None and self._passed.get(directory) == sig:
      return None
    reason = check(directory, hashes=self.hashes)
    if reason is None:
      self._passed[directory] = sig
    else:
      self._passed.pop(directory, None)
    return reason

  def forget(self, directory: str) -> None:
    """Drops what is remembered of directory (it is about to be deleted or rewritten)."""
    self._passed.pop(directory, None)
