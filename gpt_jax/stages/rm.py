"""Reward modeling: a scalar head on the SFT transformer, read at each sequence's final (end-of-text)
token and trained with the Bradley-Terry loss on pairwise comparisons.

  python -m gpt_jax rm --config=experiments/rm.py:tiny --config.train.init_from=SFT_DIR --workdir=DIR

The workdir holds config.json, the SFT run's tokenizer, checkpoints/ (params {"trunk", "head"}) and,
once training is done, reward_stats.json: the reward mean/std over the SFT model's own samples to
train prompts, which the RL stages use to normalize rewards. Scoring lives in rewards.py.

Legend: B rows (2 per pair), N pairs, T time, D model width.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import distributed, grading, loop, losses, placed, rewards, runs, sampling, sharding
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
  "rm",
  model=model_lib.SCHEMA,
  tasks=config_lib.subset(
    tasks_lib.SCHEMA, seed=Key(1, ">= 0"), train=Key(8000, ">= 1"), eval=Key(512, ">= 1")
  ),
  rm={
    "data_path": Key(""),  # '' = the embedded comparisons, written to <workdir>/data/{train,eval}.jsonl
    "eval_path": Key(""),  # '' with data_path: hold out eval_fraction of the prompts of data_path by hash
    "eval_fraction": Key(0.05, "(0, 1)"),
    "seed": Key(0, ">= 0"),  # order of the prompts in each epoch
    "use_margin": Key(False),  # subtract each pair's "margin" inside the log-sigmoid (Llama 2)
    "center_coef": Key(0.0, ">= 0"),  # coef * (r_chosen + r_rejected)^2 keeps rewards near 0
    "require_sft": Key(True),  # train.init_from must be a run of the SFT stage
    "rambling_fraction": Key(0.25, "[0, 1]"),  # share of pairs "bare answer > the same answer in filler"
    # The SFT model's own graded mistakes as rejected replies (InstructGPT ranks model samples): one
    # reply sampled for each of the first policy_train / policy_eval prompts; wrong ones become pairs.
    "policy_train": Key(0, ">= 0"),
    "policy_eval": Key(0, ">= 0"),
    "policy_temperature": Key(1.0, "> 0"),
    # reward_stats.json: the reward mean/std over the SFT model's own samples (for the RL stages).
    "stats_samples": Key(256, ">= 0"),
    "stats_max_new_tokens": Key(16, ">= 1"),
    "stats_temperature": Key(1.0, ">= 0"),  # 0: greedy
    "stats_batch": Key(64, ">= 1"),
  },
)


def default_config():
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """All checks that need no data and no compile; returns the model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  t, r = cfg.train, cfg.rm
  config_lib.check_train(cfg, jax.device_count())
  distributed.check_train(cfg)
  config_lib.check_batch(
    "train.global_batch",
    int(t.global_batch),
    int(t.grad_accum),
    config_lib.data_shards(cfg, jax.device_count()),
    unit=2,
  )
  if not str(t.init_from):
    raise ConfigError("train.init_from: required; set it to the SFT run's workdir")
  if r.data_path and (int(r.policy_train) or int(r.policy_eval)):
    raise ConfigError(
      "rm.policy_train: the SFT model's graded mistakes need the embedded tasks (rm.data_path '')"
    )
  for key, split in (("policy_train", "train"), ("policy_eval", "eval")):
    if int(r[key]) > int(cfg.tasks[split]):
      raise ConfigError(f"rm.{key}: {r[key]} is more than tasks.{split}={cfg.tasks[split]} prompts")
  # +2: the eos that the reward head reads after each reply takes a slot too (sample_replies)
  config_lib.check_room_for_prompt(r, "rm", "stats_max_new_tokens", model_cfg.max_seq_len, reserve=2)
  tasks_lib.check_data_section(r, "rm")
  tasks_lib.spec_from_config(cfg.tasks)
  return model_cfg


# --- data -------------------------------------------------------------------------------------------


