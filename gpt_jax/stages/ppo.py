"""Reinforcement learning from the reward model with PPO (Ouyang et al. 2022; Ziegler et al. 2019).

  python -m gpt_jax ppo --config=experiments/ppo.py:tiny --config.ppo.sft_workdir=SFT_DIR \
      --config.ppo.rm_workdir=RM_DIR --workdir=DIR

Four models share one mesh: the policy (from SFT, trained), the reference (the SFT weights, frozen),
the reward model (frozen) and the critic (from the reward model, trained; or a value head on the
policy trunk with ppo.value_head_on_policy). Each iteration:

  1. rollout   the jitted KV-cache sampler (sampling.py) answers ppo.rollout_batch prompts with the
               policy's current parameters, on the same devices (no weight copy to another engine);
  2. score     one jitted pass computes the log-probs of policy and reference, the critic's values,
               the reward-model score at the eos after each response, the per-token rewards (score
               normalized by the RM's statistics, minus a penalty for responses that never end,
               minus kl_coef times the per-token KL to the reference) and the whitened GAE advantages;
  3. update    ppo.epochs passes of minibatch steps of the shared train step (step.py) on the
               clipped policy objective + clipped value loss (+ entropy bonus, + PPO-ptx);
  4. the adaptive KL controller moves kl_coef toward ppo.target_kl; metrics and alarms are logged.

Held-out prompts are answered greedily at iteration 0 (the SFT model) and every ppo.eval_every
iterations: eval/gold_accuracy by the tasks' grader and eval/reward_raw by the reward model; the
answers go to DIR/samples/iter_NNNNN.jsonl. A checkpoint (step = iteration) holds the policy (as
item "policy": a plain model's params), the critic, the optimizer state and the RNG, with the KL
coefficient, the prompt position, the ptx loader position and the alarm history in its JSON extra,
so a resumed run continues exactly as an uninterrupted one. ppo.reward = "gold" trains on the task
grader's 0/1 score instead of the reward model's (a perfect reward: it separates what PPO can do
from what the reward model lets it do); the reward model is still scored and logged.

Legend: B rollouts, P padded prompt length, N max new tokens, S = P + N + 1 (an eos after the
response, where the reward model reads), V vocabulary, D width.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import distributed, heads, losses, optim, rl, sampling, sharding, trainer
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax.data import batch as batch_lib
from gpt_jax.data import comparisons as comp_data
from gpt_jax.data import sft as sft_data
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import TrainingError
from gpt_jax.stages import ppo_setup
from gpt_jax.stages import rm as rm_stage
from gpt_jax.stages import sft as sft_stage

# Keys that may change when a PPO workdir is resumed (beyond config.MUTABLE_KEYS).
PPO_MUTABLE_KEYS = (
  "ppo.iterations",
  "ppo.eval_every",
  "ppo.eval_prompts",
  "ppo.eval_pass_k",
  "ppo.kl_alarm",
  "ppo.hack_window",
  "ppo.hack_min_change",
)
ROLLOUT_KEYS = (
  "tokens",
  "positions",
  "segment_ids",
  "response_mask",
  "old_logp",
  "old_values",
  "advantages",
  "returns",
)
PTX_KEYS = ("ptx_inputs", "ptx_targets", "ptx_positions", "ptx_segment_ids", "ptx_loss_mask")


# --- model pieces -----------------------------------------------------------------------------------


def response_logits(cfg: model_lib.ModelConfig, trunk, hidden_BSD, P: int, N: int):
  """Logits (B, N, V) float32 of the N response tokens: the output head on hidden slots [P-1, P-1+N)
  only, so the prompt's (B, P, V) logits are never formed."""
  h_BND = jax.lax.dynamic_slice_in_dim(hidden_BSD, P - 1, N, axis=1)
  return jnp.einsum("bnd,dv->bnv", h_BND, model_lib.output_head_DV(cfg, trunk)).astype(jnp.float32)


