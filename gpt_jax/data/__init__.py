"""Data: sources and mixture, SentencePiece tokenizer, tokenized shards, resumable loader.

    cfg = default_data_config()                        # the embedded default corpus
    prepared = prepare(cfg, workdir, token_budget=..., tokens_per_batch=...)
    loader = make_loader(prepared, "train", global_batch=B, seq_len=T, sharding=s, seed=0)

The loader (and with it JAX) is imported on first use, so the tokenizing worker processes, which
import this package, start without JAX.
"""

from gpt_jax.data.config import default_data_config, source_config
from gpt_jax.data.prepare import Prepared, prepare
from gpt_jax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer

_LAZY = {"make_loader", "Loader"}

__all__ = [
  "Loader",
  "Prepared",
  "Tokenizer",
  "check_vocab",
  "default_data_config",
  "load_tokenizer",
  "make_loader",
  "prepare",
  "source_config",
]


def __getattr__(name):
  if name in _LAZY:
    from gpt_jax.data import loader

    return getattr(loader, name)
  raise AttributeError(f"module 'gpt_jax.data' has no attribute {name!r}")
