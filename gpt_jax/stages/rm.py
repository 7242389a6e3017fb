"""Reward modeling: a scalar head on the SFT transformer, read at each sequence's final (end-of-text)
token and trained with the Bradley-Terry loss on pairwise comparisons.

  python -m gpt_jax rm --config=experiments/rm.py:tiny --config.train.init_from=SFT_WORKDIR --workdir=DIR
  python -m gpt_jax score --workdir=DIR --prompt="Add 2 and 3." --response="5"

The workdir holds config.json, tokenizer/ (copied from the SFT workdir), checkpoints/ (params = the
transformer's + "score_head") and, once training is done, reward_stats.json: the reward mean/std over
the SFT model's own samples to train prompts, which PPO uses to normalize rewards.

Legend: B rows (2 per pair), N pairs, T time, D model width.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import distributed, heads, losses, sampling, sharding, trainer
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax.data import comparisons as comp_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.data.tokenizer import Tokenizer, check_vocab, load_any_tokenizer
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.model import ModelConfig
from gpt_jax.stages import sft

STATS_FILE = "reward_stats.json"
# For PPO: a rollout's reward sequence (prompt ids + response ids + eos) and a right-padded batch of them.
reward_inputs = comp_data.reward_inputs
reward_batch = comp_data.reward_batch


# --- config ---------------------------------------------------------------------------------------


def task_spec(r) -> tasks_lib.TaskSpec:
  """The TaskSpec of the cfg.rm task_* knobs (ConfigError names the rm key)."""
  return tasks_lib.spec_from_config(r, "rm")


def validate(cfg) -> ModelConfig:
  """All checks that need no data and no compile; returns the model config."""
  model_cfg = ModelConfig.from_config(cfg.model)
  config_lib.validate_train(cfg, jax.device_count())
  t, r = cfg.train, cfg.rm
  if not str(t.init_from):
    raise ConfigError("train.init_from: required; set it to the SFT workdir (or its checkpoints dir)")
  if int(t.global_batch) % (2 * int(t.grad_accum)):
    raise ConfigError(
      f"train.global_batch: {t.global_batch} rows must be a multiple of 2 x train.grad_accum = "
      f"{2 * int(t.grad_accum)} (each pair takes a chosen and a rejected row)"
    )
  if float(r.center_coef) < 0:
    raise ConfigError(f"rm.center_coef: must be >= 0, got {r.center_coef}")
  config_lib.check_at_least(
    r,
    "rm",
    dict(
      task_train=1,
      task_eval=1,
      stats_samples=0,
      stats_max_new_tokens=1,
      stats_batch=1,
      policy_train=0,
      policy_eval=0,
    ),
  )
  if r.data_path and (int(r.policy_train) or int(r.policy_eval)):
    raise ConfigError(
      "rm.policy_train: the SFT model's graded mistakes need the embedded tasks (rm.data_path '')"
    )
  for key in ("policy_train", "policy_eval"):
    if int(r[key]) > int(r[f"task_{key[7:]}"]):
      raise ConfigError(f"rm.{key}: {r[key]} is more than rm.task_{key[7:]}={r[f'task_{key[7:]}']} prompts")
  if float(r.policy_temperature) <= 0:
    raise ConfigError(
      f"rm.policy_temperature: must be > 0 (greedy replies would repeat), got {r.policy_temperature}"
    )
  if float(r.stats_temperature) < 0:
    raise ConfigError(f"rm.stats_temperature: must be >= 0 (0 is greedy), got {r.stats_temperature}")
  # +2: the eos that the reward head reads after each reply takes a slot too (sample_replies)
  config_lib.check_room_for_prompt(r, "rm", "stats_max_new_tokens", model_cfg.max_seq_len, reserve=2)
  if not 0.0 <= float(r.rambling_fraction) <= 1.0:
    raise ConfigError(f"rm.rambling_fraction: must be in [0, 1], got {r.rambling_fraction}")
  tasks_lib.check_data_section(r, "rm", "comparisons")
  return model_cfg


# --- the SFT checkpoint to start from ---------------------------------------------------------------


def check_init(cfg, src: sft.InitSource) -> None:
  """CheckpointError unless src is an SFT checkpoint (when rm.require_sft) of this config's model shape."""
  extra = sft.init_extra(src)
  stage = extra.get("stage")
  if bool(cfg.rm.require_sft) and stage != "sft":
    raise CheckpointError(
      f"train.init_from: {src.checkpoint} was written by stage {stage!r}, not by SFT; the reward model starts "
      "from an SFT checkpoint (set rm.require_sft=False to start from another)"
    )
  saved = (extra.get("config") or {}).get("model")
  if saved is None:
    return  # restore_params still names any tensor whose shape differs
  diff = sft.model_difference(saved, config_lib.to_dict(cfg.model))
  if diff is not None:
    key, mine, theirs = diff
    raise CheckpointError(
      f"model.{key}: {mine!r} differs from {theirs!r} in the init checkpoint "
      f"{src.checkpoint}; the reward model must have the SFT model's shape"
    )


