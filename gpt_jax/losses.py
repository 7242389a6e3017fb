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
