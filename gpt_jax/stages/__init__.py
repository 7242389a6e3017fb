"""The stages of the recipe, one module each (its SCHEMA, default_config(), validate() and run()).

A stage never imports another: a stage reads what an earlier one left through runs.py.
"""

from __future__ import annotations

import importlib

# The recipe's order: a stage may start from the runs of the stages before it.
ORDER = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo")


def module(name: str):
  """The module of stage `name` (imported on first use)."""
  if name not in ORDER:
    from gpt_jax.errors import ConfigError

    raise ConfigError(f"stage {name!r} is unknown; known: {', '.join(ORDER)}")
  return importlib.import_module(f"gpt_jax.stages.{name}")
