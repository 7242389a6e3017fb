"""Direct preference optimization (Rafailov et al. 2023) of the SFT policy on comparisons.

  python -m gpt_jax dpo --config=experiments/dpo.py:tiny --config.train.init_from=SFT_DIR --workdir=DIR

The policy starts from the SFT run (train.init_from) and learns from pairs (prompt, chosen, rejected):
the comparison files of dpo.data_path / dpo.eval_path (the reward model's format, data/comparisons.py),
or the embedded task comparisons written into DIR/data/ (the reward model's, with the same `tasks`
section). The frozen reference is the SFT model (or dpo.reference, a run of the same shape and
tokenizer); its summed log-prob of each response is computed once, before training, and rides in the
batches. The loss is dpo.loss ("sigmoid": DPO, with optional label smoothing; "ipo": IPO) at
dpo.beta, plus dpo.sft_coef times the chosen responses' mean next-token loss (RPO). Each evaluation reports, on held-out pairs, the implicit-reward accuracy (the share of pairs
whose chosen response gets the higher beta * (log pi - log pi_ref)) and margin, and the greedy gold
accuracy on dpo.eval_prompts held-out task prompts (the SFT run's, as every RL stage's).

Legend: B rows (2 per pair), T time, V vocabulary.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import distributed, grading, loop, losses, placed, runs, sharding
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax import tokenizers as tok_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.config import Key
from gpt_jax.data import comparisons as comp_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import ModelConfig

SCHEMA = config_lib.stage_schema(
  "dpo",
  model=model_lib.SCHEMA,
  tasks=config_lib.subset(
    tasks_lib.SCHEMA, seed=Key(1, ">= 0"), train=Key(8000, ">= 1"), eval=Key(512, ">= 1")
  ),
  dpo={
    "data_path": Key(""),  # '' = the embedded task comparisons, written to <workdir>/data/{train,eval}.jsonl
    "eval_path": Key(""),  # '' with data_path: hold out eval_fraction of the prompts of data_path by hash
    "eval_fraction": Key(0.05, "(0, 1)"),
    "rambling_fraction": Key(0.25, "[0, 1]"),  # embedded pairs "bare answer > the same answer in filler"
    "reference": Key(""),  # the frozen reference run; '' = train.init_from (the SFT model)
    "seed": Key(0, ">= 0"),  # order of the prompts in each epoch
    "beta": Key(0.1, "> 0"),
    "loss": Key("sigmoid", choices=("sigmoid", "ipo")),
    "label_smoothing": Key(0.0, "[0, 0.5)"),  # sigmoid only: the share of labels taken as flipped (cDPO)
    "sft_coef": Key(0.0, ">= 0"),  # weight of the chosen responses' mean next-token loss (RPO); 0 = plain DPO
    "ref_batch": Key(64, ">= 1", resumable=True),  # pairs per reference-scoring call
    "eval_prompts": Key(512, ">= 0", resumable=True),  # held-out task prompts answered greedily per eval
    # JSONL prompts with answers (the PPO / GRPO eval_path format) for the gold accuracy; '' = the SFT
    # run's held-out tasks. A dev-split file here lets settings be chosen without the test prompts.
    "gold_path": Key("", resumable=True),
    "max_new_tokens": Key(16, ">= 1", resumable=True),
    "sample_batch": Key(128, ">= 1", resumable=True),  # prompts per sampler call
  },
)
INIT_STAGES = ("sft", "dpo", runs.IMPORT)  # a chat model: the policy answers in the chat template


def default_config():
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """All checks that need no data and no compile; returns the model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  t, d = cfg.train, cfg.dpo
  config_lib.check_train(cfg, jax.device_count())
  config_lib.check_batch(
    "train.global_batch",
    int(t.global_batch),
    int(t.grad_accum),
    config_lib.data_shards(cfg, jax.device_count()),
    unit=2,
  )
  if not str(t.init_from):
    raise ConfigError("train.init_from: required; set it to the SFT run's workdir")
  if d.label_smoothing and d.loss != "sigmoid":
    raise ConfigError(f"dpo.label_smoothing: applies to dpo.loss 'sigmoid', not {d.loss!r}")
  config_lib.check_room_for_prompt(d, "dpo", "max_new_tokens", model_cfg.max_seq_len)
  tasks_lib.check_data_section(d, "dpo")
  if d.gold_path and not os.path.isfile(d.gold_path):
    raise DataError(f"dpo.gold_path: file {d.gold_path} does not exist")
  tasks_lib.spec_from_config(cfg.tasks)
  return model_cfg


