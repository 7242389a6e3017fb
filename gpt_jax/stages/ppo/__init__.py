"""Reinforcement learning from the reward model with PPO (Ouyang et al. 2022; Ziegler et al. 2019).

  python -m gpt_jax ppo --config=experiments/ppo.py:tiny --config.ppo.sft_workdir=SFT_DIR \
      --config.ppo.rm_workdir=RM_DIR --workdir=DIR

Four models share one mesh: the policy (from SFT, trained), the reference (the SFT weights, frozen),
the reward model (frozen) and the critic (from the reward model, trained; or a value head on the
policy's hidden states with ppo.value_head_on_policy). Each iteration (one step of the shared loop):

  1. rollout   the jitted KV-cache sampler answers ppo.rollout_batch prompts with the policy's
               current parameters, on the same devices; only the tokens come back to the host, to
               be decoded and graded;
  2. score     one jitted pass lays the rollouts out (rl.rollout_layout), computes the log-probs of
               policy and reference, the critic's values, the reward-model score at the eos after each
               response, the per-token rewards (score normalized by the reward model's statistics,
               minus a penalty for responses that never end, minus kl_coef times the per-token KL to
               the reference) and the whitened GAE advantages; all of it stays on the devices;
  3. update    ppo.epochs passes of minibatch steps of the shared train step (step.py) on the
               clipped policy objective + clipped value loss (+ entropy bonus, + PPO-ptx);
  4. the adaptive KL controller moves kl_coef toward ppo.target_kl; metrics and alarms are logged.

Held-out prompts are answered greedily at iteration 0 (the SFT model) and every ppo.eval_every
iterations: eval/gold_accuracy by the tasks' grader and eval/reward_raw by the reward model; the
answers go to DIR/samples/iter_NNNNN.jsonl. A checkpoint (step = iteration) holds the params
{"policy", "value" | "value_head"}, the optimizer state and the RNG, with the KL coefficient, the
prompt position, the ptx loader position and the alarm history in its JSON extra. The sequence reward
is ppo.rm_weight times the reward model's normalized score plus ppo.gold_weight times the task
grader's 0/1 (a verifiable reward; gold_weight 1 and rm_weight 0 train on the grader alone, which
separates what PPO can do from what the reward model lets it do); the reward model is scored and
logged either way.

Legend: B rollouts, P padded prompt length, N max new tokens, S = P + N + 1 (an eos after the
response, where the reward model reads), V vocabulary, D width.
"""

from __future__ import annotations

import os

import jax

from gpt_jax import config as config_lib
from gpt_jax import loop, rollouts, runs
from gpt_jax import model as model_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.config import Key
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import ModelConfig
from gpt_jax.stages.ppo.runner import Ppo

SCHEMA = config_lib.stage_schema(
  "ppo",
  train=rollouts.TRAIN,
  model=model_lib.SCHEMA,
  tasks=config_lib.subset(tasks_lib.SCHEMA, drop=("eval",), seed=Key(1, ">= 0"), train=Key(4000, ">= 1")),
  ppo={
    "sft_workdir": Key(""),  # the SFT run: the policy and the frozen reference start from it
    "rm_workdir": Key(""),  # the reward-model run (with reward_stats.json)
    "value_head_on_policy": Key(False),  # False: a separate critic initialised from the reward model
    # The separate critic's peak learning rate (its own AdamW and clip, the optim section's other
    # settings); 0 = optim.lr_peak. Its zero-initialised head must learn the prompt-dependent baseline
    # fast, or the advantages carry the reward model's per-prompt offsets.
    "value_lr": Key(0.0, ">= 0"),
    # The sequence reward: gold_weight * the task grader's 0/1 (a verifiable reward) + rm_weight * the
    # reward model's score normalized by its statistics over the SFT samples.
    "gold_weight": Key(0.0, ">= 0"),
    "rm_weight": Key(1.0, ">= 0"),
    "prompts": Key(""),  # '' = the embedded tasks' training prompts; else JSONL {"messages", ["answer"]}
    "eval_path": Key(""),  # '' = the SFT run's embedded held-out tasks; else JSONL {"messages", "answer"}
    "iterations": Key(40, ">= 1", resumable=True),  # rollout + update rounds
    "rollout_batch": Key(64, ">= 1"),  # completions sampled per iteration
    "minibatch": Key(32, ">= 1"),  # rollouts per optimizer step
    "epochs": Key(2, ">= 1"),  # passes over each rollout batch
    "max_new_tokens": Key(16, ">= 1"),
    "temperature": Key(1.0, "> 0"),  # sampling temperature; the PPO log-probs use the same
    "gamma": Key(1.0, "[0, 1]"),
    "lam": Key(0.95, "[0, 1]"),
    "whiten_advantages": Key(True),
    "clip": Key(0.2, "> 0"),  # policy ratio clip
    "value_clip": Key(0.2, "> 0"),  # value change clip
    "vf_coef": Key(0.5, ">= 0"),
    "entropy_coef": Key(0.0, ">= 0"),
    "kl_coef": Key(0.05, ">= 0"),  # initial (or fixed) coefficient of the per-token KL penalty
    "adaptive_kl": Key(True),  # Ziegler et al. (2019) controller toward target_kl
    "target_kl": Key(2.0, "> 0"),  # nats per response
    "kl_horizon": Key(1000, ">= 1"),  # rollouts over which the controller corrects at most 20% per error unit
    "kl_alarm": Key(8.0, "> 0", resumable=True),  # log an alarm when the KL per response passes this
    "hack_window": Key(5, ">= 1", resumable=True),  # iterations compared by the reward-hacking alarm
    "hack_min_change": Key(0.02, ">= 0", resumable=True),  # ... reward up and gold down each by more
    "no_eos_penalty": Key(1.0, ">= 0"),  # subtracted from the normalized score of a reply that never ends
    "ptx_coef": Key(0.0, ">= 0"),  # > 0 mixes in the next-token loss on ptx_path (InstructGPT's PPO-ptx)
    "ptx_path": Key(""),  # '' = the SFT run's training conversations (<sft_workdir>/data/train.jsonl)
    "ptx_batch": Key(8, ">= 1"),  # rows of ptx data per optimizer step
    "ptx_seq_len": Key(64, ">= 1"),
    "eval_every": Key(5, ">= 1", resumable=True),  # iterations between held-out evaluations (greedy)
    "eval_prompts": Key(512, ">= 0", resumable=True),  # held-out prompts per evaluation
    # > 0: at the first and last evaluation, also k sampled answers per graded held-out prompt:
    # eval/pass_at_k and eval/sample_accuracy, the headroom of sampling-based RL
    "eval_pass_k": Key(8, ">= 0", resumable=True),
  },
)


