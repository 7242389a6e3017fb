"""The one training loop every stage drives: fresh or resumed state, checkpoints, the metrics writer,
progress, evaluation cadence, SIGTERM/SIGINT, and the non-finite policy.

A stage hands the loop a `Job`: how to make a fresh state (or the shapes to restore one), one step
`step(state, k) -> (state, metrics)`, and the small JSON state it keeps beside the arrays (a loader
position, PPO's KL coefficient, ...). `supervised(...)` builds the Job of every stage that minimizes a
loss over batches (pretraining, SFT, reward modeling, DPO); the RL stages write their own step.

A step's metrics may be device arrays: the loop reads step k's metrics after it dispatched step k+1,
so the host never waits for the device between steps (it does at evaluations and checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import config as config_lib
from gpt_jax import metrics as metrics_lib
from gpt_jax import optim, runs, sharding
from gpt_jax import step as step_lib
from gpt_jax.data.batch import KEYS as BATCH_KEYS
from gpt_jax.errors import Interrupted, TrainingError

log = logging.getLogger("gpt_jax")

EXIT_CODES = Interrupted.EXIT_CODES


class Preempted(SystemExit):
  """Raised after SIGTERM or SIGINT: the current step finished and a checkpoint was written."""

  def __init__(self, step: int, workdir: str, signame: str = "SIGTERM"):
    super().__init__(EXIT_CODES[signame])
    self.message = (
      f"preempted ({signame}) at step {step}: checkpoint saved in {workdir}; rerun the same command to resume"
    )


@dataclasses.dataclass
class Job:
  """What a stage brings to the loop."""

  name: str  # the stage: log prefix, and recorded in every checkpoint
  steps: int  # the step count to reach
  abstract_state: Any  # the train state as ShapeDtypeStructs with shardings (what a restore places)
  init_state: Callable[[], Any]  # a fresh, placed train state (only called when there is no checkpoint)
  step: Callable[[Any, int], tuple[Any, dict]]  # (state, k) -> (state after step k, step k's metrics)
  get_extra: Callable[[], dict] = dict  # JSON kept with each checkpoint (loader position, ...)
  set_extra: Callable[[dict], None] = lambda extra: None  # restores it from a checkpoint's extra
  evaluate: Callable[[Any, int], dict] | None = None  # (state, k) -> held-out metrics
  eval_every: int = 0  # 0: only after the last step
  eval_at_start: bool = False  # also evaluate a fresh run's starting state (step 0)
  steps_key: str = "train.steps"  # the config key that sets `steps` (named in errors)
  unit: str = "step"  # what one step is called in messages ("iteration" for RL)
  tokens_per_step: int = 0
  flops_per_token: float = 0.0
  metrics_prefix: str = "train/"
  progress_keys: tuple[str, ...] = ("loss", "tokens_per_s", "mfu")
  log_keys: tuple[str, ...] = ()  # also printed as one line every train.log_every steps
  record: dict = dataclasses.field(default_factory=dict)  # static JSON recorded in every checkpoint
  host_metrics: bool = False  # the step returns host floats (it synced anyway): read them at once


@dataclasses.dataclass
class Result:
  state: Any
  step: int
  train: dict  # the last step's metrics
  eval: dict  # the last evaluation
  evals: dict  # {step: evaluation} of this invocation
  resumed_from: int | None

  @property
  def params(self):
    return self.state["params"]


class _Signals:
  """Turns the first SIGTERM or SIGINT into a flag read after each step (a second one interrupts at
  once, as the default handlers would)."""

  def __init__(self):
    self.name: str | None = None
    self._old: dict = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.name is not None:
      raise Interrupted(signal.Signals(signum).name)
    self.name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _fmt(metrics: dict, keys=None) -> str:
  keys = keys if keys is not None else list(metrics)
  return " ".join(
    f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
    for k in keys
    if k in metrics
  )


class _Reader:
  """Reads each step's metrics (one step late), applies the non-finite policy, adds throughput."""

  def __init__(self, cfg, job: Job, writer, progress, skipped: int, log_fn):
    self.t, self.job, self.writer, self.progress, self.log_fn = cfg.train, job, writer, progress, log_fn
    self.skipped = skipped
    self.peak = metrics_lib.peak_flops_per_device(
      override=float(cfg.metrics.peak_flops) or None, dtype=cfg.model.dtype if "model" in cfg else "float32"
    )
    self.t0: float | None = None  # start of the throughput window (after the first, compiling step)
    self.window = 0
    self.last: dict = {}

  def restart_window(self) -> None:
    self.t0, self.window = time.perf_counter(), 0

  def read(self, k: int, dev_metrics) -> dict:
    m = {key: float(v) for key, v in jax.device_get(dev_metrics).items()}
    bad = m.pop("skipped", 1.0 - m.get("finite", 1.0))
    if bad > 0:
      self._nonfinite(k, m, int(round(bad)))
      m = {"skipped_steps": float(self.skipped), "lr": m.get("lr")}  # the step's other values are garbage
    now = time.perf_counter()
    if self.t0 is not None and self.window:
      dt = (now - self.t0) / self.window
      m[f"{self.job.unit}_ms"] = dt * 1e3
      if self.job.tokens_per_step:
        m["tokens_per_s"] = self.job.tokens_per_step / dt
        if self.job.flops_per_token:
          m["mfu"] = metrics_lib.mfu(
            m["tokens_per_s"], self.job.flops_per_token, jax.device_count(), self.peak
          )
    if self.t0 is None:
      self.restart_window()
    else:
      self.window += 1
    m = {key: v for key, v in m.items() if v is not None and key != "finite"}
    self.last = m
    self.progress.update(k, m)
    if k % int(self.t.log_every) == 0 or k == self.job.steps or "skipped_steps" in m:
      self.writer.write(k, m, prefix=self.job.metrics_prefix)
      if self.job.log_keys:
        self.log_fn(f"[{self.job.name}] {self.job.unit} {k}/{self.job.steps} {_fmt(m, self.job.log_keys)}")
    return m

  def _nonfinite(self, k: int, m: dict, bad: int) -> None:
    if self.t.nonfinite == "stop":
      shown = ", ".join(f"{key}={m[key]}" for key in ("loss", "grad_norm") if key in m)
      raise TrainingError(
        f"non-finite loss or gradients at {self.job.unit} {k}"
        + (f" ({shown})" if shown else "")
        + "; the update was not applied and no checkpoint of it was written (set train.nonfinite=skip to skip such steps)"
      )
    self.skipped += bad
    log.warning(
      "%s %d: non-finite loss or gradients, update skipped (%d so far)", self.job.unit, k, self.skipped
    )


