"""Text sources: validation, document reading and the embedded default corpus.

A source is a config entry with: paths (one or more paths or globs; a comma-separated string or a
list), format, weight, and optional filters. Formats:

  text / markdown  one document per file, or the file split on `separator` when it is non-empty
  jsonl            one JSON object per line; the document is its `text_field` string
  parquet          the `text_field` column of each row (read in record batches with pyarrow)
  embedded         a part of the default corpus, named in `paths` (see EMBEDDED below)
  auto             each file by its extension (FORMAT_OF_EXTENSION: .jsonl/.json jsonl, .parquet
                   parquet, .md markdown, anything else text)

Filters, applied in this order: documents shorter than `min_chars` characters are dropped; with
`dedup` exact duplicates (by content hash) are dropped; at most `max_docs` documents are kept (0:
no limit). Files are read in sorted order, so a source yields the same documents on every run.

The embedded default corpus is text every Python installation already has, so the main job runs on
a fresh machine with no download:

  stdlib_code     the standard library's .py files (tests, site-packages and pydoc_data excluded)
  pydoc_topics    the reference documentation topics shipped in pydoc_data (what `help()` shows)
  stdlib_prose    the prose the standard library holds besides its code: its text files (LICENSE.txt,
                  email/architecture.rst, idlelib's help page, news, history and readme files; HTML
                  reduced to its text), one document per section; then the docstrings of the
                  built-in functions, exceptions and types (one document per type) and of a few C
                  modules (_C_MODULES, one document each). On CPython 3.11.7: 122 documents, 342 kB;
                  120 after the default config's min_chars=200.

Each is read in sorted order (by relative path, topic name; the C docstrings by name), so it is a pure
function of the Python version (and of which parts of the standard library its distributor installed).
No text of stdlib_prose is a copy of stdlib_code's: the C docstrings come from modules no .py file
reimplements, and the text files are not code.
"""

from __future__ import annotations

import glob
import hashlib
import html.parser
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from gpt_jax.errors import DataError

FORMATS = ("text", "markdown", "jsonl", "parquet", "embedded", "auto")
FORMAT_OF_EXTENSION = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".md": "markdown"}
EMBEDDED = ("stdlib_code", "pydoc_topics", "stdlib_prose")
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


