"""Pretraining: next-token prediction on the tokenized source mixture."""

from __future__ import annotations

import json
import os

import jax

from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import distributed, losses, sharding, trainer
from gpt_jax import model as model_lib
from gpt_jax.errors import ConfigError
from gpt_jax.model import ModelConfig


def lm_loss(model: trainer.Model, *, document_mask: bool = True, z_loss: float = 0.0):
  """Next-token loss over a batch in the shared schema; segment ids keep packed documents apart."""

  def loss_fn(params, batch, rng):
    del rng
    segments = batch["segment_ids"] if document_mask else None
    out = model.apply(params, batch["inputs"], batch["positions"], segments)
    return losses.next_token_xent(out.logits, batch["targets"], batch["loss_mask"], z_loss)

  return loss_fn


def validate(cfg) -> ModelConfig:
  """All config checks that need no data and no compile; returns the model config."""
  model_cfg = ModelConfig.from_config(cfg.model)
  config_lib.validate_train(cfg, jax.device_count())
  distributed.check_train(cfg)
  if cfg.train.init_from:
    raise ConfigError(
      f"train.init_from: pretraining starts from random weights, got {cfg.train.init_from!r} "
      "(finetune a checkpoint with the sft stage instead)"
    )
  return model_cfg


def run(cfg, workdir: str, log_fn=print) -> dict:
  """Tokenizes the mixture (once), then pretrains to cfg.train.steps; resumes from the workdir."""
  model_cfg = validate(cfg)
  trainer.check_workdir(workdir)
  t = cfg.train
  with distributed.WorkdirLock(workdir):
    trainer.save_config(workdir, cfg)
    tokens_per_step = int(t.global_batch) * int(t.seq_len)
    # One process tokenizes; the others then only verify what it built.
    prepared = distributed.main_first(
      lambda: data_lib.prepare(
        cfg.data,
        workdir,
        token_budget=tokens_per_step * int(t.steps),
        tokens_per_batch=tokens_per_step,
        log=log_fn,
      ),
      what="data.prepare",
    )
    data_lib.check_vocab(prepared.tokenizer, model_cfg.vocab_size)
    write_data_summary(workdir, prepared)
    mesh = sharding.make_mesh(cfg.mesh)
    model = trainer.Model.build(model_cfg, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    document_mask = bool(cfg.data.document_mask)
    loader_args = dict(
      global_batch=int(t.global_batch),
      seq_len=int(t.seq_len),
      sharding=batch_sh,
      seed=int(cfg.data.seed),
      document_mask=document_mask,
    )
    train_loader = data_lib.make_loader(prepared, "train", **loader_args)
    data_lib.make_loader(
      prepared, "eval", **loader_args
    ).close()  # checks the eval split now, not at step 1000
    bpt = prepared.eval_bytes_per_token
    stage = trainer.Stage(
      name="pretrain",
      loss_fn=lm_loss(model, document_mask=document_mask, z_loss=float(cfg.loss.z_loss)),
      train_batches=train_loader,
      eval_batches=lambda: data_lib.make_loader(prepared, "eval", **loader_args),
      eval_summary=lambda sums: trainer.default_eval_summary(sums, bpt),
      tokens_per_step=tokens_per_step,
      flops_per_token=model_lib.flops_per_token(model_cfg, int(t.seq_len)),
    )
    try:
      return trainer.fit(cfg, workdir, model, stage, log_fn=log_fn)
    finally:
      train_loader.close()


def write_data_summary(workdir: str, prepared) -> None:
  """data_summary.json: the mixture table and tokenizer figures, for reports and notebooks."""
  tok = prepared.tokenizer
  summary = {
    "mixture": prepared.mixture_table,
    "tokenizer": {
      "vocab_size": tok.vocab_size,
      "eval_bytes_per_token": prepared.eval_bytes_per_token,
      "special_tokens": {
        n: tok.special_id(n) for n in ("bos", "eos", "pad", "system", "user", "assistant", "end_of_turn")
      },
      "sha256": tok.sha256(),
    },
    "train_tokens": prepared.train_tokens,
    "eval_tokens": prepared.eval_tokens,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
