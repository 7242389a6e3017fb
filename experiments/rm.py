"""Reward-model configs: `get_config("PRESET")`; the model is the pretraining (= SFT) preset's.

  python -m gpt_jax rm --config=experiments/rm.py:tiny --config.train.init_from=/tmp/gpt_jax/sft \
      --workdir=/tmp/gpt_jax/rm
  python -m gpt_jax score --workdir=/tmp/gpt_jax/rm --prompt="Add 2 and 3." --response="5"

Presets: tiny (CPU demo on the embedded comparisons), tiny_gpt2, gpt2_124m, llama_7b. train.global_batch
counts ROWS: each pair takes two (chosen, rejected). With rm.data_path '' the embedded comparisons
(derived from the graded tasks) are written to <workdir>/data/{train,eval}.jsonl; give a JSONL of
{"prompt", "chosen", "rejected"} or {"prompt", "ranking": [best, ..., worst]} to train on your own.
"""

import os

import ml_collections

from gpt_jax import config as config_lib

# preset -> (pretraining preset, train overrides, optim overrides, rm overrides)
# tiny: the embedded pairs render to at most 41 tokens, so seq_len 48 drops none.
_PRESETS = {
  "tiny": (
    "tiny",
    # From the demo's 56% SFT model, 400 steps: 32 rows at lr 1e-3 reached 86.7% held-out accuracy,
    # 32 rows at 5e-4 88.5% / 88.9% (two seeds), these 64 rows at 5e-4 90.0% / 89.8% / 91.0% (three).
    dict(steps=400, global_batch=64, seq_len=48, eval_every=200, checkpoint_every=200, eval_batches=64),
    dict(lr_peak=5e-4, warmup_steps=10, weight_decay=0.0),
    dict(),
  ),
  "tiny_gpt2": (
    "tiny_gpt2",
    dict(steps=150, global_batch=32, seq_len=48, eval_every=50, checkpoint_every=50, eval_batches=64),
    dict(lr_peak=1e-3, warmup_steps=10, weight_decay=0.0),
    dict(),
  ),
  # One epoch over ~100k pairs at a low rate: reward models overfit after one epoch (InstructGPT).
  "gpt2_124m": (
    "gpt2_124m",
    dict(steps=1600, global_batch=128, seq_len=256, eval_every=200, checkpoint_every=400, eval_batches=32),
    dict(lr_peak=1e-5, warmup_steps=50, weight_decay=0.0),
    dict(
      task_digits=4, task_list_len=8, task_word_len=8, task_train=100_000, task_eval=2000, stats_samples=1024
    ),
  ),
  # InstructGPT's RM recipe scaled to 7B: batch 64 prompts (here 128 rows = 64 pairs), lr 9e-6, 1 epoch.
  "llama_7b": (
    "llama_7b",
    dict(steps=1600, global_batch=128, seq_len=512, eval_every=200, checkpoint_every=200, eval_batches=32),
    dict(lr_peak=9e-6, warmup_steps=50, weight_decay=0.0),
    dict(
      task_digits=6,
      task_list_len=12,
      task_word_len=12,
      task_train=100_000,
      task_eval=2000,
      stats_samples=1024,
    ),
  ),
}


def rm_config(**overrides) -> ml_collections.ConfigDict:
  """The cfg.rm keys with their defaults."""
  c = ml_collections.ConfigDict(
    dict(
      data_path="",  # '' = the embedded comparisons, written to <workdir>/data/{train,eval}.jsonl
      eval_path="",  # '' with data_path: hold out eval_fraction of the prompts of data_path by hash
      eval_fraction=0.05,
      seed=0,  # order of prompts in each epoch
      use_margin=False,  # subtract each pair's "margin" inside the log-sigmoid (Llama 2)
      center_coef=0.0,  # coef * (r_chosen + r_rejected)^2 keeps rewards near 0
      require_sft=True,  # train.init_from must be a checkpoint written by the SFT stage
      # The embedded comparisons (gpt_jax/data/tasks.py): the same task knobs as experiments/sft.py.
      task_kinds="add,reverse,sort,upper",
      task_digits=2,
      task_list_len=4,
      task_word_len=4,
      task_eval_fraction=0.2,
      task_train=8000,
      task_eval=512,
      task_seed=1,
      rambling_fraction=0.25,  # share of pairs "bare answer > the same answer wrapped in filler"
      # The SFT model's own graded mistakes as rejected replies (InstructGPT ranks model samples): one
      # reply sampled for each of the first policy_train / policy_eval prompts; wrong ones become pairs.
      policy_train=0,
      policy_eval=0,
      policy_temperature=1.0,
      # reward_stats.json: the RM's reward mean/std over the SFT model's own samples (for PPO).
      stats_samples=256,
      stats_max_new_tokens=16,
      stats_temperature=1.0,
      stats_batch=64,
    )
  )
  c.update(overrides)
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"experiments/rm.py: unknown preset {arg!r}; known: {', '.join(_PRESETS)}")
  pretrain_name, train, optim, rm = _PRESETS[arg]
  # The model is exactly the SFT (= pretraining) one.
  here = os.path.dirname(os.path.abspath(__file__))
  cfg = config_lib.stage_config("rm", os.path.join(here, f"pretrain.py:{pretrain_name}"))
  cfg.train.update(train)
  cfg.optim.update(dict(schedule="cosine", lr_end_ratio=0.1))
  cfg.optim.update(optim)
  cfg.rm = rm_config(**rm)
  return cfg
