"""The data config: every key with its default, for the embedded default corpus.

Nested as `config.data` in the stage configs, so each key can be overridden from the command line,
e.g. `--config.data.sources.web.weight=0.3` or `--config.data.tokenizer.vocab_size=8192`, and the
whole section can be replaced by a data config file, `--config.data=experiments/data/files.py:PATHS`
(any FILE.py:ARG whose get_config(ARG) returns a data config; see docs/data.md).
"""

from __future__ import annotations

import ml_collections

from gpt_jax.config import Entries, Key, defaults
from gpt_jax.errors import ConfigError

TOKENIZER_KINDS = ("sentencepiece", "hf")

# One source entry (see gpt_jax/data/sources.py for what each key means).
SOURCE = {
  "paths": Key(""),  # comma-separated paths or globs (format 'embedded': parts of the default corpus)
  "format": Key(
    "text", choices=("text", "markdown", "jsonl", "parquet", "embedded", "auto")
  ),  # auto: by extension
  "weight": Key(1.0, "> 0"),
  "text_field": Key("text"),  # jsonl key / parquet column
  "separator": Key(""),  # text/markdown: split each file on this string ('' = one document per file)
  "min_chars": Key(1, ">= 0"),  # drop shorter documents
  "dedup": Key(False),  # drop exact duplicate documents
  "max_docs": Key(0, ">= 0"),  # keep at most this many documents (0: all)
  "on_bad_utf8": Key("", choices=("", "error", "replace")),  # '' = data.on_bad_utf8
}

# The embedded default corpus (about 12 MB; see sources.py). Weights: code 70%, web-like prose of the
# standard library 20%, reference docs 10%; the small sources are repeated over a budget of a few million tokens, like
# Wikipedia and Books in the LLaMA mixture.
_DEFAULT_SOURCES = {
  "code": dict(paths="stdlib_code", format="embedded", weight=0.70, dedup=True),
  "web": dict(paths="stdlib_prose", format="embedded", weight=0.20, dedup=True, min_chars=200),
  "docs": dict(paths="pydoc_topics", format="embedded", weight=0.10),
}

SCHEMA = {
  "sources": Entries(SOURCE, _DEFAULT_SOURCES),
  "seed": Key(0, ">= 0"),  # seeds the mixture and window order of the train loader
  "eval_fraction": Key(0.05, "(0, 1)"),  # documents held out by content hash (independent of the seed)
  "on_bad_utf8": Key("error", choices=("error", "replace")),  # 'replace': U+FFFD for bad bytes
  "tokenizer": {
    # sentencepiece: gpt_jax's own SentencePiece BPE, trained on the data ('' path) or read from `path`
    # (a tokenizer.model made by gpt_jax); hf: a Hugging Face tokenizer directory at `path`
    # (tokenizer.json, or a tokenizer.model, beside tokenizer_config.json). With train.init_from the
    # tokenizer is the init run's and neither key is read (path must stay '').
    "kind": Key("sentencepiece", choices=TOKENIZER_KINDS),
    "path": Key(""),
    # Training a sentencepiece tokenizer:
    "vocab_size": Key(4096, ">= 300"),  # below this the byte pieces and specials leave no room for merges
    "sample_bytes": Key(4_000_000, "> 0"),  # UTF-8 bytes of train documents to train on, split by weight
    "max_doc_chars": Key(65536, "> 0"),  # cap on one document's share of the sample
  },
  "shard_tokens": Key(1 << 20, ">= 1024"),
  "num_workers": Key(0, ">= 0", resumable=True),  # encoding processes; 0: one per CPU core
  "verify_hash": Key(True, resumable=True),  # hash every shard on prepare (not only its size)
  "progress": Key(True, resumable=True),  # tqdm bar while tokenizing
  "document_mask": Key(True),  # packed documents do not attend to each other
}


def source_config(paths: str, format: str, weight: float, **overrides) -> ml_collections.ConfigDict:
  """One source entry with every key of SOURCE."""
  cfg = defaults(SOURCE)
  cfg.update(dict(paths=paths, format=format, weight=float(weight), **overrides))
  return cfg


def default_data_config() -> ml_collections.ConfigDict:
  """The data config of the embedded default corpus (SCHEMA's defaults)."""
  return defaults(SCHEMA)


def check(data_cfg, init_from: str = "") -> None:
  """The data keys against each other (types, bounds and choices are SCHEMA's): the tokenizer's kind
  and path, and continued pretraining (train.init_from = `init_from`), which uses the init run's."""
  t = data_cfg.tokenizer
  if init_from and str(t.path):
    raise ConfigError(
      f"data.tokenizer.path: {t.path!r}, but train.init_from={init_from!r} brings its own tokenizer "
      "(continued pretraining keeps the init run's token ids); leave data.tokenizer.path ''"
    )
  if not init_from and t.kind == "hf" and not str(t.path):
    raise ConfigError(
      "data.tokenizer.path: required with data.tokenizer.kind='hf' (a Hugging Face tokenizer directory "
      "holding tokenizer.json or tokenizer.model)"
    )
