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


def lm_loss(apply_fn, *, document_mask: bool = True, z_loss: float = 0.0):
  """The next-token loss over a batch of the shared schema (data/batch.py) for the model
  `apply_fn(params, inputs, positions, segment_ids) -> Output`: `loss_fn(params, batch, rng)`.
  Segment ids keep packed documents apart unless document_mask is False."""

  def loss_fn(params, batch, rng):
    del rng
    segments = batch["segment_ids"] if document_mask else None
    out = apply_fn(params, batch["inputs"], batch["positions"], segments)
    return next_token_xent(out.logits, batch["targets"], batch["loss_mask"], z_loss)

  return loss_fn


# --- critic-free policy optimisation (GRPO / Dr. GRPO) -------------------------------------------
# Legend: G prompts (groups), K samples per prompt, B = G * K rollouts, N response tokens.


def group_advantages(rewards_GK, *, scale: bool = True, eps: float = 1e-4):
  """Group-relative advantages of GRPO (Shao et al. 2024): each sample's reward minus the mean of its
  prompt's group, divided by the group's standard deviation (population, ddof 0) + eps when `scale`;
  scale=False is Dr. GRPO (Liu et al. 2025), which drops the division (it up-weights near-unanimous
  groups). A group whose rewards are all equal gets advantage 0 either way. float32 (G, K)."""
  r = rewards_GK.astype(jnp.float32)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if not scale:
    return centred
  return centred / (jnp.std(r, axis=1, keepdims=True) + eps)


def k3_kl(logp_BN, ref_logp_BN, mask_BN=None):
  """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020) on tokens sampled from pi:
  exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased, lower variance than logp - ref.
  float32 (B, N), 0 where mask is 0."""
  d = ref_logp_BN.astype(jnp.float32) - logp_BN.astype(jnp.float32)
  kl = jnp.exp(d) - d - 1.0
  return kl if mask_BN is None else kl * mask_BN.astype(jnp.float32)


def grpo_policy_loss(
  logp_BN,
  old_logp_BN,
  ref_logp_BN,
  advantages_B,
  mask_BN,
  *,
  clip: float = 0.2,
  kl_coef: float = 0.0,
  per: str = "token",
):
  """GRPO's objective (to minimize): the clipped surrogate -min(ratio A, clip(ratio, 1 ± clip) A) with
  one advantage per sequence (advantages_B, e.g. group_advantages flattened), plus kl_coef times the
  k3 KL to the frozen reference (k3_kl), in the loss rather than in the reward; no critic.

  per="token": loss_sum sums over all response tokens and the weight is their count (every token
  weighs the same: DAPO / Dr. GRPO); per="sequence": each sequence's token mean, summed over
  sequences, weight = sequences with a token (the GRPO paper's 1/|o_i|). Returns (loss_sum, weight,
  aux sums over the same unit: pg_loss, kl (k3 to the reference), policy_clipfrac, approx_kl (to old)).
  """
  if per not in ("token", "sequence"):
    raise ValueError(f"grpo_policy_loss: per must be 'token' or 'sequence', got {per!r}")
  mask = mask_BN.astype(jnp.float32)
  adv_B1 = advantages_B.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logp_BN - old_logp_BN)
  unclipped = -adv_B1 * ratio
  clipped = -adv_B1 * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  pg_BN = jnp.maximum(unclipped, clipped)
  kl_BN = k3_kl(logp_BN, ref_logp_BN)
  per_token = {
    "loss": pg_BN + kl_coef * kl_BN,
    "pg_loss": pg_BN,
    "kl": kl_BN,
    "policy_clipfrac": (clipped > unclipped).astype(jnp.float32),
    "approx_kl": 0.5 * jnp.square(logp_BN - old_logp_BN),
  }
  if per == "token":
    sums = {k: jnp.sum(v * mask) for k, v in per_token.items()}
    weight = jnp.sum(mask)
  else:
    n_B = jnp.sum(mask, axis=1)
    w_B = 1.0 / jnp.maximum(n_B, 1.0)
    sums = {k: jnp.sum(jnp.sum(v * mask, axis=1) * w_B) for k, v in per_token.items()}
    weight = jnp.sum((n_B > 0).astype(jnp.float32))
  loss_sum = sums.pop("loss")
  return loss_sum, weight, {f"{k}_sum": v for k, v in sums.items()}


# --- direct preference optimisation -------------------------------------------------------------


def dpo_loss(
  policy_chosen_B,
  policy_rejected_B,
  ref_chosen_B,
  ref_rejected_B,
  pair_mask_B=None,
  *,
  beta: float = 0.1,
  kind: str = "sigmoid",
  label_smoothing: float = 0.0,
):
  """DPO (Rafailov et al. 2023) over preference pairs, from each response's summed log-prob under
  the policy and the frozen reference. With h = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (ls = label_smoothing, cDPO)
    ipo:     (h - 1 / (2 beta))^2                                       (Azar et al. 2023)

  The implicit reward of a response is beta (pi - ref); a pair counts as right when the chosen one's
  is higher (h > 0), half when they tie. Returns (loss_sum, pairs, aux sums: accuracy, margin (beta h), chosen_reward,
  rejected_reward).
  """
  if kind not in ("sigmoid", "ipo"):
    raise ValueError(f"dpo_loss: kind must be 'sigmoid' or 'ipo', got {kind!r}")
  mask = (
    jnp.ones_like(policy_chosen_B, jnp.float32) if pair_mask_B is None else pair_mask_B.astype(jnp.float32)
  )
  f32 = lambda x: x.astype(jnp.float32)
  chosen_B = f32(policy_chosen_B) - f32(ref_chosen_B)
  rejected_B = f32(policy_rejected_B) - f32(ref_rejected_B)
  h_B = chosen_B - rejected_B
  if kind == "sigmoid":
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
      beta * h_B
    ) - label_smoothing * jax.nn.log_sigmoid(-beta * h_B)
  else:
    per_pair = jnp.square(h_B - 1.0 / (2.0 * beta))
  aux = {
    # A tie (|h| below float rounding of summed log-probs: e.g. the policy still is the reference)
    # counts half, so the untrained policy scores 0.5, not whatever the rounding's sign says.
    "accuracy_sum": jnp.sum(jnp.where(jnp.abs(h_B) <= 1e-4, 0.5, (h_B > 0).astype(jnp.float32)) * mask),
    "margin_sum": jnp.sum(beta * h_B * mask),
    "chosen_reward_sum": jnp.sum(beta * chosen_B * mask),
    "rejected_reward_sum": jnp.sum(beta * rejected_B * mask),
  }
  return jnp.sum(per_pair * mask), jnp.sum(mask), aux
