"""Scalar heads over the transformer's final hidden states (reward model, value model).

A model with a head keeps its parameters as {"trunk": the transformer's params, "head": {"w": (D,),
"b": ()}}; `placed.Model.build(..., head=True)` lays this out and shards it.

Legend: B batch, T time, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TRUNK, HEAD = "trunk", "head"


def head_shapes(d_model: int, dtype=jnp.float32) -> dict:
  return {"w": jax.ShapeDtypeStruct((d_model,), dtype), "b": jax.ShapeDtypeStruct((), dtype)}


def head_axes() -> dict:
  return {"w": ("norm",), "b": ()}


def init_head(d_model: int, dtype=jnp.float32) -> dict:
  """Zero-initialised head: every sequence starts with score 0."""
  return {"w": jnp.zeros((d_model,), dtype), "b": jnp.zeros((), dtype)}


def scores_BT(hidden_BTD: jax.Array, head: dict) -> jax.Array:
  """The head's scalar at every position, float32 (B, T)."""
  h = hidden_BTD.astype(jnp.float32)
  return h @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)


def score_at(hidden_BTD: jax.Array, head: dict, index_B: jax.Array) -> jax.Array:
  """The head's scalar at one position per row (e.g. each sequence's end-of-text token), (B,)."""
  h_BD = jnp.take_along_axis(hidden_BTD, index_B[:, None, None].astype(jnp.int32), axis=1)[:, 0]
  return h_BD.astype(jnp.float32) @ head["w"].astype(jnp.float32) + head["b"].astype(jnp.float32)
