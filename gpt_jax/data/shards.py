"""Tokenize sources into fixed-size binary shards with a manifest; verify; resume; rebuild.

Layout: <shards>/<split>/<source>/<index:05d>.bin, raw little-endian uint16 (or uint32 when the
vocabulary does not fit), and <shards>/<split>/manifest.json. A source's token stream is its
documents in order, each followed by the end-of-text id; it is cut into shards of exactly
`shard_tokens` tokens (the last may be shorter), so a document may continue in the next shard and
the loader reads a source as one contiguous stream.

Each shard record holds its tokens, sha256, and the cursor (document number, tokens of that
document already in earlier shards) where it starts and ends. So a run that stops midway resumes
after the last finished shard, and a shard that fails its size or hash check is rebuilt from its
start cursor; nothing is used unverified. Shards are written to a temporary file and renamed, and
the manifest is rewritten (atomically) after every shard.

Encoding runs in a pool of spawned processes (spawn: safe after JAX has started its threads), each
holding the tokenizer's encoder: SentencePiece, or a Hugging Face `tokenizers` Tokenizer (batch
encoding on one thread per process). Both encode in native code; the parent only reads documents,
cuts and writes shards.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from gpt_jax.data.sources import Source, doc_hash_fraction, iter_documents
from gpt_jax.errors import DataError
from gpt_jax.files import write_atomic

log = logging.getLogger("gpt_jax")

MANIFEST = "manifest.json"
# Text per encode task: small enough that the last tasks of a source leave no core idle for long.
TASK_BYTES = 1 << 18

# This worker process's encoder: ("spm", SentencePieceProcessor) or ("bpe", tokenizers.Tokenizer).
_worker = None


def shard_dtype(vocab_size: int) -> np.dtype:
  """Returns uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _init_worker(spec: tuple[str, bytes]) -> None:
  """Rebuilds the tokenizer's encoder from its encoder_spec() in a worker process."""
  global _worker
  fmt, blob = spec
  if fmt == "spm":
    import sentencepiece as spm

    _worker = (fmt, spm.SentencePieceProcessor(model_proto=blob))
    return
  # One thread per worker: the pool's processes are the parallelism; the library's own thread pool
  # (one thread per core in every process) would only oversubscribe the cores.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  from tokenizers import Tokenizer

  tok = Tokenizer.from_str(blob.decode("utf-8"))
  # As in tokenizers/hf.py ChatTokenizer: a document cannot forge a special token.
  tok.encode_special_tokens = True
  _worker = (fmt, tok)


def encode_ids(texts: list[str]) -> list:
  """Returns the ids of each text with this worker's encoder (no special tokens added)."""
  fmt, enc = _worker
  if fmt == "spm":
    return enc.encode(texts, out_type="numpy", num_threads=1)
  batch = getattr(enc, "encode_batch_fast", enc.encode_batch)  # _fast: the same ids, no offsets
  return [e.ids for e in batch(texts, add_special_tokens=False)]


def _encode_task(texts: list[str], eot_id: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (flat tokens with eot after each document, tokens per document incl. eot)."""
  ids = encode_ids(texts)
  lengths = np.fromiter((len(a) + 1 for a in ids), np.int64, len(ids))
  flat = np.empty(int(lengths.sum()), dtype)
  ends = np.cumsum(lengths)
  for a, end in zip(ids, ends):
    flat[end - 1 - len(a) : end - 1] = a
  flat[ends - 1] = eot_id
  return flat, lengths


def make_pool(tokenizer, num_workers: int) -> ProcessPoolExecutor:
  """Returns a spawned process pool whose workers hold the tokenizer's encoder (its encoder_spec())."""
  ctx = multiprocessing.get_context("spawn")
  return ProcessPoolExecutor(
    max_workers=num_workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer.encoder_spec(),)
  )