# --- log-probs of the responses ---------------------------------------------------------------------


def response_logprobs(model: placed.Model, params, batch) -> jax.Array:
  """Each row's summed log-prob of its response tokens (from response_start up to, not including, the
  eos the reward model reads at end_index), float32 (B,). Pure."""
  out = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
  logp_BT = losses.token_logprobs(out.logits[:, :-1], batch["inputs"][:, 1:])  # [j]: log p(token j + 1)
  j_T = jnp.arange(logp_BT.shape[1])[None, :] + 1
  mask = (j_T >= batch["response_start"]) & (j_T < batch["end_index"])
  return jnp.sum(logp_BT * mask.astype(jnp.float32), axis=1)


def dpo_loss(model: placed.Model, d):
  """DPO over a comparison batch with the reference's log-probs in it: rows 2i / 2i+1 are pair i's
  chosen / rejected side (losses.dpo_loss)."""

  def loss_fn(params, batch, rng):
    del rng
    pi_N2 = response_logprobs(model, params, batch).reshape(-1, 2)
    ref_N2 = batch["ref_logp"].reshape(-1, 2)
    mask_N = batch["pair_mask"].reshape(-1, 2)[:, 0]
    loss_sum, pairs, aux = losses.dpo_loss(
      pi_N2[:, 0],
      pi_N2[:, 1],
      ref_N2[:, 0],
      ref_N2[:, 1],
      mask_N,
      beta=float(d.beta),
      kind=str(d.loss),
      label_smoothing=float(d.label_smoothing),
    )
    # The chosen response's mean next-token loss (RPO, Pang et al. 2024): DPO alone may lower the
    # chosen log-prob too, as long as the rejected one falls faster; sft_coef > 0 holds the chosen up.
    n_tokens_N = (batch["end_index"] - batch["response_start"]).reshape(-1, 2)[:, 0].astype(jnp.float32)
    nll_sum = jnp.sum(-pi_N2[:, 0] / jnp.maximum(n_tokens_N, 1.0) * mask_N)
    return loss_sum + float(d.sft_coef) * nll_sum, pairs, {**aux, "chosen_nll_sum": nll_sum}

  return loss_fn


