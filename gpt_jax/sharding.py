"""Device mesh, the logical-axis rules table, and helpers to shard parameters and activations.

Parameters and activations name their axes logically ("embed", "mlp", "batch", ...). One rules
table maps those names onto the mesh axes (data, fsdp, tensor). Changing the parallelism of a run
means changing the mesh shape in the config (or this table), never the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights are sharded over fsdp on their model-width axis (ZeRO-3 style)
# and over tensor on heads / ffn width / vocab (Megatron style); batches over data and fsdp.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # weights
  ("layers", None),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("pos", None),
  ("norm", None),
  # activations
  ("batch", ("data", "fsdp")),
  ("act_seq", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh: at most one of {MESH_AXES} may be -1, got {sizes}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}: must be a positive size or -1, got {s}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ConfigError(
        f"mesh: {len(devices)} devices cannot be split into {sizes} (fixed axes multiply to {fixed})"
      )
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ConfigError(
      f"mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are {len(devices)} devices"
    )
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - fake CPU devices and odd shapes: plain reshape is fine there.
    dev_array = np.asarray(devices).reshape(shape)
  return Mesh(dev_array, MESH_AXES)


def logical_to_spec(
  axes: Sequence[str | None] | None, shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=RULES
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  With shape and mesh, a dimension that the mesh axes do not divide evenly is left unsharded
  (e.g. GPT-2's odd vocabulary of 50,257 over tensor=2), and a mesh axis is used at most once.
  """
  if axes is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ConfigError(f"sharding: logical axis {name!r} has no rule in the rules table")
    if target is None:
      out.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used)
    if mesh is not None:
      targets = tuple(t for t in targets if mesh.shape[t] > 1)
      if shape is not None and targets and shape[i] % math.prod(mesh.shape[t] for t in targets):
        targets = ()
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*out)


def named(mesh: Mesh, axes, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree, abstract_tree):
  """NamedShardings for a tree of arrays given a matching tree of logical-axis tuples."""
  return jax.tree.map(
    lambda ax, x: named(mesh, ax, x.shape),
    axes_tree,
    abstract_tree,
    is_leaf=lambda a: isinstance(a, tuple) or a is None,
  )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a (B, T, ...) batch array: rows over data and fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# --- activation constraints -------------------------------------------------------------------

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("gpt_jax_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
  """While tracing inside this context, `constrain` pins activations to `mesh` by the rules."""
  token = _ACTIVE_MESH.set(mesh)
  try:
    yield mesh
  finally:
    _ACTIVE_MESH.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; identity outside `activation_mesh` or on 1 device."""
  mesh = _ACTIVE_MESH.get()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, named(mesh, axes, x.shape))


def abstract(shapes, shardings):
  """`shapes` (a tree of ShapeDtypeStructs or arrays) as ShapeDtypeStructs carrying `shardings`: what
  jitted initializers and checkpoint restores place arrays by."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
