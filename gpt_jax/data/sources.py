"""Text sources: validation, document reading and the embedded default corpus.

A source is a config entry with: paths (one or more paths or globs; a comma-separated string or a
list), format, weight, and optional filters. Formats:

  text / markdown  one document per file, or the file split on `separator` when it is non-empty
  jsonl            one JSON object per line; the document is its `text_field` string
  parquet          the `text_field` column of each row (read in record batches with pyarrow)
  embedded         a part of the default corpus, named in `paths` (see EMBEDDED below)

Filters, applied in this order: documents shorter than `min_chars` characters are dropped; with
`dedup` exact duplicates (by content hash) are dropped; at most `max_docs` documents are kept (0:
no limit). Files are read in sorted order, so a source yields the same documents on every run.

The embedded default corpus is text every Python installation already has, so the main job runs on
a fresh machine with no download:

  stdlib_code     the standard library's .py files (tests, site-packages and pydoc_data excluded)
  pydoc_topics    the reference documentation topics shipped in pydoc_data (what `help()` shows)
  package_descriptions
                  long descriptions from the metadata of the installed distributions (README-like
                  prose and markdown, much of it web-like)

Each is read in sorted order (by relative path, topic name, distribution name), so it is a pure
function of the Python version and the set of installed packages.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from gpt_jax.errors import DataError

FORMATS = ("text", "markdown", "jsonl", "parquet", "embedded")
EMBEDDED = ("stdlib_code", "pydoc_topics", "package_descriptions")
_STDLIB_SKIP_DIRS = {
  "site-packages",
  "dist-packages",
  "test",
  "tests",
  "idle_test",
  "pydoc_data",
  "__pycache__",
}


@dataclass(frozen=True)
class Source:
  """One validated source entry (see the module docstring for the meaning of each field)."""

  name: str
  paths: tuple[str, ...]
  format: str
  weight: float
  text_field: str = "text"
  separator: str = ""
  min_chars: int = 0
  dedup: bool = False
  max_docs: int = 0
  on_bad_utf8: str = "error"


def _get(entry, key, default):
  try:
    value = entry[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def parse_sources(sources_cfg, on_bad_utf8: str = "error") -> list[Source]:
  """Returns the sources of a config (a mapping name -> entry, or a list of entries with `name`),
  sorted by name, after the cheap checks: weight, format, field types. Raises DataError."""
  if on_bad_utf8 not in ("error", "replace"):
    raise DataError(f"data.on_bad_utf8: expected 'error' or 'replace', got {on_bad_utf8!r}")
  if hasattr(sources_cfg, "items"):
    entries = [(str(k), v) for k, v in sources_cfg.items()]
  else:
    entries = [(str(_get(e, "name", "")), e) for e in (sources_cfg or [])]
  if not entries:
    raise DataError("data.sources: no source configured; expected at least one")
  out, seen = [], set()
  for name, e in entries:
    if not name:
      raise DataError("data.sources: a source has no name")
    if name in seen:
      raise DataError(f"source {name!r}: defined twice")
    seen.add(name)
    fmt = str(_get(e, "format", ""))
    if fmt not in FORMATS:
      raise DataError(f"source {name!r}: unknown format {fmt!r}; expected one of {FORMATS}")
    try:
      weight = float(_get(e, "weight", 0.0))
    except (TypeError, ValueError) as err:
      raise DataError(f"source {name!r}: weight must be a number, got {_get(e, 'weight', None)!r}") from err
    if not weight > 0:
      raise DataError(f"source {name!r}: weight must be positive, got {weight}")
    paths = _get(e, "paths", ())
    if isinstance(paths, str):
      paths = [p.strip() for p in paths.split(",")]
    paths = tuple(str(p) for p in paths if str(p))
    if not paths:
      raise DataError(f"source {name!r}: no paths given")
    src = Source(
      name=name,
      paths=paths,
      format=fmt,
      weight=weight,
      text_field=str(_get(e, "text_field", "text")),
      separator=str(_get(e, "separator", "")),
      min_chars=int(_get(e, "min_chars", 0)),
      dedup=bool(_get(e, "dedup", False)),
      max_docs=int(_get(e, "max_docs", 0)),
      on_bad_utf8=str(_get(e, "on_bad_utf8", "") or on_bad_utf8),
    )
    if src.on_bad_utf8 not in ("error", "replace"):
      raise DataError(f"source {name!r}: on_bad_utf8 must be 'error' or 'replace', got {src.on_bad_utf8!r}")
    if src.format == "embedded":
      for p in paths:
        if p not in EMBEDDED:
          raise DataError(f"source {name!r}: unknown embedded part {p!r}; expected one of {EMBEDDED}")
    out.append(src)
  return sorted(out, key=lambda s: s.name)


def resolve_files(src: Source) -> list[str]:
  """Returns the sorted files of a source; DataError for a missing path or a glob matching nothing."""
  if src.format == "embedded":
    return list(src.paths)
  files = []
  for p in src.paths:
    p = os.path.expanduser(p)
    if glob.has_magic(p):
      matched = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
      if not matched:
        raise DataError(f"source {src.name!r}: glob {p!r} matches no file")
      files.extend(matched)
    elif os.path.isdir(p):
      matched = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if not f.startswith("."))
      if not matched:
        raise DataError(f"source {src.name!r}: directory {p!r} holds no file")
      files.extend(matched)
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise DataError(f"source {src.name!r}: path {p!r} does not exist")
  return files


def fingerprint(src: Source, files: list[str]) -> str:
  """Returns a hash of what the source's documents depend on (filters, files, sizes, mtimes)."""
  h = hashlib.sha256()
  fields = (
    src.format,
    src.text_field,
    src.separator,
    src.min_chars,
    src.dedup,
    src.max_docs,
    src.on_bad_utf8,
  )
  h.update(repr(fields).encode())
  if src.format == "embedded":
    h.update(sys.version.encode())
    for part in files:
      if part == "package_descriptions":
        h.update(repr(_distributions_key()).encode())
      h.update(part.encode())
  else:
    for f in files:
      st = os.stat(f)
      h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
  return h.hexdigest()


