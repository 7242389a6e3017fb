"""Training-step benchmark: ms/step, tokens/s, MFU and peak memory of the jitted train step.

Times exactly what training runs (gpt_jax.step.make_train_step with the project's optimizer and
next-token loss) for a named preset and batch: warm-up (compilation) excluded, every step
device-synchronized, median over repeated steps. With --nanogpt_dir (a directory holding nanoGPT's
model.py) the reference PyTorch GPT is timed at the same shapes in the same run, eager and (with
--torch_compile) torch.compile, the implementations taking turns (A B A B ...) so that machine
drift hits all of them alike.

CPU, the foundation config (L=6, H=6, D=384, T=256, V=4096, B=16, fp32):
  python benchmarks/bench_train.py --preset cpu_bench --batch 16 --nanogpt_dir /tmp/nanogpt --torch_compile
GPU, GPT-2 124M in bf16 with the XLA GPU flags of `xla_flags()`:
  python benchmarks/bench_train.py --preset gpt2_124m --batch 16 --dtype bfloat16 \
      --nanogpt_dir /tmp/nanogpt --torch_compile
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

# XLA flags for GPU runs, all in one place. They must be in the environment before JAX starts its
# backend, which is why this module sets them before importing jax (see main()).
GPU_XLA_FLAGS = (
  # Overlap collectives and async copies with compute (MaxText and the JAX GPU performance guide).
  "--xla_gpu_enable_latency_hiding_scheduler=true",
)


def xla_flags(platform_name: str, extra: str = "") -> str:
  """Returns the XLA_FLAGS to run with: the environment's, plus GPU_XLA_FLAGS on GPU, plus `extra`."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if platform_name == "gpu":
    flags += [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
  flags += extra.split()
  return " ".join(flags)


def machine_line() -> str:
  """One line naming the CPU (model name from /proc/cpuinfo) and its core count."""
  name = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    name = names[0] if names else name
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores"


def _median_ms(times_s: list[float]) -> float:
  return 1e3 * statistics.median(times_s)


# --- JAX ------------------------------------------------------------------------------------------


def jax_runner(args, attention_impl: str, accum: int = 1):
  """Builds the sharded train state and jitted step; returns (step_fn, info) where step_fn() runs
  one device-synchronized step."""
  import jax
  import numpy as np

  from gpt_jax import config as config_lib
  from gpt_jax import losses, model, optim, placed, sharding, step
  from gpt_jax.data import batch as batch_lib

  cfg = model.preset(
    args.preset,
    dtype=args.dtype,
    **({"scan_layers": args.layers == "scan"} if args.layers != "preset" else {}),
    remat_policy=args.remat_policy,
    attention_impl=attention_impl,
    **({"max_seq_len": args.seq_len} if args.seq_len else {}),
  )
  T = cfg.max_seq_len
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  graphdef, shapes, axes = model.abstract(cfg)
  params_sh = sharding.tree_shardings(mesh, axes, shapes)
  # The project's optimizer defaults (AdamW b2 0.95, decay 0.1, clipping at 1.0) at nanoGPT's peak rate.
  optim_cfg = config_lib.defaults({"optim": config_lib.OPTIM}).optim
  optim_cfg.update(dict(lr_peak=6e-4, warmup_steps=10, decay_steps=1000))
  opt, lr = optim.make(optim_cfg, 1000, axes)
  init = lambda: step.init_state(model.split(cfg, 0)[1], opt, 0)
  state_sh = step.state_shardings(mesh, opt, params_sh, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=state_sh)()

  if args.xent_chunk:
    # Cross-entropy straight from the hidden states, chunk by chunk (never the whole batch's logits).
    def loss_fn(params, batch, rng):
      seg = batch["segment_ids"] if args.document_mask else None
      out = model.apply(graphdef, params, batch["inputs"], batch["positions"], seg, compute_logits=False)
      head_DV = model.output_head_DV(cfg, params)
      return losses.chunked_next_token_xent(
        out.hidden, head_DV, batch["targets"], batch["loss_mask"], chunk_len=args.xent_chunk
      )
  else:
    # Exactly the pretraining stage's loss; without --document_mask it passes segment_ids=None (the
    # causal-only attention path), as nanoGPT does.
    loss_fn = losses.lm_loss(placed.Model.build(cfg, mesh).apply, document_mask=args.document_mask)

  batch_sh = sharding.batch_sharding(mesh, 2)
  train_step = step.make_train_step(
    loss_fn, opt, lr, mesh=mesh, state_sharding=state_sh, batch_sharding=batch_sh, grad_accum=accum
  )
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, T + 1))
  batch = jax.device_put(batch_lib.from_windows(windows, 0, args.document_mask), batch_sh)
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()  # the same executable train_step(...) would run
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    return metrics

  return run, {"cfg": cfg, "compile_s": compile_s, "device": jax.devices()[0]}


