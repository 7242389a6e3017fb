"""The training loop every stage shares: mesh, sharded state, resume, metrics, eval, checkpoints,
preemption. A stage supplies its data, its loss and how its parameters start (`Stage`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import heads, optim, sharding
from gpt_jax import metrics as metrics_lib
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax.errors import ConfigError, TrainingError

log = logging.getLogger("gpt_jax")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job stopped by SIGTERM


class Preempted(SystemExit):
  """Raised after a SIGTERM: the current step finished and a checkpoint was written."""

  def __init__(self, step: int, workdir: str):
    super().__init__(PREEMPTED_EXIT_CODE)
    self.message = (
      f"preempted (SIGTERM) at step {step}: checkpoint saved in {workdir}; rerun the same command to resume"
    )


@dataclasses.dataclass
class Model:
  """A model placed on a mesh: its config, static graph and param shapes/shardings."""

  cfg: model_lib.ModelConfig
  mesh: Any
  graphdef: Any
  shapes: Any  # params as ShapeDtypeStructs
  axes: Any  # logical axes per param
  shardings: Any  # NamedSharding per param

  @classmethod
  def build(cls, model_cfg: model_lib.ModelConfig, mesh, *, head: bool = False) -> Model:
    """head=True adds a scalar head (reward / value model, see heads.py) beside the transformer."""
    graphdef, shapes, axes = model_lib.abstract(model_cfg)
    if head:
      shapes = {**shapes, heads.HEAD: heads.head_shapes(model_cfg.d_model)}
      axes = {**axes, heads.HEAD: heads.head_axes()}
    return cls(model_cfg, mesh, graphdef, shapes, axes, sharding.tree_shardings(mesh, axes, shapes))

  @property
  def has_head(self) -> bool:
    return heads.HEAD in self.shapes

  def init_params(self, seed: int):
    """Random params created directly sharded (never whole on one device)."""

    def init():
      params = model_lib.split(self.cfg, seed)[1]
      if self.has_head:
        params[heads.HEAD] = heads.init_head(self.cfg.d_model)
      return params

    return jax.jit(init, out_shardings=self.shardings)()

  def apply(self, params, *args, **kwargs) -> model_lib.Output:
    """The transformer's forward pass (a head, if any, is left to the caller: heads.score_at)."""
    trunk, _ = heads.split_head(params)
    return model_lib.apply(self.graphdef, trunk, *args, **kwargs)


@dataclasses.dataclass
class Stage:
  """What one training stage brings to the shared loop."""

  name: str
  loss_fn: step_lib.LossFn  # (params, batch, rng) -> (loss_sum, weight, aux sums)
  train_batches: Any  # iterator of batches with get_state() / set_state()
  eval_batches: Callable[[], Iterable[dict]] | None = None  # a fresh, repeatable pass over held-out batches
  eval_summary: Callable[[dict], dict] | None = None  # summed eval outputs -> reported metrics
  extra_eval: Callable[[Any, int], dict] | None = None  # (params, step) -> more metrics (e.g. accuracy)
  init_params: Callable[[], Any] | None = None  # sharded params to start from (default: random)
  tokens_per_step: int = 0
  flops_per_token: float = 0.0
  batch_keys: tuple[str, ...] = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
  extra_state: Callable[[], dict] | None = None  # more JSON to save in each checkpoint


def default_eval_summary(sums: dict, bytes_per_token: float | None = None) -> dict:
  loss = float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0)
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(sums["weight"])}
  if bytes_per_token:
    out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
  return out