def trunk_abstract(model: trainer.Model) -> dict:
  """The transformer's params (no head) as ShapeDtypeStructs carrying their shardings."""
  shapes, _ = heads.split_head(model.shapes)
  shardings, _ = heads.split_head(model.shardings)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def restore_init(model: trainer.Model, src: sft.InitSource) -> dict:
  """The SFT transformer plus a zero head (every sequence starts at reward 0), sharded as the model says."""
  params = ckpt_lib.restore_params(src.checkpoint, trunk_abstract(model))
  head = jax.jit(lambda: heads.init_head(model.cfg.d_model), out_shardings=model.shardings[heads.HEAD])()
  return {**params, heads.HEAD: head}


# --- data -------------------------------------------------------------------------------------------


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def load_data(cfg, workdir: str, log_fn, sampled_pairs=None) -> tuple[list, list]:
  """(train, eval) comparisons: the configured files, or the embedded task comparisons written once into
  <workdir>/data/ (a resumed run reads what the first run wrote). Held-out prompts never train.

  sampled_pairs(tasks, split) -> rows adds the SFT model's graded mistakes (policy_pairs) for the first
  rm.policy_train / rm.policy_eval tasks of each split; every process calls it (the sampler is a
  collective), process 0 writes."""
  r = cfg.rm
  if r.data_path:
    train = comp_data.read_comparisons(r.data_path)
    if r.eval_path:
      return train, comp_data.read_comparisons(r.eval_path)
    train, held = comp_data.hash_split(train, float(r.eval_fraction))
    if not train or not held:
      raise DataError(
        f"rm.data_path: {r.data_path} is too small to hold out rm.eval_fraction={r.eval_fraction}; give rm.eval_path"
      )
    return train, held
  spec, data_dir = task_spec(r), os.path.join(workdir, "data")
  splits = (
    ("train", int(r.task_train), int(r.task_seed), int(r.policy_train)),
    ("eval", int(r.task_eval), int(r.task_seed) + 1, int(r.policy_eval)),
  )
  missing = {split for split, *_ in splits if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl"))}
  _sync("gpt_jax_rm_comparisons_checked")  # every process has looked before process 0 writes
  for split, n, seed, n_policy in splits:
    if split not in missing:
      continue
    tasks = tasks_lib.make_tasks(split, n, seed, spec)
    rows = tasks_lib.comparisons(tasks, seed, float(r.rambling_fraction))
    sampled = sampled_pairs(tasks[:n_policy], split) if n_policy and sampled_pairs else []
    if jax.process_index() == 0:
      path = os.path.join(data_dir, f"{split}.jsonl")
      tasks_lib.write_jsonl(path, rows + sampled)
      extra = f" + {len(sampled)} of the SFT model's mistakes on {n_policy} prompts" if n_policy else ""
      log_fn(f"[rm] wrote {n} {split} comparisons ({', '.join(spec.kinds)}){extra} -> {path}")
  _sync("gpt_jax_rm_comparisons_written")
  return tuple(comp_data.read_comparisons(os.path.join(data_dir, f"{s}.jsonl")) for s in ("train", "eval"))


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


# --- model and loss ---------------------------------------------------------------------------------


def rewards_from_batch(model: trainer.Model, params, batch: dict) -> jax.Array:
  """The reward of every row, float32 (B,): the head at batch["end_index"] ((B,) or (B, 1)).

  batch holds inputs, positions, segment_ids (B, T), right-padded, each row ending with eos at end_index.
  Pure and jittable (model is static).
  """
  out = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], compute_logits=False)
  _, head = heads.split_head(params)
  return heads.score_at(out.hidden, head, batch["end_index"].reshape(-1))


def rm_loss(model: trainer.Model, *, use_margin: bool = False, center_coef: float = 0.0):
  """Bradley-Terry over a comparison batch: rows 2i / 2i+1 are pair i's chosen / rejected side."""

  def loss_fn(params, batch, rng):
    del rng
    r_N2 = rewards_from_batch(model, params, batch).reshape(-1, 2)
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


