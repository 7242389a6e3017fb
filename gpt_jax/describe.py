"""The slide-style hyperparameter table of a config: what the model is and what training it costs."""

from __future__ import annotations

from gpt_jax import model as model_lib


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def summary(cfg) -> dict:
  """Numbers for one stage config: model shape, parameters, tokens and training FLOPs."""
  m = model_lib.ModelConfig.from_config(cfg.model)
  n_params = model_lib.param_count(m)
  tokens = int(cfg.train.steps) * int(cfg.train.global_batch) * int(cfg.train.seq_len)
  flops_per_token = model_lib.flops_per_token(m, int(cfg.train.seq_len))
  return {
    "family": m.family,
    "vocab_size": m.vocab_size,
    "context_length": m.max_seq_len,
    "layers": m.num_layers,
    "heads": m.num_heads,
    "kv_heads": m.kv_heads,
    "width": m.d_model,
    "ffn_width": m.ffn_dim,
    "parameters": n_params,
    "batch_tokens": int(cfg.train.global_batch) * int(cfg.train.seq_len),
    "tokens": tokens,
    "training_flops": flops_per_token * tokens,
    "flops_per_token": flops_per_token,
  }


def table(cfg, name: str = "") -> str:
  s = summary(cfg)
  rows = [
    ("model family", s["family"]),
    ("vocabulary size", f"{s['vocab_size']:,}"),
    ("context length", f"{s['context_length']:,}"),
    ("layers", s["layers"]),
    ("heads (query / key-value)", f"{s['heads']} / {s['kv_heads']}"),
    ("width (model / ffn)", f"{s['width']:,} / {s['ffn_width']:,}"),
    ("parameters", f"{s['parameters']:,} ({_human(s['parameters'])})"),
    ("batch (tokens)", f"{s['batch_tokens']:,}"),
    ("tokens to train on", f"{s['tokens']:,} ({_human(s['tokens'])})"),
    ("training FLOPs (6N·D + attention)", f"{s['training_flops']:.3e}"),
  ]
  width = max(len(k) for k, _ in rows)
  head = f"{name}\n" if name else ""
  return head + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
