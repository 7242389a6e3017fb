"""Data: sources and mixture, SentencePiece tokenizer, tokenized shards, resumable loader.

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
  "Tokenizer": "tokenizer",
  "check_vocab": "tokenizer",
  "load_tokenizer": "tokenizer",
  "load_any_tokenizer": "tokenizer",
  "Loader": "loader",
  "make_loader": "loader",
}

__all__ = [
  "Loader",
  "Prepared",
  "Tokenizer",
  "check_vocab",
  "default_data_config",
  "load_any_tokenizer",
  "load_tokenizer",
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