def make_scorer(model: trainer.Model):
  """jitted `scorer(params, batch) -> (B,)` rewards, activations sharded by the rules table."""

  def run(params, batch):
    with sharding.activation_mesh(model.mesh):
      return rewards_from_batch(model, params, batch)

  return jax.jit(run)


def score_sequences(
  model: trainer.Model, params, sequences, pad_id: int, *, batch_size: int = 64, scorer=None
):
  """Rewards of token sequences (each ending with eos), in order: a list of floats.

  Rows are padded to a multiple of 32 tokens (at most model.max_seq_len) and batches to batch_size rows,
  so few shapes compile. DataError names a sequence longer than model.max_seq_len.
  """
  scorer = scorer or make_scorer(model)
  limit = model.cfg.max_seq_len
  for i, s in enumerate(sequences):
    if len(s) > limit:
      raise DataError(
        f"pair {i}: prompt + response + eos is {len(s)} tokens, more than model.max_seq_len={limit}"
      )
  out: list[float] = []
  for lo in range(0, len(sequences), batch_size):
    chunk = list(sequences[lo : lo + batch_size])
    T = min(-(-max(len(s) for s in chunk) // 32) * 32, limit)
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # one batch shape: one compile
    batch = comp_data.reward_batch(rows, T, pad_id)
    out += [float(x) for x in jax.device_get(scorer(params, batch))[: len(chunk)]]
  return out


def accuracy_by_label(model: trainer.Model, params, enc: comp_data.EncodedPairs, pad_id: int) -> dict:
  """Held-out pairwise accuracy per label ("kind/reason" of the data, e.g. accuracy_add/wrong); {} without labels."""
  if not any(enc.labels):
    return {}
  seqs = [s for pair in zip(enc.chosen, enc.rejected) for s in pair]
  r_N2 = np.asarray(score_sequences(model, params, seqs, pad_id)).reshape(-1, 2)
  right = r_N2[:, 0] > r_N2[:, 1]
  labels = np.asarray(enc.labels)
  return {f"accuracy_{k}": float(right[labels == k].mean()) for k in sorted(set(enc.labels)) if k}


# --- reward statistics over the SFT model's own samples ---------------------------------------------


def sample_replies(
  model: trainer.Model,
  params,
  tokenizer: Tokenizer,
  prompts,
  *,
  max_new_tokens: int,
  temperature: float,
  batch: int,
  seed: int,
  limit: int,
  what: str,
) -> list[tuple[int, list[int], list[int]]]:
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
  P = min(-(-max(len(x) for _, x in ids) // 16) * 16, room)
  batch = min(batch, len(ids))
  sampler = sampling.make_sampler(
    model.cfg,
    model.graphdef,
    eos_id=tokenizer.special_id("end_of_turn"),
    pad_id=tokenizer.pad_id,
    max_prompt_len=P,
    sample_cfg=sampling.SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature),
    mesh=model.mesh,
    params_sharding=heads.split_head(model.shardings)[0],
  )
  key = jax.random.key(seed)
  out = []
  for k, lo in enumerate(range(0, len(ids), batch)):
    chunk = ids[lo : lo + batch]
    prompt_ids = [x for _, x in chunk]
    tokens_BP, lengths_B = sampling.pad_prompts(
      prompt_ids + [prompt_ids[0]] * (batch - len(chunk)), tokenizer.pad_id, P
    )
    res = jax.device_get(sampler(params, tokens_BP, lengths_B, jax.random.fold_in(key, k)))
    for (i, x), row, n in zip(chunk, res.tokens, res.lengths):
      out.append((i, x, [int(t) for t in row[: int(n)]]))
  return out


def reward_stats(
  cfg, model: trainer.Model, rm_params, sft_params, tokenizer: Tokenizer, prompts, log_fn
) -> dict:
  """Samples one reply from the SFT policy per prompt (rm.stats_* knobs) and scores it with the RM.

  Returns {"mean", "std", "n", "source": "sft samples"}: PPO divides (reward - mean) by std.
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
  scores = np.asarray(score_sequences(model, rm_params, seqs, tokenizer.pad_id, batch_size=batch))
  stats = {
    "mean": float(scores.mean()),
    "std": float(scores.std()),
    "n": int(scores.size),
    "source": "sft samples",
  }
  log_fn(f"[rm] reward over {stats['n']} SFT samples: mean={stats['mean']:.4g} std={stats['std']:.4g}")
  return stats


def policy_pairs(
  cfg, model: trainer.Model, sft_params, tokenizer: Tokenizer, tasks, split: str
) -> list[dict]:
  """Comparisons of the SFT model's own mistakes: one reply sampled per task (rm.policy_temperature);
  each reply the grader marks wrong becomes the rejected side against the reference answer (reason
  "sampled"). This is InstructGPT's recipe (labelers rank the model's own samples) with the grader as
  the labeler: the reward model then learns the mistakes PPO's policy actually makes, not only the
  hand-made ones, which is what keeps PPO from finding them as reward hacks."""
  r = cfg.rm
  replies = sample_replies(
    model,
    sft_params,
    tokenizer,
    [t.messages for t in tasks],
    max_new_tokens=int(r.stats_max_new_tokens),
    temperature=float(r.policy_temperature),
    batch=int(r.stats_batch),
    seed=int(r.task_seed) + (0 if split == "train" else 1),
    limit=len(tasks),
    what=split,
  )
  eot = tokenizer.special_id("end_of_turn")
  rows = []
  for i, _, reply in replies:
    task = tasks[i]
    text = comp_data.reply_text(tokenizer, reply, eot)
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
  cfg, workdir: str, model: trainer.Model, rm_params, tokenizer, train_comps, step: int, log_fn
):
  """Writes <workdir>/reward_stats.json (atomically) unless it already describes checkpoint `step`."""
  path = os.path.join(workdir, STATS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      if json.load(f).get("step") == step:
        return
  src = sft.resolve_init(cfg.train.init_from)
  check_init(cfg, src)
  sft_params = ckpt_lib.restore_params(src.checkpoint, trunk_abstract(model))
  prompts, seen = [], set()
  for c in train_comps:  # distinct prompts, in file order
    key = json.dumps(c.prompt, sort_keys=True)
    if key not in seen:
      seen.add(key)
      prompts.append(c.prompt)
  stats = reward_stats(cfg, model, rm_params, sft_params, tokenizer, prompts, log_fn)
  stats.update(step=step, sft_workdir=src.workdir)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(stats, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# --- the stage --------------------------------------------------------------------------------------


def run(cfg, workdir: str, log_fn=print) -> dict:
  """Trains the reward model to cfg.train.steps from the SFT checkpoint (train.init_from); resumes from
  the workdir. Returns trainer.fit's result plus "data" (the dataset counts) and "reward_stats"."""
  model_cfg = validate(cfg)
  trainer.check_workdir(workdir)
  t, r = cfg.train, cfg.rm
  with distributed.WorkdirLock(workdir):
    resuming = sft.has_checkpoint(workdir)
    src = None
    if not resuming:  # a resumed run needs the SFT workdir only for reward_stats.json
      src = sft.resolve_init(t.init_from)
      check_init(cfg, src)
    trainer.save_config(workdir, cfg)
    tokenizer = sft.install_tokenizer(src, workdir, log_fn)
    check_vocab(tokenizer, model_cfg.vocab_size)
    mesh = sharding.make_mesh(cfg.mesh)
    model = trainer.Model.build(model_cfg, mesh, head=True)

    def sampled_pairs(tasks, split):
      init = src or sft.resolve_init(t.init_from)
      sft_params = ckpt_lib.restore_params(init.checkpoint, trunk_abstract(model))
      return policy_pairs(cfg, model, sft_params, tokenizer, tasks, split)

    train_comps, eval_comps = load_data(cfg, workdir, log_fn, sampled_pairs)
    seq_len = int(t.seq_len)
    train_enc = comp_data.encode(train_comps, tokenizer, seq_len, "rm train")
    eval_enc = comp_data.encode(eval_comps, tokenizer, seq_len, "rm eval")
    data_stats = report_data(train_enc, eval_enc, seq_len, log_fn)

    batch_sh = sharding.batch_sharding(mesh)
    args = dict(global_batch=int(t.global_batch), seq_len=seq_len, sharding=batch_sh)
    # Built before anything compiles: a ranking with more pairs than a batch holds fails here.
    train_loader = comp_data.ComparisonLoader(
      train_enc, seed=int(r.seed), grad_accum=int(t.grad_accum), **args
    )
    comp_data.ComparisonLoader(eval_enc, shuffle=False, repeat=False, **args)
    writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
    writer.write(0, data_stats, prefix="data/")
    writer.close()
    stage = trainer.Stage(
      name="rm",
      loss_fn=rm_loss(model, use_margin=bool(r.use_margin), center_coef=float(r.center_coef)),
      train_batches=train_loader,
      eval_batches=lambda: comp_data.ComparisonLoader(eval_enc, shuffle=False, repeat=False, **args),
      eval_summary=eval_summary,
      init_params=lambda: restore_init(model, src or sft.resolve_init(t.init_from)),
      tokens_per_step=int(t.global_batch) * seq_len,
      flops_per_token=model_lib.flops_per_token(model_cfg, seq_len),
      batch_keys=comp_data.KEYS,
    )
    if src is not None:
      log_fn(f"[rm] starting from {src.checkpoint}")
    result = trainer.fit(cfg, workdir, model, stage, log_fn=log_fn)
    if result["eval"]:  # the final held-out accuracy, broken down by the data's labels
      by_label = accuracy_by_label(model, result["params"], eval_enc, tokenizer.pad_id)
      if by_label:
        with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False) as w:
          w.write(result["step"], by_label, prefix="eval/")
        log_fn(
          "[rm] held-out accuracy by label: " + " ".join(f"{k[9:]}={v:.3f}" for k, v in by_label.items())
        )
        result["eval"].update(by_label)
    if int(r.stats_samples):
      write_stats(cfg, workdir, model, result["params"], tokenizer, train_comps, result["step"], log_fn)
    result["data"] = data_stats
    result["reward_stats"] = read_stats(workdir)
    return result


# --- loading and scoring ----------------------------------------------------------------------------


def read_stats(workdir: str) -> dict | None:
  """The saved reward_stats.json, or None before training has finished."""
  path = os.path.join(workdir, STATS_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_reward_model(workdir: str, mesh=None):
  """Returns (trainer.Model with head, params, tokenizer, reward stats or None) of an RM workdir.

  mesh defaults to all devices on the data axis. CheckpointError if the workdir holds no reward model.
  """
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"reward model workdir {workdir}: no config.json (not a reward-model workdir)")
  with open(cfg_path) as f:
    saved = json.load(f)
  if saved.get("stage") != "rm":
    raise CheckpointError(
      f"reward model workdir {workdir}: config.json is of stage {saved.get('stage')!r}, not 'rm'"
    )
  model_cfg = ModelConfig.from_config(saved["model"])
  mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = trainer.Model.build(model_cfg, mesh, head=True)
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), model.shapes, model.shardings
  )
  params = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), abstract)
  return model, params, load_any_tokenizer(workdir), read_stats(workdir)


