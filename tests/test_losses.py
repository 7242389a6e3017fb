"""Loss functions on hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import losses


def test_next_token_xent_is_a_masked_sum():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  loss_sum, weight, _ = losses.next_token_xent(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))
  assert float(weight) == 1.0
  assert float(loss_sum) == pytest.approx(-np.log(0.5), rel=1e-6)


def test_bradley_terry():
  rc, rr = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
  loss_sum, pairs, aux = losses.bradley_terry(rc, rr)
  expected = -np.log(1 / (1 + np.exp(-1.0))) - np.log(1 / (1 + np.exp(1.0)))
  assert float(loss_sum) == pytest.approx(expected, rel=1e-6)
  assert float(pairs) == 2 and float(aux["accuracy_sum"]) == 1.0 and float(aux["margin_sum"]) == 0.0
  with_margin, _, _ = losses.bradley_terry(rc, rr, margin_B=jnp.array([1.0, 0.0]))
  assert float(with_margin) == pytest.approx(np.log(2) - np.log(1 / (1 + np.exp(1.0))), rel=1e-6)


def test_gae_matches_a_hand_computed_case():
  r = jnp.array([[0.0, 0.0, 1.0, 9.0]])
  v = jnp.array([[0.5, 0.4, 0.3, 9.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # the last position is past the end of the response
  gamma, lam = 0.9, 0.8
  d2 = 1.0 - 0.3
  d1 = 0.0 + gamma * 0.3 - 0.4
  d0 = 0.0 + gamma * 0.4 - 0.5
  a2 = d2
  a1 = d1 + gamma * lam * a2
  a0 = d0 + gamma * lam * a1
  adv, ret = losses.gae(r, v, m, gamma, lam)
  np.testing.assert_allclose(adv[0], [a0, a1, a2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(ret[0], [a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0], rtol=1e-6)


def test_ppo_policy_loss_clips():
  adv = jnp.array([[1.0, 1.0, -1.0]])
  old = jnp.zeros((1, 3))
  new = jnp.log(jnp.array([[1.5, 1.1, 0.5]]))  # ratios 1.5 (clipped at 1.2), 1.1, 0.5 (clipped at 0.8)
  loss_sum, n, aux = losses.ppo_policy_loss(new, old, adv, jnp.ones((1, 3)), clip=0.2)
  # token 0: max(-1.5, -1.2) = -1.2; token 1: -1.1; token 2 (adv -1): max(0.5, 0.8) = 0.8
  assert float(loss_sum) == pytest.approx(-1.2 - 1.1 + 0.8, rel=1e-6)
  assert float(n) == 3 and float(aux["policy_clipfrac_sum"]) == 2.0


def test_ppo_value_loss_clips():
  v_new, v_old, ret = jnp.array([[2.0, 0.1]]), jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 1.0]])
  loss_sum, n, aux = losses.ppo_value_loss(v_new, v_old, ret, jnp.ones((1, 2)), clip=0.5)
  # token 0: max((2-1)^2, (0.5-1)^2) = 1; token 1: max((0.1-1)^2, (0.1-1)^2) = 0.81
  assert float(loss_sum) == pytest.approx(0.5 * (1.0 + 0.81), rel=1e-6)
  assert float(aux["value_clipfrac_sum"]) == 0.0


def test_whiten_and_entropy():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  m = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  w = losses.whiten(x, m)
  assert float(losses.masked_mean(w, m)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.masked_mean(w * w, m)) == pytest.approx(1.0, rel=1e-4)
  ent = losses.entropy_from_logits(jnp.zeros((1, 1, 4)))
  assert float(ent[0, 0]) == pytest.approx(np.log(4), rel=1e-6)


def test_adaptive_kl_controller():
  assert losses.adaptive_kl_coef(0.1, 12.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
  assert losses.adaptive_kl_coef(0.1, 3.0, 6.0, 256, 10000) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
  assert losses.adaptive_kl_coef(0.1, 6.6, 6.0, 100, 100) == pytest.approx(0.1 * 1.1)
