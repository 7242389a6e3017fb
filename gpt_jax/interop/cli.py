"""Command bodies for `python -m gpt_jax import-hf` and `export-hf` (plain functions of keyword arguments).

  python -m gpt_jax import-hf --hf_dir=/models/llama-1b --out=/ckpt/llama-1b
  python -m gpt_jax export-hf --workdir=/runs/sft --out=/export/sft-hf [--tokenizer=.../tokenizer.model]

export-hf reads either an imported checkpoint (model_config.json) or a training workdir
(config.json with a "model" section, newest valid step under checkpoints/).
"""

from __future__ import annotations

import json
import os

from gpt_jax.errors import CheckpointError
from gpt_jax.interop import hf


def cmd_import(
  hf_dir: str, out_dir: str, *, mesh: dict | None = None, dtype: str | None = None, log_fn=print
):
  """Imports a Hugging Face directory into out_dir; returns the ModelConfig."""
  overrides = {"dtype": dtype} if dtype else {}
  cfg = hf.import_hf(hf_dir, out_dir, mesh_cfg=mesh, **overrides)
  log_fn(f"imported {hf_dir} ({cfg.family}, {cfg.num_layers} layers, d_model {cfg.d_model}) into {out_dir}")
  return cfg


def _workdir_params(workdir: str, item: str):
  """Returns (ModelConfig, params) from a training workdir's newest valid checkpoint."""
  from gpt_jax import model as model_lib
  from gpt_jax.checkpoint import restore_params

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(
      f"{workdir}: neither {hf.MODEL_CONFIG} (an import) nor config.json (a training workdir)"
    )
  with open(path) as f:
    model_cfg = json.load(f).get("model")
  if not isinstance(model_cfg, dict):
    raise CheckpointError(f"{path}: no 'model' section")
  cfg = model_lib.ModelConfig.from_config(model_cfg)
  _, shapes, _ = model_lib.abstract(cfg)
  return cfg, restore_params(os.path.join(workdir, "checkpoints"), shapes, item=item)


def cmd_export(
  workdir: str,
  out_dir: str,
  *,
  tokenizer: str | None = None,
  params_item: str = "params",
  reward_head: dict | None = None,
  log_fn=print,
) -> list[str]:
  """Exports a workdir (or an imported checkpoint) to a Hugging Face directory; returns the files written.

  params_item: the subtree of the saved state holding the transformer params (e.g. "params/policy"
  for a PPO state); reward_head: {"w", "b"} to export a reward model as a sequence classifier.
  tokenizer: a SentencePiece model; default <workdir>/tokenizer/tokenizer.model when present, else the
  imported model's own tokenizer files <workdir>/hf_tokenizer/ (an import, or a run started from one),
  with its bos and eos ids in config.json.
  """
  if os.path.isfile(os.path.join(workdir, hf.MODEL_CONFIG)):
    cfg, params = hf.load_imported(workdir)
  else:
    cfg, params = _workdir_params(workdir, params_item)
  default_tok = os.path.join(workdir, "tokenizer", "tokenizer.model")
  hf_tok_dir, ids = None, {}
  if tokenizer is None and os.path.isfile(default_tok):
    tokenizer = default_tok
  elif tokenizer is None and os.path.isdir(os.path.join(workdir, hf.TOKENIZER_DIR)):
    hf_tok_dir = os.path.join(workdir, hf.TOKENIZER_DIR)
    tok = hf.load_chat_tokenizer(hf_tok_dir)
    ids = {"bos_id": tok.hf.bos_id, "eos_id": tok.eos_id}
  files = hf.export_hf(
    cfg, params, out_dir, tokenizer_model=tokenizer, tokenizer_dir=hf_tok_dir, reward_head=reward_head, **ids
  )
  log_fn(f"exported {workdir} to {out_dir}: {', '.join(files)}")
  return files