def split_documents(src: Source, files: list[str], split: str, eval_fraction: float):
  """Yields the source's documents of one split ('train' or 'eval'): held out when the document's
  content hash falls below eval_fraction."""
  want_eval = split == "eval"
  for doc in iter_documents(src, files):
    if (doc_hash_fraction(doc) < eval_fraction) == want_eval:
      yield doc


def shard_problem(path: str, rec: dict, itemsize: int, check_hash: bool) -> str | None:
  """None when the shard file has the recorded size (and hash), else what is wrong with it."""
  try:
    size = os.path.getsize(path)
    if size != rec["tokens"] * itemsize:
      return f"has {size} bytes, the manifest says {rec['tokens'] * itemsize}"
    if check_hash:
      with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != rec["sha256"]:
          return "has other bytes than the manifest's sha256"
    return None
  except FileNotFoundError:
    return "is missing"
  except OSError as e:
    return f"is unreadable ({e.strerror or e})"


def file_ok(path: str, rec: dict, itemsize: int, check_hash: bool) -> bool:
  """Returns whether the shard file has the recorded size (and hash)."""
  return shard_problem(path, rec, itemsize, check_hash) is None


class _Stream:
  """Tokens produced so far but not yet written, with document cursors."""

  def __init__(self, doc: int, skip: int):
    self.pieces = collections.deque()  # [first_doc, flat, cum_lengths, consumed]
    self.size = 0
    self.cursor = (doc, skip)

  def add(self, first_doc: int, flat: np.ndarray, lengths: np.ndarray, skip: int = 0) -> None:
    cum = np.cumsum(lengths)
    self.pieces.append([first_doc, flat, cum, skip])
    self.size += len(flat) - skip

  def take(self, n: int) -> np.ndarray:
    """Returns the next n tokens (n <= size) and moves the cursor past them."""
    out, need = [], n
    while need:
      piece = self.pieces[0]
      first_doc, flat, cum, used = piece
      k = min(need, len(flat) - used)
      out.append(flat[used : used + k])
      used += k
      need -= k
      piece[3] = used
      if used == len(flat):
        self.pieces.popleft()
        self.cursor = (first_doc + len(cum), 0)
      else:
        d = int(np.searchsorted(cum, used, side="right"))
        self.cursor = (first_doc + d, used - (int(cum[d - 1]) if d else 0))
    self.size -= n
    return np.concatenate(out) if len(out) > 1 else out[0].copy()


