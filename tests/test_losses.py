"""Loss functions on hand-computed values."""

import jax
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


# --- GRPO and DPO ---------------------------------------------------------------------------------


def test_group_advantages_hand_computed_groups():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
  adv = losses.group_advantages(r, eps=0.0 + 1e-12)
  # group 0: mean 0.5, std 0.5 -> +-1; group 1: all equal -> 0 (no signal, no NaN);
  # group 2: mean 0.25, std sqrt(3)/4 -> 0.75 / 0.433 = sqrt(3), -0.25 / 0.433 = -1/sqrt(3)
  np.testing.assert_allclose(adv[0], [1.0, -1.0, -1.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(adv[1], [0.0, 0.0, 0.0, 0.0], atol=1e-6)
  s3 = np.sqrt(3.0)
  np.testing.assert_allclose(adv[2], [s3, -1 / s3, -1 / s3, -1 / s3], rtol=1e-5)
  # Dr. GRPO: centred only.
  dr = losses.group_advantages(r, scale=False)
  np.testing.assert_allclose(dr[2], [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
  np.testing.assert_allclose(dr[1], 0.0, atol=1e-7)
  # The default eps keeps a near-constant group finite.
  assert np.isfinite(np.asarray(losses.group_advantages(jnp.array([[1.0, 1.0 + 1e-9]])))).all()


def test_k3_kl_hand_computed():
  logp = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
  ref = jnp.log(jnp.array([[0.25, 0.2, 0.3]]))
  kl = losses.k3_kl(logp, ref, jnp.array([[1.0, 1.0, 0.0]]))
  # token 0: r = ref/p = 0.5 -> 0.5 - log 0.5 - 1; token 1: equal -> 0; token 2: masked
  np.testing.assert_allclose(kl[0], [0.5 - np.log(0.5) - 1.0, 0.0, 0.0], rtol=1e-5, atol=1e-7)
  assert float(losses.k3_kl(ref, logp)[0, 2]) > 0  # >= 0 both ways


def test_grpo_policy_loss_clips_and_adds_kl():
  old = jnp.zeros((2, 3))
  # row 0 (adv +1): ratios 1.5 (clipped at 1.2), 1.1, and a masked token; row 1 (adv -1): ratio 0.5 (-> 0.8)
  new = jnp.log(jnp.array([[1.5, 1.1, 7.0], [0.5, 1.0, 1.0]]))
  ref = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  adv = jnp.array([1.0, -1.0])
  k3 = lambda ratio: 1.0 / ratio + np.log(ratio) - 1.0  # exp(ref - logp) - (ref - logp) - 1 with ref = 0
  pg = [-1.2, -1.1, 0.8]
  kls = [k3(1.5), k3(1.1), k3(0.5)]
  loss_sum, n, aux = losses.grpo_policy_loss(new, old, ref, adv, mask, clip=0.2, kl_coef=0.1)
  assert float(n) == 3
  assert float(loss_sum) == pytest.approx(sum(pg) + 0.1 * sum(kls), rel=1e-5)
  assert float(aux["pg_loss_sum"]) == pytest.approx(sum(pg), rel=1e-5)
  assert float(aux["kl_sum"]) == pytest.approx(sum(kls), rel=1e-5)
  assert float(aux["policy_clipfrac_sum"]) == 2.0
  # per sequence: row 0's two tokens are averaged, row 1's one token counts alone; weight = 2 rows
  seq_sum, rows, _ = losses.grpo_policy_loss(new, old, ref, adv, mask, clip=0.2, kl_coef=0.1, per="sequence")
  row0 = (pg[0] + pg[1] + 0.1 * (kls[0] + kls[1])) / 2
  row1 = pg[2] + 0.1 * kls[2]
  assert float(rows) == 2 and float(seq_sum) == pytest.approx(row0 + row1, rel=1e-5)
  with pytest.raises(ValueError, match="per must be"):
    losses.grpo_policy_loss(new, old, ref, adv, mask, per="batch")


def test_grpo_gradient_pushes_logp_along_the_advantage():
  # On-policy (logp == old, inside the clip range) the surrogate's gradient is -A per token, and the
  # k3 term's gradient is 1 - exp(ref - logp): it pulls logp back toward ref.
  logp = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5]]))
  ref = jnp.log(jnp.array([[0.25, 0.5], [0.5, 0.5]]))
  adv = jnp.array([2.0, -1.0])
  mask = jnp.ones((2, 2))
  f = lambda lp, c: losses.grpo_policy_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, kl_coef=c)[0]
  np.testing.assert_allclose(jax.grad(f)(logp, 0.0), [[-2.0, -2.0], [1.0, 1.0]], rtol=1e-6)
  g = jax.grad(f)(logp, 1.0) - jax.grad(f)(logp, 0.0)
  np.testing.assert_allclose(g, [[1.0 - 0.5, 0.0], [0.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_dpo_loss_hand_computed_and_gradient_sign():
  pc, pr = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
  rc, rr = jnp.array([-1.5, -2.0]), jnp.array([-1.5, -2.0])
  beta = 0.5
  # pair 0: h = (-1 + 1.5) - (-2 + 1.5) = 1.0; pair 1: h = (-3 + 2) - (-1 + 2) = -2.0
  h = np.array([1.0, -2.0])
  sig = lambda x: 1 / (1 + np.exp(-x))
  loss_sum, pairs, aux = losses.dpo_loss(pc, pr, rc, rr, beta=beta)
  assert float(pairs) == 2
  assert float(loss_sum) == pytest.approx(float(-np.log(sig(beta * h)).sum()), rel=1e-6)
  assert float(aux["accuracy_sum"]) == 1.0
  assert float(aux["margin_sum"]) == pytest.approx(beta * h.sum(), rel=1e-6)
  assert float(aux["chosen_reward_sum"]) == pytest.approx(beta * (0.5 + -1.0), rel=1e-6)
  assert float(aux["rejected_reward_sum"]) == pytest.approx(beta * (-0.5 + 1.0), rel=1e-6)
  # d loss / d pi_chosen = -beta sigmoid(-beta h) < 0: descending raises the chosen log-prob and
  # lowers the rejected one; the reference gets the opposite sign.
  grads = jax.grad(lambda *a: losses.dpo_loss(*a, beta=beta)[0], argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  expected = -beta * sig(-beta * h)
  np.testing.assert_allclose(grads[0], expected, rtol=1e-6)
  np.testing.assert_allclose(grads[1], -expected, rtol=1e-6)
  np.testing.assert_allclose(grads[2], -expected, rtol=1e-6)
  assert (np.asarray(grads[0]) < 0).all() and (np.asarray(grads[1]) > 0).all()
  # A masked pair adds nothing; label smoothing mixes in the flipped pair's loss.
  masked, n, _ = losses.dpo_loss(pc, pr, rc, rr, jnp.array([1.0, 0.0]), beta=beta)
  assert float(n) == 1 and float(masked) == pytest.approx(-np.log(sig(beta * 1.0)), rel=1e-6)
  ls, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.25)
  expected_ls = -(0.75 * np.log(sig(beta * h)) + 0.25 * np.log(sig(-beta * h))).sum()
  assert float(ls) == pytest.approx(float(expected_ls), rel=1e-6)


def test_ipo_loss_hand_computed():
  pc, pr = jnp.array([-1.0]), jnp.array([-2.0])
  rc, rr = jnp.array([-1.5]), jnp.array([-1.5])
  beta = 0.25  # IPO's margin 1 / (2 beta) = 2; h = 1.0
  loss_sum, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=beta, kind="ipo")
  assert float(loss_sum) == pytest.approx((1.0 - 2.0) ** 2, rel=1e-6)
  g = jax.grad(lambda x: losses.dpo_loss(x, pr, rc, rr, beta=beta, kind="ipo")[0])(pc)
  assert float(g[0]) == pytest.approx(2 * (1.0 - 2.0), rel=1e-6)  # below IPO's margin: push chosen up
  with pytest.raises(ValueError, match="kind must be"):
    losses.dpo_loss(pc, pr, rc, rr, kind="hinge")