def report_data(train_enc, eval_enc, seq_len: int, log_fn) -> dict:
  """Logs the counts (a too-long pair is dropped and counted, never cut) and returns them for metrics."""
  out = {}
  for name, enc in (("train", train_enc), ("eval", eval_enc)):
    st = enc.stats
    log_fn(
      f"[rm] {name}: {st['pairs']} pairs from {st['groups']} prompts, {st['tokens']} tokens; "
      f"{st['dropped_too_long']} pairs dropped as longer than train.seq_len={seq_len}"
    )
    out.update({f"{name}_{k}": v for k, v in st.items()})
  return out


# --- loss and evaluation ----------------------------------------------------------------------------


def rm_loss(model: placed.Model, *, use_margin: bool = False, center_coef: float = 0.0):
  """Bradley-Terry over a comparison batch: rows 2i / 2i+1 are pair i's chosen / rejected side."""

  def loss_fn(params, batch, rng):
    del rng
    r_N2 = model.scores(params, batch).reshape(-1, 2)
    pair_mask_N = batch["pair_mask"].reshape(-1, 2)[:, 0]
    margin_N = batch["margin"].reshape(-1, 2)[:, 0] if use_margin else None
    return losses.bradley_terry(
      r_N2[:, 0], r_N2[:, 1], pair_mask_N, margin_B=margin_N, center_coef=center_coef
    )

  return loss_fn


def eval_summary(sums: dict) -> dict:
  """Held-out metrics from summed eval outputs: pairwise accuracy, mean margin, reward mean and std."""
  pairs = max(float(sums["weight"]), 1.0)
  mean = float(sums["reward_sum"]) / pairs
  var = max(float(sums["reward_sq_sum"]) / pairs - mean * mean, 0.0)
  return {
    "loss": float(sums["loss_sum"]) / pairs,
    "accuracy": float(sums["accuracy_sum"]) / pairs,
    "margin": float(sums["margin_sum"]) / pairs,
    "reward_mean": mean,
    "reward_std": var**0.5,
    "pairs": float(sums["weight"]),
  }


def accuracy_by_label(model: placed.Model, params, enc: comp_data.EncodedPairs, pad_id: int) -> dict:
  """Held-out pairwise accuracy per label ("kind/reason" of the data, e.g. accuracy_add/wrong); {} without labels."""
  if not any(enc.labels):
    return {}
  seqs = [s for pair in zip(enc.chosen, enc.rejected) for s in pair]
  r_N2 = np.asarray(rewards.score_sequences(model, params, seqs, pad_id)).reshape(-1, 2)
  right = r_N2[:, 0] > r_N2[:, 1]
  labels = np.asarray(enc.labels)
  return {f"accuracy_{k}": float(right[labels == k].mean()) for k in sorted(set(enc.labels)) if k}


# --- the SFT model's own samples ---------------------------------------------------------------------


