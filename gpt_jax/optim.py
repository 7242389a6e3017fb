"""The optax chain from config: global-norm clipping, AdamW with a weight-decay mask, and a
linear-warmup + cosine-decay learning-rate schedule; `make_per_model` gives each of several models
(PPO's policy and critic) its own chain."""

from __future__ import annotations

import jax
import optax

from gpt_jax.errors import ConfigError


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr_peak over warmup_steps, then cosine decay to lr_peak * lr_end_ratio
  at decay_steps (0 means total_steps), constant after."""
  decay_steps = int(optim_cfg.decay_steps) or int(total_steps)
  warmup = int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, optim_cfg.lr_peak, max(warmup, 1)),
        optax.constant_schedule(optim_cfg.lr_peak),
      ],
      [warmup],
    )
  if warmup >= decay_steps:
    raise ConfigError(f"optim.warmup_steps: {warmup} must be smaller than the decay steps ({decay_steps})")
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(optim_cfg.lr_peak),
    warmup_steps=warmup,
    decay_steps=decay_steps,
    end_value=float(optim_cfg.lr_peak) * float(optim_cfg.lr_end_ratio),
  )


def decay_mask(axes):
  """True for matrices that get weight decay: not norms, biases, or embeddings (input or positional)."""

  def want(path, ax):
    names = [getattr(p, "key", str(p)) for p in path]
    if {"embed", "pos_embed"} & set(names):  # also inside {"policy": ..., "value": ...} trees
      return False
    ax = tuple(a for a in (ax or ()) if a != "layers")
    return len(ax) >= 2

  return jax.tree_util.tree_map_with_path(want, axes, is_leaf=_is_axes)


def _is_axes(a) -> bool:
  """A leaf of a params-axes tree: one parameter's tuple of logical axis names (or None)."""
  return isinstance(a, tuple) or a is None


def make(optim_cfg, total_steps: int, params_axes) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule)."""
  lr = schedule(optim_cfg, total_steps)
  chain = []
  if optim_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
  chain.append(
    optax.adamw(
      learning_rate=lr,
      b1=float(optim_cfg.b1),
      b2=float(optim_cfg.b2),
      eps=float(optim_cfg.eps),
      weight_decay=float(optim_cfg.weight_decay),
      mask=decay_mask(params_axes),
    )
  )
  return optax.chain(*chain), lr


def make_per_model(optim_cfgs: dict, total_steps: int, params_axes: dict):
  """One optimizer per top-level entry of the params dict (e.g. PPO's "policy" and "value"): each
  entry gets its own `make` chain, so its own learning rate and its own global-norm clip (one
  model's large gradients do not shrink the other's steps). Returns (optimizer, the schedule of the
  first entry, for logging)."""
  # Each chain sees the whole params tree (multi_transform masks out the other entries), so its
  # weight-decay mask is built over the whole tree too.
  built = {k: make(optim_cfgs[k], total_steps, params_axes) for k in params_axes}
  optimizer = optax.multi_transform(
    {k: opt for k, (opt, _) in built.items()},
    {k: jax.tree.map(lambda _, k=k: k, ax, is_leaf=_is_axes) for k, ax in params_axes.items()},
  )
  return optimizer, built[next(iter(params_axes))][1]