def response_values(hidden_BSD, head, P: int, N: int):
  """The critic's values (B, N) of the states before each response token (slots [P-1, P-1+N))."""
  return heads.scores_BT(jax.lax.dynamic_slice_in_dim(hidden_BSD, P - 1, N, axis=1), head)


def _forward(model: trainer.Model, params, rows):
  return model.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"], compute_logits=False)


def policy_outputs(policy: trainer.Model, value: trainer.Model | None, params, rows, P, N, temperature):
  """(logits_BNV at the sampling temperature, values_BN) of the trained models on rollout rows.

  params: {"policy": ..., "value": ...}; with value None the critic is the policy's own "score_head"."""
  out = _forward(policy, params["policy"], rows)
  trunk, head = heads.split_head(params["policy"])
  logits_BNV = response_logits(policy.cfg, trunk, out.hidden, P, N) / temperature
  if value is None:
    return logits_BNV, response_values(out.hidden, head, P, N)
  v_out = _forward(value, params["value"], rows)
  return logits_BNV, response_values(v_out.hidden, params["value"][heads.HEAD], P, N)


def make_experience_fn(policy, value, reference, reward, *, P, N, p, score_mean, score_std):
  """Returns jitted `experience(params, ref_params, rm_params, rows, kl_coef) -> dict` of (B, N) float32
  arrays logp, ref_logp, values, entropy, rewards, kl, advantages, returns and (B,) score, normalized.

  rows: tokens, positions, segment_ids (B, S) int32; response_mask (B, N); ended, end_index (B,).
  """
  mesh = policy.mesh

  def experience(params, ref_params, rm_params, rows, kl_coef):
    with sharding.activation_mesh(mesh):
      response_BN = rows["tokens"][:, P : P + N]
      mask_BN = rows["response_mask"]
      logits_BNV, values_BN = policy_outputs(policy, value, params, rows, P, N, p.temperature)
      logp_BN = losses.token_logprobs(logits_BNV, response_BN)
      ref_hidden = _forward(reference, ref_params, rows).hidden
      ref_logits = response_logits(reference.cfg, ref_params, ref_hidden, P, N) / p.temperature
      ref_logp_BN = losses.token_logprobs(ref_logits, response_BN)
      rm_rows = {"inputs": rows["tokens"], **{k: rows[k] for k in ("positions", "segment_ids", "end_index")}}
      score_B = rm_stage.rewards_from_batch(reward, rm_params, rm_rows)
      # ppo.reward "gold": the task grader's 0/1 score replaces the reward model's (kept for the metrics).
      gold = p.reward == "gold"
      rewards_BN, kl_BN, normalized_B = rl.assemble_rewards(
        rows["gold"] if gold else score_B,
        logp_BN,
        ref_logp_BN,
        mask_BN,
        rows["ended"],
        kl_coef=kl_coef,
        score_mean=0.0 if gold else score_mean,
        score_std=1.0 if gold else score_std,
        no_eos_penalty=float(p.no_eos_penalty),
      )
      values_BN = values_BN * mask_BN
      adv_BN, returns_BN = rl.advantages(
        rewards_BN,
        values_BN,
        mask_BN,
        gamma=float(p.gamma),
        lam=float(p.lam),
        whiten=bool(p.whiten_advantages),
      )
      return {
        "logp": logp_BN * mask_BN,
        "ref_logp": ref_logp_BN * mask_BN,
        "values": values_BN,
        "entropy": losses.entropy_from_logits(logits_BNV) * mask_BN,
        "rewards": rewards_BN,
        "kl": kl_BN,
        "advantages": adv_BN,
        "returns": returns_BN,
        "score": score_B,
        "normalized": normalized_B,
      }

  return jax.jit(experience, out_shardings=sharding.replicated(mesh))


