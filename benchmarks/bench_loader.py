"""Loader throughput on the embedded corpus for the tiny preset's batch shape.

  python benchmarks/bench_loader.py [--batch 16] [--seq 256] [--devices 8] [--steps 300]

Prints batches/s and tokens/s of (a) host batches (numpy windows + batch schema) and (b) global
jax.Arrays through the prefetching iterator, sharded over a data axis of --devices CPU devices.
The tiny train step consumes roughly 20-50K tokens/s on a 2-core CPU; the loader should deliver at least 20x that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpt_jax_bench_data"))
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from gpt_jax.data import default_data_config, make_loader, prepare

  cfg = default_data_config()
  cfg.progress = False
  tokens_per_batch = args.batch * args.seq
  p = prepare(cfg, args.workdir, token_budget=10**7, tokens_per_batch=tokens_per_batch, log=lambda *_: None)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data", None))
  print(
    f"# this machine: {os.cpu_count()} cores, {len(jax.devices())} {jax.devices()[0].platform} devices; "
    f"B={args.batch} T={args.seq}"
  )

  loader = make_loader(p, "train", global_batch=args.batch, seq_len=args.seq, sharding=sharding, seed=0)
  t0 = time.perf_counter()
  for k in range(args.steps):
    loader.host_batch(k)
  dt = time.perf_counter() - t0
  print(
    f"host batches     {args.steps / dt:8.1f} batches/s  {args.steps * tokens_per_batch / dt / 1e6:6.2f} M tokens/s"
  )

  for _ in range(10):
    next(loader)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    batch = next(loader)
  jax.block_until_ready(batch)
  dt = time.perf_counter() - t0
  loader.close()
  print(
    f"global batches   {args.steps / dt:8.1f} batches/s  {args.steps * tokens_per_batch / dt / 1e6:6.2f} M tokens/s"
    f"  ({args.steps * tokens_per_batch / dt / 50e3:.0f}x a 50K tokens/s train step)"
  )


if __name__ == "__main__":
  main()