def build_source_split(
  pool,
  tokenizer,
  src: Source,
  files: list[str],
  split: str,
  split_dir: str,
  entry: dict,
  *,
  shard_tokens: int,
  eval_fraction: float,
  verify_hash: bool,
  save,
  progress=None,
  lock=None,
  report: dict | None = None,
) -> dict:
  """Builds (or resumes, or repairs) one source's shards of one split.

  `entry` is the source's manifest entry (fingerprint, complete, shards, totals), updated in place;
  `save()` persists the manifest; `lock` (optional) guards the manifest when several sources are
  built at once by threads sharing one pool; `report` (optional) gets {"reused": verified shards kept}.
  Each shard that fails its check is named in a warning and rebuilt. Returns the entry. Raises
  DataError for unreadable input.
  """
  lock = lock or contextlib.nullcontext()
  dtype = shard_dtype(tokenizer.vocab_size)
  src_dir = os.path.join(split_dir, src.name)
  os.makedirs(src_dir, exist_ok=True)
  records = entry.setdefault("shards", [])
  problems = [
    shard_problem(os.path.join(split_dir, r["file"]), r, dtype.itemsize, verify_hash) for r in records
  ]
  ok = [p is None for p in problems]
  if report is not None:
    report["reused"] = 0
  if entry.get("complete") and all(ok):
    return entry
  for rec, problem in zip(records, problems):
    if problem is not None:
      log.warning(
        "data: shard %s of source %r %s; rebuilding it",
        os.path.join(split_dir, rec["file"]),
        src.name,
        problem,
      )
  first_bad = ok.index(False) if False in ok else len(records)
  if first_bad < len(records):
    start = (records[first_bad]["start_doc"], records[first_bad]["start_skip"])
  elif records:
    start = (records[-1]["end_doc"], records[-1]["end_skip"])
  else:
    start = (0, 0)
  entry["complete"] = False
  stream = _Stream(*start)
  index = first_bad
  documents = nbytes = 0

  def emit(n: int) -> None:
    nonlocal index
    begin = stream.cursor
    toks = stream.take(n)
    if index < len(records) and ok[index]:
      index += 1  # verified earlier: same inputs and tokenizer give the same tokens
      if report is not None:
        report["reused"] += 1
      return
    name = f"{src.name}/{index:05d}.bin"
    data = toks.astype(dtype, copy=False).tobytes()
    write_atomic(os.path.join(split_dir, name), data)
    rec = {
      "file": name,
      "tokens": len(toks),
      "sha256": hashlib.sha256(data).hexdigest(),
      "start_doc": begin[0],
      "start_skip": begin[1],
      "end_doc": stream.cursor[0],
      "end_skip": stream.cursor[1],
    }
    with lock:
      if index < len(records):
        records[index] = rec
      else:
        records.append(rec)
      save()
    index += 1

  pending = collections.deque()
  max_pending = 4 * max(1, getattr(pool, "_max_workers", 1))

  def drain(limit: int) -> None:
    while len(pending) > limit:
      first_doc, skip, fut = pending.popleft()
      flat, lengths = fut.result()
      stream.add(first_doc, flat, lengths, skip)
      if progress is not None:
        progress.update(int(lengths.sum()) - skip)
      while stream.size >= shard_tokens:
        emit(shard_tokens)

  batch, batch_bytes, batch_first = [], 0, None
  for d, doc in enumerate(split_documents(src, files, split, eval_fraction)):
    size = len(doc.encode("utf-8", "surrogatepass"))
    documents += 1
    nbytes += size
    if d < start[0]:
      continue
    if batch_first is None:
      batch_first = d
    batch.append(doc)
    batch_bytes += size
    if batch_bytes >= TASK_BYTES:
      skip = start[1] if batch_first == start[0] else 0
      pending.append((batch_first, skip, pool.submit(_encode_task, batch, tokenizer.eos_id, dtype.str)))
      batch, batch_bytes, batch_first = [], 0, None
      drain(max_pending)
  if batch:
    skip = start[1] if batch_first == start[0] else 0
    pending.append((batch_first, skip, pool.submit(_encode_task, batch, tokenizer.eos_id, dtype.str)))
  drain(0)
  if stream.size:
    emit(stream.size)
  with lock:
    del records[index:]
    entry.update(
      complete=True,
      documents=documents,
      bytes=nbytes,
      tokens=int(sum(r["tokens"] for r in records)),
    )
    save()
  return entry


def read_manifest(split_dir: str) -> dict | None:
  """Returns the split's manifest, or None if there is none yet; DataError if it is unreadable."""
  path = os.path.join(split_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except (OSError, ValueError) as e:
    raise DataError(f"manifest {path} is unreadable ({e}); delete it to rebuild the split") from None


def write_manifest(split_dir: str, manifest: dict) -> None:
  """Atomically writes the split's manifest."""
  os.makedirs(split_dir, exist_ok=True)
  write_atomic(os.path.join(split_dir, MANIFEST), json.dumps(manifest, indent=1).encode())


def check_shard_sizes(split_dir: str, entry: dict, itemsize: int, source: str) -> None:
  """Raises DataError naming the first shard whose size differs from the manifest."""
  for rec in entry.get("shards", []):
    path = os.path.join(split_dir, rec["file"])
    try:
      size = os.path.getsize(path)
    except OSError:
      raise DataError(f"shard {path} of source {source!r} is missing; re-run prepare to rebuild it") from None
    if size != rec["tokens"] * itemsize:
      raise DataError(
        f"shard {path} of source {source!r} has {size} bytes, the manifest says "
        f"{rec['tokens'] * itemsize}; it is truncated or corrupt, re-run prepare to rebuild it"
      )