def make_loss_fn(policy, value, *, P, N, p):
  """The PPO loss over a rollout minibatch (ROLLOUT_KEYS, plus PTX_KEYS when ptx_coef > 0).

  Returns (loss_sum, response tokens, aux sums): clipped policy loss + vf_coef * clipped value loss
  - entropy_coef * entropy, summed over response tokens (step.py divides by their count); PPO-ptx adds
  ptx_coef times the mean next-token loss of the ptx rows, scaled by the token count to survive that division.
  """
  ptx_coef = float(p.ptx_coef)

  def loss_fn(params, batch, rng):
    del rng
    mask_BN = batch["response_mask"]
    logits_BNV, values_BN = policy_outputs(policy, value, params, batch, P, N, p.temperature)
    logp_BN = losses.token_logprobs(logits_BNV, batch["tokens"][:, P : P + N])
    pg_sum, tokens, pg_aux = losses.ppo_policy_loss(
      logp_BN, batch["old_logp"], batch["advantages"], mask_BN, p.clip
    )
    vf_sum, _, vf_aux = losses.ppo_value_loss(
      values_BN, batch["old_values"], batch["returns"], mask_BN, p.value_clip
    )
    ent_sum = jnp.sum(losses.entropy_from_logits(logits_BNV) * mask_BN)
    loss_sum = pg_sum + float(p.vf_coef) * vf_sum - float(p.entropy_coef) * ent_sum
    aux = {"policy_loss_sum": pg_sum, "value_loss_sum": vf_sum, "entropy_sum": ent_sum, **pg_aux, **vf_aux}
    if ptx_coef > 0:
      out = policy.apply(
        params["policy"],
        batch["ptx_inputs"],
        batch["ptx_positions"],
        batch["ptx_segment_ids"],
        compute_logits=False,
      )
      trunk, _ = heads.split_head(params["policy"])
      ptx_sum, ptx_n, _ = losses.chunked_next_token_xent(
        out.hidden, model_lib.output_head_DV(policy.cfg, trunk), batch["ptx_targets"], batch["ptx_loss_mask"]
      )
      ptx_mean_scaled = ptx_sum / jnp.maximum(ptx_n, 1.0) * jax.lax.stop_gradient(tokens)
      loss_sum = loss_sum + ptx_coef * ptx_mean_scaled
      aux["ptx_loss_sum"] = ptx_mean_scaled
    return loss_sum, tokens, aux

  return loss_fn


# --- host-side helpers ------------------------------------------------------------------------------


def save_config(workdir: str, cfg) -> None:
  """trainer.save_config with PPO_MUTABLE_KEYS also allowed to change on resume."""
  path = os.path.join(workdir, "config.json")
  current = config_lib.to_dict(cfg)
  if os.path.exists(path):
    with open(path) as f:
      saved = config_lib.flatten(json.load(f))
    flat = config_lib.flatten(current)
    saved.update({k: flat[k] for k in PPO_MUTABLE_KEYS if k in flat})
    config_lib.check_resume(saved, flat, what=f"workdir {workdir}")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def checkpoint_tree(state: dict) -> dict:
  """The train state as checkpointed: {"policy": the transformer's params (what inference and later
  stages load as item "policy"), "value": the critic's | "value_head": the policy's value head,
  "opt_state", "step", "rng", "skipped"}. Works on arrays and on ShapeDtypeStructs alike."""
  params = dict(state["params"])
  policy, head = heads.split_head(params.pop("policy"))
  out = {"policy": policy, **params, **({} if head is None else {"value_head": head})}
  return out | {k: v for k, v in state.items() if k != "params"}


def state_tree(tree: dict) -> dict:
  """The inverse of checkpoint_tree."""
  tree = dict(tree)
  policy = tree.pop("policy")
  if "value_head" in tree:
    policy = {**policy, heads.HEAD: tree.pop("value_head")}
  params = {"policy": policy} | ({"value": tree.pop("value")} if "value" in tree else {})
  return {"params": params, **tree}


