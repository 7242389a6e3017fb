"""Reinforcement learning with GRPO (Shao et al. 2024): group-relative advantages, no critic.

  python -m gpt_jax grpo --config=experiments/grpo.py:tiny --config.grpo.sft_workdir=SFT_DIR --workdir=DIR

Each iteration (one step of the shared loop) takes grpo.prompts_per_iteration training prompts and
samples grpo.samples_per_prompt answers to each with the policy's current parameters (the jitted
KV-cache sampler; only the tokens come back, to be graded). A sample's reward is

  grpo.gold_weight * the task grader's 0/1 (a verifiable reward)
  + grpo.rm_weight * the reward model's score, normalized by its statistics over the SFT samples,

its advantage that reward minus its group's mean (divided by the group's standard deviation unless
grpo.scale_advantages is False, as Dr. GRPO), the same for every token of the answer. grpo.epochs
passes of minibatch steps then minimize the clipped surrogate plus grpo.kl_coef times the k3 estimate
of the KL to the frozen reference (the SFT weights), in the loss rather than in the reward.

Held-out prompts (the SFT run's, as every RL stage's) are answered greedily at iteration 0 and every
grpo.eval_every iterations: eval/gold_accuracy, and with a reward model eval/reward (its normalized
score of the greedy answers: the proxy the policy is trained on when rm_weight > 0); pass@k at the
first and last evaluation. With grpo.rm_workdir set the reward model is loaded even when rm_weight is
0, so its score is logged beside gold.

Legend: G prompts per iteration, K samples per prompt, B = G * K rollouts, P padded prompt length,
N max new tokens.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import config as config_lib
from gpt_jax import distributed, loop, losses, optim, placed, rl, rollouts, runs, sharding
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax import workdir as workdir_lib
from gpt_jax.config import Key
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.model import ModelConfig

SCHEMA = config_lib.stage_schema(
  "grpo",
  # GRPO counts iterations, not steps over a dataset: no steps, batch, context or init keys.
  train=rollouts.TRAIN,
  model=model_lib.SCHEMA,
  tasks=config_lib.subset(tasks_lib.SCHEMA, drop=("eval",), seed=Key(2, ">= 0"), train=Key(4000, ">= 1")),
  grpo={
    "sft_workdir": Key(""),  # the SFT run: the policy and the frozen reference start from it
    "rm_workdir": Key(""),  # a reward-model run ('' with rm_weight 0: no reward model)
    "gold_weight": Key(1.0, ">= 0"),  # weight of the task grader's 0/1 in the reward
    "rm_weight": Key(0.0, ">= 0"),  # weight of the reward model's normalized score
    "prompts": Key(""),  # '' = the embedded tasks' training prompts; else JSONL {"messages", ["answer"]}
    "eval_path": Key(""),  # '' = the SFT run's embedded held-out tasks; else JSONL {"messages", "answer"}
    "iterations": Key(40, ">= 1", resumable=True),
    "prompts_per_iteration": Key(16, ">= 1"),  # G
    "samples_per_prompt": Key(8, ">= 2"),  # K: a group of one has no relative advantage
    # Sample oversample x G prompts and update on G of their groups, those whose answers got different
    # rewards first: a group whose answers all got the same reward has advantage 0 and teaches nothing
    # (DAPO's dynamic sampling, Yu et al. 2025). 1: update on every sampled group.
    "oversample": Key(1, ">= 1"),
    "minibatch": Key(64, ">= 1"),  # rollouts per optimizer step
    "epochs": Key(1, ">= 1"),  # passes over each iteration's rollouts
    "max_new_tokens": Key(16, ">= 1"),
    "temperature": Key(1.0, "> 0"),  # sampling temperature; the log-probs use the same
    "clip": Key(0.2, "> 0"),  # policy ratio clip
    "kl_coef": Key(0.04, ">= 0"),  # beta of the k3 KL to the reference, in the loss
    "scale_advantages": Key(True),  # False: Dr. GRPO (no division by the group's std)
    "loss_per": Key("token", choices=("token", "sequence")),  # the unit the loss averages over
    "kl_alarm": Key(8.0, "> 0", resumable=True),  # log an alarm when the KL per response passes this
    "hack_window": Key(5, ">= 1", resumable=True),  # iterations compared by the reward-hacking alarm
    "hack_min_change": Key(0.02, ">= 0", resumable=True),
    "eval_every": Key(5, ">= 1", resumable=True),
    "eval_prompts": Key(512, ">= 0", resumable=True),  # held-out prompts per evaluation
    "eval_pass_k": Key(8, ">= 0", resumable=True),  # samples per held-out prompt for pass@k (first/last eval)
  },
)
ROW_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "old_logp", "ref_logp", "advantages")


def default_config():
  return config_lib.defaults(SCHEMA)


def validate(cfg) -> ModelConfig:
  """The checks that need no file: returns the policy's model config."""
  config_lib.check(cfg, SCHEMA)
  model_cfg = ModelConfig.from_config(cfg.model)
  g, t = cfg.grpo, cfg.train
  if not str(g.sft_workdir):
    raise ConfigError("grpo.sft_workdir: required; set it to the SFT run's workdir")
  if float(g.gold_weight) == 0 and float(g.rm_weight) == 0:
    raise ConfigError("grpo.gold_weight, grpo.rm_weight: both are 0, so every reward is 0; give one a weight")
  if float(g.rm_weight) > 0 and not str(g.rm_workdir):
    raise ConfigError(f"grpo.rm_workdir: required with grpo.rm_weight={g.rm_weight} (the reward model's run)")
  B = int(g.prompts_per_iteration) * int(g.samples_per_prompt)
  if B % int(g.minibatch):
    raise ConfigError(
      f"grpo.minibatch: {g.minibatch} must divide the {B} rollouts of an iteration "
      "(grpo.prompts_per_iteration x grpo.samples_per_prompt)"
    )
  shards = config_lib.data_shards(cfg, jax.device_count())
  config_lib.check_batch("grpo.prompts_per_iteration x grpo.samples_per_prompt", B, 1, shards)
  config_lib.check_batch(
    "grpo.oversample x grpo.prompts_per_iteration x grpo.samples_per_prompt", B * int(g.oversample), 1, shards
  )
  config_lib.check_batch("grpo.minibatch", int(g.minibatch), int(t.grad_accum), shards)
  config_lib.check_room_for_prompt(g, "grpo", "max_new_tokens", model_cfg.max_seq_len)
  config_lib.check_schedule(cfg.optim, int(g.iterations) * int(g.epochs) * (B // int(g.minibatch)))
  for key in ("prompts", "eval_path"):
    if g[key] and not os.path.isfile(g[key]):
      raise DataError(f"grpo.{key}: file {g[key]} does not exist")
  tasks_lib.spec_from_config(cfg.tasks)
  return model_cfg


# --- the jitted pieces --------------------------------------------------------------------------------


def make_prepare_fn(policy, reward, *, P: int, N: int, g, eos_id: int, score_mean: float, score_std: float):
  """jitted `prepare(params, ref_params, rm_params, rollout) -> (rows, stats)`: the rollouts laid out,
  their log-probs under the policy (old_logp) and the reference, the rewards and the group-relative
  advantages; rows stay on the devices (batch-sharded), stats are scalar means."""
  mesh, G, K = policy.mesh, int(g.prompts_per_iteration) * int(g.oversample), int(g.samples_per_prompt)
  w_gold, w_rm = float(g.gold_weight), float(g.rm_weight)

  def prepare(params, ref_params, rm_params, rollout):
    with sharding.activation_mesh(mesh):
      mask_BN = rollout["response_mask_BN"].astype(jnp.float32)
      rows = rl.rollout_layout(
        rollout["tokens_BP"], rollout["lengths_B"], rollout["response_BN"], mask_BN, eos_id
      )
      logp_BN, logits_BNV, _ = rl.response_logprobs(policy, params, rows, P, N, g.temperature)
      ref_logp_BN = rl.response_logprobs(policy, ref_params, rows, P, N, g.temperature)[0]
      gold_B = rollout["gold_B"].astype(jnp.float32)
      rewards_B = w_gold * gold_B
      stats = {}
      if reward is not None:
        norm_B = (reward.scores_of(rm_params, rollout) - score_mean) / score_std
        rewards_B = rewards_B + w_rm * norm_B
        stats["rm_reward"] = jnp.mean(norm_B)
      rewards_GK = rewards_B.reshape(G, K)
      adv_B = losses.group_advantages(rewards_GK, scale=bool(g.scale_advantages)).reshape(-1)
      n_tok = jnp.maximum(mask_BN.sum(), 1.0)
      stats.update(
        reward=jnp.mean(rewards_B),
        kl=jnp.mean(losses.k3_kl(logp_BN, ref_logp_BN, mask_BN).sum(axis=1)),
        entropy=jnp.sum(losses.entropy_from_logits(logits_BNV) * mask_BN) / n_tok,
        response_length=jnp.mean(mask_BN.sum(axis=1)),
        # A group whose answers all got the same reward teaches nothing (advantage 0).
        zero_std_groups=jnp.mean((jnp.std(rewards_GK, axis=1) == 0).astype(jnp.float32)),
      )
      out = dict(
        tokens=rows["tokens"],
        positions=rows["positions"],
        segment_ids=rows["segment_ids"],
        response_mask=mask_BN,
        old_logp=logp_BN * mask_BN,
        ref_logp=ref_logp_BN * mask_BN,
        advantages=adv_B[:, None],
        rewards=rewards_B[:, None],
      )
      return out, stats

  row_sh = {k: sharding.batch_sharding(mesh, 2) for k in (*ROW_KEYS, "rewards")}
  return jax.jit(prepare, out_shardings=(row_sh, sharding.replicated(mesh)))


def make_loss_fn(policy, *, P: int, N: int, g):
  """GRPO's loss over a minibatch of rows (ROW_KEYS): losses.grpo_policy_loss."""

  def loss_fn(params, batch, rng):
    del rng
    logp_BN = rl.response_logprobs(policy, params, batch, P, N, g.temperature)[0]
    return losses.grpo_policy_loss(
      logp_BN,
      batch["old_logp"],
      batch["ref_logp"],
      batch["advantages"][:, 0],
      batch["response_mask"],
      clip=float(g.clip),
      kl_coef=float(g.kl_coef),
      per=str(g.loss_per),
    )

  return loss_fn


# --- the run ------------------------------------------------------------------------------------------


class Grpo:
  """One GRPO run's models (the policy, its frozen reference, an optional frozen reward model), jitted
  functions and small host state (prompt order, alarms), as the pieces of a loop.Job."""

  def __init__(self, cfg, model_cfg, src: rollouts.Sources, train_prompts, eval_prompts, P: int, log_fn):
    g, t = cfg.grpo, cfg.train
    self.g, self.src, self.log = g, src, log_fn
    self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
    self.G, self.K, self.over = int(g.prompts_per_iteration), int(g.samples_per_prompt), int(g.oversample)
    self.B, self.seed = self.G * self.K, int(t.seed)  # B: rollouts per update pass
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.policy = placed.Model.build(model_cfg, self.mesh)
    self.reward = rollouts.Reward(src.rm, self.mesh, src.tokenizer) if src.rm is not None else None
    self.ref_params = src.sft.restore(self.policy.abstract())
    steps = int(g.iterations) * int(g.epochs) * (self.B // int(g.minibatch))
    self.optimizer, lr = optim.make(cfg.optim, steps, self.policy.axes)
    abstract = jax.eval_shape(lambda q: step_lib.init_state(q, self.optimizer, self.seed), self.policy.shapes)
    self.state_sh = step_lib.state_shardings(self.mesh, self.optimizer, self.policy.shardings, abstract)
    self.abstract_state = sharding.abstract(abstract, self.state_sh)
    batch_sh = {k: sharding.batch_sharding(self.mesh, 2) for k in ROW_KEYS}
    N = int(g.max_new_tokens)
    self.train_step = step_lib.make_train_step(
      make_loss_fn(self.policy, P=P, N=N, g=g),
      self.optimizer,
      lr,
      mesh=self.mesh,
      state_sharding=self.state_sh,
      batch_sharding=batch_sh,
      grad_accum=int(t.grad_accum),
    )
    self.prepare = make_prepare_fn(
      self.policy,
      self.reward,
      P=P,
      N=N,
      g=g,
      eos_id=src.tokenizer.eos_id,
      score_mean=src.score_mean,
      score_std=src.score_std,
    )
    self.select = jax.jit(lambda rows, idx: {k: rows[k][idx] for k in ROW_KEYS}, out_shardings=batch_sh)
    self.score = self.reward.scorer() if self.reward is not None else None
    self.actor = rollouts.Actor(
      self.policy, src.tokenizer, P=P, N=N, B=self.B * self.over, temperature=float(g.temperature)
    )
    self.order = rl.PromptOrder(len(train_prompts), self.seed)
    self.alarms = rl.Alarms(float(g.kl_alarm), int(g.hack_window), float(g.hack_min_change))

  def init_state(self):
    """The policy from the SFT run (its own copy: the train state is donated)."""
    self.log(f"[grpo] policy and reference from {self.src.sft.describe()}")
    params = jax.tree.map(jnp.copy, self.ref_params)
    init_fn = lambda q: step_lib.init_state(q, self.optimizer, self.seed)
    return jax.jit(init_fn, out_shardings=self.state_sh, donate_argnums=0)(params)

  def get_extra(self) -> dict:
    return {"prompt_position": self.order.get_state(), "alarms": self.alarms.get_state()}

  def set_extra(self, extra: dict) -> None:
    self.order.set_state(extra["prompt_position"])
    self.alarms.set_state(extra.get("alarms", {}))

  def step(self, state, it: int):
    """Sample K answers to each of oversample x G prompts, grade and score them, update on G of the
    groups: one iteration."""
    prompts = [self.train_prompts[i] for i in self.order.take(self.G * self.over) for _ in range(self.K)]
    # The rollout key of iteration i is fold_in(state.rng, i): a resumed run samples what the first would have.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), it)
    t0 = time.perf_counter()
    rollout, _, golds = self.actor.sample(state["params"], prompts, key)
    t1 = time.perf_counter()
    rm_params = self.reward.params if self.reward is not None else None
    rows, stats = self.prepare(state["params"], self.ref_params, rm_params, rollout)
    kept = self.kept_rows(rows)
    step_metrics, mb = [], int(self.g.minibatch)
    for epoch in range(int(self.g.epochs)):
      perm = np.random.default_rng([self.seed, it, epoch]).permutation(self.B)
      for lo in range(0, self.B, mb):
        idx = jnp.asarray(kept[perm[lo : lo + mb]], jnp.int32)
        state, m = self.train_step(state, self.select(rows, idx))
        step_metrics.append(m)
    m = rollouts.iteration_metrics(step_metrics, stats, golds, gen_s=t1 - t0, update_start=t1)
    rollouts.sound_alarms(self.alarms, it, m, m.get("rm_reward", m["reward"]), "grpo", self.log)
    return state, m

  def kept_rows(self, rows) -> np.ndarray:
    """The rows (G * K of them) this iteration updates on: every row without oversampling, else the
    groups whose answers got different rewards first (in sampling order), then the others."""
    if self.over == 1:
      return np.arange(self.B)
    r_GK = np.asarray(distributed.to_host(rows["rewards"])).reshape(-1, self.K)
    informative = r_GK.std(axis=1) > 0
    groups = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])[: self.G]
    return (groups[:, None] * self.K + np.arange(self.K)[None, :]).reshape(-1)

  def evaluate(self, state, it: int, workdir: str) -> dict:
    """Greedy answers to the held-out prompts (gold accuracy; with a reward model its normalized score),
    the samples file DIR/samples/iter_NNNNN.jsonl; at the first and last evaluation also pass@k."""
    score = None if self.score is None else (lambda rollout: self.score(self.reward.params, rollout))
    g = self.g
    return rollouts.held_out(
      self.actor,
      state["params"],
      self.eval_prompts,
      self.src,
      it=it,
      last=int(g.iterations),
      pass_k=int(g.eval_pass_k),
      workdir=workdir,
      score=score,
    )

  def job(self, workdir: str) -> loop.Job:
    keys = (
      "reward",
      "gold",
      "kl",
      "entropy",
      "response_length",
      "zero_std_groups",
      "policy_clipfrac",
      "gen_s",
      "update_s",
    )
    return rollouts.job(self, "grpo", self.g, workdir, keys)


def run(cfg, workdir: str, log_fn=print) -> loop.Result:
  """Runs GRPO to cfg.grpo.iterations from the SFT run (and the reward model, if any); resumes from the
  workdir. Every config, file and length check runs before anything is placed or compiled."""
  model_cfg = validate(cfg)
  g = cfg.grpo
  src = rollouts.open_sources(cfg, "grpo", need_rm=bool(str(g.rm_workdir)))
  train_prompts, eval_prompts = rollouts.load_prompts(cfg, "grpo", src, need_gold=float(g.gold_weight) > 0)
  P = rollouts.prompt_length(
    "grpo",
    model_cfg,
    src.rm_model,
    int(g.max_new_tokens),
    {"grpo train prompt": train_prompts, "grpo held-out prompt": eval_prompts},
  )
  workdir_lib.check_writable(workdir)
  with workdir_lib.WorkdirLock(workdir):
    resume = runs.check_resume(workdir, cfg, SCHEMA, steps=int(g.iterations), steps_key="grpo.iterations")
    resume.check_record(src.record())
    runs.install_tokenizer(src.sft, workdir, log_fn)
    grpo = Grpo(cfg, model_cfg, src, train_prompts, eval_prompts, P, log_fn)
    return loop.run(cfg, workdir, grpo.job(workdir), log_fn=log_fn)
