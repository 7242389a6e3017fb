"""Command bodies for `python -m gpt_jax import-hf` and `export-hf` (plain functions of keyword arguments).

  python -m gpt_jax import-hf --hf_dir=/models/llama-1b --out=/ckpt/llama-1b
  python -m gpt_jax export-hf --workdir=/runs/sft --out=/export/sft-hf [--tokenizer=.../tokenizer.model]

export-hf reads any run directory (runs.open): an import, or a stage's workdir (its newest valid
checkpoint).
"""

from __future__ import annotations

import os

from gpt_jax.interop import hf


def cmd_import(
  hf_dir: str, out_dir: str, *, mesh: dict | None = None, dtype: str | None = None, log_fn=print
):
  """Imports a Hugging Face directory into out_dir; returns the ModelConfig."""
  overrides = {"dtype": dtype} if dtype else {}
  cfg = hf.import_hf(hf_dir, out_dir, mesh_cfg=mesh, **overrides)
  log_fn(f"imported {hf_dir} ({cfg.family}, {cfg.num_layers} layers, d_model {cfg.d_model}) into {out_dir}")
  return cfg


def cmd_export(workdir: str, out_dir: str, *, tokenizer: str | None = None, log_fn=print) -> list[str]:
  """Exports the model of a run directory (runs.open: a stage's workdir or an import) to a Hugging Face
  directory; returns the files written. A reward model exports as *ForSequenceClassification; an RL
  run exports its policy. tokenizer: a SentencePiece model to ship; default the run's own tokenizer
  (tokenizer/tokenizer.model, or an imported model's hf_tokenizer/ files with its bos and eos ids)."""
  from gpt_jax import placed, runs, sharding
  from gpt_jax import tokenizers as tok_lib

  run = runs.open(workdir, "--workdir")
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  cfg = run.model_config()
  reward_head = None
  if run.stage == "rm":
    model = placed.Model.build(cfg, mesh, head=True)
    both = run.restore(model.abstract(), item="params")
    params, reward_head = both["trunk"], both["head"]
  else:
    params = run.restore(placed.Model.build(cfg, mesh).abstract())
  default_tok = os.path.join(run.workdir, tok_lib.SENTENCEPIECE_DIR, tok_lib.MODEL_FILE)
  hf_tok_dir, ids = None, {}
  if tokenizer is None and os.path.isfile(default_tok):
    tokenizer = default_tok
  elif tokenizer is None and os.path.isdir(os.path.join(run.workdir, tok_lib.HF_TOKENIZER_DIR)):
    hf_tok_dir = os.path.join(run.workdir, tok_lib.HF_TOKENIZER_DIR)
    tok = tok_lib.load(run.workdir)
    ids = {"bos_id": tok.hf.bos_id, "eos_id": tok.eos_id}
  files = hf.export_hf(
    cfg, params, out_dir, tokenizer_model=tokenizer, tokenizer_dir=hf_tok_dir, reward_head=reward_head, **ids
  )
  log_fn(f"exported {run.describe()} to {out_dir}: {', '.join(files)}")
  return files