def jax_matmul_flops(dtype: str, n: int, reps: int = 5) -> float:
  """Measured FLOP/s of one jitted (n, n) @ (n, n) product in `dtype` (median of `reps`)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def jax_peak_memory(device) -> str:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB (device peak)"
  return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS, all rows)"


# --- PyTorch reference (nanoGPT) -------------------------------------------------------------------


def torch_runner(args, cfg, compile_model: bool, accum: int = 1):
  """nanoGPT's GPT at cfg's shapes with its own configure_optimizers (AdamW), one full step per
  call: forward, backward, grad-norm clipping at 1.0 (as nanoGPT's train.py), update."""
  import torch

  sys.path.insert(0, os.path.abspath(args.nanogpt_dir))
  from model import GPT, GPTConfig  # nanoGPT's model.py

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if dev == "cuda":  # as nanoGPT's train.py; JAX's default GPU matmul precision also uses TF32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  torch.manual_seed(0)
  gcfg = GPTConfig(
    block_size=cfg.max_seq_len,
    vocab_size=cfg.vocab_size,
    n_layer=cfg.num_layers,
    n_head=cfg.num_heads,
    n_embd=cfg.d_model,
    dropout=0.0,
    bias=cfg.use_bias,
  )
  net = GPT(gcfg).to(dev)
  opt = net.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev)
  fwd = torch.compile(net) if compile_model else net
  g = torch.Generator().manual_seed(0)
  x = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len), generator=g).to(dev)
  y = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len), generator=g).to(dev)
  amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def run():
    # accum > 1: nanoGPT train.py's gradient accumulation (micro-batches, loss / accum each).
    for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
      with amp:
        _, loss = fwd(xm, ym)
      (loss / accum).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if dev == "cuda":
      torch.cuda.synchronize()

  return run


def torch_matmul_flops(n: int, reps: int = 5) -> float:
  import torch

  a = torch.randn(n, n)
  a @ a
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def torch_peak_memory() -> str:
  import torch

  if torch.cuda.is_available():
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (device peak)"
  return "see JAX row"


