"""Pretraining configs: `get_config("PRESET")`.

  python -m gpt_jax pretrain --config=experiments/pretrain.py:tiny --workdir=/tmp/gpt_jax/pretrain

Presets: tiny (CPU demo, LLaMA-style, 1.8M parameters), tiny_gpt2, cpu_bench (L=6 H=6 D=384 T=256),
gpt2_124m, gpt2_350m, llama_1b, llama_7b, llama_13b, llama_65b, gpt3_175b. The large presets carry
their papers' batch sizes, learning rates and token budgets (GPT-3: 300B tokens; LLaMA-65B: 1.4T) and
train on the LLaMA mixture (experiments/data/llama_mixture.py) once its paths are given.
"""

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax.data import default_data_config

# preset -> (model preset, train overrides, optim overrides)
_PRESETS = {
  # Sized so the whole demo pipeline fits in minutes on 2 CPU cores (2,048-token batches).
  "tiny": (
    "tiny",
    dict(steps=200, global_batch=16, seq_len=128, eval_every=100, checkpoint_every=100),
    dict(lr_peak=3e-3, warmup_steps=20),
  ),
  "tiny_gpt2": (
    "tiny_gpt2",
    dict(steps=300, global_batch=16, seq_len=256, eval_every=100, checkpoint_every=100),
    dict(lr_peak=3e-3, warmup_steps=30),
  ),
  "cpu_bench": (
    "cpu_bench",
    dict(steps=200, global_batch=16, seq_len=256),
    dict(lr_peak=1e-3, warmup_steps=20),
  ),
  # GPT-2 124M on ~10B tokens (0.5M-token batches), as commonly reproduced.
  "gpt2_124m": (
    "gpt2_124m",
    dict(
      steps=19073,
      global_batch=512,
      seq_len=1024,
      grad_accum=1,
      eval_every=250,
      checkpoint_every=1000,
      log_every=10,
    ),
    dict(lr_peak=6e-4, warmup_steps=715, weight_decay=0.1),
  ),
  "gpt2_350m": (
    "gpt2_350m",
    dict(steps=19073, global_batch=512, seq_len=1024, eval_every=250, checkpoint_every=1000),
    dict(lr_peak=3e-4, warmup_steps=715),
  ),
  "llama_1b": (
    "llama_1b",
    dict(steps=100_000, global_batch=512, seq_len=2048, eval_every=1000, checkpoint_every=1000),
    dict(lr_peak=4e-4, warmup_steps=2000),
  ),
  # LLaMA (Touvron et al. 2023): 4M-token batches, cosine to 10%, warmup 2000, wd 0.1, clip 1.0.
  "llama_7b": (
    "llama_7b",
    dict(steps=250_000, global_batch=2048, seq_len=2048, eval_every=1000, checkpoint_every=1000),
    dict(lr_peak=3e-4, warmup_steps=2000),
  ),
  "llama_13b": (
    "llama_13b",
    dict(steps=250_000, global_batch=2048, seq_len=2048, eval_every=1000, checkpoint_every=1000),
    dict(lr_peak=3e-4, warmup_steps=2000),
  ),
  "llama_65b": (
    "llama_65b",
    dict(steps=333_786, global_batch=2048, seq_len=2048, eval_every=1000, checkpoint_every=1000),
    dict(lr_peak=1.5e-4, warmup_steps=2000),
  ),
  # GPT-3 175B (Brown et al. 2020): 3.2M-token batches, 300B tokens, lr 0.6e-4.
  "gpt3_175b": (
    "gpt3_175b",
    dict(steps=95_367, global_batch=1536, seq_len=2048, eval_every=1000, checkpoint_every=1000),
    dict(lr_peak=0.6e-4, warmup_steps=375, b2=0.95),
  ),
}

_GPU_PRESETS = {"gpt2_124m", "gpt2_350m", "llama_1b", "llama_7b", "llama_13b", "llama_65b", "gpt3_175b"}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"experiments/pretrain.py: unknown preset {arg!r}; known: {', '.join(_PRESETS)}")
  model_name, train, optim = _PRESETS[arg]
  cfg = config_lib.base_config("pretrain")
  overrides = dict(dtype="bfloat16", remat_policy="dots_no_batch") if arg in _GPU_PRESETS else {}
  if arg in ("llama_7b", "llama_13b", "llama_65b", "gpt3_175b"):
    overrides["remat_policy"] = "full"
  cfg.model = config_lib.model_config_dict(model_name, **overrides)
  cfg.train.update(train)
  cfg.optim.update(optim)
  cfg.data = default_data_config()
  cfg.loss = ml_collections.ConfigDict(dict(z_loss=0.0))
  if arg in _GPU_PRESETS:
    cfg.data.tokenizer.vocab_size = min(cfg.model.vocab_size, 32000)
  return cfg
