"""Data: sources and mixture, tokenized shards, resumable loader (the tokenizers are gpt_jax.tokenizers).

cfg = default_data_config()                        # the embedded default corpus
prepared = prepare(cfg, workdir, token_budget=..., tokens_per_batch=...)
loader = make_loader(prepared, "train", global_batch=B, seq_len=T, sharding=s, seed=0)

"""

import importlib

# name -> submodule; imported on first use, so the tokenizing worker processes (which import this
# package) start in a fraction of a second and without JAX.
_EXPORTS = {
  "default_data_config": "config",
  "source_config": "config",
  "Prepared": "pipeline",
  "prepare": "pipeline",
  "Loader": "loader",
  "make_loader": "loader",
}

__all__ = [
  "Loader",
  "Prepared",
  "default_data_config",
  "make_loader",
  "prepare",
  "source_config",
]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"gpt_jax.data.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'gpt_jax.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
