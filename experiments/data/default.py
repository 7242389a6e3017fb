"""The embedded default corpus: Python's standard library code, pydoc reference topics, and the
standard library's prose (its text files and the C docstrings; see gpt_jax/data/sources.py). Needs no
download.

  python -c "from experiments.data import default; print(default.get_config())"
  --config.data=experiments/data/default.py   (the data section every preset starts from)
"""

from gpt_jax.data import default_data_config


def get_config(arg: str | None = None):
  """Returns the default data config; `arg` is unused (kept for the get_config(arg) convention)."""
  del arg
  return default_data_config()