def default_config():
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """The checks that need no file: returns the policy's model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  p, t = cfg.ppo, cfg.train
  for key in ("sft_workdir", "rm_workdir"):
    if not str(p[key]):
      raise ConfigError(f"ppo.{key}: required; set it to the {key[:-8].upper()} run's workdir")
  if float(p.gold_weight) == 0 and float(p.rm_weight) == 0:
    raise ConfigError("ppo.gold_weight, ppo.rm_weight: both are 0, so every reward is 0; give one a weight")
  if float(p.value_lr) > 0 and p.value_head_on_policy:
    raise ConfigError(
      "ppo.value_lr: applies to the separate critic; with ppo.value_head_on_policy the value head trains "
      "with the policy at optim.lr_peak"
    )
  if int(p.rollout_batch) % int(p.minibatch):
    raise ConfigError(f"ppo.minibatch: {p.minibatch} must divide ppo.rollout_batch={p.rollout_batch}")
  shards = config_lib.data_shards(cfg, jax.device_count())
  config_lib.check_batch("ppo.rollout_batch", int(p.rollout_batch), 1, shards)
  config_lib.check_batch("ppo.minibatch", int(p.minibatch), int(t.grad_accum), shards)
  if float(p.ptx_coef) > 0:
    config_lib.check_batch("ppo.ptx_batch", int(p.ptx_batch), int(t.grad_accum), shards)
  config_lib.check_room_for_prompt(p, "ppo", "max_new_tokens", model_cfg.max_seq_len)
  config_lib.check_schedule(
    cfg.optim, int(p.iterations) * int(p.epochs) * (int(p.rollout_batch) // int(p.minibatch))
  )
  for key in ("prompts", "eval_path", "ptx_path"):
    if p[key] and not os.path.isfile(p[key]):
      raise DataError(f"ppo.{key}: file {p[key]} does not exist")
  tasks_lib.spec_from_config(cfg.tasks)
  return model_cfg


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Runs PPO to cfg.ppo.iterations from the SFT and reward-model runs; resumes from the workdir.
  Every config, file and length check runs before anything is placed on the devices or compiled."""
  model_cfg = validate(cfg)
  p = cfg.ppo
  src = rollouts.open_sources(cfg, "ppo", need_rm=True)
  train_prompts, eval_prompts = rollouts.load_prompts(cfg, "ppo", src, need_gold=float(p.gold_weight) > 0)
  P = rollouts.prompt_length(
    "ppo",
    model_cfg,
    src.rm_model,
    int(p.max_new_tokens),
    {"ppo train prompt": train_prompts, "ppo held-out prompt": eval_prompts},
  )
  ptx_enc = None
  if float(p.ptx_coef) > 0:
    path = p.ptx_path or os.path.join(src.sft.workdir, "data", "train.jsonl")
    ptx_enc = sft_data.encode(
      sft_data.read_conversations(path), src.tokenizer, int(p.ptx_seq_len), "drop", "ppo ptx data"
    )
  workdir_lib.check_writable(workdir)
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(p.iterations), steps_key="ppo.iterations")
    resume.check_record(src.record())
    runs.install_tokenizer(src.sft, workdir, log_fn)
    ppo = Ppo(cfg, model_cfg, src, train_prompts, eval_prompts, P, ptx_enc, log_fn)
    return loop.run(cfg, workdir, ppo.job(workdir), log_fn=log_fn)
