"""The slide-style hyperparameter table of a config: what the model is, how it is trained, and the
compute that implies.

  python -m gpt_jax describe --config=experiments/pretrain.py:llama_65b --devices=2048 --device=a100 --mfu=0.5

The compute rows: training FLOPs (6N·D plus attention, PaLM appendix B; the same count as the MFU the
training loop logs), their petaflop/s-days (GPT-3's unit), and the days and device-hours of
`devices` devices of peak FLOP/s `device` (a name of DEVICES, or a number) at model FLOPs
utilization `mfu`.
"""

from __future__ import annotations

from gpt_jax import metrics
from gpt_jax import model as model_lib
from gpt_jax.errors import ConfigError

# --device NAME -> the device kind of metrics.PEAK_FLOPS whose dense peak it has.
DEVICES = {
  "a100": "NVIDIA A100-SXM4-80GB",
  "h100": "NVIDIA H100",
  "h100-pcie": "NVIDIA H100 PCIe",
  "h200": "NVIDIA H200",
  "l4": "NVIDIA L4",
  "tpu-v4": "TPU v4",
  "tpu-v5e": "TPU v5e",
  "tpu-v5p": "TPU v5p",
  "tpu-v6e": "TPU v6e",
}


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def _amount(n: float) -> str:
  """A count with thousands separators, or three significant digits below 100."""
  return f"{n:,.0f}" if abs(n) >= 100 else f"{n:.3g}"


def device_peak(device: str, dtype: str) -> tuple[str, float]:
  """(name, dense peak FLOP/s) of `device`: a name of DEVICES (its peak for `dtype`) or a number of
  FLOP/s such as 312e12. ConfigError naming --device otherwise."""
  name = str(device).strip().lower()
  if name in DEVICES:
    peaks = metrics.PEAK_FLOPS[DEVICES[name]]
    key = "float32" if str(dtype) == "float32" else "bfloat16"
    return f"{name} ({peaks[key] / 1e12:g} TFLOP/s {key})", float(peaks[key])
  try:
    peak = float(name)
  except ValueError:
    raise ConfigError(
      f"--device: unknown device {device!r}; expected one of {', '.join(DEVICES)} or a peak in FLOP/s (e.g. 312e12)"
    ) from None
  if not peak > 0:
    raise ConfigError(f"--device: a peak FLOP/s must be positive, got {device!r}")
  return f"{peak / 1e12:g} TFLOP/s", peak


def summary(cfg) -> dict:
  """Numbers for one stage config: model shape, parameters, tokens, training FLOPs, hyperparameters."""
  m = model_lib.ModelConfig.from_config(cfg.model)
  n_params = model_lib.param_count(m)
  t, o = cfg.train, cfg.optim
  batch_tokens = int(t.global_batch) * int(t.seq_len)
  tokens = int(t.steps) * batch_tokens
  flops_per_token = model_lib.flops_per_token(m, int(t.seq_len))
  return {
    "family": m.family,
    "vocab_size": m.vocab_size,
    "context_length": m.max_seq_len,
    "layers": m.num_layers,
    "heads": m.num_heads,
    "kv_heads": m.kv_heads,
    "head_dim": m.q_dim,
    "width": m.d_model,
    "ffn_width": m.ffn_dim,
    "dtype": m.dtype,
    "parameters": n_params,
    "steps": int(t.steps),
    "batch_sequences": int(t.global_batch),
    "seq_len": int(t.seq_len),
    "batch_tokens": batch_tokens,
    "tokens": tokens,
    "training_flops": flops_per_token * tokens,
    "flops_per_token": flops_per_token,
    "flops_6nd": 6 * model_lib.flops_param_count(m) * tokens,  # what the GPT-3 paper counts
    "lr_peak": float(o.lr_peak),
    "warmup_steps": int(o.warmup_steps),
    "schedule": str(o.schedule),
    "decay_steps": int(o.decay_steps) or int(t.steps),
    "lr_end_ratio": float(o.lr_end_ratio),
    "weight_decay": float(o.weight_decay),
    "b1": float(o.b1),
    "b2": float(o.b2),
    "grad_clip_norm": float(o.grad_clip_norm),
  }


