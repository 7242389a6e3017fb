"""Shared test helpers: a tiny pretraining config on a small slice of the embedded corpus, and a
data directory prepared once per test session and copied into each workdir."""

from __future__ import annotations

import os
import shutil

from gpt_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "experiments", "pretrain.py")

TINY = {
  "model.vocab_size": 512,
  "model.max_seq_len": 64,
  "model.num_layers": 2,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.d_model": 64,
  "model.d_ff": 128,
  "train.steps": 6,
  "train.global_batch": 8,
  "train.seq_len": 32,
  "train.eval_every": 3,
  "train.checkpoint_every": 3,
  "train.eval_batches": 2,
  "train.log_every": 1,
  "train.progress_bar": False,
  "optim.warmup_steps": 2,
  "data.sources.code.max_docs": 40,
  "data.sources.web.max_docs": 15,
  "data.sources.docs.max_docs": 30,
  "data.eval_fraction": 0.2,
  "data.tokenizer.vocab_size": 512,
  "data.tokenizer.sample_bytes": 300_000,
  "data.num_workers": 1,
  "data.progress": False,
}


def tiny_config(**overrides):
  """The `tiny` pretraining preset shrunk for tests; overrides as {"train.steps": 4}."""
  return config_lib.load(f"{PRETRAIN}:tiny", {**TINY, **overrides})


def seed_workdir(prepared_dir: str, workdir: str) -> str:
  """Copies a prepared tokenizer and shards into a fresh workdir (prepare() then only verifies them)."""
  os.makedirs(workdir, exist_ok=True)
  for sub in ("tokenizer", "shards"):
    shutil.copytree(os.path.join(prepared_dir, sub), os.path.join(workdir, sub))
  return workdir


PIPELINE = os.path.join(REPO, "experiments", "pipeline.py")


def tiny_pipeline_overrides(**extra) -> dict:
  """The demo pipeline shrunk for tests: the tiny pretraining model and a few steps per stage."""
  o = {f"pretrain.{k}": v for k, v in TINY.items()}
  o.update(
    {
      "pretrain.train.steps": 8,
      "pretrain.train.eval_every": 4,
      "pretrain.train.checkpoint_every": 4,
      "sft.train.steps": 8,
      "sft.train.seq_len": 64,
      "sft.train.global_batch": 8,
      "sft.train.eval_every": 4,
      "sft.train.checkpoint_every": 4,
      "sft.train.eval_batches": 2,
      "sft.train.progress_bar": False,
      "sft.optim.warmup_steps": 2,
      "sft.sft.eval_samples": 16,
      "sft.sft.task_train": 400,
      "sft.sft.task_eval": 32,
      "rm.train.steps": 6,
      "rm.train.global_batch": 8,
      "rm.train.eval_every": 3,
      "rm.train.checkpoint_every": 3,
      "rm.train.eval_batches": 2,
      "rm.train.progress_bar": False,
      "rm.optim.warmup_steps": 2,
      "rm.rm.task_train": 200,
      "rm.rm.task_eval": 32,
      "rm.rm.stats_samples": 16,
      "rm.rm.stats_batch": 16,
      "ppo.ppo.iterations": 2,
      "ppo.ppo.rollout_batch": 8,
      "ppo.ppo.minibatch": 8,
      "ppo.ppo.epochs": 1,
      "ppo.ppo.eval_every": 1,
      "ppo.ppo.eval_prompts": 8,
      "ppo.ppo.task_train": 64,
      "ppo.train.checkpoint_every": 1,
      "ppo.train.progress_bar": False,
    }
  )
  o.update(extra)
  return o


def tiny_pipeline_config(**extra):
  return config_lib.load(f"{PIPELINE}:demo", tiny_pipeline_overrides(**extra))