def _resume_point(job: Job, ckpt, workdir: str) -> int | None:
  """The step to resume from (None: a fresh run), checked against what its checkpoint recorded before
  anything is restored or written: the stage, a step within job.steps, and every fact of job.record."""
  latest = runs.latest_checkpoint(ckpt)
  if latest is None:
    return None
  extra = ckpt.read_extra(latest)
  runs.check_checkpoint(workdir, latest, extra, stage=job.name, steps=job.steps, steps_key=job.steps_key)
  runs.check_record(extra, job.record, f"checkpoint step {latest} in {workdir}")
  return latest


def run(cfg, workdir: str, job: Job, *, log_fn=print) -> Result:
  """Runs `job` to job.steps, resuming from the workdir's newest valid checkpoint.

  Refuses (before anything is restored or written) a checkpoint of another stage, past job.steps, or
  whose recorded facts differ from job.record, and step directories none of which is valid. Writes
  <workdir>/config.json once the state is placed (the run has started), checkpoints every
  train.checkpoint_every steps and after the last, evaluates every job.eval_every steps and after the
  last. Raises TrainingError on a non-finite step (unless train.nonfinite == "skip") and Preempted
  after SIGTERM/SIGINT (the checkpoint written first).
  """
  t = cfg.train
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=int(t.keep_checkpoints),
    async_save=bool(t.async_checkpoint),
    trust_commit=bool(t.get("trust_orbax_commit", False)),
  )
  is_main = jax.process_index() == 0
  writer = None
  try:
    resumed = _resume_point(job, ckpt, workdir)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=bool(cfg.metrics.tensorboard))
    if resumed is None:
      state, start = job.init_state(), 0
    else:
      state, extra = ckpt.restore(resumed, job.abstract_state)
      job.set_extra(extra)
      log_fn(f"[{job.name}] resumed from {job.unit} {resumed} in {workdir}")
      start = resumed
    if start < job.steps:  # the config of what is trained (a run already at its end trains nothing)
      runs.write_config(workdir, cfg)
    progress = metrics_lib.Progress(
      job.steps, start, enabled=is_main and bool(t.progress_bar), desc=job.name, keys=job.progress_keys
    )
    skipped = int(jax.device_get(state["skipped"])) if "skipped" in state else 0
    reader = _Reader(cfg, job, writer, progress, skipped, log_fn)
    evals: dict[int, dict] = {}

    def evaluate(k: int) -> None:
      if job.evaluate is None:
        return
      result = job.evaluate(state, k)
      if result:
        evals[k] = result
        writer.write(k, result, prefix="eval/")
        log_fn(f"[{job.name}] {job.unit} {k} eval " + _fmt(result))

    def save(k: int) -> None:
      extra = {"stage": job.name, "config": config_lib.to_dict(cfg), **job.record, **job.get_extra()}
      ckpt.save(k, state, extra=extra, force=True)

    if resumed is None and job.eval_at_start:
      evaluate(0)
    pending = None  # (k, device metrics) of the step before, read after the next one is dispatched
    with _Signals() as signals:
      k = start
      while k < job.steps:
        k += 1
        state, dev_metrics = job.step(state, k)
        if pending is not None:
          reader.read(*pending)
        pending = (k, dev_metrics)
        if job.host_metrics:
          reader.read(*pending)
          pending = None
        is_eval = k == job.steps or (job.eval_every and k % job.eval_every == 0)
        is_save = k == job.steps or k % int(t.checkpoint_every) == 0 or signals.name
        if is_eval or is_save:
          if pending is not None:
            reader.read(*pending)  # a non-finite step raises here, before any checkpoint of it
            pending = None
          if is_eval:
            evaluate(k)
          if is_save:
            save(k)
          reader.restart_window()
          if signals.name:
            ckpt.wait()
            raise Preempted(k, workdir, signals.name)
      if pending is not None:
        reader.read(*pending)
    if resumed is not None and start == job.steps:
      log_fn(f"[{job.name}] already at {job.unit} {job.steps}: nothing to do")
    progress.close()
    ckpt.wait()
    done = max(evals) if evals else None
    return Result(state, k, reader.last, evals[done] if done is not None else {}, evals, resumed)
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