def value_optim_config(cfg):
  """The separate critic's optim section: cfg.optim with lr_peak = ppo.value_lr when that is set."""
  c = ml_collections.ConfigDict(cfg.optim.to_dict())
  if float(cfg.ppo.value_lr) > 0:
    c.lr_peak = float(cfg.ppo.value_lr)
  return c


def _place(model: trainer.Model):
  """The model's params as ShapeDtypeStructs carrying their shardings (what restore_params places)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), model.shapes, model.shardings
  )


def _fmt(m: dict, keys) -> str:
  return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


# --- the stage --------------------------------------------------------------------------------------


class _Run:
  """One PPO run: the models on the mesh, the jitted functions, and the loop state."""

  def __init__(
    self,
    cfg,
    workdir: str,
    model_cfg,
    src: ppo_setup.Sources,
    train_prompts,
    eval_prompts,
    P,
    ptx_enc,
    log_fn,
  ):
    p, t = cfg.ppo, cfg.train
    self.cfg, self.p, self.t, self.workdir, self.src, self.log = cfg, p, t, workdir, src, log_fn
    self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
    self.P, self.N, self.B = P, int(p.max_new_tokens), int(p.rollout_batch)
    self.tok = src.tokenizer
    self.eot = self.tok.special_id("end_of_turn")
    self.seed = int(t.seed)
    self.mesh = mesh = sharding.make_mesh(cfg.mesh)
    self.on_policy = on_policy = bool(p.value_head_on_policy)
    self.policy = trainer.Model.build(model_cfg, mesh, head=on_policy)
    self.reference = trainer.Model.build(model_cfg, mesh)
    self.reward, self.rm_params, _, _ = rm_stage.load_reward_model(src.rm.workdir, mesh)
    self.value = None if on_policy else self.reward
    trained = {"policy": self.policy} | ({} if on_policy else {"value": self.value})
    self.params_sh = {k: m.shardings for k, m in trained.items()}
    total_steps = int(p.iterations) * int(p.epochs) * (self.B // int(p.minibatch))
    self.optimizer, lr = optim.make_per_model(
      {"policy": cfg.optim, "value": value_optim_config(cfg)},
      total_steps,
      {k: m.axes for k, m in trained.items()},
    )
    shapes = {k: m.shapes for k, m in trained.items()}
    self.abstract_state = jax.eval_shape(lambda q: step_lib.init_state(q, self.optimizer, self.seed), shapes)
    self.state_sh = step_lib.state_shardings(mesh, self.optimizer, self.params_sh, self.abstract_state)
    keys = ROLLOUT_KEYS + (PTX_KEYS if ptx_enc is not None else ())
    self.train_step = step_lib.make_train_step(
      make_loss_fn(self.policy, self.value, P=P, N=self.N, p=p),
      self.optimizer,
      lr,
      mesh=mesh,
      state_sharding=self.state_sh,
      batch_sharding={k: sharding.batch_sharding(mesh, 2) for k in keys},
      grad_accum=int(t.grad_accum),
    )
    self.experience = make_experience_fn(
      self.policy,
      self.value,
      self.reference,
      self.reward,
      P=P,
      N=self.N,
      p=p,
      score_mean=src.score_mean,
      score_std=src.score_std,
    )
    self.samplers = {
      greedy: sampling.make_sampler(
        model_cfg,
        self.reference.graphdef,
        eos_id=self.eot,
        pad_id=self.tok.pad_id,
        max_prompt_len=P,
        sample_cfg=sampling.SampleConfig(
          max_new_tokens=self.N, temperature=float(p.temperature), greedy=greedy
        ),
        mesh=mesh,
        params_sharding=self.reference.shardings,
      )
      for greedy in (False, True)
    }
    self.order = rl.PromptOrder(len(train_prompts), self.seed)
    self.alarms = rl.Alarms(float(p.kl_alarm), int(p.hack_window), float(p.hack_min_change))
    self.ptx = None
    if ptx_enc is not None:
      self.ptx = sft_data.SftLoader(
        ptx_enc, global_batch=int(p.ptx_batch), seq_len=int(p.ptx_seq_len), sharding=None, seed=self.seed
      )
    self.kl_coef = float(p.kl_coef)
    self.is_main = jax.process_index() == 0

  # -- state

  def load(self, ckpt: ckpt_lib.Checkpointer) -> int:
    """Places the frozen models and the train state (fresh or resumed); returns the iteration done."""
    src = self.src
    self.ref_params = ckpt_lib.restore_params(src.sft.checkpoint, _place(self.reference))
    latest = ckpt.latest_step()
    if latest is not None:
      abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract_state, self.state_sh
      )
      tree, extra = ckpt.restore(latest, checkpoint_tree(abstract))
      self.state = state_tree(tree)
      self.kl_coef = float(extra["kl_coef"])
      self.order.set_state(extra["prompt_position"])
      self.alarms.set_state(extra.get("alarms", {}))
      if self.ptx is not None:
        self.ptx.set_state(extra["ptx_loader"])
      self.log(f"[ppo] resumed from iteration {latest} in {self.workdir}")
      return int(extra["iteration"])
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # own buffers: the train state is donated
    init = {"policy": copy(self.ref_params)}
    if self.on_policy:
      head = heads.init_head(self.policy.cfg.d_model)
      init["policy"][heads.HEAD] = jax.device_put(head, self.policy.shardings[heads.HEAD])
    else:
      # The critic starts as the reward model's transformer with a zero head. The reward head was
      # trained only at the end-of-text token; at the response's other tokens (where the critic
      # reads it) its values are off any scale, and GAE would turn them into advantages that drown
      # the reward (explained variance < 0). A zero head starts PPO as REINFORCE with the whitened
      # mean as baseline, and the critic learns the returns from there.
      value = copy(self.rm_params)
      value[heads.HEAD] = jax.device_put(
        heads.init_head(self.reward.cfg.d_model), self.reward.shardings[heads.HEAD]
      )
      init["value"] = value
    self.state = jax.jit(
      lambda q: step_lib.init_state(q, self.optimizer, self.seed),
      out_shardings=self.state_sh,
      donate_argnums=0,
    )(init)
    self.log(
      f"[ppo] policy and reference from {src.sft.checkpoint}; reward model and critic from {src.rm.checkpoint}"
    )
    return 0

  def save(self, ckpt: ckpt_lib.Checkpointer, iteration: int) -> None:
    extra = {
      "iteration": iteration,
      "kl_coef": self.kl_coef,
      "prompt_position": self.order.get_state(),
      "alarms": self.alarms.get_state(),
      "config": config_lib.to_dict(self.cfg),
      "stage": "ppo",
    }
    if self.ptx is not None:
      extra["ptx_loader"] = self.ptx.get_state()
    ckpt.save(iteration, checkpoint_tree(self.state), extra=extra, force=True)

  # -- rollouts

  def _trunk(self):
    return heads.split_head(self.state["params"]["policy"])[0]

  def sample(self, prompts, key, greedy: bool):
    """Samples answers to `prompts` (B of them) with the policy and grades them.

    Returns (padded prompt tokens, their lengths, host SampleOutput, reply texts, gold scores
    (nan: no answer))."""
    tokens_BP, lengths_B = sampling.pad_prompts([q.ids for q in prompts], self.tok.pad_id, self.P)
    out = jax.device_get(self.samplers[greedy](self._trunk(), tokens_BP, lengths_B, key))
    texts = [
      comp_data.reply_text(self.tok, out.tokens[i][: int(out.lengths[i])], self.eot)
      for i in range(len(prompts))
    ]
    golds = np.array(
      [np.nan if q.answer is None else tasks_lib.grade_text(q.answer, x) for q, x in zip(prompts, texts)],
      np.float32,
    )
    return tokens_BP, lengths_B, out, texts, golds

  def rollout(self, prompts, key, greedy: bool):
    """Samples answers to `prompts` (B of them) and scores them.

    Returns (host rows, host SampleOutput, reply texts, gold scores (nan: no answer), host experience,
    generate s, score s)."""
    t0 = time.perf_counter()
    tokens_BP, lengths_B, out, texts, golds = self.sample(prompts, key, greedy)
    t1 = time.perf_counter()
    mask = np.asarray(out.response_mask, np.float32)
    rows = rl.rollout_layout(tokens_BP, lengths_B, out.tokens, mask, self.tok.eos_id)
    rows["response_mask"] = mask
    rows["ended"] = ((out.tokens == self.eot) & (mask > 0)).any(axis=1).astype(np.float32)
    rows["gold"] = np.nan_to_num(golds)
    dev = batch_lib.to_global(rows, lambda nd: sharding.batch_sharding(self.mesh, nd))
    exp = jax.device_get(
      self.experience(self.state["params"], self.ref_params, self.rm_params, dev, jnp.float32(self.kl_coef))
    )
    return rows, out, texts, golds, exp, t1 - t0, time.perf_counter() - t1

  def evaluate(self, iteration: int, writer) -> dict:
    """Greedy answers to the held-out prompts: gold accuracy, reward-model score; the samples file."""
    if not self.eval_prompts:
      return {}
    records = []
    for lo in range(0, len(self.eval_prompts), self.B):
      chunk = self.eval_prompts[lo : lo + self.B]
      full = chunk + [chunk[0]] * (self.B - len(chunk))  # one shape: one compile
      _, out, texts, golds, exp, _, _ = self.rollout(full, jax.random.key(0), greedy=True)
      for q, text, g, score, n in zip(chunk, texts, golds, exp["score"], out.lengths):
        gold = None if q.answer is None else float(g)
        records.append(
          dict(
            prompt=q.text,
            answer=q.answer,
            response=text,
            kind=q.kind,
            gold=gold,
            reward_raw=float(score),
            length=int(n),
          )
        )
    raw = float(np.mean([r["reward_raw"] for r in records]))
    result = {
      "reward_raw": raw,
      "reward": (raw - self.src.score_mean) / self.src.score_std,
      "response_length": float(np.mean([r["length"] for r in records])),
    }
    graded = [r for r in records if r["gold"] is not None]
    if graded:
      result["gold_accuracy"] = float(np.mean([r["gold"] for r in graded]))
      kinds = sorted({r["kind"] for r in graded})
      for k in kinds if len(kinds) > 1 else ():
        result[f"gold_accuracy_{k}"] = float(np.mean([r["gold"] for r in graded if r["kind"] == k]))
    if self.is_main:
      tasks_lib.write_jsonl(os.path.join(self.workdir, "samples", f"iter_{iteration:05d}.jsonl"), records)
    writer.write(iteration, result, prefix="eval/")
    self.log(f"[ppo] iteration {iteration} eval " + _fmt(result, sorted(result)))
    return result

  def pass_at_k(self, iteration: int, writer) -> dict:
    """ppo.eval_pass_k sampled answers (at ppo.temperature) per graded held-out prompt.

    eval/pass_at_k is the share of prompts with at least one correct sample, eval/sample_accuracy the
    share of correct samples. PPO raises the probability of answers the policy already samples, so
    pass@k of the SFT model (iteration 0) bounds roughly what it can bring to the greedy answers; at
    the end it shows whether the policy kept its range or collapsed onto fewer answers. The keys are
    fixed, so the figures are a function of the parameters alone (a resumed run reports the same).
    """
    k = int(self.p.eval_pass_k)
    graded = [q for q in self.eval_prompts if q.answer is not None]
    if k <= 0 or not graded:
      return {}
    flat = [q for q in graded for _ in range(k)]
    golds = []
    for lo in range(0, len(flat), self.B):
      chunk = flat[lo : lo + self.B]
      full = chunk + [chunk[0]] * (self.B - len(chunk))  # one shape: one compile
      key = jax.random.fold_in(jax.random.key(1), lo)
      golds.extend(self.sample(full, key, greedy=False)[4][: len(chunk)])  # graded only: no scoring pass
    g_PK = np.asarray(golds, np.float32).reshape(len(graded), k)
    result = {f"pass_at_{k}": float(g_PK.max(axis=1).mean()), "sample_accuracy": float(g_PK.mean())}
    writer.write(iteration, result, prefix="eval/")
    self.log(f"[ppo] iteration {iteration} eval " + _fmt(result, sorted(result)))
    return result

  # -- one iteration

  def iteration(self, it: int) -> dict:
    """Rollout, score, update, KL controller; returns the iteration's metrics (host floats)."""
    p = self.p
    idx = self.order.take(self.B)
    # The rollout key of iteration i is fold_in(state.rng, i): a resumed run samples what the first would have.
    key = jax.random.fold_in(jax.random.wrap_key_data(self.state["rng"]), it)
    rows, out, _, golds, exp, gen_s, score_s = self.rollout(
      [self.train_prompts[i] for i in idx], key, greedy=False
    )
    golds = golds[np.isfinite(golds)]
    host = {k: rows[k] for k in ("tokens", "positions", "segment_ids", "response_mask")}
    host.update(
      old_logp=exp["logp"], old_values=exp["values"], advantages=exp["advantages"], returns=exp["returns"]
    )
    t0 = time.perf_counter()
    step_metrics = []
    mb = int(p.minibatch)
    for epoch in range(int(p.epochs)):
      perm = np.random.default_rng([self.seed, it, epoch]).permutation(self.B)
      for lo in range(0, self.B, mb):
        batch = {k: v[perm[lo : lo + mb]] for k, v in host.items()}
        if self.ptx is not None:
          batch.update({f"ptx_{k}": v for k, v in self.ptx.host_batch().items()})
        dev = batch_lib.to_global(batch, lambda nd: sharding.batch_sharding(self.mesh, nd))
        self.state, m = self.train_step(self.state, dev)
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    update_s = time.perf_counter() - t0
    finite = min(float(m["finite"]) for m in step_metrics)
    if finite < 1.0:
      if self.t.nonfinite == "stop":
        raise TrainingError(
          f"non-finite PPO loss or gradients at iteration {it}; the update was not applied and no checkpoint "
          "of it was written (set train.nonfinite=skip to skip such steps)"
        )
      self.log(
        f"[ppo] iteration {it}: non-finite loss or gradients, {sum(m['finite'] < 1 for m in step_metrics)} steps skipped"
      )
    mask = rows["response_mask"]
    kl_per_response = float(np.mean(exp["kl"].sum(axis=1)))
    m = {
      k: float(np.mean([s[k] for s in step_metrics]))
      for k in step_metrics[0]
      if k not in ("finite", "weight")
    }
    m.update(
      # The reward model's normalized score (whatever ppo.reward trains on): what the alarms watch.
      reward=float(np.mean((exp["score"] - self.src.score_mean) / self.src.score_std)),
      reward_raw=float(np.mean(exp["score"])),
      reward_total=float(np.mean(exp["rewards"].sum(axis=1))),
      kl=kl_per_response,
      kl_coef=self.kl_coef,
      entropy=float(exp["entropy"].sum() / max(mask.sum(), 1.0)),
      response_length=float(mask.sum(axis=1).mean()),
      no_eos_fraction=float(1.0 - rows["ended"].mean()),
      explained_variance=rl.explained_variance(exp["values"], exp["returns"], mask),
      value_mean=float((exp["values"] * mask).sum() / max(mask.sum(), 1.0)),
      return_mean=float((exp["returns"] * mask).sum() / max(mask.sum(), 1.0)),
      gen_s=gen_s,
      score_s=score_s,
      update_s=update_s,
    )
    if golds.size:
      m["gold"] = float(np.mean(golds))
    if p.adaptive_kl:
      self.kl_coef = losses.adaptive_kl_coef(
        self.kl_coef, kl_per_response, float(p.target_kl), self.B, int(p.kl_horizon)
      )
    warnings = self.alarms.update(it, kl_per_response, m["reward"], m.get("gold"))
    m["alarm_kl"] = float(any("KL" in w for w in warnings))
    m["alarm_hacking"] = float(any("hacking" in w for w in warnings))
    for w in warnings:
      self.log(f"[ppo] {w}")
    return m