def score(workdir: str, pairs, *, mesh=None, batch_size: int = 32) -> list[float]:
  """The reward of each (prompt messages or text, response text) pair, read at the eos after the
  rendered conversation (as in training)."""
  model, params, tokenizer, _ = load_reward_model(workdir, mesh)
  seqs = [comp_data.response_tokens(tokenizer, p, resp) for p, resp in pairs]
  if not seqs:
    return []
  return score_sequences(model, params, seqs, tokenizer.pad_id, batch_size=min(batch_size, len(seqs)))


def read_pairs_file(path: str) -> list[tuple]:
  """[(prompt, response)] of a JSONL of {"prompt": text or messages, "response": text}; DataError names file:line."""
  if not os.path.isfile(path):
    raise DataError(f"--pairs_file: {path} does not exist")
  out = []
  for where, row in tasks_lib.read_jsonl(path):
    for field in ("prompt", "response"):
      if not isinstance(row, dict) or field not in row:
        raise DataError(f'{where}: missing field \'{field}\' (expected {{"prompt", "response"}})')
    out.append(
      (
        comp_data.check_prompt(row["prompt"], where),
        comp_data.check_response(row["response"], where, "response"),
      )
    )
  if not out:
    raise DataError(f"--pairs_file: {path} holds no pairs")
  return out


def score_cli(
  workdir: str,
  prompt: str | None = None,
  response: str | None = None,
  pairs_file: str | None = None,
  print_fn=print,
) -> list[float]:
  """`python -m gpt_jax score`: prints one reward per pair (one per line) and returns them."""
  if pairs_file and (prompt is not None or response is not None):
    raise ConfigError("--pairs_file: give either --pairs_file or --prompt with --response, not both")
  if pairs_file:
    pairs = read_pairs_file(pairs_file)
  elif prompt is not None and response is not None:
    pairs = [(prompt, response)]
  else:
    raise ConfigError("--prompt/--response: both are required (or give --pairs_file)")
  rewards = score(workdir, pairs)
  for value in rewards:
    print_fn(f"{value:.6f}")
  return rewards