def check_workdir(workdir: str) -> None:
  """ConfigError unless the workdir can be created and written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir: {workdir} is not writable ({e.strerror or e})") from None


def save_config(workdir: str, cfg) -> None:
  """Refuses a workdir made by a config whose model/data keys differ; writes config.json."""
  path = os.path.join(workdir, "config.json")
  current = config_lib.to_dict(cfg)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = config_lib.check_resume(saved, current, what=f"workdir {workdir}")
    if changed:
      log.warning("resuming %s with changed keys: %s", workdir, ", ".join(changed))
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class _Sigterm:
  """Turns SIGTERM into a flag the loop reads after each step."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def fit(cfg, workdir: str, model: Model, stage: Stage, *, log_fn=print) -> dict:
  """Trains `model` on `stage` to cfg.train.steps, resuming from the workdir's newest checkpoint.

  Returns the last train and eval metrics. Raises TrainingError on a non-finite step (unless
  train.nonfinite == "skip") and Preempted after a SIGTERM (checkpoint written first).
  """
  t = cfg.train
  mesh = model.mesh
  total_steps = int(t.steps)
  optimizer, lr = optim.make(cfg.optim, total_steps, model.axes)
  init_params = stage.init_params or (lambda: model.init_params(int(t.seed)))

  abstract_state = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, int(t.seed)), model.shapes)
  state_sh = step_lib.state_shardings(mesh, optimizer, model.shardings, abstract_state)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in stage.batch_keys}
  train_step = step_lib.make_train_step(
    stage.loss_fn,
    optimizer,
    lr,
    mesh=mesh,
    state_sharding=state_sh,
    batch_sharding=batch_sh,
    grad_accum=int(t.grad_accum),
  )
  eval_step = step_lib.make_eval_step(
    stage.loss_fn, mesh=mesh, params_sharding=model.shardings, batch_sharding=batch_sh
  )

  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=int(t.keep_checkpoints), async_save=bool(t.async_checkpoint)
  )
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=bool(cfg.metrics.tensorboard))
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      abstract_with_sh = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, state_sh
      )
      state, extra = ckpt.restore(latest, abstract_with_sh)
      stage.train_batches.set_state(extra["loader"])
      log_fn(f"[{stage.name}] resumed from step {latest} in {workdir}")
    else:
      params = init_params()
      state = jax.jit(
        lambda p: step_lib.init_state(p, optimizer, int(t.seed)), out_shardings=state_sh, donate_argnums=0
      )(params)
    start = int(jax.device_get(state["step"]))
    peak = metrics_lib.peak_flops_per_device(
      override=float(cfg.metrics.peak_flops) or None, dtype=model.cfg.dtype
    )
    progress = metrics_lib.Progress(
      total_steps, start, enabled=is_main and bool(t.progress_bar), desc=stage.name
    )
    last = {"train": {}, "eval": {}}

    def save(step_now: int, force: bool = False):
      extra = {
        "loader": stage.train_batches.get_state(),
        "config": config_lib.to_dict(cfg),
        "stage": stage.name,
      }
      if stage.extra_state:
        extra.update(stage.extra_state())
      ckpt.save(step_now, state, extra=extra, force=force)

    def run_eval(step_now: int):
      if stage.eval_batches is None or int(t.eval_batches) == 0:
        return {}
      sums = None
      batches = stage.eval_batches()
      try:
        for i, batch in enumerate(batches):
          if i >= int(t.eval_batches):
            break
          out = eval_step(state["params"], batch)
          sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      finally:
        if hasattr(batches, "close"):
          batches.close()
      if sums is None:
        return {}
      sums = jax.device_get(sums)
      result = (stage.eval_summary or default_eval_summary)(sums)
      if stage.extra_eval:
        result.update(stage.extra_eval(state["params"], step_now))
      writer.write(step_now, result, prefix="eval/")
      log_fn(f"[{stage.name}] step {step_now} eval " + " ".join(f"{k}={_fmt(v)}" for k, v in result.items()))
      return result

    skipped = [int(jax.device_get(state["skipped"]))]  # non-finite steps so far (train.nonfinite=skip)
    pending = None  # (step, device metrics) of the previous step, read after the next is dispatched
    window = {"t0": None, "steps": 0}

    def flush(pending_item):
      step_done, dev_metrics = pending_item
      m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
      if m.get("finite", 1.0) < 1.0:
        if t.nonfinite == "stop":
          bad = [k for k in ("loss", "grad_norm") if not np.isfinite(m.get(k, 0.0))]
          raise TrainingError(
            f"non-finite {'/'.join(bad) or 'loss'} at step {step_done} "
            f"(loss={m.get('loss')}, grad_norm={m.get('grad_norm')}); the update was not applied and no "
            "checkpoint of it was written (set train.nonfinite=skip to skip such steps)"
          )
        skipped[0] += 1
        log.warning(
          "step %d: non-finite loss or gradients, update skipped (%d so far)", step_done, skipped[0]
        )
        # The step's values are garbage: no log, average or progress display sees them, only the count.
        m = {"skipped_steps": float(skipped[0]), "lr": m.get("lr")}
      now = time.perf_counter()
      if window["t0"] is not None and window["steps"]:
        dt = (now - window["t0"]) / window["steps"]
        m["step_ms"] = dt * 1e3
        if stage.tokens_per_step:
          m["tokens_per_s"] = stage.tokens_per_step / dt
          if stage.flops_per_token:
            m["mfu"] = metrics_lib.mfu(m["tokens_per_s"], stage.flops_per_token, jax.device_count(), peak)
      m = {k: v for k, v in m.items() if v is not None}
      last["train"] = m
      progress.update(step_done, m)
      if step_done % int(t.log_every) == 0 or step_done == total_steps or "skipped_steps" in m:
        writer.write(step_done, {k: v for k, v in m.items() if k != "finite"}, prefix="train/")
      return now

    with _Sigterm() as sigterm:
      step_now = start
      while step_now < total_steps:
        batch = next(stage.train_batches)
        state, dev_metrics = train_step(state, batch)
        step_now += 1
        if pending is not None:
          now = flush(pending)
          # The first step compiles: start the throughput window after it.
          if window["t0"] is None:
            window["t0"], window["steps"] = now, 0
          else:
            window["steps"] += 1
        pending = (step_now, dev_metrics)
        boundary = (
          step_now % int(t.eval_every) == 0
          or step_now % int(t.checkpoint_every) == 0
          or step_now == total_steps
          or sigterm.flag
        )
        if boundary:
          # Read this step's metrics (a non-finite step raises here, before any checkpoint of it).
          flush(pending)
          pending = None
          window["t0"], window["steps"] = time.perf_counter(), 0
          if step_now % int(t.eval_every) == 0 or step_now == total_steps:
            last["eval"] = run_eval(step_now)
          if step_now % int(t.checkpoint_every) == 0 or step_now == total_steps or sigterm.flag:
            save(step_now, force=True)
          if sigterm.flag:
            ckpt.wait()
            raise Preempted(step_now, workdir)
      if pending is not None:
        flush(pending)
      if start == total_steps and ckpt.latest_step() is not None:
        log_fn(f"[{stage.name}] already at step {total_steps}: nothing to do")
    progress.close()
    ckpt.wait()
    last["params"] = state["params"]
    last["step"] = int(jax.device_get(state["step"]))
    last["skipped"] = int(jax.device_get(state["skipped"]))
    return last
  finally:
    ckpt.close()
    writer.close()


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, float) else str(v)
