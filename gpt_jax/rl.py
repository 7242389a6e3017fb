"""The RL pieces the PPO and GRPO stages share: the rollout layout, response log-probs, reward
assembly, advantages, prompt order and the alarms.

Legend: B rollouts, P padded prompt length, N max new tokens, S = P + N + 1 slots of a whole rollout.

A rollout row is its left-padded prompt (slots [0, P)) followed by the sampled response (slots
[P, P + N)), exactly as the sampler laid them out in its cache, and one more slot for the eos the
reward model reads. Response token j sits at slot P + j and is predicted by the hidden state at slot
P + j - 1, which is also where the critic values the state before token j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import heads, losses
from gpt_jax import model as model_lib
from gpt_jax.errors import DataError


def rollout_layout(tokens_BP, lengths_B, response_BN, response_mask_BN, eos_id: int) -> dict:
  """The whole rollouts as one forward pass reads them, S = P + N + 1 slots per row (jnp; jittable).

  Each row is its left-padded prompt, its response (pad after its end), and `eos_id` written right
  after the response's last token, where the reward model reads its head (the reward model scores
  "prompt + response + eos", as it was trained). Returns int32 arrays: tokens (B, S); positions (B, S)
  counted from each row's first real token; segment_ids (B, S), 0 on the left padding (which then
  attends only to itself) and 1 from the prompt on; end_index (B,), the slot of that eos.
  """
  tokens_BP = jnp.asarray(tokens_BP, jnp.int32)
  B, P = tokens_BP.shape
  N = response_BN.shape[1]
  pad_B = P - jnp.asarray(lengths_B, jnp.int32)
  n_B = jnp.sum(jnp.asarray(response_mask_BN, jnp.int32), axis=1)
  tokens_BS = jnp.concatenate(
    [tokens_BP, jnp.asarray(response_BN, jnp.int32), jnp.zeros((B, 1), jnp.int32)], axis=1
  )
  end_B = (P + n_B).astype(jnp.int32)
  tokens_BS = tokens_BS.at[jnp.arange(B), end_B].set(eos_id)
  t_S = jnp.arange(P + N + 1, dtype=jnp.int32)
  return {
    "tokens": tokens_BS,
    "positions": jnp.maximum(t_S[None, :] - pad_B[:, None], 0).astype(jnp.int32),
    "segment_ids": (t_S[None, :] >= pad_B[:, None]).astype(jnp.int32),
    "end_index": end_B,
  }


def response_logits(cfg, trunk, hidden_BSD, P: int, N: int):
  """Logits (B, N, V) float32 of the N response tokens: the output head on hidden slots [P-1, P-1+N)
  only, so the prompt's (B, P, V) logits are never formed."""
  h_BND = jax.lax.dynamic_slice_in_dim(hidden_BSD, P - 1, N, axis=1)
  return jnp.einsum("bnd,dv->bnv", h_BND, model_lib.output_head_DV(cfg, trunk)).astype(jnp.float32)


def response_values(hidden_BSD, head, P: int, N: int):
  """A head's values (B, N) of the states before each response token (slots [P-1, P-1+N))."""
  return heads.scores_BT(jax.lax.dynamic_slice_in_dim(hidden_BSD, P - 1, N, axis=1), head)


def response_logprobs(model, params, rows, P: int, N: int, temperature: float):
  """(log-probs (B, N) of the response tokens at the sampling temperature, logits (B, N, V), the
  forward pass's hidden states) of a plain model on rollout rows."""
  out = model.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"], compute_logits=False)
  logits_BNV = response_logits(model.cfg, model.trunk(params), out.hidden, P, N) / temperature
  return losses.token_logprobs(logits_BNV, rows["tokens"][:, P : P + N]), logits_BNV, out.hidden


def assemble_rewards(
  score_B,
  logp_BN,
  ref_logp_BN,
  mask_BN,
  ended_B,
  *,
  kl_coef,
  score_mean: float,
  score_std: float,
  no_eos_penalty: float,
):
  """Per-token rewards of Ziegler et al. (2019): -kl_coef * (log pi - log pi_ref) on every response
  token, plus the normalized reward-model score on the last one.

  score_B: raw reward-model scores at each row's last token; ended_B: whether the row produced the
  end token (a row that never ends loses no_eos_penalty). Returns (rewards_BN, kl_BN, normalized_B),
  float32, zero past each response's end.
  """
  mask = mask_BN.astype(jnp.float32)
  kl_BN = (logp_BN - ref_logp_BN) * mask
  normalized_B = (score_B.astype(jnp.float32) - score_mean) / score_std
  normalized_B = normalized_B - no_eos_penalty * (1.0 - ended_B.astype(jnp.float32))
  last_B = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  is_last_BN = (jnp.arange(mask.shape[1])[None, :] == last_B[:, None]).astype(jnp.float32) * mask
  rewards_BN = -kl_coef * kl_BN + is_last_BN * normalized_B[:, None]
  return rewards_BN, kl_BN, normalized_B