# --- the supervised stages --------------------------------------------------------------------------


def default_eval_summary(sums: dict, bytes_per_token: float | None = None) -> dict:
  """Held-out loss, perplexity and token count (and bits per byte) from summed eval outputs."""
  loss = float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0)
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(sums["weight"])}
  if bytes_per_token:
    out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
  return out


def supervised(
  cfg,
  model,
  *,
  name: str,
  loss_fn: step_lib.LossFn,
  train_batches,
  eval_batches: Callable[[], Iterable[dict]] | None = None,
  eval_summary: Callable[[dict], dict] | None = None,
  extra_eval: Callable[[Any, int], dict] | None = None,
  init_params: Callable[[], Any] | None = None,
  tokens_per_step: int = 0,
  flops_per_token: float = 0.0,
  batch_keys: tuple[str, ...] = BATCH_KEYS,
  record: dict | None = None,
) -> Job:
  """The Job of a stage that minimizes `loss_fn` over batches: AdamW from cfg.optim over train.steps,
  gradient accumulation, train.eval_batches held-out batches per evaluation (plus `extra_eval(params,
  step)`, e.g. the accuracy of sampled answers). `train_batches` has get_state()/set_state(); its
  position is checkpointed as extra["loader"]."""
  t = cfg.train
  steps = int(t.steps)
  optimizer, lr = optim.make(cfg.optim, steps, model.axes)
  init_params = init_params or (lambda: model.init_params(int(t.seed)))
  shapes = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, int(t.seed)), model.shapes)
  state_sh = step_lib.state_shardings(model.mesh, optimizer, model.shardings, shapes)
  batch_sh = {k: sharding.batch_sharding(model.mesh) for k in batch_keys}
  train_step = step_lib.make_train_step(
    loss_fn,
    optimizer,
    lr,
    mesh=model.mesh,
    state_sharding=state_sh,
    batch_sharding=batch_sh,
    grad_accum=int(t.grad_accum),
  )
  eval_step = step_lib.make_eval_step(
    loss_fn, mesh=model.mesh, params_sharding=model.shardings, batch_sharding=batch_sh
  )

  def init_state():
    init = jax.jit(
      lambda p: step_lib.init_state(p, optimizer, int(t.seed)), out_shardings=state_sh, donate_argnums=0
    )
    return init(init_params())

  def step(state, k):
    del k
    return train_step(state, next(train_batches))

  def evaluate(state, k):
    result = {}
    if eval_batches is not None and int(t.eval_batches) > 0:
      sums, batches = None, eval_batches()
      try:
        for i, batch in enumerate(batches):
          if i >= int(t.eval_batches):
            break
          out = eval_step(state["params"], batch)
          sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      finally:
        if hasattr(batches, "close"):
          batches.close()
      if sums is not None:
        result.update((eval_summary or default_eval_summary)(jax.device_get(sums)))
    if extra_eval is not None:
      result.update(extra_eval(state["params"], k))
    return result

  return Job(
    name=name,
    steps=steps,
    abstract_state=sharding.abstract(shapes, state_sh),
    init_state=init_state,
    step=step,
    get_extra=lambda: {"loader": train_batches.get_state()},
    set_extra=lambda extra: train_batches.set_state(extra["loader"]),
    evaluate=evaluate,
    eval_every=int(t.eval_every),
    tokens_per_step=tokens_per_step,
    flops_per_token=flops_per_token,
    record=dict(record or {}),
  )
