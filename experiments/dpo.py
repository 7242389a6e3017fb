"""DPO configs: `get_config("PRESET")`; the model is the SFT (= pretraining) preset's.

  python -m gpt_jax dpo --config=experiments/dpo.py:tiny --config.train.init_from=/tmp/gpt_jax/sft \
      --workdir=/tmp/gpt_jax/dpo

Presets: tiny (CPU demo on the embedded task comparisons, the reward model's data), tiny_ipo (IPO),
gpt2_124m, llama_7b. train.global_batch counts ROWS: each pair takes two (chosen, rejected). Give
dpo.data_path (and dpo.eval_path) to learn from your own comparisons (the reward model's format).
"""

import os

from gpt_jax import config as config_lib
from gpt_jax.stages import dpo

_HERE = os.path.dirname(os.path.abspath(__file__))
# preset -> the pretraining preset whose model it is, and the keys that differ from the defaults.
# tiny: the embedded pairs render to at most 41 tokens, so seq_len 48 drops none.
_PRESETS = {
  "tiny": {
    "model": "tiny",
    "train.steps": 60,
    "train.global_batch": 64,
    "train.seq_len": 48,
    "train.eval_every": 30,
    "train.checkpoint_every": 30,
    "train.eval_batches": 16,
    "optim.lr_peak": 1e-4,
    "optim.warmup_steps": 10,
    "optim.weight_decay": 0.0,
    # Chosen on the dev split from the demo's SFT model (docs/results.md, "DPO"): plain DPO lowered
    # dev gold 62.3% -> 52.3% in 100 steps (the chosen answers' log-probs fell too); with the chosen
    # answers' token loss at weight 1, 62.3% -> 61.9% at 85.7% implicit-reward accuracy.
    "dpo.sft_coef": 1.0,
  },
  # One epoch over ~100k pairs at Zephyr's rate (5e-7 at 7B; higher for a small model), beta 0.1.
  "gpt2_124m": {
    "model": "gpt2_124m",
    "train.steps": 1600,
    "train.global_batch": 128,
    "train.seq_len": 256,
    "train.eval_every": 200,
    "train.checkpoint_every": 400,
    "train.eval_batches": 32,
    "optim.lr_peak": 1e-6,
    "optim.warmup_steps": 50,
    "optim.weight_decay": 0.0,
    "tasks.digits": 4,
    "tasks.list_len": 8,
    "tasks.word_len": 8,
    "tasks.train": 100_000,
    "tasks.eval": 2000,
  },
  "llama_7b": {
    "model": "llama_7b",
    "train.steps": 1600,
    "train.global_batch": 128,
    "train.seq_len": 512,
    "train.eval_every": 200,
    "train.checkpoint_every": 200,
    "train.eval_batches": 32,
    "optim.lr_peak": 5e-7,
    "optim.warmup_steps": 50,
    "optim.weight_decay": 0.0,
    "tasks.digits": 6,
    "tasks.list_len": 12,
    "tasks.word_len": 12,
    "tasks.train": 100_000,
    "tasks.eval": 2000,
    "dpo.max_new_tokens": 32,
  },
}
_PRESETS["tiny_ipo"] = {**_PRESETS["tiny"], "dpo.loss": "ipo"}


def get_config(arg: str = "tiny"):
  return config_lib.experiment(
    dpo.default_config(), _PRESETS, arg, "experiments/dpo.py", model_from=os.path.join(_HERE, "pretrain.py")
  )
