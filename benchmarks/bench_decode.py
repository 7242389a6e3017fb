"""Decode benchmark of the KV-cache sampler: tokens/s, ms/token and the memory-bandwidth roofline share.

At small batch every decode step reads all the weights once, so a step cannot beat
(parameter bytes read per step) / (memory bandwidth): the share of that bound the sampler reaches is
its roofline share. Decode time is isolated from prefill by timing the compiled sampler at N and at
1 new tokens: ms/token = (t_N - t_1) / (N - 1). eos is disabled so every row decodes N tokens.
Warm-up (compilation) excluded, every call device-synchronized, median over --repeats.

CPU (defaults there: preset tiny, fp32):
  python benchmarks/bench_decode.py
GPU, a 1.1B LLaMA-shaped model in bf16 (peak bandwidth taken from the table below by device name,
or given with --peak_gbps):
  python benchmarks/bench_decode.py --preset llama_1b --dtype bfloat16 --batch_sizes 1,64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt_jax import model, sampling  # noqa: E402
from gpt_jax.sampling import SampleConfig  # noqa: E402

# Peak HBM bandwidth in GB/s by device-name fragment (vendor data sheets); first match wins.
PEAK_GBPS = (
  ("H100 PCIe", 2000.0),
  ("H100", 3350.0),  # SXM
  ("H200", 4800.0),
  ("A100-SXM4-80GB", 2039.0),
  ("A100 80GB", 2039.0),
  ("A100", 1555.0),  # 40GB
)


def machine_line() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    name = platform.processor() or "CPU"
    try:
      with open("/proc/cpuinfo") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
      pass
    return f"{name}, {os.cpu_count()} cores (cpu)"
  return f"{dev.device_kind} x{jax.device_count()} ({dev.platform})"


def peak_gbps(arg: float | None) -> float | None:
  if arg:
    return arg
  kind = jax.devices()[0].device_kind
  return next((gbps for frag, gbps in PEAK_GBPS if frag in kind), None)


def random_params(cfg: model.ModelConfig, seed: int = 0):
  """Random params of the right shapes and dtype, made on device in one compiled call (the model's
  eager initialisation is slow for big models and its values do not matter for timing)."""
  _, shapes, _ = model.abstract(cfg)
  leaves, treedef = jax.tree.flatten(shapes)

  @jax.jit
  def make(key):
    keys = jax.random.split(key, len(leaves))
    return [
      (cfg.init_std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)
    ]

  return jax.tree.unflatten(treedef, make(jax.random.key(seed)))


def bytes_read_per_step(cfg: model.ModelConfig, params) -> int:
  """Parameter bytes one decode step reads: all weights except lookup tables (input embedding when
  untied, learned positions), which contribute only B rows."""
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  if not cfg.tie_embeddings:
    total -= params["embed"].nbytes
  if "pos_embed" in params:
    total -= params["pos_embed"].nbytes
  return total


def time_sampler(cfg, graphdef, params, batch, prompt_len, new_tokens, sample_cfg, repeats) -> float:
  """Median seconds of one full sampler call (prefill + new_tokens tokens), compile excluded."""
  sc = SampleConfig(**{**sample_cfg.__dict__, "max_new_tokens": new_tokens})
  sampler = sampling.make_sampler(
    cfg, graphdef, eos_id=-1, pad_id=0, max_prompt_len=prompt_len, sample_cfg=sc
  )
  rng = np.random.default_rng(0)
  tokens_BP = rng.integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  lengths_B = np.full((batch,), prompt_len, np.int32)
  args = (params, jnp.asarray(tokens_BP), lengths_B, jax.random.key(0))
  jax.block_until_ready(sampler(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> None:
  on_gpu = jax.devices()[0].platform == "gpu"
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="llama_1b" if on_gpu else "tiny")
  ap.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", help="compute and param dtype")
  ap.add_argument("--batch_sizes", default="1,64")
  ap.add_argument("--prompt_len", type=int, default=128 if on_gpu else 64)
  ap.add_argument("--new_tokens", type=int, default=256 if on_gpu else 64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--peak_gbps", type=float, default=None, help="memory bandwidth for the roofline share")
  ap.add_argument(
    "--unroll_layers",
    action="store_true",
    help="unroll the layer loop (model.scan_layers=False): one flat graph per decode step",
  )
  ap.add_argument("--json", default=None, help="also write the results to this file")
  args = ap.parse_args(argv)

  cfg = model.preset(
    args.preset, dtype=args.dtype, param_dtype=args.dtype, scan_layers=not args.unroll_layers
  )
  sample_cfg = SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p).validate()
  sampling.check_lengths(cfg, args.prompt_len, SampleConfig(max_new_tokens=args.new_tokens))
  graphdef = model.abstract(cfg)[0]
  params = random_params(cfg)
  param_bytes = bytes_read_per_step(cfg, params)
  peak = peak_gbps(args.peak_gbps)
  machine = machine_line()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"machine: {machine}")
  loop = "unrolled" if args.unroll_layers else "scanned"
  print(
    f"model: {args.preset} {args.dtype} ({loop} layers), {n_params / 1e6:.1f}M params, {param_bytes / 1e9:.3f} GB read per step;"
    f" prompt {args.prompt_len}, {args.new_tokens} new tokens, peak {peak or 'unknown'} GB/s"
  )
  header = f"{'batch':>5} {'prefill_ms':>10} {'ms/token':>9} {'tokens/s':>10} {'GB/s':>8} {'roofline':>8} {'w/ cache':>8}"
  print(header)
  results = []
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    t_1 = time_sampler(cfg, graphdef, params, batch, args.prompt_len, 1, sample_cfg, args.repeats)
    t_n = time_sampler(
      cfg, graphdef, params, batch, args.prompt_len, args.new_tokens, sample_cfg, args.repeats
    )
    step_s = max(t_n - t_1, 1e-9) / (args.new_tokens - 1)
    # The step attends over the whole cache (prompt + new tokens): k and v, every layer.
    cache_bytes = 2 * cfg.num_layers * batch * (args.prompt_len + args.new_tokens) * cfg.kv_heads * cfg.q_dim
    cache_bytes *= jnp.dtype(cfg.dtype).itemsize
    gbps = param_bytes / step_s / 1e9
    row = dict(
      machine=machine,
      preset=args.preset,
      dtype=args.dtype,
      scan_layers=cfg.scan_layers,
      batch=batch,
      prompt_len=args.prompt_len,
      new_tokens=args.new_tokens,
      prefill_ms=1e3 * t_1,
      ms_per_token=1e3 * step_s,
      tokens_per_s=batch / step_s,
      param_bytes=param_bytes,
      cache_bytes=cache_bytes,
      achieved_gbps=gbps,
      roofline_share=gbps / peak if peak else None,
      roofline_share_with_cache=(param_bytes + cache_bytes) / step_s / 1e9 / peak if peak else None,
    )
    results.append(row)
    share = f"{row['roofline_share']:8.1%}" if peak else f"{'n/a':>8}"
    share_c = f"{row['roofline_share_with_cache']:8.1%}" if peak else f"{'n/a':>8}"
    print(
      f"{batch:>5} {row['prefill_ms']:>10.2f} {row['ms_per_token']:>9.3f} {row['tokens_per_s']:>10.1f}"
      f" {gbps:>8.1f} {share} {share_c}",
      flush=True,
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
