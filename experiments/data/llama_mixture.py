"""The LLaMA pretraining mixture (Touvron et al. 2023, table 1) over corpora you supply.

  python -m gpt_jax pretrain --config=experiments/pretrain.py:llama_7b \
      --config.data=experiments/data/llama_mixture.py:/data/llama --workdir=DIR

  source          share   paper's epochs
  commoncrawl     67.0%   1.10
  c4              15.0%   1.06
  github           4.5%   0.64
  wikipedia        4.5%   2.45
  books            4.5%   2.23
  arxiv            2.5%   1.06
  stackexchange    2.0%   1.03

get_config(arg) where arg is either
  a root folder:  "/data/llama"  -> each source reads /data/llama/<source>/*.jsonl (field "text")
  or pairs:       "commoncrawl=/cc/*.parquet;c4=/c4/*.jsonl;...": paths per source ('=' and ';'),
                  the format follows the extension (.jsonl/.json: jsonl, .parquet: parquet,
                  .md: markdown, else text); unnamed sources keep <root>/<source>/*.jsonl.
Each source stays overridable, e.g. --config.data.sources.books.format=text. prepare() prints the
table above for your files: share of tokens and the epochs your token budget implies.
"""

from __future__ import annotations

import os

from gpt_jax.data import default_data_config, source_config

LLAMA_WEIGHTS = {
  "commoncrawl": 67.0,
  "c4": 15.0,
  "github": 4.5,
  "wikipedia": 4.5,
  "books": 4.5,
  "arxiv": 2.5,
  "stackexchange": 2.0,
}
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".md": "markdown"}


def _format_of(paths: str) -> str:
  first = paths.split(",")[0].strip()
  return _FORMATS.get(os.path.splitext(first)[1].lower(), "text")


def get_config(arg: str | None = None):
  """Returns the data config of the LLaMA mixture over the paths in `arg` (see the docstring)."""
  arg = (arg or "").strip()
  root, given = "/data/llama", {}
  if "=" in arg:
    for pair in filter(None, (p.strip() for p in arg.split(";"))):
      name, _, paths = pair.partition("=")
      given[name.strip()] = paths.strip()
  elif arg:
    root = arg
  unknown = sorted(set(given) - set(LLAMA_WEIGHTS))
  if unknown:
    from gpt_jax.errors import ConfigError

    raise ConfigError(
      f"llama_mixture: unknown source(s) {unknown}; expected names among {sorted(LLAMA_WEIGHTS)}"
    )
  cfg = default_data_config()
  sources = {}
  for name, weight in LLAMA_WEIGHTS.items():
    paths = given.get(name, os.path.join(root, name, "*.jsonl"))
    sources[name] = source_config(paths, _format_of(paths), weight / 100.0, dedup=True)
  cfg.sources = sources
  cfg.tokenizer.vocab_size = 32000
  cfg.tokenizer.sample_bytes = 100_000_000
  cfg.shard_tokens = 1 << 25
  cfg.eval_fraction = 0.001
  return cfg