def advantages(rewards_BN, values_BN, mask_BN, *, gamma: float, lam: float, whiten: bool = True):
  """GAE advantages (whitened over the response tokens when `whiten`) and returns, both (B, N)."""
  adv_BN, returns_BN = losses.gae(rewards_BN, values_BN, mask_BN, gamma, lam)
  if whiten:
    adv_BN = losses.whiten(adv_BN, mask_BN) * mask_BN.astype(jnp.float32)
  return adv_BN, returns_BN


def explained_variance(values_BN, returns_BN, mask_BN):
  """1 - Var(returns - values) / Var(returns) over the masked entries (1 is a perfect critic; NaN when
  the returns do not vary). jnp; jittable."""
  m = mask_BN.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)

  def var(x):
    mean = jnp.sum(x * m) / n
    return jnp.sum(jnp.square(x - mean) * m) / n

  v_r = var(returns_BN.astype(jnp.float32))
  return jnp.where(
    v_r > 0, 1.0 - var((returns_BN - values_BN).astype(jnp.float32)) / jnp.where(v_r > 0, v_r, 1.0), jnp.nan
  )


class PromptOrder:
  """Prompt indices in a fresh seeded permutation per epoch; state {"position"} = prompts handed out.

  The sequence is a pure function of (n, seed, position), so a resumed run sees the same prompts.
  """

  def __init__(self, n: int, seed: int):
    if n <= 0:
      raise DataError("ppo prompts: the prompt set is empty")
    self.n, self.seed, self.position = int(n), int(seed), 0
    self._perm: tuple[int, np.ndarray] | None = None

  def _epoch(self, e: int) -> np.ndarray:
    if self._perm is None or self._perm[0] != e:
      self._perm = (e, np.random.default_rng([self.seed, e]).permutation(self.n))
    return self._perm[1]

  def take(self, k: int) -> np.ndarray:
    """The next k prompt indices (an epoch boundary may fall inside them)."""
    out = []
    for p in range(self.position, self.position + int(k)):
      out.append(self._epoch(p // self.n)[p % self.n])
    self.position += int(k)
    return np.asarray(out, np.int64)

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    try:
      position = int(state["position"])
    except (KeyError, TypeError, ValueError):
      raise DataError(f"ppo prompt order state {state!r}: expected {{'position': int}}") from None
    if position < 0:
      raise DataError(f"ppo prompt order state {state!r}: position must be >= 0")
    self.position = position


class Alarms:
  """Watches each iteration for trouble and returns one-line warnings.

  kl: the KL to the reference (nats per response) passed `kl_alarm`. reward hacking: over the last
  `window` iterations against the `window` before them, the normalized reward rose and the gold
  score fell, both by more than `min_change` (the policy is pleasing the reward model, not solving
  the task; the margin keeps iteration-to-iteration noise quiet).
  """

  def __init__(self, kl_alarm: float, window: int, min_change: float = 0.0):
    self.kl_alarm, self.window, self.min_change = float(kl_alarm), int(window), float(min_change)
    self.history: list[tuple[float, float]] = []  # (reward, gold) per iteration, the last 2 windows

  def update(self, iteration: int, kl: float, reward: float, gold: float | None) -> list[str]:
    out = []
    if kl > self.kl_alarm:
      out.append(
        f"ALARM iteration {iteration}: KL to the reference {kl:.3f} nats passed ppo.kl_alarm={self.kl_alarm:g}"
      )
    if gold is None or not np.isfinite(gold):
      return out
    self.history = (self.history + [(float(reward), float(gold))])[-2 * self.window :]
    if len(self.history) == 2 * self.window:
      before, now = np.mean(self.history[: self.window], 0), np.mean(self.history[self.window :], 0)
      if now[0] - before[0] > self.min_change and before[1] - now[1] > self.min_change:
        out.append(
          f"ALARM iteration {iteration}: reward hacking? over the last {self.window} iterations the reward "
          f"rose {before[0]:.3f} -> {now[0]:.3f} while the gold score fell {before[1]:.3f} -> {now[1]:.3f}"
        )
    return out

  def get_state(self) -> dict:
    return {"history": [list(h) for h in self.history]}

  def set_state(self, state: dict) -> None:
    self.history = [(float(r), float(g)) for r, g in state.get("history", [])]
