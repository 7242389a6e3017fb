"""Pretraining: next-token prediction on the tokenized source mixture.

  python -m gpt_jax pretrain --config=experiments/pretrain.py:tiny --workdir=DIR
  python -m gpt_jax pretrain --config=experiments/pretrain.py:tiny \
      --config.data=experiments/data/files.py:'/corpus/*.jsonl' --workdir=DIR

The first run makes the tokenizer (data.tokenizer: trains gpt_jax's SentencePiece model, or copies
the one given, or a Hugging Face tokenizer directory) and tokenizes the mixture into DIR/shards
(data/pipeline.py); a rerun on the same workdir verifies them and resumes from the newest checkpoint.

Continued pretraining: with train.init_from naming a gpt_jax run or a Hugging Face model imported with
`import-hf`, the run starts from its weights (only: the optimizer and the learning-rate schedule start
afresh) and tokenizes the data with its tokenizer, copied into DIR; the model config must describe
that run's model (runs.check_model, as for SFT).
"""

from __future__ import annotations

import json
import os

import jax

from gpt_jax import config as config_lib
from gpt_jax import data as data_lib
from gpt_jax import distributed, loop, losses, placed, runs, sharding
from gpt_jax import model as model_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.config import Key
from gpt_jax.data import config as data_config
from gpt_jax.errors import DataError
from gpt_jax.model import ModelConfig
from gpt_jax.tokenizers import check_vocab

SCHEMA = config_lib.stage_schema(
  "pretrain",
  model=model_lib.SCHEMA,
  data=data_config.SCHEMA,
  loss={"z_loss": Key(0.0, ">= 0")},  # PaLM's log-partition penalty
)
# Runs pretraining may continue: any transformer without a head (a reward model's trunk is no LM).
INIT_STAGES = ("pretrain", "sft", "dpo", "ppo", "grpo", runs.IMPORT)


def default_config():
  """Every key of a pretraining config, with its default."""
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """All config checks that need no data and no compile; returns the model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  config_lib.check_train(cfg, jax.device_count())
  distributed.check_train(cfg)
  data_config.check(cfg.data, str(cfg.train.init_from))
  return model_cfg


def open_init(cfg, workdir: str):
  """The run continued pretraining starts from (runs.Run), checked against the config; None when
  pretraining from random weights, or when the workdir already has a checkpoint to resume from."""
  if not str(cfg.train.init_from) or runs.has_checkpoint(workdir):
    return None
  src = runs.open(cfg.train.init_from)
  runs.check_stage(src, INIT_STAGES, "train.init_from", "pretraining continues a model without a scalar head")
  runs.check_model(config_lib.to_dict(cfg.model), src, "the init run's model")
  return src


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Tokenizes the mixture (once), then pretrains to cfg.train.steps; resumes from the workdir."""
  model_cfg = validate(cfg)
  workdir_lib.check_writable(workdir)
  t = cfg.train
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(t.steps))
    resume.check_tokenizer()  # the workdir's own, before its shards are verified or rebuilt with it
    src = open_init(cfg, workdir)
    # Continued pretraining tokenizes with the init run's tokenizer (a resumed one with the copy).
    tokenizer = runs.install_tokenizer(src, workdir, log_fn) if str(t.init_from) else None
    tokens_per_step = int(t.global_batch) * int(t.seq_len)
    # One process tokenizes; the others then only verify what it built.
    prepared = distributed.main_first(
      lambda: data_lib.prepare(
        cfg.data,
        workdir,
        token_budget=tokens_per_step * int(t.steps),
        tokens_per_batch=tokens_per_step,
        log=log_fn,
        tokenizer=tokenizer,
      ),
      what="data.prepare",
    )
    check_vocab(prepared.tokenizer, model_cfg.vocab_size)
    write_data_summary(workdir, prepared)
    mesh = sharding.make_mesh(cfg.mesh)
    model = placed.Model.build(model_cfg, mesh)
    document_mask = bool(cfg.data.document_mask)
    loader_args = dict(
      global_batch=int(t.global_batch),
      seq_len=int(t.seq_len),
      sharding=sharding.batch_sharding(mesh),
      seed=int(cfg.data.seed),
      document_mask=document_mask,
    )
    train_loader = data_lib.make_loader(prepared, "train", **loader_args)
    data_lib.make_loader(
      prepared, "eval", **loader_args
    ).close()  # checks the eval split now, not at step 1000
    bpt = prepared.eval_bytes_per_token
    tok = prepared.tokenizer
    log_fn(
      f"[pretrain] eval/loss: nats per token of the {tok.kind} tokenizer {tok.path} ({tok.vocab_size} "
      f"tokens, {bpt:.2f} bytes per token on the eval split)"
    )
    if src is not None:
      log_fn(f"[pretrain] continuing from {src.describe()}: its weights, a fresh optimizer and schedule")
    init = src.fact() if src is not None else resume.extra.get("init")
    record = {**runs.tokenizer_record(tok), **({"init": init} if init else {})}
    resume.check_record(record)
    job = loop.supervised(
      cfg,
      model,
      name="pretrain",
      loss_fn=losses.lm_loss(model.apply, document_mask=document_mask, z_loss=float(cfg.loss.z_loss)),
      train_batches=train_loader,
      eval_batches=lambda: data_lib.make_loader(prepared, "eval", **loader_args),
      eval_summary=lambda sums: loop.default_eval_summary(sums, bpt),
      tokens_per_step=tokens_per_step,
      flops_per_token=model_lib.flops_per_token(model_cfg, int(t.seq_len)),
      init_params=(lambda: src.restore(model.abstract())) if src is not None else None,
      record=record,
    )
    try:
      return loop.run(cfg, workdir, job, log_fn=log_fn)
    finally:
      train_loader.close()


_SPECIALS = ("bos", "eos", "pad", "system", "user", "assistant", "end_of_turn")


def _has_special(tok, name: str) -> bool:
  """False for a token the tokenizer lacks (a Hugging Face tokenizer's chat roles are plain text)."""
  try:
    tok.special_id(name)
  except DataError:
    return False
  return True


def write_data_summary(workdir: str, prepared) -> None:
  """data_summary.json: the mixture table and tokenizer figures, for reports and notebooks."""
  tok = prepared.tokenizer
  summary = {
    "mixture": prepared.mixture_table,
    "tokenizer": {
      "vocab_size": tok.vocab_size,
      "eval_bytes_per_token": prepared.eval_bytes_per_token,
      "special_tokens": {n: tok.special_id(n) for n in _SPECIALS if _has_special(tok, n)},
      "kind": tok.kind,
      "path": tok.path,
      "sha256": tok.sha256(),
    },
    "train_tokens": prepared.train_tokens,
    "eval_tokens": prepared.eval_tokens,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=float)
