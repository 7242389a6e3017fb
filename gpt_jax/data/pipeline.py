"""prepare(): validate sources, train or reuse the tokenizer, build or verify the shards.

The tokenizer (data.tokenizer.kind) is gpt_jax's SentencePiece model, trained on the data or given as
a file, or a Hugging Face tokenizer directory; whichever it is lands in the workdir (tokenizer/ or
hf_tokenizer/), where every later stage reads it, and each split's manifest records its kind and
sha256, so shards are never mixed with another tokenizer's.

Order of work, cheapest first, so bad input fails before anything heavy and nothing built is lost:
  1. budget and config checks, every source's paths (missing path, empty glob, format, weight);
  2. the existing tokenizer and manifests (wrong vocabulary size, other tokenizer, changed source);
  3. one reading pass over all documents (bad JSON, missing field, bad UTF-8, empty source), which
     also collects the tokenizer's training sample;
  4. tokenizer training (if there is none in the workdir), then sharding (resumable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from gpt_jax.data import mixture, shards
from gpt_jax.data.sources import (
  Source,
  doc_hash_fraction,
  fingerprint,
  iter_documents,
  parse_sources,
  resolve_files,
)
from gpt_jax.errors import DataError
from gpt_jax.tokenizers import hf as hf_tok
from gpt_jax.tokenizers import sentencepiece as sp_tok
from gpt_jax.tokenizers.base import HF_TOKENIZER_DIR, META_FILE, MODEL_FILE, SENTENCEPIECE_DIR, Tokenizer

SPLITS = ("train", "eval")


@dataclasses.dataclass
class Prepared:
  """What the loader and the stages need: the tokenizer, the shards and their statistics."""

  workdir: str
  tokenizer: (
    Tokenizer  # a SentencePieceTokenizer or a Hugging Face tokenizer (tokenizers/hf.py ChatTokenizer)
  )
  manifest: dict  # split -> manifest dict (see shards.py)
  mixture_table: list  # rows: source, weight, documents, tokens, bytes, share, epochs
  eval_bytes_per_token: float  # UTF-8 bytes per token over the eval split, mixture-weighted
  train_tokens: int
  eval_tokens: int
  sources: list  # [(name, weight)] in the mixture's order

  def split_dir(self, split: str) -> str:
    return os.path.join(self.workdir, "shards", split)


def _check_config(data_cfg, token_budget: int, tokens_per_batch: int) -> None:
  if int(tokens_per_batch) <= 0:
    raise DataError(f"tokens_per_batch must be positive, got {tokens_per_batch}")
  if int(token_budget) < int(tokens_per_batch):
    raise DataError(
      f"token budget {token_budget} is smaller than one batch ({tokens_per_batch} tokens); "
      "raise the number of steps or shrink the batch"
    )
  ef = float(data_cfg.eval_fraction)
  if not 0.0 < ef < 1.0:
    raise DataError(f"data.eval_fraction must be in (0, 1), got {ef}")
  if int(data_cfg.shard_tokens) < 1024:
    raise DataError(f"data.shard_tokens must be at least 1024, got {data_cfg.shard_tokens}")


def _scan(sources: list[Source], files: dict, eval_fraction: float, sample_cfg, want_sample: bool, log):
  """Reads every document once: validates input, returns the tokenizer sample (list of str).

  The sample is, per source, the train documents with the smallest content hashes up to
  weight * sample_bytes: a uniform random sample that needs no second pass and no seed.
  """
  total_w = sum(s.weight for s in sources)
  sample = []
  for src in sources:
    t0 = time.time()
    budget = src.weight / total_w * int(sample_cfg.sample_bytes)
    cap = int(sample_cfg.max_doc_chars)
    heap, kept, n, nbytes = [], 0, 0, 0
    for doc in iter_documents(src, files[src.name]):
      n += 1
      nbytes += len(doc)
      h = doc_hash_fraction(doc)
      if not want_sample or h < eval_fraction:
        continue
      piece = doc[:cap]
      heapq.heappush(heap, (-h, piece))
      kept += len(piece)
      while heap and kept - len(heap[0][1]) >= budget:
        kept -= len(heapq.heappop(heap)[1])
    if n == 0:
      raise DataError(
        f"source {src.name!r}: no documents in {len(files[src.name])} file(s) after filters "
        f"(min_chars={src.min_chars}, max_docs={src.max_docs})"
      )
    sample.extend(p for _, p in sorted(heap, reverse=True))
    log(f"data: source {src.name}: {n} documents, {nbytes / 1e6:.1f} M chars read in {time.time() - t0:.1f}s")
  return sample


def _tokenizer(data_cfg, workdir: str):
  """The tokenizer data.tokenizer names, as the workdir holds it: a Hugging Face tokenizer (copied into
  <workdir>/hf_tokenizer/ once), a given SentencePiece model (copied into <workdir>/tokenizer/ once), or
  the workdir's trained SentencePiece model; None when one must be trained. DataError when the workdir
  holds another tokenizer."""
  tcfg = data_cfg.tokenizer
  kind, given_path = str(tcfg.kind), str(tcfg.path)
  tok_dir = os.path.join(workdir, SENTENCEPIECE_DIR)
  path = os.path.join(tok_dir, MODEL_FILE)
  hf_dir = os.path.join(workdir, HF_TOKENIZER_DIR)
  have = "sentencepiece" if os.path.exists(path) else "hf" if os.path.isdir(hf_dir) else None
  if have is not None and have != kind:
    where = path if have == "sentencepiece" else hf_dir
    raise DataError(
      f"data.tokenizer.kind: {workdir} holds a {have} tokenizer ({where}), the config asks for {kind!r}; "
      f"use a new workdir or set data.tokenizer.kind={have!r}"
    )
  if kind == "hf":
    if not given_path:
      raise DataError(
        "data.tokenizer.path: required with data.tokenizer.kind='hf' (a Hugging Face tokenizer directory)"
      )
    src_dir = hf_tok.tokenizer_dir(given_path, "data.tokenizer.path")
    given = hf_tok.load_chat_tokenizer(src_dir)
    if have is None:
      hf_tok.install_files(src_dir, hf_dir)
    mine = hf_tok.load_chat_tokenizer(hf_dir)
    if mine.sha256() != given.sha256():
      raise DataError(
        f"tokenizer {hf_dir} differs from data.tokenizer.path={given_path} ({given.sha256()[:12]} vs "
        f"{mine.sha256()[:12]}); use a new workdir"
      )
    return mine
  if given_path:
    if not os.path.exists(os.path.expanduser(given_path)):
      raise DataError(
        f"data.tokenizer.path: {given_path} does not exist (expected a tokenizer.model made by gpt_jax)"
      )
    given = sp_tok.load(given_path)
    if os.path.exists(path):
      mine = sp_tok.load(path)
      if mine.sha256() != given.sha256():
        raise DataError(f"tokenizer {path} differs from data.tokenizer.path={given_path}; use a new workdir")
      return mine
    os.makedirs(tok_dir, exist_ok=True)
    shutil.copyfile(given.path, path + ".tmp")
    os.replace(path + ".tmp", path)
    return sp_tok.load(path)
  if not os.path.exists(path):
    return None
  tok = sp_tok.load(path)
  meta_path = os.path.join(tok_dir, META_FILE)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      want = json.load(f).get("vocab_size_requested", tok.vocab_size)
    if want != int(tcfg.vocab_size):
      raise DataError(
        f"tokenizer {path} was trained with vocab_size {want}, the config asks for {tcfg.vocab_size}; "
        "use a new workdir or set data.tokenizer.vocab_size to match"
      )
  return tok


def _check_manifest(split_dir: str, m: dict | None, tok: Tokenizer) -> None:
  if m is None:
    return
  kind = m.get("tokenizer_kind", "sentencepiece")
  if kind != tok.kind or m.get("tokenizer_sha256") != tok.sha256():
    raise DataError(
      f"manifest {split_dir}/{shards.MANIFEST} was built with the {kind} tokenizer "
      f"{str(m.get('tokenizer_sha256'))[:12]}, not the {tok.kind} tokenizer {tok.path} ({tok.sha256()[:12]}); "
      f"use a new workdir or delete {split_dir}"
    )


def prepare(
  data_cfg,
  workdir: str,
  *,
  token_budget: int,
  tokens_per_batch: int,
  log=print,
  tokenizer: Tokenizer | None = None,
) -> Prepared:
  """Validates the sources, trains or reuses the tokenizer, builds or verifies the shards.

  tokenizer: the one to use (already in the workdir, e.g. continued pretraining's init run's, which
  runs.install_tokenizer copied) instead of the one data.tokenizer names. Idempotent: a second call
  with the same config checks sizes/hashes and returns at once. Returns Prepared; raises DataError (one
  line naming the source, file or manifest) on bad input.
  """
  _check_config(data_cfg, token_budget, tokens_per_batch)
  sources = parse_sources(data_cfg.sources, str(data_cfg.on_bad_utf8))
  files = {s.name: resolve_files(s) for s in sources}
  eval_fraction = float(data_cfg.eval_fraction)
  shard_tokens = int(data_cfg.shard_tokens)
  fps = {
    s.name: hashlib.sha256(
      f"{fingerprint(s, files[s.name])}|{eval_fraction}|{shard_tokens}".encode()
    ).hexdigest()
    for s in sources
  }
  tok_dir = os.path.join(workdir, SENTENCEPIECE_DIR)
  shards_dir = os.path.join(workdir, "shards")
  tok = tokenizer if tokenizer is not None else _tokenizer(data_cfg, workdir)
  manifests = {sp: shards.read_manifest(os.path.join(shards_dir, sp)) for sp in SPLITS}
  for sp, m in manifests.items():
    if tok is not None:
      _check_manifest(os.path.join(shards_dir, sp), m, tok)
    for name, entry in ((m or {}).get("sources") or {}).items():
      if name in fps and entry.get("fingerprint") != fps[name] and entry.get("shards"):
        raise DataError(
          f"source {name!r} changed (files, filters, eval_fraction or shard_tokens) since "
          f"{shards_dir}/{sp} was built; use a new workdir or delete {shards_dir}/{sp}/{name}"
        )
  done = tok is not None and all(
    m is not None and all((m["sources"].get(s.name) or {}).get("complete") for s in sources)
    for m in manifests.values()
  )
  if not done:
    sample = _scan(sources, files, eval_fraction, data_cfg.tokenizer, tok is None, log)
    if tok is None:
      t0 = time.time()
      tok = sp_tok.train_tokenizer(
        sample, tok_dir, vocab_size=int(data_cfg.tokenizer.vocab_size), num_threads=_workers(data_cfg)
      )
      log(f"data: trained tokenizer ({tok.vocab_size} pieces) in {time.time() - t0:.1f}s -> {tok.path}")
      for sp, m in manifests.items():
        _check_manifest(os.path.join(shards_dir, sp), m, tok)
  _build(data_cfg, sources, files, fps, tok, shards_dir, manifests, log)
  return _prepared(workdir, tok, sources, manifests, token_budget, log)


def _workers(data_cfg) -> int:
  n = int(data_cfg.num_workers)
  return n if n > 0 else (os.cpu_count() or 1)


def _build(data_cfg, sources, files, fps, tok, shards_dir, manifests, log, pool=None) -> None:
  """Builds, resumes or repairs every (split, source); verifies finished ones. Uses `pool` if given
  (left running), else starts and stops its own."""
  from tqdm import tqdm

  dtype = shards.shard_dtype(tok.vocab_size)
  own_pool = pool is None
  bar = None
  jobs = []
  try:
    for sp in SPLITS:
      split_dir = os.path.join(shards_dir, sp)
      m = manifests[sp] or {
        "format": 1,
        "tokenizer_kind": tok.kind,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eot_id": tok.eos_id,
        "shard_tokens": int(data_cfg.shard_tokens),
        "sources": {},
      }
      manifests[sp] = m
      for src in sources:
        entry = m["sources"].setdefault(
          src.name, {"fingerprint": fps[src.name], "complete": False, "shards": []}
        )
        if entry.get("fingerprint") != fps[src.name]:  # an entry without shards: nothing to lose
          entry.clear()
          entry.update(fingerprint=fps[src.name], complete=False, shards=[])
        needs_work = not entry.get("complete") or not all(
          shards.file_ok(os.path.join(split_dir, r["file"]), r, dtype.itemsize, bool(data_cfg.verify_hash))
          for r in entry["shards"]
        )
        if not needs_work:
          continue
        jobs.append((sp, src, split_dir, m, entry))
    if jobs:
      pool = shards.make_pool(tok, _workers(data_cfg)) if own_pool else pool
      bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not bool(data_cfg.progress))
      lock = threading.Lock()

      def run(job):
        sp, src, split_dir, m, entry = job
        t0, report = time.time(), {}
        shards.build_source_split(
          pool,
          tok,
          src,
          files[src.name],
          sp,
          split_dir,
          entry,
          shard_tokens=int(data_cfg.shard_tokens),
          eval_fraction=float(data_cfg.eval_fraction),
          verify_hash=bool(data_cfg.verify_hash),
          save=lambda: shards.write_manifest(split_dir, m),
          progress=bar,
          lock=lock,
          report=report,
        )
        log(
          f"data: {sp}/{src.name}: {entry['tokens']} tokens in {len(entry['shards'])} shard(s) "
          f"({report['reused']} verified and kept) in {time.time() - t0:.1f}s"
        )

      # Two sources at a time feed the one process pool, so no core idles while a source ends.
      with ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(run, job) for job in jobs]
      for f in futures:
        f.result()
    for sp, m in manifests.items():
      shards.write_manifest(os.path.join(shards_dir, sp), m)
    for name, entry in manifests["train"]["sources"].items():
      if entry.get("complete") and entry["tokens"] == 0 and name in fps:
        raise DataError(f"source {name!r}: its train split is empty; lower data.eval_fraction")
  finally:
    if bar is not None:
      bar.close()
    if own_pool and pool is not None:
      pool.shutdown()


def _prepared(workdir, tok, sources, manifests, token_budget, log) -> Prepared:
  names = [s.name for s in sources]
  weights = [s.weight for s in sources]
  train = {n: manifests["train"]["sources"][n] for n in names}
  ev = {n: manifests["eval"]["sources"][n] for n in names}
  table = mixture.mixture_table(names, weights, train, token_budget)
  log(
    "data: mixture (share of training tokens, epochs over the budget of "
    f"{token_budget} tokens)\n{mixture.format_table(table)}"
  )
  with_eval = [(w, ev[n]) for n, w in zip(names, weights) if ev[n]["tokens"]]
  wsum = sum(w for w, _ in with_eval) or 1.0
  bpt = sum(w / wsum * e["bytes"] / e["tokens"] for w, e in with_eval)
  return Prepared(
    workdir=workdir,
    tokenizer=tok,
    manifest=manifests,
    mixture_table=table,
    eval_bytes_per_token=float(bpt),
    train_tokens=int(sum(e["tokens"] for e in train.values())),
    eval_tokens=int(sum(e["tokens"] for e in ev.values())),
    sources=list(zip(names, weights)),
  )