def compute(s: dict, *, devices: int, device: str, mfu: float) -> dict:
  """The compute a summary implies on `devices` devices of peak `device` at utilization `mfu`."""
  if int(devices) < 1:
    raise ConfigError(f"--devices: must be at least 1, got {devices}")
  if not 0 < float(mfu) <= 1:
    raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
  name, peak = device_peak(device, s["dtype"])
  device_seconds = s["training_flops"] / (peak * float(mfu))
  return {
    "device": name,
    "devices": int(devices),
    "mfu": float(mfu),
    "petaflop_s_days": s["training_flops"] / (1e15 * 86400),
    "device_hours": device_seconds / 3600,
    "days": device_seconds / int(devices) / 86400,
    "tokens_per_s_per_device": s["tokens"] / device_seconds,
  }


def _schedule(s: dict) -> str:
  if s["schedule"] == "constant":
    return "constant after the warmup"
  return f"cosine to {s['lr_end_ratio']:.0%} of the peak at step {s['decay_steps']:,}"


def table(cfg, name: str = "", *, devices: int = 1, device: str = "a100", mfu: float = 0.4) -> str:
  s = summary(cfg)
  c = compute(s, devices=devices, device=device, mfu=mfu)
  rows = [
    ("model family", s["family"]),
    ("vocabulary size", f"{s['vocab_size']:,}"),
    ("context length", f"{s['context_length']:,}"),
    ("layers", s["layers"]),
    ("heads (query / key-value)", f"{s['heads']} / {s['kv_heads']}"),
    ("head width", s["head_dim"]),
    ("width (model / ffn)", f"{s['width']:,} / {s['ffn_width']:,}"),
    ("parameters", f"{s['parameters']:,} ({_human(s['parameters'])})"),
    (
      "batch",
      f"{s['batch_sequences']:,} x {s['seq_len']:,} = {s['batch_tokens']:,} tokens ({_human(s['batch_tokens'])})",
    ),
    ("steps", f"{s['steps']:,}"),
    ("tokens to train on", f"{s['tokens']:,} ({_human(s['tokens'])})"),
    ("peak learning rate", f"{s['lr_peak']:.2e}"),
    ("warmup", f"{s['warmup_steps']:,} steps ({_human(s['warmup_steps'] * s['batch_tokens'])} tokens)"),
    ("schedule", _schedule(s)),
    ("weight decay", f"{s['weight_decay']:g}"),
    ("optimizer", f"AdamW (b1 {s['b1']:g}, b2 {s['b2']:g}), gradient clip {s['grad_clip_norm']:g}"),
    (
      "training FLOPs (6N·D + attention)",
      f"{s['training_flops']:.3e} ({_amount(c['petaflop_s_days'])} petaflop/s-days)",
    ),
    ("  of which 6N·D", f"{s['flops_6nd']:.3e} ({_amount(s['flops_6nd'] / 8.64e19)} petaflop/s-days)"),
    ("compute at", f"{c['devices']:,} x {c['device']} at {c['mfu']:.0%} MFU"),
    ("  days", f"{c['days']:,.1f}" if c["days"] >= 1 else f"{c['days']:.2g} ({c['days'] * 24:.2g} hours)"),
    (
      "  device-hours",
      _amount(c["device_hours"]) + (f" ({_human(c['device_hours'])})" if c["device_hours"] >= 1e4 else ""),
    ),
    ("  tokens/s per device", f"{c['tokens_per_s_per_device']:,.0f}"),
  ]
  width = max(len(k) for k, _ in rows)
  head = f"{name}\n" if name else ""
  return head + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
