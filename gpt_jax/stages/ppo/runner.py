"""One PPO run as the pieces of a loop.Job: the models on the mesh, the jitted functions, the small host
state (KL coefficient, prompt order, alarms, ptx loader) and one iteration's step."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import heads, loop, losses, optim, placed, rl, rollouts, sharding
from gpt_jax import step as step_lib
from gpt_jax.data import batch as batch_lib
from gpt_jax.data import sft as sft_data
from gpt_jax.stages.ppo import objective


def value_optim_config(cfg):
  """The separate critic's optim section: cfg.optim with lr_peak = ppo.value_lr when that is set."""
  c = ml_collections.ConfigDict(cfg.optim.to_dict())
  if float(cfg.ppo.value_lr) > 0:
    c.lr_peak = float(cfg.ppo.value_lr)
  return c


class Ppo:
  """The models of one PPO run on one mesh: the policy and its frozen reference (the SFT weights), the
  frozen reward model, and the critic (the reward model's transformer with a fresh head, or a head on
  the policy's hidden states)."""

  def __init__(
    self, cfg, model_cfg, src: rollouts.Sources, train_prompts, eval_prompts, P: int, ptx_enc, log_fn
  ):
    p, t = cfg.ppo, cfg.train
    self.p, self.src, self.log = p, src, log_fn
    self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
    self.B, self.seed = int(p.rollout_batch), int(t.seed)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.policy = placed.Model.build(model_cfg, self.mesh)
    self.reward = rollouts.Reward(src.rm, self.mesh, src.tokenizer)
    self.value = None if p.value_head_on_policy else self.reward.model
    self.ref_params = src.sft.restore(self.policy.abstract())
    if self.value is None:
      critic = ("value_head", heads.head_shapes(model_cfg.d_model), heads.head_axes(), cfg.optim)
    else:
      critic = ("value", self.value.shapes, self.value.axes, value_optim_config(cfg))
    shapes, axes = (
      {"policy": self.policy.shapes, critic[0]: critic[1]},
      {"policy": self.policy.axes, critic[0]: critic[2]},
    )
    self.params_sh = sharding.tree_shardings(self.mesh, axes, shapes)
    steps = int(p.iterations) * int(p.epochs) * (self.B // int(p.minibatch))
    self.optimizer, lr = optim.make_per_model({"policy": cfg.optim, critic[0]: critic[3]}, steps, axes)
    abstract = jax.eval_shape(lambda q: step_lib.init_state(q, self.optimizer, self.seed), shapes)
    self.state_sh = step_lib.state_shardings(self.mesh, self.optimizer, self.params_sh, abstract)
    self.abstract_state = sharding.abstract(abstract, self.state_sh)
    keys = objective.ROLLOUT_KEYS + (objective.PTX_KEYS if ptx_enc is not None else ())
    batch_sh = {k: sharding.batch_sharding(self.mesh, 2) for k in keys}
    N = int(p.max_new_tokens)
    self.train_step = step_lib.make_train_step(
      objective.make_loss_fn(self.policy, self.value, P=P, N=N, p=p),
      self.optimizer,
      lr,
      mesh=self.mesh,
      state_sharding=self.state_sh,
      batch_sharding=batch_sh,
      grad_accum=int(t.grad_accum),
    )
    self.experience = objective.make_experience_fn(
      self.policy,
      self.value,
      self.policy,
      self.reward,
      P=P,
      N=N,
      p=p,
      score_mean=src.score_mean,
      score_std=src.score_std,
    )
    self.score = self.reward.scorer()
    mb_sh = {k: batch_sh[k] for k in objective.ROLLOUT_KEYS}
    self.select = jax.jit(
      lambda rows, idx: {k: rows[k][idx] for k in objective.ROLLOUT_KEYS}, out_shardings=mb_sh
    )
    self.actor = rollouts.Actor(
      self.policy, src.tokenizer, P=P, N=N, B=self.B, temperature=float(p.temperature)
    )
    self.order = rl.PromptOrder(len(train_prompts), self.seed)
    self.alarms = rl.Alarms(float(p.kl_alarm), int(p.hack_window), float(p.hack_min_change))
    self.ptx = None
    if ptx_enc is not None:
      self.ptx = sft_data.SftLoader(
        ptx_enc,
        global_batch=int(p.ptx_batch),
        seq_len=int(p.ptx_seq_len),
        seed=self.seed,
        sharding=sharding.batch_sharding(self.mesh),
      )
    self.kl_coef = float(p.kl_coef)

  # -- the loop's pieces

  def init_state(self):
    """The policy from the SFT run; the critic as the reward model's transformer with a zero head."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers: the train state is donated
    init = {"policy": copy(self.ref_params)}
    if self.value is None:
      init["value_head"] = jax.device_put(
        heads.init_head(self.policy.cfg.d_model), self.params_sh["value_head"]
      )
    else:
      # The reward head was trained only at the end-of-text token; at the response's other tokens
      # (where the critic reads it) its values are off any scale, and GAE would turn them into
      # advantages that drown the reward. A zero head starts PPO as REINFORCE with the whitened mean
      # as baseline, and the critic learns the returns from there.
      init["value"] = self.value.with_zero_head(copy(self.reward.params[heads.TRUNK]))
    self.log(
      f"[ppo] policy and reference from {self.src.sft.describe()}; reward model and critic from {self.src.rm.describe()}"
    )
    init_fn = lambda q: step_lib.init_state(q, self.optimizer, self.seed)
    return jax.jit(init_fn, out_shardings=self.state_sh, donate_argnums=0)(init)

  def get_extra(self) -> dict:
    extra = {
      "kl_coef": self.kl_coef,
      "prompt_position": self.order.get_state(),
      "alarms": self.alarms.get_state(),
    }
    return extra | ({"ptx_loader": self.ptx.get_state()} if self.ptx is not None else {})

  def set_extra(self, extra: dict) -> None:
    self.kl_coef = float(extra["kl_coef"])
    self.order.set_state(extra["prompt_position"])
    self.alarms.set_state(extra.get("alarms", {}))
    if self.ptx is not None:
      self.ptx.set_state(extra["ptx_loader"])

  def _update(self, state, rows, it: int):
    """ppo.epochs passes of minibatch steps over the rollout rows (on the devices); the steps' metrics."""
    step_metrics, mb = [], int(self.p.minibatch)
    for epoch in range(int(self.p.epochs)):
      perm = np.random.default_rng([self.seed, it, epoch]).permutation(self.B)
      for lo in range(0, self.B, mb):
        batch = self.select(rows, jnp.asarray(perm[lo : lo + mb], jnp.int32))
        if self.ptx is not None:
          ptx = batch_lib.to_global(self.ptx.host_batch(), lambda nd: sharding.batch_sharding(self.mesh, nd))
          batch.update({f"ptx_{k}": v for k, v in ptx.items()})
        state, m = self.train_step(state, batch)
        step_metrics.append(m)
    return state, step_metrics

  def step(self, state, it: int):
    """Rollout, score, update, KL controller: one iteration. Returns (state, host metrics)."""
    p = self.p
    prompts = [self.train_prompts[i] for i in self.order.take(self.B)]
    # The rollout key of iteration i is fold_in(state.rng, i): a resumed run samples what the first would have.
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), it)
    t0 = time.perf_counter()
    rollout, _, golds = self.actor.sample(state["params"]["policy"], prompts, key)
    t1 = time.perf_counter()
    rows, stats = self.experience(
      state["params"], self.ref_params, self.reward.params, rollout, jnp.float32(self.kl_coef)
    )
    state, step_metrics = self._update(state, rows, it)
    m = rollouts.iteration_metrics(step_metrics, stats, golds, gen_s=t1 - t0, update_start=t1)
    m["kl_coef"] = self.kl_coef
    if p.adaptive_kl:
      self.kl_coef = losses.adaptive_kl_coef(
        self.kl_coef, m["kl"], float(p.target_kl), self.B, int(p.kl_horizon)
      )
    rollouts.sound_alarms(self.alarms, it, m, m["reward"], "ppo", self.log)
    return state, m

  def evaluate(self, state, it: int, workdir: str) -> dict:
    """Greedy answers to the held-out prompts: gold accuracy, the reward model's score, the samples file
    (DIR/samples/iter_NNNNN.jsonl); at the first and last evaluation also pass@k."""
    p = self.p
    return rollouts.held_out(
      self.actor,
      state["params"]["policy"],
      self.eval_prompts,
      self.src,
      it=it,
      last=int(p.iterations),
      pass_k=int(p.eval_pass_k),
      workdir=workdir,
      score=lambda rollout: self.score(self.reward.params, rollout),
    )

  def job(self, workdir: str) -> loop.Job:
    keys = (
      "reward",
      "reward_raw",
      "gold",
      "kl",
      "kl_coef",
      "entropy",
      "response_length",
      "policy_clipfrac",
      "explained_variance",
      "gen_s",
      "update_s",
    )
    return rollouts.job(self, "ppo", self.p, workdir, keys)
