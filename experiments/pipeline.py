"""The whole recipe as one config: `get_config("demo")` nests each stage's own config.

  python -m gpt_jax pipeline --config=experiments/pipeline.py:demo --workdir=runs/demo

Each stage's keys are its experiment file's (experiments/pretrain.py, sft.py, rm.py, ppo.py), so a
larger run differs only in the presets named here and in sizes and paths, e.g.
`--config.pretrain.train.steps=2000`. The pipeline fills in how stages feed each other
(sft.train.init_from, rm.train.init_from, ppo.ppo.sft_workdir / rm_workdir).
"""

import os

import ml_collections

from gpt_jax import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# preset -> the preset of each stage's experiment file
_PRESETS = {
  "demo": dict(pretrain="tiny", sft="tiny", rm="tiny", ppo="tiny"),
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  if arg not in _PRESETS:
    raise ValueError(f"experiments/pipeline.py: unknown preset {arg!r}; known: {', '.join(_PRESETS)}")
  cfg = ml_collections.ConfigDict()
  cfg.stage = "pipeline"
  cfg.stages = "pretrain,sft,rm,ppo"
  for stage, preset in _PRESETS[arg].items():
    cfg[stage] = config_lib.load(os.path.join(_HERE, f"{stage}.py:{preset}"))
  return cfg
