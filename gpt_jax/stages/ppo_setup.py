"""What PPO reads before it builds anything: the SFT and reward-model workdirs, the prompts, and the
checks that they fit together. Everything here runs before any array is placed or any function compiled.

The reward-model workdir holds config.json (its model), tokenizer/, checkpoints/ (params = transformer
+ "score_head", see heads.py) and reward_stats.json {"mean", "std"} of its scores on held-out responses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.data.tokenizer import Tokenizer, check_vocab, load_any_tokenizer
from gpt_jax.errors import CheckpointError, ConfigError, DataError
from gpt_jax.model import ModelConfig
from gpt_jax.stages import rm as rm_stage
from gpt_jax.stages import sft as sft_stage

REWARD_STATS_FILE = rm_stage.STATS_FILE


@dataclasses.dataclass
class Sources:
  """The two finished runs PPO starts from."""

  sft: sft_stage.InitSource  # the policy's and the reference's checkpoint
  rm: sft_stage.InitSource  # the reward model's (and the critic's) checkpoint
  rm_model: ModelConfig
  tokenizer: Tokenizer
  score_mean: float
  score_std: float
  task_spec: tasks_lib.TaskSpec  # the SFT run's task knobs (for the embedded prompts)
  task_seed: int  # the SFT run's task seed: its held-out prompts are ours


@dataclasses.dataclass
class Prompt:
  ids: list[int]  # the rendered chat, ending with <|assistant|>
  answer: str | None  # the gold reply (None: no gold score for this prompt)
  kind: str
  text: str  # the last user turn, for sample logs


def validate(cfg) -> ModelConfig:
  """The checks that need no file: returns the policy's model config."""
  model_cfg = ModelConfig.from_config(cfg.model)
  p, t = cfg.ppo, cfg.train
  for key in ("sft_workdir", "rm_workdir"):
    if not str(p[key]):
      raise ConfigError(f"ppo.{key}: required; set it to the {key[:-8].upper()} run's workdir")
  positive = (
    "iterations",
    "rollout_batch",
    "minibatch",
    "epochs",
    "max_new_tokens",
    "eval_every",
    "kl_horizon",
  )
  config_lib.check_at_least(p, "ppo", dict.fromkeys((*positive, "hack_window"), 1))
  config_lib.check_at_least(
    p, "ppo", dict.fromkeys(("eval_prompts", "eval_pass_k", "task_train", "ptx_batch", "ptx_seq_len"), 0)
  )
  config_lib.check_at_least(p, "ppo", {"hack_min_change": 0.0})
  for key in ("clip", "value_clip", "target_kl", "kl_alarm"):
    if not float(p[key]) > 0:
      raise ConfigError(f"ppo.{key}: must be > 0, got {p[key]}")
  for key in ("gamma", "lam"):
    if not 0.0 <= float(p[key]) <= 1.0:
      raise ConfigError(f"ppo.{key}: must be in [0, 1], got {p[key]}")
  for key in ("vf_coef", "entropy_coef", "kl_coef", "no_eos_penalty", "ptx_coef", "value_lr"):
    if float(p[key]) < 0 or not math.isfinite(float(p[key])):
      raise ConfigError(f"ppo.{key}: must be a finite number >= 0, got {p[key]}")
  if not float(p.temperature) > 0:
    raise ConfigError(
      f"ppo.temperature: must be > 0 (PPO needs a sampling distribution), got {p.temperature}"
    )
  if p.reward not in ("rm", "gold"):
    raise ConfigError(
      f"ppo.reward: must be 'rm' (the reward model) or 'gold' (the task grader), got {p.reward!r}"
    )
  if float(p.value_lr) > 0 and p.value_head_on_policy:
    raise ConfigError(
      "ppo.value_lr: applies to the separate critic; with ppo.value_head_on_policy the value head trains "
      "with the policy at optim.lr_peak"
    )
  if int(p.rollout_batch) % int(p.minibatch):
    raise ConfigError(f"ppo.minibatch: {p.minibatch} must divide ppo.rollout_batch={p.rollout_batch}")
  if int(t.grad_accum) < 1 or int(p.minibatch) % int(t.grad_accum):
    raise ConfigError(f"train.grad_accum: {t.grad_accum} must be >= 1 and divide ppo.minibatch={p.minibatch}")
  if float(p.ptx_coef) > 0 and (int(p.ptx_batch) < 1 or int(p.ptx_batch) % int(t.grad_accum)):
    raise ConfigError(
      f"ppo.ptx_batch: {p.ptx_batch} must be >= 1 and divisible by train.grad_accum={t.grad_accum}"
    )
  config_lib.check_at_least(
    t, "train", dict.fromkeys(("checkpoint_every", "keep_checkpoints", "log_every"), 1)
  )
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite: must be 'stop' or 'skip', got {t.nonfinite!r}")
  config_lib.check_room_for_prompt(p, "ppo", "max_new_tokens", model_cfg.max_seq_len)
  # (the critic's optim section differs only in lr_peak, which ppo.value_lr's check covers)
  config_lib.validate_optim(
    cfg.optim, int(p.iterations) * int(p.epochs) * (int(p.rollout_batch) // int(p.minibatch))
  )
  for key in ("prompts", "eval_path", "ptx_path"):
    if p[key] and not os.path.isfile(p[key]):
      raise DataError(f"ppo.{key}: file {p[key]} does not exist")
  return model_cfg


def check_mesh(cfg, n_devices: int) -> int:
  """Returns the number of data-parallel shards; ConfigError when a batch does not split over them."""
  shards = config_lib.data_shards(cfg, n_devices)
  p = cfg.ppo
  for key, n in (
    ("rollout_batch", int(p.rollout_batch)),
    ("minibatch", int(p.minibatch) // int(cfg.train.grad_accum)),
  ):
    if n % shards:
      raise ConfigError(
        f"ppo.{key}: {n} rows do not split over the {shards} data-parallel shards (mesh.data*mesh.fsdp)"
      )
  if float(p.ptx_coef) > 0 and (int(p.ptx_batch) // int(cfg.train.grad_accum)) % shards:
    raise ConfigError(
      f"ppo.ptx_batch: {p.ptx_batch} rows do not split over the {shards} data-parallel shards"
    )
  return shards


def _saved_model(src: sft_stage.InitSource, what: str) -> dict:
  saved = sft_stage.saved_model_config(src)
  if saved is None:
    raise CheckpointError(
      f"ppo.{what}: {src.workdir} has no saved model config (config.json or checkpoint extra)"
    )
  return saved


def inspect_sources(cfg, model_cfg: ModelConfig) -> Sources:
  """Reads both workdirs' configs, tokenizers and the reward statistics, and checks that the policy
  config, the SFT checkpoint and the reward model agree. Raises ConfigError / DataError / CheckpointError."""
  p = cfg.ppo
  sft = sft_stage.resolve_init(p.sft_workdir)
  rm = sft_stage.resolve_init(p.rm_workdir)
  saved = _saved_model(sft, "sft_workdir")
  current = config_lib.to_dict(cfg.model)
  for key in sorted(set(saved) | set(current)):
    if key not in sft_stage.RUNTIME_MODEL_KEYS and saved.get(key) != current.get(key):
      raise ConfigError(
        f"model.{key}: {current.get(key)!r} differs from {saved.get(key)!r} in the SFT checkpoint {sft.checkpoint}; "
        "the policy must have the SFT model's shape"
      )
  rm_config = os.path.join(rm.workdir, "config.json")
  stage = None
  if os.path.isfile(rm_config):
    with open(rm_config) as f:
      stage = json.load(f).get("stage")
  if stage != "rm":
    raise ConfigError(
      f"ppo.rm_workdir: {rm_config} is not a reward-model run's config (stage {stage!r}, expected 'rm')"
    )
  try:
    rm_model = ModelConfig.from_config(_saved_model(rm, "rm_workdir"))
  except ConfigError as e:
    raise ConfigError(f"ppo.rm_workdir: the reward model's config is invalid: {e}") from None
  if rm_model.vocab_size != model_cfg.vocab_size:
    raise ConfigError(
      f"ppo.rm_workdir: the reward model's model.vocab_size={rm_model.vocab_size} differs from the policy's "
      f"{model_cfg.vocab_size}; both must embed the same token ids"
    )
  tok = load_any_tokenizer(sft.workdir)
  rm_tok = load_any_tokenizer(rm.workdir)
  if tok.sha256() != rm_tok.sha256():
    raise DataError(
      f"tokenizer {rm_tok.path} of ppo.rm_workdir differs from {tok.path} of ppo.sft_workdir; "
      "the reward model must read the policy's tokens"
    )
  check_vocab(tok, model_cfg.vocab_size)
  mean, std = read_reward_stats(rm.workdir)
  spec, seed = tasks_lib.TaskSpec(), 0
  sft_cfg_path = os.path.join(sft.workdir, "config.json")
  if os.path.isfile(sft_cfg_path):
    with open(sft_cfg_path) as f:
      s = json.load(f).get("sft")
    if s:
      spec, seed = sft_stage.task_spec(ml_collections.ConfigDict(s)), int(s.get("task_seed", 0))
  return Sources(sft, rm, rm_model, tok, mean, std, spec, seed)


def read_reward_stats(rm_workdir: str) -> tuple[float, float]:
  """(mean, std) of the reward model's scores, for normalizing them; DataError when missing or bad."""
  path = os.path.join(rm_workdir, REWARD_STATS_FILE)
  if not os.path.isfile(path):
    raise DataError(f"ppo.rm_workdir: {path} is missing (written by reward modeling: {{'mean', 'std'}})")
  try:
    with open(path) as f:
      stats = json.load(f)
    mean, std = float(stats["mean"]), float(stats["std"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: expected {{'mean': float, 'std': float}} ({e})") from None
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise DataError(f"{path}: mean must be finite and std > 0, got mean={mean}, std={std}")
  return mean, std


# --- prompts ----------------------------------------------------------------------------------------


def _from_tasks(tasks, tok: Tokenizer) -> list[Prompt]:
  return [
    Prompt(tok.render_chat(t.messages, add_generation_prompt=True)[0], t.answer, t.kind, t.question)
    for t in tasks
  ]


def read_prompts(path: str, tok: Tokenizer) -> list[Prompt]:
  """JSONL rows {"messages": [...], "answer"?: str, "kind"?: str}; a trailing assistant turn is dropped
  (an SFT file works as is) and is the gold answer unless "answer" is given. DataError names file:line."""
  out = []
  for where, row in tasks_lib.read_jsonl(path):
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs:
      raise DataError(f"{where}: expected {{'messages': [...]}} with at least one message")
    answer = row.get("answer")
    if isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
      answer = answer if answer is not None else msgs[-1].get("content")
      msgs = msgs[:-1]
    if not msgs or not any(isinstance(m, dict) and m.get("role") == "user" for m in msgs):
      raise DataError(f"{where}: the prompt has no user turn")
    try:
      ids = tok.render_chat(msgs, add_generation_prompt=True)[0]
    except DataError as e:
      raise DataError(f"{where}: {e}") from None
    user = [m for m in msgs if m.get("role") == "user"][-1]["content"]
    out.append(Prompt(ids, None if answer is None else str(answer), str(row.get("kind", "chat")), user))
  return out


def load_prompts(cfg, src: Sources) -> tuple[list[Prompt], list[Prompt]]:
  """(train prompts, held-out prompts). DataError when the training set is empty."""
  p = cfg.ppo
  tok = src.tokenizer
  if p.prompts:
    train = read_prompts(p.prompts, tok)
    if not train:
      raise DataError(f"ppo.prompts: {p.prompts} holds no prompts")
  else:
    if int(p.task_train) < 1:
      raise DataError("ppo.task_train: 0 embedded training prompts; the prompt set is empty")
    train = _from_tasks(
      tasks_lib.make_tasks("train", int(p.task_train), int(p.task_seed), src.task_spec), tok
    )
  if p.reward == "gold":
    missing = [i for i, q in enumerate(train) if q.answer is None]
    if missing:
      raise DataError(f"ppo.reward: 'gold' needs an answer for every prompt; prompt {missing[0]} has none")
  if p.eval_path:
    held = read_prompts(p.eval_path, tok)[: int(p.eval_prompts)]
  elif int(p.eval_prompts):
    # The SFT run's own held-out prompts (same spec and seed): SFT and PPO accuracies compare directly.
    held = _from_tasks(tasks_lib.make_tasks("eval", int(p.eval_prompts), src.task_seed, src.task_spec), tok)
  else:
    held = []
  return train, held


def prompt_length(cfg, model_cfg: ModelConfig, rm_model: ModelConfig, sets: dict[str, list[Prompt]]) -> int:
  """The padded prompt length P: the longest prompt of all `sets` ({name: prompts}), rounded up to 8
  where room allows. ConfigError naming the prompt when it plus ppo.max_new_tokens does not fit the
  policy's or the reward model's context."""
  n_new = int(cfg.ppo.max_new_tokens)
  cap = min(model_cfg.max_seq_len, rm_model.max_seq_len)
  who = (
    "model.max_seq_len" if model_cfg.max_seq_len <= rm_model.max_seq_len else "the reward model's max_seq_len"
  )
  longest = 1
  for name, prompts in sets.items():
    for i, q in enumerate(prompts):
      if len(q.ids) + n_new + 1 > cap:  # + 1: the eos the reward model reads
        raise ConfigError(
          f"ppo.max_new_tokens: {name}[{i}] has {len(q.ids)} tokens; with {n_new} new tokens and the eos that "
          f"exceeds {who}={cap}"
        )
      longest = max(longest, len(q.ids))
  return min(-(-longest // 8) * 8, cap - n_new - 1)
