"""FineWeb / FineWeb-edu parquet shards tokenized with GPT-2's tokenizer, as the GPT-2 reproductions
(nanoGPT, llm.c, modded-nanogpt) read them; the data of experiments/pretrain.py:gpt2_124m_fineweb.

get_config(arg): arg = the parquet paths or globs (comma-separated; default DEFAULT_PATHS). The
tokenizer is the Hugging Face directory at DEFAULT_TOKENIZER (holding GPT-2's tokenizer.json), or
--config.data.tokenizer.path=DIR. docs/data.md says what to download and how.
"""

from gpt_jax.data import default_data_config, source_config

DEFAULT_PATHS = "~/data/fineweb-edu/sample/10BT/*.parquet"
DEFAULT_TOKENIZER = "~/data/gpt2"


def get_config(arg: str | None = None):
  """Returns the data config of FineWeb(-edu) parquet files (`arg`) with the GPT-2 tokenizer."""
  cfg = default_data_config()
  cfg.sources = {"fineweb": source_config(str(arg or DEFAULT_PATHS), "parquet", 1.0)}
  cfg.tokenizer.kind = "hf"
  cfg.tokenizer.path = DEFAULT_TOKENIZER
  # 0.2% of the documents held out by content hash: ~20M tokens of sample-10BT, of which each eval
  # reads train.eval_batches batches (the preset: 20 x 512 x 1024 = 10.5M tokens).
  cfg.eval_fraction = 0.002
  cfg.shard_tokens = 1 << 25
  # nanoGPT and llm.c train on the plain token stream: packed documents attend to each other.
  cfg.document_mask = False
  return cfg