def _stdlib_walk(keep) -> list[str]:
  """Returns the standard library's files whose name `keep` accepts, sorted by relative path."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
    out.extend(os.path.join(dirpath, f) for f in files if keep(f))
  return sorted(out, key=lambda p: os.path.relpath(p, root))


def _stdlib_files() -> list[str]:
  return _stdlib_walk(lambda f: f.endswith(".py"))


# --- stdlib_prose ---------------------------------------------------------------------------------

_PROSE_SUFFIXES = (".txt", ".rst", ".html")
_PROSE_PREFIXES = ("README", "NEWS", "ChangeLog")
_PROSE_SKIP = ("Grammar.txt", "PatternGrammar.txt")  # lib2to3's grammars: text files, but not prose
# C modules whose docstrings no .py file of the standard library repeats (an accelerator such as _pickle
# or _heapq shares its pure-Python twin's) and whose contents are the same on every platform
# (unlike sys, time or select); (import name, title).
_C_MODULES = (
  ("math", "math"),
  ("cmath", "cmath"),
  ("itertools", "itertools"),
  ("array", "array"),
  ("binascii", "binascii"),
  ("unicodedata", "unicodedata"),
  ("marshal", "marshal"),
  ("gc", "gc"),
  ("_struct", "struct"),
  ("_csv", "csv"),
)
# A title line underlined by a run of one punctuation character (reStructuredText, NEWS files).
_UNDERLINE = re.compile(r"([=\-~^*#+])\1{2,}[ \t]*")
_TITLE_LINES = 3  # NEWS files put a version, a "since" line and a date above one underline
_MIN_SECTION = 500


def _prose_files() -> list[str]:
  return _stdlib_walk(
    lambda f: (f.endswith(_PROSE_SUFFIXES) or f.startswith(_PROSE_PREFIXES)) and f not in _PROSE_SKIP
  )


def _sections(text: str) -> list[str]:
  """Returns text cut before each heading (a title of up to _TITLE_LINES lines after a blank line or
  the start, underlined); a part shorter than _MIN_SECTION characters is joined to the next one."""
  lines = text.split("\n")
  starts = [0]
  for i in range(1, len(lines)):
    if not _UNDERLINE.fullmatch(lines[i]):
      continue
    j = i - 1
    while j >= 0 and i - j <= _TITLE_LINES and lines[j].strip() and not _UNDERLINE.fullmatch(lines[j]):
      j -= 1
    if j < i - 1 and (j < 0 or not lines[j].strip()) and j + 1 > starts[-1]:
      starts.append(j + 1)
  parts, pending = [], ""
  for a, b in zip(starts, starts[1:] + [len(lines)]):
    pending += "\n".join(lines[a:b])
    if len(pending.strip()) >= _MIN_SECTION:
      parts.append(pending.strip("\n") + "\n")
      pending = ""
  if pending.strip():
    parts.append(pending.strip("\n") + "\n")
  return parts


class _HtmlText(html.parser.HTMLParser):
  """The text of an HTML page: blocks on their own lines, headings underlined (h1 and h2 with '=',
  the others with '-') as in a text file; scripts, styles and the headings' permalink marks dropped."""

  _BLOCKS = {"p", "div", "pre", "li", "dt", "dd", "tr", "table", "ul", "ol", "dl", "section", "br", "hr"}
  _HEADINGS = {"h1": "=", "h2": "=", "h3": "-", "h4": "-", "h5": "-", "h6": "-"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._skip = 0
    self._heading_at = 0

  def handle_starttag(self, tag, attrs):
    if tag in ("script", "style") or (tag == "a" and ("class", "headerlink") in attrs):
      self._skip += 1
    elif tag in self._HEADINGS:
      self.parts.append("\n\n")
      self._heading_at = len(self.parts)
    elif tag in self._BLOCKS:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if self._skip and tag in ("script", "style", "a"):
      self._skip -= 1
    elif tag in self._HEADINGS:
      title = " ".join("".join(self.parts[self._heading_at :]).split())
      self.parts[self._heading_at :] = [f"{title}\n{self._HEADINGS[tag] * len(title)}\n\n"]
    elif tag in self._BLOCKS:
      self.parts.append("\n")

  def handle_data(self, data):
    if not self._skip:
      self.parts.append(data)

  def text(self) -> str:
    lines = [line.rstrip() for line in "".join(self.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def _html_text(page: str) -> str:
  """Returns the text of a Sphinx page's main part: from its first <h1> to its navigation sidebar."""
  start = max(page.find("<h1"), 0)
  end = page.find('<div class="sphinxsidebar"', start)
  parser = _HtmlText()
  parser.feed(page[start : end if end >= 0 else len(page)])
  parser.close()
  return parser.text()


def _doc_page(title: str, intro: str | None, objects) -> str:
  """Returns a markdown page: # title, the intro, then ## each object's docstring and ### its members'."""
  parts = [f"# {title}"] + ([inspect.cleandoc(intro)] if intro else [])
  for obj in objects:
    if obj.__doc__:
      parts.append(f"## {obj.__name__}\n\n{inspect.cleandoc(obj.__doc__)}")
    if isinstance(obj, type):
      for name, member in sorted(vars(obj).items()):
        doc = getattr(member, "__doc__", None)
        if not name.startswith("_") and doc and doc != type(member).__doc__:
          parts.append(f"### {obj.__name__}.{name}\n\n{inspect.cleandoc(doc)}")
  return "\n\n".join(parts) + "\n"


def _public_objects(module) -> list:
  """Returns the module's own public functions and classes (each once, aliases dropped), by name."""
  found = {}
  for name, obj in vars(module).items():
    own = getattr(obj, "__module__", None) == module.__name__
    if not name.startswith("_") and own and (isinstance(obj, type) or inspect.isbuiltin(obj)):
      found[id(obj)] = obj
  return sorted(found.values(), key=lambda o: o.__name__)


def _c_docstring_pages() -> Iterator[str]:
  import builtins

  objects = _public_objects(builtins)
  errors = [o for o in objects if isinstance(o, type) and issubclass(o, BaseException)]
  yield _doc_page("Built-in functions", None, [o for o in objects if not isinstance(o, type)])
  yield _doc_page("Built-in exceptions", None, errors)
  for t in objects:
    if isinstance(t, type) and t not in errors:
      yield _doc_page(f"Built-in type {t.__name__}", None, [t])
  for name, title in _C_MODULES:
    module = importlib.import_module(name)
    yield _doc_page(f"Module {title}", module.__doc__, _public_objects(module))


def _read_embedded(src: Source, part: str) -> Iterator[str]:
  if part == "stdlib_code":
    for path in _stdlib_files():
      yield from _read_text(src, path)
  elif part == "pydoc_topics":
    from pydoc_data.topics import topics

    for key in sorted(topics):
      yield f"{key}\n\n{topics[key]}"
  elif part == "stdlib_prose":
    for path in _prose_files():
      with open(path, "rb") as f:
        text = _decode(f.read(), src, f"file {path}")
      yield from _sections(_html_text(text) if path.endswith(".html") else text)
    yield from _c_docstring_pages()


def format_of(path: str) -> str:
  """The format of a file by its extension (what format 'auto' reads it as)."""
  return FORMAT_OF_EXTENSION.get(os.path.splitext(path)[1].lower(), "text")


def _raw_documents(src: Source, files: list[str]) -> Iterator[str]:
  for f in files:
    fmt = format_of(f) if src.format == "auto" else src.format
    if fmt in ("text", "markdown"):
      yield from _read_text(src, f)
    elif fmt == "jsonl":
      yield from _read_jsonl(src, f)
    elif fmt == "parquet":
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
