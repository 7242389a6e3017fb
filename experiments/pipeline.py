"""The whole recipe as one config: `get_config("demo")` nests each entry's own stage config.

  python -m gpt_jax pipeline --config=experiments/pipeline.py:demo --workdir=runs/demo

Each entry's keys are its experiment file's (experiments/pretrain.py, sft.py, rm.py, dpo.py, ppo.py,
grpo.py), so a larger run differs only in the presets named here and in sizes and paths, e.g.
`--config.pretrain.train.steps=2000`. The pipeline fills in how entries feed each other (init runs,
the RL stages' SFT and reward-model runs, DPO's comparisons), gives every entry the pretrained model's
shape and SFT's task space, and runs them in `stages` order.
"""

import os

import ml_collections

from gpt_jax import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# preset -> {entry name: "experiment file:preset"}, in recipe order
_PRESETS = {
  "demo": {
    "pretrain": "pretrain.py:tiny",
    "sft": "sft.py:tiny",
    "rm": "rm.py:tiny",
    "dpo": "dpo.py:tiny",
    "ppo": "ppo.py:tiny",
    "grpo": "grpo.py:tiny",
  },
}


def get_config(arg: str = "demo"):
  entries = config_lib.preset(_PRESETS, arg, "experiments/pipeline.py")
  cfg = ml_collections.ConfigDict()
  cfg.stage = "pipeline"
  cfg.stages = ",".join(entries)
  # What the report's evaluation table measures every model on after the stages (`eval --tasks`
  # syntax, docs/eval.md; '' for none): the SFT run's held-out embedded prompts, and bits per byte on
  # the held-out documents of the pretraining source 'docs' (the reference prose).
  cfg.eval_tasks = "embedded,bpb:docs"
  for name, spec in entries.items():
    cfg[name] = config_lib.load_file(os.path.join(_HERE, spec))
  return cfg
