"""The jitted pieces of PPO: the experience pass over fresh rollouts and the clipped loss.

Legend: B rollouts, P padded prompt length, N max new tokens, S = P + N + 1, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gpt_jax import heads, losses, rl, sharding
from gpt_jax import model as model_lib

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


def critic_values(value, params, hidden_BSD, rows, P, N):
  """The critic's values (B, N): a head on the policy's hidden states, or the separate critic's."""
  if value is None:
    return rl.response_values(hidden_BSD, params["value_head"], P, N)
  out = value.apply(
    params["value"], rows["tokens"], rows["positions"], rows["segment_ids"], compute_logits=False
  )
  return rl.response_values(out.hidden, params["value"][heads.HEAD], P, N)


def make_experience_fn(policy, value, reference, reward, *, P, N, p, score_mean, score_std):
  """jitted `experience(params, ref_params, rm_params, rollout, kl_coef) -> (rows, stats)`.

  rollout: tokens_BP, lengths_B (the padded prompts), response_BN, response_mask_BN, gold_B. rows
  (batch-sharded, on device): ROLLOUT_KEYS plus score_B (the raw reward-model score); stats: scalar
  means for the metrics."""
  mesh = policy.mesh
  w_gold, w_rm = float(p.gold_weight), float(p.rm_weight)

  def experience(params, ref_params, rm_params, rollout, kl_coef):
    with sharding.activation_mesh(mesh):
      mask_BN = rollout["response_mask_BN"].astype(jnp.float32)
      rows = rl.rollout_layout(
        rollout["tokens_BP"], rollout["lengths_B"], rollout["response_BN"], mask_BN, reward.eos_id
      )
      logp_BN, logits_BNV, hidden = rl.response_logprobs(policy, params["policy"], rows, P, N, p.temperature)
      values_BN = critic_values(value, params, hidden, rows, P, N) * mask_BN
      ref_logp_BN = rl.response_logprobs(reference, ref_params, rows, P, N, p.temperature)[0]
      score_B = reward.model.scores(rm_params, {"inputs": rows["tokens"], **rows})
      ended_B = jnp.any((rollout["response_BN"] == reward.eot_id) & (mask_BN > 0), axis=1).astype(jnp.float32)
      # The sequence reward: the grader's 0/1 and the reward model's normalized score, weighted.
      mixed_B = w_gold * rollout["gold_B"] + w_rm * (score_B - score_mean) / score_std
      rewards_BN, kl_BN, _ = rl.assemble_rewards(
        mixed_B,
        logp_BN,
        ref_logp_BN,
        mask_BN,
        ended_B,
        kl_coef=kl_coef,
        score_mean=0.0,
        score_std=1.0,
        no_eos_penalty=float(p.no_eos_penalty),
      )
      adv_BN, returns_BN = rl.advantages(
        rewards_BN,
        values_BN,
        mask_BN,
        gamma=float(p.gamma),
        lam=float(p.lam),
        whiten=bool(p.whiten_advantages),
      )
      n_tok = jnp.maximum(mask_BN.sum(), 1.0)
      stats = {
        # The reward model's normalized score (whatever the reward mix): what the alarms watch.
        "reward": jnp.mean((score_B - score_mean) / score_std),
        "reward_raw": jnp.mean(score_B),
        "reward_total": jnp.mean(rewards_BN.sum(axis=1)),
        "kl": jnp.mean(kl_BN.sum(axis=1)),  # the penalty's log-ratio estimate (the controller's)
        # The k3 estimate of the same KL (never negative, lower variance; GRPO's `kl`): what the report
        # and the over-optimization curve read.
        "kl_k3": jnp.mean(losses.k3_kl(logp_BN, ref_logp_BN, mask_BN).sum(axis=1)),
        "entropy": jnp.sum(losses.entropy_from_logits(logits_BNV) * mask_BN) / n_tok,
        "response_length": jnp.mean(mask_BN.sum(axis=1)),
        "no_eos_fraction": 1.0 - jnp.mean(ended_B),
        "explained_variance": rl.explained_variance(values_BN, returns_BN, mask_BN),
        "value_mean": jnp.sum(values_BN * mask_BN) / n_tok,
        "return_mean": jnp.sum(returns_BN * mask_BN) / n_tok,
      }
      out = dict(
        tokens=rows["tokens"],
        positions=rows["positions"],
        segment_ids=rows["segment_ids"],
        response_mask=mask_BN,
        old_logp=logp_BN * mask_BN,
        old_values=values_BN,
        advantages=adv_BN,
        returns=returns_BN,
        score=score_B,
      )
      return out, stats

  row_sh = {k: sharding.batch_sharding(mesh, 1 if k == "score" else 2) for k in (*ROLLOUT_KEYS, "score")}
  return jax.jit(experience, out_shardings=(row_sh, sharding.replicated(mesh)))


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
    logp_BN, logits_BNV, hidden = rl.response_logprobs(policy, params["policy"], batch, P, N, p.temperature)
    values_BN = critic_values(value, params, hidden, batch, P, N)
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
      ptx_sum, ptx_n, _ = losses.chunked_next_token_xent(
        out.hidden,
        model_lib.output_head_DV(policy.cfg, params["policy"]),
        batch["ptx_targets"],
        batch["ptx_loss_mask"],
      )
      ptx_mean_scaled = ptx_sum / jnp.maximum(ptx_n, 1.0) * jax.lax.stop_gradient(tokens)
      loss_sum = loss_sum + ptx_coef * ptx_mean_scaled
      aux["ptx_loss_sum"] = ptx_mean_scaled
    return loss_sum, tokens, aux

  return loss_fn
