"""A model placed on a mesh: its config, static graph, and the shapes, logical axes and shardings of
its parameters, with a sharded initializer and the forward pass.

A plain model's params are the transformer's; a model with a scalar head (reward model, critic) keeps
{"trunk": transformer params, "head": head params} (see heads.py). Every stage, the sampler's callers
and the evaluation build their models here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from gpt_jax import heads, sharding
from gpt_jax import model as model_lib


@dataclasses.dataclass
class Model:
  """A transformer (optionally with a scalar head) on `mesh`."""

  cfg: model_lib.ModelConfig
  mesh: Any
  graphdef: Any
  shapes: Any  # params as ShapeDtypeStructs
  axes: Any  # logical axes per param
  shardings: Any  # NamedSharding per param
  has_head: bool = False

  @classmethod
  def build(cls, model_cfg: model_lib.ModelConfig, mesh, *, head: bool = False) -> Model:
    """head=True: params {"trunk", "head"} with a scalar head (reward / value model)."""
    graphdef, shapes, axes = model_lib.abstract(model_cfg)
    if head:
      shapes = {heads.TRUNK: shapes, heads.HEAD: heads.head_shapes(model_cfg.d_model)}
      axes = {heads.TRUNK: axes, heads.HEAD: heads.head_axes()}
    return cls(model_cfg, mesh, graphdef, shapes, axes, sharding.tree_shardings(mesh, axes, shapes), head)

  def abstract(self):
    """The params as ShapeDtypeStructs carrying their shardings (what restores and jitted inits place by)."""
    return sharding.abstract(self.shapes, self.shardings)

  def trunk_abstract(self):
    """The transformer's params alone, as ShapeDtypeStructs with shardings."""
    return self.abstract()[heads.TRUNK] if self.has_head else self.abstract()

  @property
  def trunk_shardings(self):
    return self.shardings[heads.TRUNK] if self.has_head else self.shardings

  def init_params(self, seed: int):
    """Random params (a zero head) created directly sharded, never whole on one device."""

    def init():
      params = model_lib.split(self.cfg, seed)[1]
      return {heads.TRUNK: params, heads.HEAD: heads.init_head(self.cfg.d_model)} if self.has_head else params

    return jax.jit(init, out_shardings=self.shardings)()

  def with_zero_head(self, trunk_params):
    """{"trunk": trunk_params, "head": a zero head placed on the mesh} (a head model's fresh start)."""
    head = jax.jit(lambda: heads.init_head(self.cfg.d_model), out_shardings=self.shardings[heads.HEAD])()
    return {heads.TRUNK: trunk_params, heads.HEAD: head}

  def trunk(self, params):
    return params[heads.TRUNK] if self.has_head else params

  def apply(self, params, *args, **kwargs) -> model_lib.Output:
    """The transformer's forward pass on the trunk params (a head is read by the caller)."""
    return model_lib.apply(self.graphdef, self.trunk(params), *args, **kwargs)

  def scores(self, params, batch: dict) -> jax.Array:
    """A head model's score of every row, float32 (B,): the head at batch["end_index"] ((B,) or (B, 1)).

    batch holds inputs, positions, segment_ids (B, T), each row ending with eos at end_index. Pure."""
    out = self.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], compute_logits=False)
    return heads.score_at(out.hidden, params[heads.HEAD], batch["end_index"].reshape(-1))
