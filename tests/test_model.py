"""Model properties: exact parameter counts, causality, packed == separate, loop/remat invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model as M
from gpt_jax.errors import ConfigError

SMALL = dict(vocab_size=97, max_seq_len=32, num_layers=2, num_heads=4, d_model=32)


def _apply(g, p, *args, **kw):
  return jax.jit(lambda p, *a: M.apply(g, p, *a, **kw))(p, *args)


FAMILIES = {
  "llama": M.preset("tiny", **SMALL, num_kv_heads=2, d_ff=64),
  "gpt2": M.preset("tiny_gpt2", **SMALL),
}


def test_published_parameter_counts():
  assert M.param_count(M.preset("gpt2_124m")) == 124_439_808
  assert M.param_count(M.preset("llama_7b")) == 6_738_415_616
  assert abs(M.param_count(M.preset("gpt3_175b")) / 175.0e9 - 1) < 0.005
  assert abs(M.param_count(M.preset("llama_65b")) / 65.2e9 - 1) < 0.005


def test_flops_per_token_matches_palm_formula():
  cfg = M.preset("gpt2_124m")
  n = 124_439_808 - 1024 * 768  # positions are a lookup; the tied embedding is the output product
  assert M.flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_param_shapes_and_axes_agree():
  for cfg in FAMILIES.values():
    _, shapes, axes = M.abstract(cfg)
    for x, ax in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple))):
      assert len(x.shape) == len(ax)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_causal(family):
  cfg = FAMILIES[family]
  g, p = M.split(cfg, 0)
  rng = np.random.default_rng(0)
  x = rng.integers(0, cfg.vocab_size, (2, 16))
  y = x.copy()
  y[:, 9:] = rng.integers(0, cfg.vocab_size, (2, 7))
  a = _apply(g, p, jnp.asarray(x)).logits
  b = _apply(g, p, jnp.asarray(y)).logits
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
  assert not np.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_equals_separate(family):
  cfg = FAMILIES[family]
  g, p = M.split(cfg, 1)
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 9)
  packed = np.concatenate([doc_a, doc_b])[None]
  positions = np.concatenate([np.arange(7), np.arange(9)])[None]
  segments = np.concatenate([np.full(7, 1), np.full(9, 2)])[None]
  out = _apply(g, p, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)).logits[0]
  alone_a = _apply(g, p, jnp.asarray(doc_a[None])).logits[0]
  alone_b = _apply(g, p, jnp.asarray(doc_b[None])).logits[0]
  np.testing.assert_allclose(out[:7], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[7:], alone_b, atol=1e-5)


def _loss_and_grads(cfg, p, x):
  g, _ = M.split(cfg, 0)

  def f(params):
    return jnp.mean(M.apply(g, params, x).logits ** 2)

  return jax.jit(jax.value_and_grad(f))(p)


@pytest.mark.parametrize(
  "change", [dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")]
)
def test_loop_and_remat_do_not_change_results(change):
  cfg = FAMILIES["llama"]
  _, p = M.split(cfg, 2)
  x = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)))
  l0, g0 = _loss_and_grads(cfg, p, x)
  l1, g1 = _loss_and_grads(dataclasses.replace(cfg, **change), p, x)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
  "B,T,H,K,block", [(2, 40, 4, 4, 16), (2, 32, 6, 3, 8), (1, 17, 4, 1, 128)], ids=["mha", "gqa", "one-block"]
)
def test_blocked_attention_equals_one_piece_attention(B, T, H, K, block):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, 8)), jnp.float32) for n in (H, K, K))
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1))
  mask = jnp.tril(jnp.ones((T, T), bool)) & (seg[:, :, None] == seg[:, None, :])

  @jax.jit
  def both(q, k, v, m):
    def ref(q, k, v):
      return jax.nn.dot_product_attention(
        q, k, v, is_causal=m is None, mask=None if m is None else m[:, None]
      )

    got = lambda q, k, v: M.blocked_attention(q, k, v, m, block)
    out = lambda f: (f(q, k, v), jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v))
    return out(got), out(ref)

  for m in (None, mask):
    (o_got, g_got), (o_ref, g_ref) = both(q, k, v, m)
    np.testing.assert_allclose(o_got, o_ref, atol=2e-6)
    for a, b in zip(g_got, g_ref):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_auto_attention_on_cpu_is_blocked_and_matches_xla(monkeypatch):
  monkeypatch.setattr(M, "ATTENTION_BLOCK", 8)  # 3 blocks of the 24 tokens
  cfg = FAMILIES["llama"]  # grouped-query heads and rotary positions
  g, p = M.split(cfg, 1)
  g_xla, _ = M.split(dataclasses.replace(cfg, attention_impl="xla"), 1)
  x = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24)))
  seg = jnp.asarray(np.repeat([[1, 2, 3]], 8, axis=1).repeat(2, axis=0))
  calls, blocked = [], M.blocked_attention
  monkeypatch.setattr(M, "blocked_attention", lambda *a: calls.append(1) or blocked(*a))
  for segments in (None, seg):
    auto = _apply(g, p, x, None, segments).logits
    np.testing.assert_allclose(auto, _apply(g_xla, p, x, None, segments).logits, atol=1e-5)
  assert calls, "attention_impl=auto did not take blocked_attention on CPU"


def test_bfloat16_compute_close_to_float32():
  cfg = FAMILIES["gpt2"]
  g, p = M.split(cfg, 3)
  x = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 16)))
  full = _apply(g, p, x).logits
  g16, _ = M.split(dataclasses.replace(cfg, dtype="bfloat16"), 3)
  half = _apply(g16, p, x).logits
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.05)


def test_hidden_states_are_returned():
  cfg = FAMILIES["llama"]
  g, p = M.split(cfg, 0)
  out = _apply(g, p, jnp.zeros((2, 5), jnp.int32))
  assert out.hidden.shape == (2, 5, cfg.d_model)
  assert _apply(g, p, jnp.zeros((2, 5), jnp.int32), compute_logits=False).logits is None


@pytest.mark.parametrize(
  "bad, key",
  [
    (dict(num_heads=5), "model.num_heads"),
    (dict(num_kv_heads=3), "model.num_kv_heads"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(vocab_size=0), "model.vocab_size"),
  ],
)
def test_bad_model_config_names_the_key(bad, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    M.preset("tiny", **bad)
  with pytest.raises(ConfigError, match="model.bogus"):
    M.ModelConfig.from_config({**dataclasses.asdict(M.preset("tiny")), "bogus": 1})
