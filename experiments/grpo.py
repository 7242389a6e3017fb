"""GRPO configs: `get_config("PRESET")`; the policy model is the SFT preset's.

  python -m gpt_jax grpo --config=experiments/grpo.py:tiny --config.grpo.sft_workdir=/tmp/gpt_jax/sft \
      --workdir=/tmp/gpt_jax/grpo

Presets: tiny (CPU demo on the embedded graded tasks, the grader as the reward), tiny_rm (the same
against the learned reward model alone: the over-optimization curve), gpt2_124m, llama_7b. One iteration
samples grpo.samples_per_prompt answers to each of grpo.prompts_per_iteration training prompts;
train.checkpoint_every counts iterations.
"""

import os

from gpt_jax import config as config_lib
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.stages import grpo

_HERE = os.path.dirname(os.path.abspath(__file__))
# Every preset: no weight decay (the KL term, not decay, keeps the policy near the reference), a
# constant rate, and a checkpoint every 10 iterations.
_COMMON = {
  "train.checkpoint_every": 10,
  "train.log_every": 1,
  "optim.warmup_steps": 5,
  "optim.schedule": "constant",
  "optim.weight_decay": 0.0,
  "optim.b2": 0.99,
}
# preset -> the SFT preset whose model it tunes, and the keys that differ from the defaults
_PRESETS = {
  # CPU demo: 64 of 192 sampled prompts (dynamic sampling), 4 answers each, one update per iteration.
  # Chosen on the dev split (data/tasks.py) from the demo's SFT model: 16 prompts x 8 answers moved
  # dev gold by -3..+1 points, lr 1e-3 collapsed it, 64 x 4 at 2e-4 gained the most. 16 iterations
  # (~5 s each on 2 CPU cores) keep the demo within its time budget; longer runs: docs/results.md.
  "tiny": {
    "model": "tiny",
    "grpo.iterations": 16,
    "grpo.prompts_per_iteration": 64,
    "grpo.samples_per_prompt": 4,
    "grpo.oversample": 3,
    "grpo.minibatch": 256,
    "grpo.kl_coef": 0.05,
    "grpo.eval_every": 8,
    "optim.lr_peak": 2e-4,
    "optim.warmup_steps": 0,
  },
  # DeepSeekMath's GRPO settings scaled down: 64 prompts x 8 samples, one update per iteration.
  "gpt2_124m": {
    "model": "gpt2_124m",
    "grpo.iterations": 200,
    "grpo.prompts_per_iteration": 64,
    "grpo.samples_per_prompt": 8,
    "grpo.minibatch": 128,
    "grpo.max_new_tokens": 32,
    "tasks.train": 200_000,
    "optim.lr_peak": 1e-6,
  },
  "llama_7b": {
    "model": "llama_7b",
    "grpo.iterations": 256,
    "grpo.prompts_per_iteration": 64,
    "grpo.samples_per_prompt": 16,
    "grpo.minibatch": 256,
    "grpo.max_new_tokens": 64,
    "tasks.train": 200_000,
    "optim.lr_peak": 1e-6,
  },
}
_PRESETS["tiny_rm"] = {**_PRESETS["tiny"], "grpo.gold_weight": 0.0, "grpo.rm_weight": 1.0}
_PRESETS = {name: {**_COMMON, **keys} for name, keys in _PRESETS.items()}


def get_config(arg: str = "tiny"):
  # The policy is exactly the SFT model, in the SFT run's task space.
  take = ("model", *(f"tasks.{k}" for k in tasks_lib.SPACE_KEYS))
  return config_lib.experiment(
    grpo.default_config(),
    _PRESETS,
    arg,
    "experiments/grpo.py",
    model_from=os.path.join(_HERE, "sft.py"),
    take=take,
  )
