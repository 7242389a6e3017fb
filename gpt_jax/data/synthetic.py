"""A tiny multi-format corpus written from the embedded sources, for tests and smoke runs.

tiny_data_config(root) writes, deterministically, under root:
  code/*.py        stdlib modules, one document per file          (format text)
  docs/topics.md   reference topics joined by a separator line     (format markdown, separator)
  web/part-*.jsonl paragraphs of further reference topics, one JSON object per line (format jsonl)
  web/extra.parquet more such paragraphs in a parquet column       (written only when pyarrow exists)
and returns a data config over them with a small vocabulary and small shards, so that prepare()
finishes in a few seconds on a laptop CPU. Every document comes from the Python standard library, so
the corpus (and which documents its hash split holds out) depends on the Python version alone.
"""

from __future__ import annotations

import itertools
import json
import os

from gpt_jax.data.config import default_data_config, source_config
from gpt_jax.data.sources import iter_documents, parse_sources

SEPARATOR = "\n=====\n"


def _embedded(part: str, n: int, max_chars: int, min_chars: int = 1) -> list[str]:
  (src,) = parse_sources({part: {"paths": part, "format": "embedded", "weight": 1.0, "min_chars": min_chars}})
  return [d[:max_chars] for d in itertools.islice(iter_documents(src), n)]


def tiny_data_config(root: str, *, docs_per_source: int = 24, max_chars: int = 6000):
  """Writes the tiny corpus under root (if absent) and returns its data config (ConfigDict)."""
  os.makedirs(root, exist_ok=True)
  code_dir, docs_dir, web_dir = (os.path.join(root, d) for d in ("code", "docs", "web"))
  if not os.path.isdir(code_dir):
    os.makedirs(code_dir)
    for i, doc in enumerate(_embedded("stdlib_code", docs_per_source, max_chars)):
      with open(os.path.join(code_dir, f"m{i:03d}.py"), "w", encoding="utf-8") as f:
        f.write(doc)
  topics = _embedded("pydoc_topics", 4 * docs_per_source, max_chars)
  if not os.path.isdir(docs_dir):
    os.makedirs(docs_dir)
    with open(os.path.join(docs_dir, "topics.md"), "w", encoding="utf-8") as f:
      f.write(SEPARATOR.join(topics[:docs_per_source]))
  if not os.path.isdir(web_dir):
    os.makedirs(web_dir)
    # Paragraphs of the topics the docs source leaves over: many short documents, so that the hash
    # split very likely holds some out of each web file, whatever the Python version's topics are.
    paragraphs = (p.strip() for t in topics[docs_per_source:] for p in t.split("\n\n"))
    web = list(itertools.islice((p for p in paragraphs if len(p) >= 200), 4 * docs_per_source))
    half = len(web) // 2
    for part in range(2):
      rows = web[part * half // 2 : (part + 1) * half // 2]
      with open(os.path.join(web_dir, f"part-{part}.jsonl"), "w", encoding="utf-8") as f:
        for j, text in enumerate(rows):
          f.write(json.dumps({"id": j, "text": text}) + "\n")
    try:
      import pyarrow as pa
      import pyarrow.parquet as pq

      pq.write_table(pa.table({"text": web[half:]}), os.path.join(web_dir, "extra.parquet"))
    except ImportError:
      pass
  cfg = default_data_config()
  cfg.sources = {
    "code": source_config(os.path.join(code_dir, "*.py"), "text", 0.6, dedup=True),
    "docs": source_config(os.path.join(docs_dir, "topics.md"), "markdown", 0.15, separator=SEPARATOR),
    "web": source_config(os.path.join(web_dir, "*.jsonl"), "jsonl", 0.25, min_chars=50),
  }
  if os.path.exists(os.path.join(web_dir, "extra.parquet")):
    cfg.sources.web_parquet = source_config(os.path.join(web_dir, "extra.parquet"), "parquet", 0.1)
  cfg.tokenizer.vocab_size = 512
  cfg.tokenizer.sample_bytes = 300_000
  cfg.shard_tokens = 4096
  cfg.eval_fraction = 0.1
  cfg.num_workers = 2
  cfg.progress = False
  return cfg
