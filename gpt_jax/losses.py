"""Pure loss functions. Each returns sums and weights, `(loss_sum, weight)`, with masks explicit, so
gradient accumulation and packed sequences average over exactly the tokens that count.

Legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) per token, float32 (B, T)."""
  logits = logits_BTV.astype(jnp.float32)
  return -optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT)


def next_token_xent(logits_BTV, targets_BT, loss_mask_BT, z_loss: float = 0.0):
  """Next-token cross-entropy.

  Returns (loss_sum, weight, aux): the masked sum of per-token losses, the number of counted tokens,
  and {"z_loss_sum"} when z_loss > 0 (PaLM's auxiliary log-partition penalty, included in loss_sum).
  """
  logits = logits_BTV.astype(jnp.float32)
  mask = loss_mask_BT.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  loss_sum = jnp.sum(nll_BT * mask)
  aux = {"nll_sum": loss_sum}
  if z_loss:
    z_sum = z_loss * jnp.sum(jnp.square(log_z_BT) * mask)
    loss_sum = loss_sum + z_sum
    aux["z_loss_sum"] = z_sum
  return loss_sum, jnp.sum(mask), aux


def chunked_next_token_xent(
  hidden_BTD, head_DV, targets_BT, loss_mask_BT, z_loss: float = 0.0, *, chunk_len: int = 128
):
  """next_token_xent computed from the final hidden states without ever holding the logits of the
  whole batch: the output head runs on `chunk_len` time steps at a time inside a rematerialized scan,
  so forward and backward keep only one (B, chunk_len, V) block of logits alive (GPT-2's V=50,257 at
  B=16, T=1024 is 3.3 GB of fp32 logits otherwise). Chunks run along time, so a batch sharded over
  rows stays sharded.

  hidden_BTD: model.Output.hidden; head_DV: the output projection (model.output_head_DV), both in the
  compute dtype; the logits of each chunk go to float32 for the softmax.
  Returns (loss_sum, weight, aux) exactly as next_token_xent.
  """
  B, T, D = hidden_BTD.shape
  c = max(1, min(int(chunk_len), T))
  n = -(-T // c)
  pad = n * c - T
  mask_BT = loss_mask_BT.astype(jnp.float32)
  if pad:  # padded steps carry mask 0, so they add nothing to any sum
    hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  # (B, n*c, ...) -> (n, B, c, ...): the scan walks the chunk axis.
  to_chunks = lambda x: jnp.swapaxes(x.reshape((B, n, c) + x.shape[2:]), 0, 1)

  @jax.checkpoint  # the backward recomputes each chunk's logits instead of saving them all
  def chunk_sums(h_BCD, t_BC, m_BC):
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, head_DV).astype(jnp.float32)
    log_z_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z_BC - target_BC) * m_BC), jnp.sum(jnp.square(log_z_BC) * m_BC)

  def body(carry, xs):
    nll, zsq = chunk_sums(*xs)
    return (carry[0] + nll, carry[1] + zsq), None

  zero = jnp.zeros((), jnp.float32)
  (nll_sum, zsq_sum), _ = jax.lax.scan(
    body, (zero, zero), (to_chunks(hidden_BTD), to_chunks(targets_BT), to_chunks(mask_BT))
  )
  loss_sum = nll_sum
  aux = {"nll_sum": nll_sum}
  if z_loss:
    z_sum = z_loss * zsq_sum
    loss_sum = loss_sum + z_sum
    aux["z_loss_sum"] = z_sum
  return loss_sum, jnp.sum(mask_BT), aux


# --- reward modeling ----------------------------------------------------------------------------


