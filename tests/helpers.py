"""Shared test helpers: a tiny pretraining config on a small slice of the embedded corpus, and a
data directory prepared once per test session and copied into each workdir."""

from __future__ import annotations

import hashlib
import json
import os
import random
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


def snapshot(workdir: str) -> dict[str, str]:
  """relative path -> sha256 of every file under workdir ("<dir>" for a directory; the lock file aside)."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), workdir)] = "<dir>"
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel != ".lock":
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


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
      "sft.tasks.train": 400,
      "sft.tasks.eval": 32,
      "rm.train.steps": 6,
      "rm.train.global_batch": 8,
      "rm.train.eval_every": 3,
      "rm.train.checkpoint_every": 3,
      "rm.train.eval_batches": 2,
      "rm.train.progress_bar": False,
      "rm.optim.warmup_steps": 2,
      "rm.tasks.train": 200,
      "rm.tasks.eval": 32,
      "rm.rm.stats_samples": 16,
      "rm.rm.stats_batch": 16,
      "ppo.ppo.iterations": 2,
      "ppo.ppo.rollout_batch": 8,
      "ppo.ppo.minibatch": 8,
      "ppo.ppo.epochs": 1,
      "ppo.ppo.eval_every": 1,
      "ppo.ppo.eval_prompts": 8,
      "ppo.tasks.train": 64,
      "ppo.train.checkpoint_every": 1,
      "ppo.train.progress_bar": False,
      "dpo.train.steps": 4,
      "dpo.train.global_batch": 8,
      "dpo.train.eval_every": 4,
      "dpo.train.checkpoint_every": 4,
      "dpo.train.eval_batches": 2,
      "dpo.train.progress_bar": False,
      "dpo.optim.warmup_steps": 1,
      "dpo.dpo.eval_prompts": 8,
      "grpo.grpo.iterations": 2,
      "grpo.grpo.prompts_per_iteration": 4,
      "grpo.grpo.samples_per_prompt": 2,
      "grpo.grpo.oversample": 1,
      "grpo.grpo.minibatch": 8,
      "grpo.grpo.eval_every": 1,
      "grpo.grpo.eval_prompts": 8,
      "grpo.grpo.eval_pass_k": 2,
      "grpo.tasks.train": 64,
      "grpo.train.checkpoint_every": 1,
      "grpo.train.progress_bar": False,
    }
  )
  o.update(extra)
  return o


def tiny_pipeline_config(**extra):
  return config_lib.load(f"{PIPELINE}:demo", tiny_pipeline_overrides(**extra))


# --- stand-in SFT and reward-model runs for the RL stages' tests --------------------------------------

RL_MODEL = {
  "model.vocab_size": 512,
  "model.max_seq_len": 64,
  "model.num_layers": 2,
  "model.d_model": 64,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.d_ff": 128,
}


def corpus_docs(n: int = 300) -> list[str]:
  """Text that looks like the embedded tasks (so a tokenizer trained on it covers them)."""
  from gpt_jax.data import tasks

  rng = random.Random(0)
  return [
    f"{t.question} {t.answer}\nThe answer to {t.question.lower()} is {t.answer}. " * rng.randint(1, 3)
    for t in tasks.make_tasks("train", n, 0)
  ]


def write_run(workdir, tok_dir, stage: str, model_dict: dict, params, extra_cfg=None) -> str:
  """A finished run's workdir as the stages leave it: config.json, tokenizer/, one checkpoint."""
  from gpt_jax import checkpoint as ckpt_lib

  os.makedirs(workdir, exist_ok=True)
  shutil.copytree(tok_dir, os.path.join(workdir, "tokenizer"))
  config = {"stage": stage, "model": model_dict, **(extra_cfg or {})}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ck:
    ck.save(10, {"params": params}, extra={"stage": stage, "config": config})
  return str(workdir)


def make_rl_runs(root) -> tuple[str, str, str]:
  """(sft workdir, rm workdir, tokenizer dir) under `root`: random tiny models of RL_MODEL's shape, a
  tokenizer that covers the tasks, the SFT run's demonstrations and the reward model's statistics."""
  import jax
  import jax.numpy as jnp

  from gpt_jax import model as model_lib
  from gpt_jax.data import jsonl, tasks
  from gpt_jax.stages import sft as sft_stage
  from gpt_jax.tokenizers import train_tokenizer

  tok_dir = os.path.join(root, "tok")
  train_tokenizer(corpus_docs(), tok_dir, vocab_size=400)
  model_dict = config_lib.to_dict(model_lib.preset_config("tiny", **{k[6:]: v for k, v in RL_MODEL.items()}))
  mcfg = model_lib.ModelConfig.from_config(model_dict)
  _, sft_params = model_lib.split(mcfg, 0)
  sft_dir = write_run(
    os.path.join(root, "sft"),
    tok_dir,
    "sft",
    model_dict,
    sft_params,
    {"tasks": sft_stage.default_config().tasks.to_dict()},
  )
  # The SFT run's demonstrations: PPO-ptx mixes their next-token loss in.
  jsonl.write_jsonl(
    os.path.join(sft_dir, "data", "train.jsonl"), tasks.task_rows(tasks.make_tasks("train", 64, 0))
  )
  _, trunk = model_lib.split(mcfg, 1)
  rm_params = {
    "trunk": trunk,
    "head": {"w": jax.random.normal(jax.random.key(2), (mcfg.d_model,)), "b": jnp.zeros(())},
  }
  rm_dir = write_run(os.path.join(root, "rm"), tok_dir, "rm", model_dict, rm_params)
  with open(os.path.join(rm_dir, "reward_stats.json"), "w") as f:
    json.dump({"mean": 0.5, "std": 2.0}, f)
  return sft_dir, rm_dir, tok_dir