def sample_replies(
  model, params, tokenizer, prompts, *, max_new_tokens, temperature, batch, seed, limit, what
):
  """One sampled reply per prompt (messages), for the first `limit` prompts that leave room for
  max_new_tokens and the eos the reward head reads. Returns [(prompt index, prompt ids, reply ids
  (ending with the end-of-turn token unless cut at max_new_tokens))]; DataError when no prompt fits."""
  room = model.cfg.max_seq_len - max_new_tokens - 1  # the eos read by the head takes one slot
  ids = [(i, tokenizer.render_chat(p, add_generation_prompt=True)[0]) for i, p in enumerate(prompts)]
  ids = [(i, x) for i, x in ids if len(x) <= room][:limit]
  if not ids:
    raise DataError(
      f"rm: no {what} prompt fits model.max_seq_len - {max_new_tokens} new tokens - 1 = {room} tokens"
    )
  replier = sampling.Replier(
    model.cfg,
    model.graphdef,
    eos_id=tokenizer.special_id("end_of_turn"),
    pad_id=tokenizer.pad_id,
    prompt_len=min(-(-max(len(x) for _, x in ids) // 16) * 16, room),
    batch=min(batch, len(ids)),
    sample_cfg=sampling.SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature),
    mesh=model.mesh,
    params_sharding=model.trunk_shardings,
  )
  replies = replier(params, [x for _, x in ids], jax.random.key(seed))
  return [(i, x, reply) for (i, x), reply in zip(ids, replies)]


def reward_stats(cfg, model, rm_params, sft_params, tokenizer, prompts, log_fn) -> dict:
  """Samples one reply from the SFT policy per prompt (rm.stats_* knobs) and scores it with the RM.

  Returns {"mean", "std", "n", "source": "sft samples"}: the RL stages divide (reward - mean) by std.
  """
  r = cfg.rm
  replies = sample_replies(
    model,
    sft_params,
    tokenizer,
    prompts,
    max_new_tokens=int(r.stats_max_new_tokens),
    temperature=float(r.stats_temperature),
    batch=int(r.stats_batch),
    seed=int(cfg.train.seed),
    limit=int(r.stats_samples),
    what="train",
  )
  seqs = [comp_data.reward_inputs(tokenizer, x, reply) for _, x, reply in replies]
  batch = min(int(r.stats_batch), len(seqs))
  scores = np.asarray(rewards.score_sequences(model, rm_params, seqs, tokenizer.pad_id, batch_size=batch))
  stats = {
    "mean": float(scores.mean()),
    "std": float(scores.std()),
    "n": int(scores.size),
    "source": "sft samples",
  }
  log_fn(f"[rm] reward over {stats['n']} SFT samples: mean={stats['mean']:.4g} std={stats['std']:.4g}")
  return stats


def policy_pairs(cfg, model, sft_params, tokenizer, tasks, split: str) -> list[dict]:
  """Comparisons of the SFT model's own mistakes: one reply sampled per task (rm.policy_temperature);
  each reply the grader marks wrong becomes the rejected side against the reference answer (reason
  "sampled"). This is InstructGPT's recipe (labelers rank the model's own samples) with the grader as
  the labeler: the reward model then learns the mistakes the RL policy actually makes."""
  r = cfg.rm
  replies = sample_replies(
    model,
    sft_params,
    tokenizer,
    [t.messages for t in tasks],
    max_new_tokens=int(r.stats_max_new_tokens),
    temperature=float(r.policy_temperature),
    batch=int(r.stats_batch),
    seed=int(cfg.tasks.seed) + (0 if split == "train" else 1),
    limit=len(tasks),
    what=split,
  )
  eot = tokenizer.special_id("end_of_turn")
  rows = []
  for i, _, reply in replies:
    task = tasks[i]
    text = grading.reply_text(tokenizer, reply, eot)
    if not text.strip() or tasks_lib.grade(task, text) > 0 or text == task.answer:
      continue
    rows.append(
      {
        "prompt": task.messages,
        "chosen": task.answer,
        "rejected": text,
        "kind": task.kind,
        "reason": "sampled",
      }
    )
  return rows


def write_stats(
  cfg, workdir, model, rm_params, tokenizer, train_comps, step: int, src: runs.Run, log_fn
) -> None:
  """Writes <workdir>/reward_stats.json (atomically) unless it already describes checkpoint `step`."""
  stats = runs.read_reward_stats(workdir)
  if stats is not None and stats.get("step") == step:
    return
  sft_params = src.restore(model.trunk_abstract())
  prompts, seen = [], set()
  for c in train_comps:  # distinct prompts, in file order
    key = json.dumps(c.prompt, sort_keys=True)
    if key not in seen:
      seen.add(key)
      prompts.append(c.prompt)
  stats = reward_stats(cfg, model, rm_params, sft_params, tokenizer, prompts, log_fn)
  stats.update(step=step, sft_workdir=src.workdir)
  runs.write_json(os.path.join(workdir, runs.REWARD_STATS_FILE), stats)


# --- the stage --------------------------------------------------------------------------------------


def open_init(cfg, recorded: dict | None = None) -> runs.Run:
  """The run the reward model starts from: an SFT run (unless rm.require_sft=False) of this model's shape.
  A resumed run goes on from the checkpoint it `recorded` (its extra "init") while that is still there,
  though the run at train.init_from has been trained further since."""
  src = runs.open(cfg.train.init_from)
  if recorded and recorded.get("workdir") == src.fact()["workdir"] and recorded.get("step") != src.step:
    step_dir = os.path.join(src.workdir, "checkpoints", str(recorded.get("step")))
    if os.path.isdir(step_dir):
      src = runs.open(step_dir, "train.init_from")
  if bool(cfg.rm.require_sft):
    runs.check_stage(
      src,
      ("sft",),
      "train.init_from",
      "the reward model starts from an SFT run (or set rm.require_sft=False)",
    )
  else:
    runs.check_stage(src, tuple(s for s in runs.MODEL_ITEM if s != "rm"), "train.init_from")
  runs.check_model(config_lib.to_dict(cfg.model), src, "the SFT model")
  return src


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Trains the reward model to cfg.train.steps from the SFT run (train.init_from); resumes from the
  workdir. Writes reward_stats.json once training is done."""
  model_cfg = validate(cfg)
  workdir_lib.check_writable(workdir)
  t, r = cfg.train, cfg.rm
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(t.steps))
    # Also needed after training (reward statistics over the SFT model's samples).
    src = open_init(cfg, resume.extra.get("init"))
    tokenizer = runs.install_tokenizer(src, workdir, log_fn)
    record = {**runs.tokenizer_record(tokenizer), "init": src.fact()}
    resume.check_record(record)
    tok_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    model = placed.Model.build(model_cfg, mesh, head=True)

    def sampled_pairs(tasks, split):
      n = int(r.policy_train if split == "train" else r.policy_eval)
      return (
        policy_pairs(cfg, model, src.restore(model.trunk_abstract()), tokenizer, tasks[:n], split)
        if n
        else []
      )

    train_comps, eval_comps = comp_data.load_splits(cfg.rm, cfg.tasks, workdir, "rm", log_fn, sampled_pairs)
    seq_len = int(t.seq_len)
    train_enc = comp_data.encode(train_comps, tokenizer, seq_len, "rm train")
    eval_enc = comp_data.encode(eval_comps, tokenizer, seq_len, "rm eval")
    data_stats = report_data(train_enc, eval_enc, seq_len, log_fn)
    args = dict(global_batch=int(t.global_batch), seq_len=seq_len, sharding=sharding.batch_sharding(mesh))
    # Built before anything compiles: a ranking with more pairs than a batch holds fails here.
    train_loader = comp_data.ComparisonLoader(
      train_enc, seed=int(r.seed), grad_accum=int(t.grad_accum), **args
    )
    comp_data.ComparisonLoader(eval_enc, shuffle=False, repeat=False, **args)
    with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False) as w:
      w.write(0, data_stats, prefix="data/")
    log_fn(f"[rm] starting from {src.describe()}")
    job = loop.supervised(
      cfg,
      model,
      name="rm",
      loss_fn=rm_loss(model, use_margin=bool(r.use_margin), center_coef=float(r.center_coef)),
      train_batches=train_loader,
      eval_batches=lambda: comp_data.ComparisonLoader(eval_enc, shuffle=False, repeat=False, **args),
      eval_summary=eval_summary,
      init_params=lambda: model.with_zero_head(src.restore(model.trunk_abstract())),
      tokens_per_step=int(t.global_batch) * seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, seq_len),
      batch_keys=comp_data.KEYS,
      record=record,
    )
    result = loop.run(cfg, workdir, job, log_fn=log_fn)
    if result.eval:  # the final held-out accuracy, broken down by the data's labels
      by_label = accuracy_by_label(model, result.params, eval_enc, tokenizer.pad_id)
      if by_label:
        with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False) as w:
          w.write(result.step, by_label, prefix="eval/")
        log_fn(
          "[rm] held-out accuracy by label: " + " ".join(f"{k[9:]}={v:.3f}" for k, v in by_label.items())
        )
        result.eval.update(by_label)
    if int(r.stats_samples):
      write_stats(cfg, workdir, model, result.params, tokenizer, train_comps, result.step, src, log_fn)
    return result