def _decode(data: bytes, src: Source, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    if src.on_bad_utf8 == "replace":
      return data.decode("utf-8", errors="replace")
    raise DataError(
      f"source {src.name!r}: {where} is not valid UTF-8 (byte {e.start}); "
      "set data.on_bad_utf8='replace' to replace bad bytes"
    ) from None


def _read_text(src: Source, path: str) -> Iterator[str]:
  with open(path, "rb") as f:
    text = _decode(f.read(), src, f"file {path}")
  if src.separator:
    yield from text.split(src.separator)
  else:
    yield text


def _read_jsonl(src: Source, path: str) -> Iterator[str]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      line = _decode(raw, src, f"{path}:{lineno}")
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"source {src.name!r}: {path}:{lineno} is not JSON ({e.msg})") from None
      if not isinstance(obj, dict) or src.text_field not in obj:
        raise DataError(f"source {src.name!r}: {path}:{lineno} lacks the text field {src.text_field!r}")
      value = obj[src.text_field]
      if not isinstance(value, str):
        raise DataError(
          f"source {src.name!r}: {path}:{lineno} field {src.text_field!r} is {type(value).__name__}, expected str"
        )
      yield value


def _read_parquet(src: Source, path: str) -> Iterator[str]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(path)
    if src.text_field not in pf.schema_arrow.names:
      raise DataError(f"source {src.name!r}: {path} has no column {src.text_field!r}")
    for batch in pf.iter_batches(columns=[src.text_field], batch_size=4096):
      col = batch.column(0)
      if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        values = [None if v is None else _decode(v, src, path) for v in col.to_pylist()]
      else:
        values = col.to_pylist()
      for v in values:
        if v is not None:
          yield str(v)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"source {src.name!r}: cannot read parquet file {path} ({e})") from None


def _stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
    out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
  return sorted(out, key=lambda p: os.path.relpath(p, root))


def _distributions_key() -> list[tuple[str, str]]:
  seen = {}
  for d in importlib.metadata.distributions():
    name = (d.metadata.get("Name") or "").strip()
    if name and name.lower() not in seen:
      seen[name.lower()] = (name, d.version or "")
  return sorted(seen.values(), key=lambda nv: nv[0].lower())


def _read_embedded(src: Source, part: str) -> Iterator[str]:
  if part == "stdlib_code":
    for path in _stdlib_files():
      yield from _read_text(src, path)
  elif part == "pydoc_topics":
    from pydoc_data.topics import topics

    for key in sorted(topics):
      yield f"{key}\n\n{topics[key]}"
  elif part == "package_descriptions":
    for name, _ in _distributions_key():
      try:
        meta = importlib.metadata.metadata(name)
      except importlib.metadata.PackageNotFoundError:
        continue
      body = meta.get_payload() or meta.get("Description") or ""
      if body.strip():
        yield f"# {name}\n\n{meta.get('Summary') or ''}\n\n{body}"


def _raw_documents(src: Source, files: list[str]) -> Iterator[str]:
  for f in files:
    if src.format in ("text", "markdown"):
      yield from _read_text(src, f)
    elif src.format == "jsonl":
      yield from _read_jsonl(src, f)
    elif src.format == "parquet":
      yield from _read_parquet(src, f)
    else:
      yield from _read_embedded(src, f)


def iter_documents(src: Source, files: list[str] | None = None) -> Iterator[str]:
  """Yields the source's documents (str) in a fixed order after its filters (min_chars, dedup,
  max_docs). Raises DataError naming the file for unreadable input."""
  files = resolve_files(src) if files is None else files
  seen: set[bytes] = set()
  kept = 0
  for doc in _raw_documents(src, files):
    if len(doc) < max(src.min_chars, 1):
      continue
    if src.dedup:
      key = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=16).digest()
      if key in seen:
        continue
      seen.add(key)
    yield doc
    kept += 1
    if src.max_docs and kept >= src.max_docs:
      return


def doc_hash_fraction(doc: str) -> float:
  """Returns a number in [0, 1) fixed by the document's content: the held-out split and the
  tokenizer sample use it, so neither depends on the order of files or on the seed."""
  digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64