def add_reference_logprobs(
  model: placed.Model, ref_params, enc: comp_data.EncodedPairs, seq_len: int, batch: int
):
  """enc.row_values["ref_logp"]: the reference's summed log-prob of every pair's chosen and rejected
  response, (N, 2), computed in batches of `batch` pairs (one compiled shape)."""
  sh = sharding.batch_sharding(model.mesh)

  def run(params, b):
    with sharding.activation_mesh(model.mesh):
      return response_logprobs(model, params, b)

  score = jax.jit(run, out_shardings=sharding.replicated(model.mesh))
  unit = math.lcm(2, model.mesh.shape["data"] * model.mesh.shape["fsdp"])  # rows: pairs, split over shards
  n_pairs = -(-2 * min(batch, len(enc)) // unit) * unit // 2
  keep = ("inputs", "positions", "segment_ids", "end_index", "response_start")
  out = np.zeros((len(enc), 2), np.float32)
  for lo in range(0, len(enc), n_pairs):
    pairs = list(range(lo, min(lo + n_pairs, len(enc))))
    host = comp_data.pairs_to_batch(enc, pairs, n_pairs, seq_len)
    dev = jax.device_put({k: host[k] for k in keep}, sh)
    out[lo : lo + len(pairs)] = np.asarray(distributed.to_host(score(ref_params, dev)))[
      : 2 * len(pairs)
    ].reshape(-1, 2)
  enc.row_values["ref_logp"] = out


def eval_summary(sums: dict) -> dict:
  """Held-out metrics from summed eval outputs: the implicit-reward accuracy and margin of the pairs."""
  pairs = max(float(sums["weight"]), 1.0)
  return {
    "loss": float(sums["loss_sum"]) / pairs,
    "reward_accuracy": float(sums["accuracy_sum"]) / pairs,
    "margin": float(sums["margin_sum"]) / pairs,
    "chosen_reward": float(sums["chosen_reward_sum"]) / pairs,
    "rejected_reward": float(sums["rejected_reward_sum"]) / pairs,
    "chosen_nll": float(sums["chosen_nll_sum"]) / pairs,
    "pairs": float(sums["weight"]),
  }


# --- the stage --------------------------------------------------------------------------------------


def open_runs(cfg) -> tuple[runs.Run, runs.Run]:
  """(the init run, the reference run): chat models of this config's shape and one tokenizer."""
  src = runs.open(cfg.train.init_from)
  runs.check_stage(src, INIT_STAGES, "train.init_from", "DPO starts from a finetuned (chat) model")
  runs.check_model(config_lib.to_dict(cfg.model), src, "the SFT model")
  if not cfg.dpo.reference:
    return src, src
  ref = runs.open(cfg.dpo.reference, "dpo.reference")
  runs.check_stage(ref, INIT_STAGES, "dpo.reference")
  runs.check_model(config_lib.to_dict(cfg.model), ref, "the reference model")
  runs.check_same_tokenizer(src.tokenizer(), ref.tokenizer(), "dpo.reference")
  return src, ref


def gold_eval(cfg, model, tokenizer, src: runs.Run):
  """extra_eval(params, step) -> the greedy gold accuracy on the first dpo.eval_prompts prompts of
  dpo.gold_path, else of the SFT run's held-out tasks (its task space and seed: the prompts every RL
  stage reports on); None when eval_prompts is 0."""
  d = cfg.dpo
  n = int(d.eval_prompts)
  if not n:
    return None
  if d.gold_path:
    prompts = grading.read_prompts(d.gold_path, tokenizer)[:n]
    if not prompts or any(q.answer is None for q in prompts):
      raise DataError(
        f"dpo.gold_path: {d.gold_path} needs prompts with an answer each (the grader compares them)"
      )
  else:
    sft_tasks = src.config.get("tasks") or config_lib.to_dict(cfg.tasks)
    spec = tasks_lib.spec_from_config(sft_tasks)
    held = tasks_lib.make_tasks("eval", n, int(sft_tasks.get("seed", 0)), spec)
    prompts = grading.from_tasks(held, tokenizer)
  answerer = grading.Answerer(
    model,
    tokenizer,
    prompts,
    max_new_tokens=int(d.max_new_tokens),
    batch=int(d.sample_batch),
  )
  return lambda params, step: {f"gold_{k}": v for k, v in answerer.accuracy(params).items()}


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Trains the policy with DPO to cfg.train.steps from the SFT run; resumes from the workdir."""
  model_cfg = validate(cfg)
  workdir_lib.check_writable(workdir)
  t, d = cfg.train, cfg.dpo
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(t.steps))
    src, ref = open_runs(cfg)
    tokenizer = src.tokenizer()
    tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    record = {**runs.tokenizer_record(tokenizer), "init": src.fact(), "reference": ref.fact()}
    resume.check_record(record)
    train_comps, eval_comps = comp_data.load_splits(d, cfg.tasks, workdir, "dpo", log_fn)
    seq_len = int(t.seq_len)
    train_enc = comp_data.encode(train_comps, tokenizer, seq_len, "dpo train")
    eval_enc = comp_data.encode(eval_comps, tokenizer, seq_len, "dpo eval")
    runs.install_tokenizer(src, workdir, log_fn)
    mesh = sharding.make_mesh(cfg.mesh)
    model = placed.Model.build(model_cfg, mesh)
    ref_params = ref.restore(model.abstract())
    for enc in (train_enc, eval_enc):
      add_reference_logprobs(model, ref_params, enc, seq_len, int(d.ref_batch))
    data_stats = {
      f"{n}_{k}": v for n, e in (("train", train_enc), ("eval", eval_enc)) for k, v in e.stats.items()
    }
    with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False) as w:
      w.write(0, data_stats, prefix="data/")
    log_fn(
      f"[dpo] {train_enc.stats['pairs']} train and {eval_enc.stats['pairs']} held-out pairs; starting from {src.describe()}"
    )
    args = dict(global_batch=int(t.global_batch), seq_len=seq_len, sharding=sharding.batch_sharding(mesh))
    job = loop.supervised(
      cfg,
      model,
      name="dpo",
      loss_fn=dpo_loss(model, d),
      train_batches=comp_data.ComparisonLoader(
        train_enc, seed=int(d.seed), grad_accum=int(t.grad_accum), **args
      ),
      eval_batches=lambda: comp_data.ComparisonLoader(eval_enc, shuffle=False, repeat=False, **args),
      eval_summary=eval_summary,
      extra_eval=gold_eval(cfg, model, tokenizer, src),
      init_params=lambda: src.restore(model.abstract()),
      tokens_per_step=int(t.global_batch) * seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, seq_len),
      batch_keys=train_enc.keys(),
      record=record,
    )
    job.eval_at_start = True  # step 0 is the SFT model: the gold accuracy DPO starts from
    return loop.run(cfg, workdir, job, log_fn=log_fn)