def run(cfg, workdir: str, log_fn=print) -> dict:
  """Runs PPO to cfg.ppo.iterations from the SFT and reward-model workdirs; resumes from the workdir.

  Returns {"iteration", "ppo": the last iteration's metrics, "eval": the last evaluation, "evals":
  {iteration: evaluation} of this process, "params": the trained {"policy", ["value"]}}. Every config,
  file and length check runs before anything is placed on the devices or compiled.
  """
  model_cfg = ppo_setup.validate(cfg)
  p, t = cfg.ppo, cfg.train
  ppo_setup.check_mesh(cfg, jax.device_count())
  src = ppo_setup.inspect_sources(cfg, model_cfg)
  train_prompts, eval_prompts = ppo_setup.load_prompts(cfg, src)
  P = ppo_setup.prompt_length(
    cfg, model_cfg, src.rm_model, {"ppo train prompt": train_prompts, "ppo held-out prompt": eval_prompts}
  )
  ptx_enc = None
  if float(p.ptx_coef) > 0:
    path = p.ptx_path or os.path.join(src.sft.workdir, "data", "train.jsonl")
    ptx_enc = sft_data.encode(
      sft_data.read_conversations(path), src.tokenizer, int(p.ptx_seq_len), "drop", "ppo ptx data"
    )
  trainer.check_workdir(workdir)

  with distributed.WorkdirLock(workdir):
    save_config(workdir, cfg)
    sft_stage.install_tokenizer(src.sft, workdir, log_fn)
    r = _Run(cfg, workdir, model_cfg, src, train_prompts, eval_prompts, P, ptx_enc, log_fn)
    ckpt = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpoint)
    )
    writer = metrics_lib.MetricWriter(workdir, enabled=r.is_main, tensorboard=bool(cfg.metrics.tensorboard))
    try:
      start = r.load(ckpt)
      evals = {0: r.evaluate(0, writer) | r.pass_at_k(0, writer)} if start == 0 else {}
      total = int(p.iterations)
      progress = metrics_lib.Progress(
        total, start, enabled=r.is_main and bool(t.progress_bar), desc="ppo", keys=("reward", "gold", "kl")
      )
      last: dict = {}
      with trainer._Sigterm() as sigterm:
        for it in range(start + 1, total + 1):
          last = r.iteration(it)
          progress.update(it, last)
          if it % int(t.log_every) == 0 or it == total:
            writer.write(it, last, prefix="ppo/")
            log_fn(
              f"[ppo] iteration {it}/{total} "
              + _fmt(
                last,
                (
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
                ),
              )
            )
          if it % int(p.eval_every) == 0 or it == total:
            evals[it] = r.evaluate(it, writer) | (r.pass_at_k(it, writer) if it == total else {})
          if it % int(t.checkpoint_every) == 0 or it == total or sigterm.flag:
            r.save(ckpt, it)
          if sigterm.flag:
            ckpt.wait()
            raise trainer.Preempted(it, workdir)
      if start >= total:
        log_fn(f"[ppo] already at iteration {total}: nothing to do")
      progress.close()
      ckpt.wait()
      done = max(evals) if evals else None
      return {
        "iteration": max(start, total),
        "ppo": last,
        "eval": evals[done] if done is not None else {},
        "evals": evals,
        "params": r.state["params"],
      }
    finally:
      ckpt.close()
      writer.close()
