"""Your own files as one source: get_config("PATHS") with PATHS comma-separated paths, directories or
globs; each file is read by its extension (.jsonl/.json: one JSON object per line with a "text"
field; .parquet: the "text" column; .md: markdown; anything else: one document per text file).

  python -m gpt_jax pretrain --config=experiments/pretrain.py:tiny \\
      --config.data=experiments/data/files.py:'/corpus/a.jsonl,/corpus/more/*.parquet' --workdir=DIR

Give the section first, then any of its keys, e.g. --config.data.sources.files.text_field=content,
--config.data.tokenizer.kind=hf --config.data.tokenizer.path=/models/gpt2 (see docs/data.md).
"""

from gpt_jax.data import default_data_config, source_config
from gpt_jax.errors import ConfigError


def get_config(arg: str | None = None):
  """Returns a data config with one source, "files", over the paths in `arg`."""
  paths = ",".join(p.strip() for p in str(arg or "").split(",") if p.strip())
  if not paths:
    raise ConfigError(
      "files: no paths given; expected experiments/data/files.py:PATH[,PATH...] (globs allowed)"
    )
  cfg = default_data_config()
  cfg.sources = {"files": source_config(paths, "auto", 1.0)}
  return cfg
