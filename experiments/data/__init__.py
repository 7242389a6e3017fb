"""Data configs: get_config(arg) returns a data config (nested as config.data by the stages).

Give one on the command line as the data section, `--config.data=experiments/data/FILE.py:ARG`:
default.py (the embedded corpus), files.py (your files as one source), llama_mixture.py (the LLaMA
mixture over your corpora), fineweb.py (FineWeb parquet shards with GPT-2's tokenizer). docs/data.md.
"""
