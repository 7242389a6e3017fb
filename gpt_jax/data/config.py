"""The data config: every key with its default, for the embedded default corpus.

Nested as `config.data` in the stage configs, so each key can be overridden from the command line,
e.g. `--config.data.sources.web.weight=0.3` or `--config.data.tokenizer.vocab_size=8192`.
"""

from __future__ import annotations

import ml_collections


def source_config(paths: str, format: str, weight: float, **overrides) -> ml_collections.ConfigDict:
  """Returns one source entry with every key (see gpt_jax/data/sources.py for their meaning).

  paths: comma-separated paths or globs (or, for format 'embedded', parts of the default corpus).
  """
  cfg = ml_collections.ConfigDict(
    {
      "paths": paths,
      "format": format,
      "weight": float(weight),
      "text_field": "text",  # jsonl key / parquet column
      "separator": "",  # text/markdown: split each file on this string ('' = one document per file)
      "min_chars": 1,  # drop shorter documents
      "dedup": False,  # drop exact duplicate documents
      "max_docs": 0,  # keep at most this many documents (0: all)
      "on_bad_utf8": "",  # '' = data.on_bad_utf8
    }
  )
  cfg.update(overrides)
  return cfg


def default_data_config() -> ml_collections.ConfigDict:
  """Returns the data config for the embedded default corpus (about 13 MB; see sources.py).

  Weights: code 70%, web-like package descriptions 20%, reference docs 10%; the small sources are
  repeated over a budget of a few million tokens, like Wikipedia and Books in the LLaMA mixture.
  """
  return ml_collections.ConfigDict(
    {
      "sources": {
        "code": source_config("stdlib_code", "embedded", 0.70, dedup=True),
        "web": source_config("package_descriptions", "embedded", 0.20, dedup=True, min_chars=200),
        "docs": source_config("pydoc_topics", "embedded", 0.10),
      },
      "seed": 0,  # seeds the mixture and window order of the train loader
      "eval_fraction": 0.05,  # documents held out by content hash (independent of the seed)
      "on_bad_utf8": "error",  # 'error': stop naming the file; 'replace': U+FFFD for bad bytes
      "tokenizer": {
        "vocab_size": 4096,
        "sample_bytes": 4_000_000,  # UTF-8 bytes of train documents to train on, split by weight
        "max_doc_chars": 65536,  # cap on one document's share of the sample
        "model_path": "",  # use this SentencePiece model instead of training one
      },
      "shard_tokens": 1 << 20,
      "num_workers": 0,  # encoding processes; 0: one per CPU core
      "verify_hash": True,  # hash every shard on prepare (not only its size)
      "progress": True,  # tqdm bar while tokenizing
      "document_mask": True,  # packed documents do not attend to each other
    }
  )