# --- driver -----------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu_bench", help="model preset from gpt_jax.model.PRESETS")
  p.add_argument("--batch", type=int, default=16, help="rows per step")
  p.add_argument("--seq_len", type=int, default=0, help="sequence length (0: the preset's max_seq_len)")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
  p.add_argument(
    "--attention_impl",
    default="auto",
    help="auto | xla | cudnn | blocked; a comma list times each as its own row",
  )
  p.add_argument(
    "--layers",
    default="preset",
    choices=("preset", "scan", "unroll"),
    help="layer loop: the preset's model.scan_layers, lax.scan, or fully unrolled",
  )
  p.add_argument("--remat_policy", default="none", help="none | full | dots | dots_no_batch")
  p.add_argument(
    "--xent_chunk",
    type=int,
    default=0,
    help="time steps per chunk of the chunked cross-entropy (0: full logits, as pretraining)",
  )
  p.add_argument("--document_mask", action="store_true", help="time the packed-documents attention path")
  p.add_argument(
    "--grad_accum",
    default="1",
    help="micro-batches per step (train.grad_accum; nanoGPT's gradient_accumulation_steps for the "
    "PyTorch rows); a comma list times each as its own row",
  )
  p.add_argument("--rounds", type=int, default=5, help="turns each implementation takes")
  p.add_argument("--steps", type=int, default=2, help="timed steps per turn")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
  p.add_argument("--nanogpt_dir", default="", help="directory holding nanoGPT's model.py (reference)")
  p.add_argument("--torch_compile", action="store_true", help="also time torch.compile(nanoGPT)")
  p.add_argument("--no_jax", action="store_true", help="time only the PyTorch rows")
  p.add_argument(
    "--matmul_n", type=int, default=0, help="size of the measured matmul (0: 2048 CPU, 8192 GPU)"
  )
  p.add_argument("--peak_flops", type=float, default=0.0, help="peak FLOP/s per device for MFU")
  p.add_argument("--xla_flags", default="", help="extra XLA flags for this run")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  # The platform must be known before JAX starts (flags are read once), so look for an NVIDIA device node.
  gpu = os.environ.get("JAX_PLATFORMS", "") != "cpu" and os.path.exists("/dev/nvidia0")
  os.environ["XLA_FLAGS"] = xla_flags("gpu" if gpu else "cpu", args.xla_flags)
  if args.nanogpt_dir:  # JAX would otherwise take 75% of GPU memory up front and starve PyTorch
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  matmul_n = args.matmul_n or (8192 if gpu else 2048)
  if args.nanogpt_dir and not os.path.exists(os.path.join(args.nanogpt_dir, "model.py")):
    sys.exit(f"--nanogpt_dir: expected a nanoGPT checkout with model.py, found none in {args.nanogpt_dir!r}")
  import jax

  from gpt_jax import metrics, model

  runners: dict[str, object] = {}
  notes: dict[str, str] = {}
  cfg = model.preset(args.preset, **({"max_seq_len": args.seq_len} if args.seq_len else {}))
  compile_s: dict[str, float] = {}
  impls = args.attention_impl.split(",")
  accums = [int(a) for a in args.grad_accum.split(",")]
  if any(a < 1 or args.batch % a for a in accums):
    sys.exit(f"--grad_accum: each of {args.grad_accum} must be >= 1 and divide --batch={args.batch}")

  for impl in impls if not args.no_jax else ():
    for accum in accums:
      parts = (f", attention={impl}" if len(impls) > 1 else "") + (
        f", accum={accum}" if len(accums) > 1 else ""
      )
      name = f"jax (gpt_jax{parts})"
      runners[name], info = jax_runner(args, impl, accum)
      compile_s[name], cfg = info["compile_s"], info["cfg"]
  torch_threads = None
  if args.nanogpt_dir:
    import torch

    torch_threads = torch.get_num_threads()
    for accum in accums:
      tag = f", accum={accum}" if len(accums) > 1 else ""
      runners[f"torch eager (nanoGPT{tag})"] = torch_runner(args, cfg, False, accum)
      if args.torch_compile:
        runners[f"torch.compile (nanoGPT{tag})"] = torch_runner(args, cfg, True, accum)
  else:
    print("reference PyTorch rows skipped: pass --nanogpt_dir <directory with nanoGPT's model.py>")

  # Warm-up (compilation) per implementation; a failure becomes a row note instead of a crash.
  for name in list(runners):
    t0 = time.perf_counter()
    try:
      for _ in range(args.warmup):
        runners[name]()
    except Exception as e:  # noqa: BLE001 - report e.g. a torch.compile failure as a row
      notes[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
      del runners[name]
      continue
    notes[name] = f"warm-up {time.perf_counter() - t0:.1f} s"
  for name, seconds in compile_s.items():
    if name in notes:
      notes[name] = f"compile {seconds:.1f} s; " + notes[name]

  # Turns: A B C A B C ... so slow drifts of a shared, noisy machine affect every row alike.
  # Process CPU time per step is kept beside wall time: on a shared machine it moves far less with
  # other people's load than wall time does (it counts only the time our threads actually ran).
  times: dict[str, list[float]] = {n: [] for n in runners}
  cpu_times: dict[str, list[float]] = {n: [] for n in runners}
  for _ in range(args.rounds):
    for name, run in runners.items():
      for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times[name].append(time.perf_counter() - t0)
        cpu_times[name].append(time.process_time() - c0)

  device = jax.devices()[0]
  tokens = args.batch * cfg.max_seq_len
  fpt = model.flops_per_token(cfg, cfg.max_seq_len)
  peak = args.peak_flops or metrics.peak_flops_per_device(device, args.dtype)
  measured = jax_matmul_flops(args.dtype, matmul_n)
  print(
    f"\nmachine: {machine_line()}; JAX {jax.__version__} on {device.device_kind} "
    f"({jax.device_count()} device(s)); torch threads: {torch_threads}"
  )
  print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(none)'}")
  print(
    f"config: preset={args.preset} L={cfg.num_layers} H={cfg.num_heads} D={cfg.d_model} "
    f"T={cfg.max_seq_len} V={cfg.vocab_size} B={args.batch} dtype={args.dtype} scan_layers={cfg.scan_layers} "
    f"remat={cfg.remat_policy} attention={args.attention_impl} document_mask={args.document_mask} "
    f"xent_chunk={args.xent_chunk}"
  )
  line = (
    f"model FLOPs/token (6N + 12LHQT): {fpt / 1e6:.1f} M; measured {args.dtype} matmul peak "
    f"(n={matmul_n}): JAX {measured / 1e9:.1f} GFLOP/s"
  )
  if args.nanogpt_dir and args.dtype == "float32" and device.platform == "cpu":
    line += f", torch {torch_matmul_flops(matmul_n) / 1e9:.1f} GFLOP/s"
  print(line)
  print(
    f"timed: {args.rounds} turns x {args.steps} steps per implementation, warm-up excluded; ms/step and "
    "tokens/s are wall-clock medians, CPU ms the median process CPU time per step (all threads)"
  )
  # "vs eager" is against the first eager PyTorch row (accumulation as the first --grad_accum).
  eager = next((n for n in times if n.startswith("torch eager") and times[n]), None)
  ref = statistics.median(times[eager]) if eager else None
  head = (
    f"{'implementation':<34}{'ms/step':>10}{'min ms':>10}{'tokens/s':>11}{'vs eager':>10}"
    f"{'CPU ms':>10}{'MFU(spec)':>11}{'MFU(meas)':>11}  notes"
  )
  print(head + "\n" + "-" * len(head))
  for name in list(times) + [n for n in notes if n not in times]:
    if name not in times:
      print(f"{name:<34}{'-':>10}{'-':>10}{'-':>11}{'-':>10}{'-':>10}{'-':>11}{'-':>11}  {notes[name]}")
      continue
    med = statistics.median(times[name])
    tps = tokens / med
    ratio = f"{ref / med:.2f}x" if ref else "-"
    mfu_spec = f"{100 * tps * fpt / peak:.1f}%" if peak else "n/a"
    mfu_meas = f"{100 * tps * fpt / measured:.1f}%"
    cpu_ms = _median_ms(cpu_times[name])
    print(
      f"{name:<34}{1e3 * med:>10.1f}{1e3 * min(times[name]):>10.1f}{tps:>11.0f}{ratio:>10}{cpu_ms:>10.0f}"
      f"{mfu_spec:>11}{mfu_meas:>11}  {notes[name]}"
    )
  mem = jax_peak_memory(device) if not args.no_jax else "-"
  print(f"peak memory: jax {mem}; torch {torch_peak_memory() if args.nanogpt_dir else '-'}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
