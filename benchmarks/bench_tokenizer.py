"""Encoding throughput: the tokenizer library alone vs gpt_jax's sharding pipeline, on the same processes.

  python benchmarks/bench_tokenizer.py [--tokenizer hf,sentencepiece] [--hf_dir DIR] [--min_mb 100]
                                       [--workers N] [--rounds 2] [--workdir DIR]

The corpus is the embedded default corpus (the standard library's code and prose, ~12 MB) repeated
until it holds at least --min_mb MB, written as JSONL files into the workdir, so the pipeline reads
and parses it as it would a user's corpus. Tokenizers:
  hf             a Hugging Face tokenizer read with the `tokenizers` library: --hf_dir (e.g. GPT-2's
                 tokenizer.json), else a GPT-2-style byte-level BPE of 50,257 tokens trained here on
                 the embedded corpus with `tokenizers`
  sentencepiece  gpt_jax's SentencePiece model, trained on the embedded corpus (data.prepare)

For each, MB/s (UTF-8 bytes of documents per second) of, in turns (A B A B ...), on one pool of N
spawned processes:
  library    the library's batch encode of the documents, already in memory, in the N processes
             (tokenizers: encode_batch_fast and each encoding's ids; SentencePiece: encode), tasks of
             the pipeline's size; only the token count comes back
  pipeline   gpt_jax.data.shards as prepare() runs it: read and parse the JSONL, hash-split, encode in
             the N processes, cut, hash and write the shards with the manifest
then the ratio pipeline / library per turn and their median, in wall time and in CPU time (this
process and the workers, so the pipeline's reading, cutting and writing count against it; on a
machine shared with other jobs the CPU-time ratio is the steadier figure); once, the library's own
threading in this process (tokenizers' thread pool, SentencePiece's num_threads), for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_jax import tokenizers as tok_lib
from gpt_jax.data import default_data_config, pipeline, prepare, shards, source_config
from gpt_jax.data.sources import iter_documents, parse_sources, resolve_files


def _cpu(pool) -> float:
  """CPU seconds used so far by this process (all threads) and the pool's worker processes (Linux
  /proc; NaN elsewhere). On a box shared with other jobs, CPU time per MB moves far less with their
  load than wall time does."""
  total = time.process_time()
  tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
  for pid in list(getattr(pool, "_processes", {}) or {}):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, IndexError, ValueError):
      return float("nan")
  return total


def _count(texts):
  """Tokens of `texts` encoded by this worker's encoder: the library's own batch call, nothing else."""
  return sum(len(ids) for ids in shards.encode_ids(texts))


def _corpus(workdir: str, min_mb: float) -> tuple[str, list[str]]:
  """Writes the embedded corpus, repeated to at least min_mb MB, as JSONL parts; returns (glob, its docs)."""
  base = [
    d for s in parse_sources(default_data_config().sources) for d in iter_documents(s, resolve_files(s))
  ]
  base_mb = sum(len(d.encode("utf-8", "surrogatepass")) for d in base) / 1e6
  repeats = max(1, -int(-min_mb // base_mb))
  d = os.path.join(workdir, "corpus")
  if not os.path.isdir(d):
    os.makedirs(d + ".tmp", exist_ok=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in base)
    for r in range(repeats):
      with open(os.path.join(d + ".tmp", f"part-{r:03d}.jsonl"), "w") as f:
        f.write(lines)
    os.replace(d + ".tmp", d)
  return os.path.join(d, "*.jsonl"), base * repeats


def _bpe(workdir: str) -> str:
  """A GPT-2-style byte-level BPE (50,257 tokens, <|endoftext|>) trained on the embedded corpus."""
  d = os.path.join(workdir, "bpe")
  if os.path.isfile(os.path.join(d, "tokenizer.json")):
    return d
  import tokenizers

  docs = [
    d for s in parse_sources(default_data_config().sources) for d in iter_documents(s, resolve_files(s))
  ]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=50257,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(docs, trainer)
  os.makedirs(d, exist_ok=True)
  tok.save(os.path.join(d, "tokenizer.json"))
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|endoftext|>"}, f)
  return d


def _tokenizer(kind: str, args):
  if kind == "hf":
    return tok_lib.load_chat_tokenizer(args.hf_dir or _bpe(args.workdir))
  cfg = default_data_config()
  cfg.num_workers, cfg.progress = args.workers, False
  sp_dir = os.path.join(args.workdir, "sentencepiece")
  return prepare(cfg, sp_dir, token_budget=10**7, tokens_per_batch=4096, log=lambda *_: None).tokenizer


def _threads(tok, docs, workers: int) -> None:
  if tok.kind == "hf":
    tok.hf.backend.encode_batch_fast(docs, add_special_tokens=False)
  else:
    tok.encode_batch(docs, num_threads=workers)


def bench(kind: str, args, paths: str, docs: list[str], mb: float) -> None:
  tok = _tokenizer(kind, args)
  cfg = default_data_config()
  cfg.sources = {"corpus": source_config(paths, "jsonl", 1.0)}
  cfg.num_workers, cfg.progress = args.workers, False
  sources = parse_sources(cfg.sources)
  files = {s.name: resolve_files(s) for s in sources}
  tasks, cur, size = [], [], 0  # the pipeline's task size, so both balance the same way
  for d in docs:
    cur.append(d)
    size += len(d)
    if size >= shards.TASK_BYTES:
      tasks.append(cur)
      cur, size = [], 0
  tasks.append(cur)
  print(f"## {kind}: {tok.path} (vocab {tok.vocab_size})", flush=True)
  lib, pipe, lib_cpu, pipe_cpu = [], [], [], []  # MB/s wall; CPU seconds per MB
  t0 = time.perf_counter()
  with shards.make_pool(tok, args.workers) as pool:
    list(pool.map(_count, [["warm up"]] * args.workers))
    start = time.perf_counter() - t0
    for r in range(args.rounds):
      t0, c0 = time.perf_counter(), _cpu(pool)
      n_tokens = sum(pool.map(_count, tasks))
      lib.append(mb / (time.perf_counter() - t0))
      lib_cpu.append((_cpu(pool) - c0) / mb)
      out = tempfile.mkdtemp(dir=args.workdir)
      try:
        t0, c0 = time.perf_counter(), _cpu(pool)
        manifests = {"train": None, "eval": None}
        pipeline._build(
          cfg, sources, files, {"corpus": "bench"}, tok, out, manifests, lambda *_: None, pool=pool
        )
        pipe.append(mb / (time.perf_counter() - t0))
        pipe_cpu.append((_cpu(pool) - c0) / mb)
      finally:
        shutil.rmtree(out)
      print(
        f"turn {r + 1}: library {lib[-1]:6.2f} MB/s ({lib_cpu[-1]:.2f} CPU-s/MB)  pipeline {pipe[-1]:6.2f} MB/s "
        f"({pipe_cpu[-1]:.2f} CPU-s/MB)  ratio {pipe[-1] / lib[-1]:.2f} wall, {lib_cpu[-1] / pipe_cpu[-1]:.2f} CPU",
        flush=True,
      )
  t0 = time.perf_counter()
  _threads(tok, docs, args.workers)
  thr = mb / (time.perf_counter() - t0)
  med = statistics.median
  ratios = [p / q for p, q in zip(pipe, lib)]
  cpu_ratios = [q / p for p, q in zip(pipe_cpu, lib_cpu)]
  print(f"tokens: {n_tokens}  ({mb * 1e6 / n_tokens:.2f} bytes/token); pool start {start:.1f}s")
  print(
    f"library, {args.workers} processes   {med(lib):6.2f} MB/s, {med(lib_cpu):.2f} CPU-s/MB (medians of {len(lib)})"
  )
  print(f"pipeline, {args.workers} processes  {med(pipe):6.2f} MB/s, {med(pipe_cpu):.2f} CPU-s/MB")
  print(
    f"ratio pipeline / library     {med(ratios):.2f} wall (turns: {', '.join(f'{x:.2f}' for x in ratios)})"
  )
  print(
    f"                             {med(cpu_ratios):.2f} CPU time (turns: {', '.join(f'{x:.2f}' for x in cpu_ratios)})"
  )
  print(f"library's own threads        {thr:6.2f} MB/s (this process)", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokenizer", default="hf,sentencepiece", help="comma-separated: hf, sentencepiece")
  ap.add_argument("--hf_dir", default="", help="a Hugging Face tokenizer directory (default: train a BPE)")
  ap.add_argument("--min_mb", type=float, default=100.0)
  ap.add_argument("--workers", type=int, default=os.cpu_count())
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpt_jax_bench_tokenizer"))
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  paths, docs = _corpus(args.workdir, args.min_mb)
  mb = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs) / 1e6
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
    f"# {os.cpu_count()} cores, load average {load:.1f}; workers={args.workers}; "
    f"corpus {mb:.1f} MB, {len(docs)} documents in {len(resolve_files(parse_sources({'c': source_config(paths, 'jsonl', 1.0)})[0]))} JSONL files",
    flush=True,
  )
  for kind in [k.strip() for k in args.tokenizer.split(",") if k.strip()]:
    bench(kind, args, paths, docs, mb)


if __name__ == "__main__":
  main()