def bradley_terry(r_chosen_B, r_rejected_B, pair_mask_B=None, *, margin_B=None, center_coef: float = 0.0):
  """Pairwise preference loss -log sigmoid(r_chosen - r_rejected - margin), summed over pairs.

  center_coef adds center_coef * (r_chosen + r_rejected)^2, a small penalty that keeps rewards
  centred on zero. Returns (loss_sum, pairs, aux sums: correct, margin, reward, reward_sq).
  """
  mask = jnp.ones_like(r_chosen_B, jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
  rc, rr = r_chosen_B.astype(jnp.float32), r_rejected_B.astype(jnp.float32)
  diff = rc - rr
  target = diff - (0.0 if margin_B is None else margin_B.astype(jnp.float32))
  per_pair = -jax.nn.log_sigmoid(target)
  if center_coef:
    per_pair = per_pair + center_coef * jnp.square(rc + rr)
  aux = {
    "accuracy_sum": jnp.sum((diff > 0).astype(jnp.float32) * mask),
    "margin_sum": jnp.sum(diff * mask),
    "reward_sum": jnp.sum(0.5 * (rc + rr) * mask),
    "reward_sq_sum": jnp.sum(0.5 * (rc * rc + rr * rr) * mask),
  }
  return jnp.sum(per_pair * mask), jnp.sum(mask), aux


# --- reinforcement learning (PPO) -------------------------------------------------------------
# Legend: B rollouts, N response tokens.


def masked_mean(x, mask, axis=None):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x_BN, mask_BN, shift_mean: bool = True):
  """Normalizes x to zero mean and unit variance over the masked entries."""
  mean = masked_mean(x_BN, mask_BN)
  var = masked_mean(jnp.square(x_BN - mean), mask_BN)
  out = (x_BN - mean) * jax.lax.rsqrt(var + 1e-8)
  return out if shift_mean else out + mean


def gae(rewards_BN, values_BN, mask_BN, gamma: float, lam: float):
  """Generalized advantage estimation over each response (masked positions are past its end).

  Returns (advantages_BN, returns_BN); the value after the last response token is 0.
  """
  mask = mask_BN.astype(jnp.float32)
  next_values = jnp.concatenate([values_BN[:, 1:], jnp.zeros_like(values_BN[:, :1])], axis=1)
  next_values = next_values * jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  deltas = (rewards_BN + gamma * next_values - values_BN) * mask

  def back(carry, xs):
    delta, m = xs
    adv = delta + gamma * lam * carry * m
    return adv, adv

  _, adv_NB = jax.lax.scan(back, jnp.zeros(rewards_BN.shape[0]), (deltas.T, mask.T), reverse=True)
  advantages = adv_NB.T * mask
  return advantages, (advantages + values_BN) * mask


def ppo_policy_loss(logp_BN, old_logp_BN, advantages_BN, mask_BN, clip: float):
  """Clipped surrogate objective (to minimize), summed over response tokens.

  Returns (loss_sum, tokens, aux sums: clipfrac, approx_kl)."""
  mask = mask_BN.astype(jnp.float32)
  ratio = jnp.exp(logp_BN - old_logp_BN)
  unclipped = -advantages_BN * ratio
  clipped = -advantages_BN * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  per_token = jnp.maximum(unclipped, clipped)
  aux = {
    "policy_clipfrac_sum": jnp.sum((clipped > unclipped).astype(jnp.float32) * mask),
    "approx_kl_sum": jnp.sum(0.5 * jnp.square(logp_BN - old_logp_BN) * mask),
  }
  return jnp.sum(per_token * mask), jnp.sum(mask), aux


def ppo_value_loss(values_BN, old_values_BN, returns_BN, mask_BN, clip: float):
  """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old ± clip) - R)^2), summed over tokens."""
  mask = mask_BN.astype(jnp.float32)
  v_clipped = old_values_BN + jnp.clip(values_BN - old_values_BN, -clip, clip)
  loss_unclipped = jnp.square(values_BN - returns_BN)
  loss_clipped = jnp.square(v_clipped - returns_BN)
  per_token = 0.5 * jnp.maximum(loss_unclipped, loss_clipped)
  aux = {"value_clipfrac_sum": jnp.sum((loss_clipped > loss_unclipped).astype(jnp.float32) * mask)}
  return jnp.sum(per_token * mask), jnp.sum(mask), aux


def entropy_from_logits(logits_BNV):
  """Entropy of each token's distribution, float32 (B, N)."""
  logp = jax.nn.log_softmax(logits_BNV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def adaptive_kl_coef(coef: float, observed_kl: float, target_kl: float, n_steps: int, horizon: int) -> float:
  """One update of the adaptive KL controller of Ziegler et al. (2019): the coefficient grows when
  the observed KL is above target and shrinks below it, by at most 20% of the error per horizon."""
  error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
  return coef * (1.0 + error * n_steps / horizon)
