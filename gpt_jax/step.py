"""The jitted train and eval steps, shared by every stage: only the loss function differs.

A loss function is pure: `loss_fn(params, batch, rng) -> (loss_sum, weight, aux)` where aux is a
dict of sums (divided by the step's total weight when reported). The train state is a plain dict
pytree: {"params", "opt_state", "step", "rng", "skipped"}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gpt_jax import sharding

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
  return {
    "params": params,
    "opt_state": optimizer.init(params),
    "step": jnp.zeros((), jnp.int32),
    "rng": jax.random.key_data(jax.random.key(seed)),
    "skipped": jnp.zeros((), jnp.int32),
  }


def state_shardings(mesh, optimizer: optax.GradientTransformation, params_shardings, abstract_state) -> dict:
  """Shardings for the whole train state: optimizer moments follow their parameters, counters and
  the RNG are replicated."""
  rep = sharding.replicated(mesh)
  # A MaskedNode stands where a per-model optimizer (optim.make_per_model) keeps no state for the
  # other models' params; it stays as it is.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  opt = optax.tree_map_params(
    optimizer,
    lambda x, s: x if masked(x) else s,
    abstract_state["opt_state"],
    params_shardings,
    transform_non_params=lambda _: rep,
    is_leaf=masked,
  )
  return {"params": params_shardings, "opt_state": opt, "step": rep, "rng": rep, "skipped": rep}


def _microbatches(batch: dict, n: int) -> dict:
  """(B, ...) -> (n, B/n, ...), with microbatch a = rows a, a+n, a+2n, ... so that every device
  keeps working on its own rows of the data-sharded batch."""

  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  lr_schedule: optax.Schedule,
  *,
  mesh,
  state_sharding,
  batch_sharding,
  grad_accum: int = 1,
  donate: bool = True,
):
  """Returns jitted `step(state, batch) -> (state, metrics)`.

  Gradients are accumulated over `grad_accum` microbatches as sums and divided once by the total
  weight, so the update equals that of one big batch. A step whose loss or gradients are not finite
  changes nothing but the step counter and the `skipped` counter, and reports `finite = 0`; the
  loop decides whether to stop or go on (config `train.nonfinite`).
  """

  def grads_of(params, batch, rng):
    def f(p):
      loss_sum, weight, aux = loss_fn(p, batch, rng)
      return loss_sum, (weight, aux)

    (loss_sum, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss_sum, weight, aux, grads

  def step(state, batch):
    with sharding.activation_mesh(mesh):
      params = state["params"]
      rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
      if grad_accum == 1:
        loss_sum, weight, aux, grads = grads_of(params, batch, rng)
      else:
        micro = _microbatches(batch, grad_accum)

        def body(carry, xs):
          mb, i = xs
          out = grads_of(params, mb, jax.random.fold_in(rng, i))
          return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype),
          jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], micro), rng),
        )
        (loss_sum, weight, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
      denom = jnp.maximum(weight, 1.0)
      grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
      loss = loss_sum / denom
      grad_norm = optax.global_norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt = optimizer.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {
        "params": keep(new_params, params),
        "opt_state": keep(new_opt, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "skipped": state["skipped"] + (1 - finite.astype(jnp.int32)),
      }
      metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr_schedule(state["step"]),
        "weight": weight,
        "finite": finite.astype(jnp.float32),
        **{k.removesuffix("_sum"): v / denom for k, v in aux.items()},
      }
      return new_state, metrics

  return jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,) if donate else (),
  )


def make_eval_step(loss_fn: LossFn, *, mesh, params_sharding, batch_sharding):
  """Returns jitted `eval(params, batch) -> {"loss_sum", "weight", **aux sums}`."""

  def evaluate(params, batch):
    with sharding.activation_mesh(mesh):
      loss_sum, weight, aux = loss_fn(params, batch, jax.random.key(0))
      return {"loss_sum": loss_sum, "weight": weight, **aux}

  return jax.jit(
    evaluate,
    in_shardings=(params_sharding, batch_sharding),
    out_shardings=sharding.replicated(mesh),
  )
