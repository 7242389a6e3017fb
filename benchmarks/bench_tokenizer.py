"""Encoding throughput on the embedded corpus: SentencePiece alone vs the sharding pipeline.

  python benchmarks/bench_tokenizer.py [--workers N] [--workdir DIR]

Prints MB/s (UTF-8 bytes of documents per second) for, on the same cores and in the same run:
  sp-processes  SentencePiece encode in N spawned processes, text already in memory, nothing kept
  sp-threads    SentencePiece's own batch encode on N threads in this process
  pipeline      gpt_jax.data.shards: read documents, encode in N processes, cut, hash and write
                shards with the manifest (warm pool; and end to end with the pool start)
and the ratio pipeline / sp-processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_jax.data import default_data_config, pipeline, prepare, shards
from gpt_jax.data.sources import parse_sources, resolve_files


def _count(texts):
  return sum(len(a) for a in shards._worker_sp.encode(texts, num_threads=1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workers", type=int, default=os.cpu_count())
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpt_jax_bench_data"))
  args = ap.parse_args()
  cfg = default_data_config()
  cfg.num_workers = args.workers
  cfg.progress = False
  p = prepare(cfg, args.workdir, token_budget=10**7, tokens_per_batch=4096, log=lambda *_: None)
  tok = p.tokenizer
  sources = parse_sources(cfg.sources)
  files = {s.name: resolve_files(s) for s in sources}
  jobs = [(s, sp) for sp in ("train", "eval") for s in sources]
  docs = [d for s, sp in jobs for d in shards.split_documents(s, files[s.name], sp, float(cfg.eval_fraction))]
  mb = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs) / 1e6
  print(
    f"# this machine: {os.cpu_count()} cores; workers={args.workers}; "
    f"corpus {mb:.1f} MB, {len(docs)} documents, vocab {tok.vocab_size}"
  )

  # SentencePiece alone, N processes; tasks of the pipeline's size so both balance the same way.
  tasks, cur, size = [], [], 0
  for d in docs:
    cur.append(d)
    size += len(d)
    if size >= shards.TASK_BYTES:
      tasks.append(cur)
      cur, size = [], 0
  tasks.append(cur)
  with shards.make_pool(tok, args.workers) as pool:
    list(pool.map(_count, [["warm up"]] * args.workers))
    t0 = time.perf_counter()
    n_tokens = sum(pool.map(_count, tasks))
    sp_proc = mb / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    tok.encode_batch(docs, num_threads=args.workers)
    sp_thr = mb / (time.perf_counter() - t0)

    out = tempfile.mkdtemp()
    try:
      t0 = time.perf_counter()
      _build_all(pool, tok, jobs, files, cfg, out)
      pipe = mb / (time.perf_counter() - t0)
    finally:
      shutil.rmtree(out)
  out = tempfile.mkdtemp()
  try:
    t0 = time.perf_counter()
    with shards.make_pool(tok, args.workers) as pool:
      _build_all(pool, tok, jobs, files, cfg, out)
    e2e = mb / (time.perf_counter() - t0)
  finally:
    shutil.rmtree(out)
  print(f"tokens: {n_tokens}  ({mb * 1e6 / n_tokens:.2f} bytes/token)")
  print(f"sp-processes  {sp_proc:6.2f} MB/s")
  print(f"sp-threads    {sp_thr:6.2f} MB/s")
  print(f"pipeline      {pipe:6.2f} MB/s  (warm pool)  ratio to sp-processes {pipe / sp_proc:.2f}")
  print(f"pipeline      {e2e:6.2f} MB/s  (incl. pool start)  ratio {e2e / sp_proc:.2f}")


def _build_all(pool, tok, jobs, files, cfg, out):
  """The pipeline as prepare() runs it: every (split, source), into a fresh shards folder."""
  sources = sorted({s.name: s for s, _ in jobs}.values(), key=lambda s: s.name)
  fps = {s.name: s.name for s in sources}
  manifests = {"train": None, "eval": None}
  pipeline._build(cfg, sources, files, fps, tok, out, manifests, lambda *_: None, pool=pool)


if __name__ == "__main__":
  main()
