"""The shared train step: same losses on every mesh, accumulation == one batch, non-finite guard."""

import math

import jax
import ml_collections
import numpy as np
import pytest

from gpt_jax import losses, optim, sharding
from gpt_jax import model as M
from gpt_jax import step as S
from gpt_jax.data.batch import KEYS, from_windows
from gpt_jax.errors import ConfigError

CFG = M.preset(
  "tiny", vocab_size=128, max_seq_len=32, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64
)
OPTIM = ml_collections.ConfigDict(
  dict(
    lr_peak=1e-2,
    lr_end_ratio=0.1,
    warmup_steps=1,
    decay_steps=0,
    schedule="cosine",
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    grad_clip_norm=1.0,
  )
)


def _batches(n, B=16, T=16, seed=0):
  rng = np.random.default_rng(seed)
  # A learnable stream: each row counts upward modulo the vocabulary from a random start.
  out = []
  for _ in range(n):
    start = rng.integers(0, CFG.vocab_size, (B, 1))
    w = (start + np.arange(T + 1)) % CFG.vocab_size
    out.append(from_windows(w, eot_id=0))
  return out


def _train(mesh_shape, batches, accum=1, loss_scale=1.0):
  devices = jax.devices()[: math.prod(mesh_shape)]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
  graphdef, shapes, axes = M.abstract(CFG)
  params_sh = sharding.tree_shardings(mesh, axes, shapes)
  opt, lr = optim.make(OPTIM, 10, axes)
  abstract_state = jax.eval_shape(lambda p: S.init_state(p, opt, 0), shapes)
  state_sh = S.state_shardings(mesh, opt, params_sh, abstract_state)
  state = jax.jit(lambda: S.init_state(M.split(CFG, 0)[1], opt, 0), out_shardings=state_sh)()

  def loss_fn(p, b, rng):
    out = M.apply(graphdef, p, b["inputs"], b["positions"], b["segment_ids"])
    loss_sum, w, aux = losses.next_token_xent(out.logits, b["targets"], b["loss_mask"])
    return loss_sum * loss_scale, w, aux

  batch_sh = {k: sharding.batch_sharding(mesh) for k in KEYS}
  step = S.make_train_step(
    loss_fn, opt, lr, mesh=mesh, state_sharding=state_sh, batch_sharding=batch_sh, grad_accum=accum
  )
  history = []
  for b in batches:
    state, m = step(state, b)
    history.append(jax.device_get(m))
  return state, history


def test_losses_equal_on_every_mesh():
  batches = _batches(3)
  ref_state, ref = _train((1, 1, 1), batches)
  ref_losses = [h["loss"] for h in ref]
  assert ref_losses[-1] < ref_losses[0]
  for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
    state, hist = _train(shape, batches)
    np.testing.assert_allclose([h["loss"] for h in hist], ref_losses, rtol=2e-5, err_msg=str(shape))
    np.testing.assert_allclose(
      np.asarray(state["params"]["embed"]), np.asarray(ref_state["params"]["embed"]), atol=2e-5
    )


def test_params_are_sharded_as_the_rules_say():
  state, _ = _train((1, 4, 2), _batches(1))
  wq = state["params"]["blocks"]["attn"]["wq"]  # (L, D, H, Q): D over fsdp, H over tensor
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.shape == (2, 32 // 4, 4 // 2, 8)


def test_grad_accumulation_equals_one_big_batch():
  batches = _batches(2)
  _, one = _train((2, 2, 2), batches, accum=1)
  _, four = _train((2, 2, 2), batches, accum=4)
  np.testing.assert_allclose([h["loss"] for h in one], [h["loss"] for h in four], rtol=1e-5)
  np.testing.assert_allclose([h["grad_norm"] for h in one], [h["grad_norm"] for h in four], rtol=1e-4)


def test_non_finite_step_changes_nothing():
  batches = _batches(1)
  state0 = jax.device_get(_train((1, 1, 1), [])[0])
  state, hist = _train((1, 1, 1), batches, loss_scale=float("nan"))
  assert hist[0]["finite"] == 0.0
  assert int(state["skipped"]) == 1 and int(state["step"]) == 1
  for a, b in zip(jax.tree.leaves(state0["params"]), jax.tree.leaves(jax.device_get(state["params"]))):
    np.testing.assert_array_equal(a, b)


def test_mesh_must_cover_the_devices():
  with pytest.raises(ConfigError, match="mesh"):
    sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1}, jax.devices())
  with pytest.raises(ConfigError, match="mesh"):
    sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1}, jax.devices())
  assert sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape["data"] == 2


def test_uneven_dimensions_stay_replicated():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
  spec = sharding.logical_to_spec(("vocab", "embed"), (50257, 768), mesh)
  assert spec == jax.sharding.PartitionSpec(None, None)


def test_per_model_optimizer_keeps_each_model_to_its_own_rate_and_clip():
  """optim.make_per_model (PPO's policy + critic): each entry updates exactly as its own optimizer
  alone would, so the critic's large gradients do not shrink the policy's clipped step."""
  graphdef, shapes, axes = M.abstract(CFG)
  params = M.split(CFG, 0)[1]
  grads = jax.tree.map(lambda x: jax.numpy.full_like(x, 0.01), params)
  cfg_a = ml_collections.ConfigDict(OPTIM.to_dict())
  cfg_a.update(schedule="constant", warmup_steps=0)  # a full step at step 0
  cfg_b = ml_collections.ConfigDict(cfg_a.to_dict())
  cfg_b.lr_peak = 1e-3
  opt, _ = optim.make_per_model({"a": cfg_a, "b": cfg_b}, 10, {"a": axes, "b": axes})
  both = {"a": params, "b": params}
  big = {"a": grads, "b": jax.tree.map(lambda g: 1000.0 * g, grads)}
  updates, _ = opt.update(big, opt.init(both), both)
  for key, ocfg, g in (("a", cfg_a, grads), ("b", cfg_b, big["b"])):
    alone, _ = optim.make(ocfg, 10, axes)
    want, _ = alone.update(g, alone.init(params), params)
    assert max(float(np.abs(w).max()) for w in jax.tree.leaves(want)) > 0.1 * ocfg.lr_peak
    for u, w in zip(jax.tree.leaves(updates[key]), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
  # and the state is placed on a mesh like a single model's (moments follow their parameters)
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, (1, 8, 1))), jax.devices()[:8])
  params_sh = sharding.tree_shardings(mesh, axes, shapes)
  abstract = jax.eval_shape(lambda p: S.init_state(p, opt, 0), {"a": shapes, "b": shapes})
  state_sh = S.state_shardings(mesh, opt, {"a": params_sh, "b": params_sh}, abstract)
  state = jax.jit(lambda: S.init_state(both, opt, 0), out_shardings=state_sh)()
  mu = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) == 2]
  assert mu and any(not x.sharding.is_fully_replicated for x in mu)
