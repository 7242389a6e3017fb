"""The fault suite: kill -9 (also inside saves), corrupted checkpoints, SIGTERM, non-finite steps, disk
full, restore onto other meshes, changed configs on resume, and two runs on one workdir.

Each case asserts the outcome: the resumed run equals an uninterrupted one bit for bit, the bad checkpoint
is skipped with a warning, the error names the step, the previous checkpoint is intact, ...

Runs that must die (kill -9, SIGTERM, the lock holder) are real CLI runs in their own processes, forked by a
`tests/fault_worker.py --serve` process that paid the imports once, with progress markers on stdout to
kill them at chosen points; everything else runs in-process. `pytest --runslow` adds the long kill loop
(60 kills over 30 steps on 8 devices) to the CI one (20 kills over 10 steps on 2 devices).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import data as data_lib
from gpt_jax import loop, metrics, optim, placed, runs, sharding
from gpt_jax import model as model_lib
from gpt_jax import step as step_lib
from gpt_jax.errors import CheckpointError, ConfigError, TrainingError
from gpt_jax.integrity import RECORD_FILE
from gpt_jax.stages import pretrain
from tests.helpers import REPO, TINY, seed_workdir, snapshot, tiny_config

WORKER = os.path.join(REPO, "tests", "fault_worker.py")
QUIET = lambda *a: None

# ----------------------------------------------------------------------------- subprocess runs

# The subprocess runs: checkpoint every step, no eval (eval adds nothing to what is saved), no TensorBoard.
RUN = {
  **TINY,
  "train.checkpoint_every": 1,
  "train.keep_checkpoints": 2,
  "train.eval_batches": 0,
  "metrics.tensorboard": False,
  "data.verify_hash": False,
}
CI = dict(devices=2, steps=10, kills=20, seed=0)  # 2 fake devices, fsdp=2: sharded saves, cheap restarts
FULL = dict(devices=8, steps=30, kills=60, seed=1)


def _run_overrides(spec: dict, **extra) -> dict:
  return {**RUN, "train.steps": spec["steps"], "mesh.fsdp": 2, **extra}


class Server:
  """A `fault_worker.py --serve` process for one fake device count: it forks one training run per
  `start` (imports paid once); its stdout lines are collected by a reader thread."""

  def __init__(self, devices: int, log: str):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    with open(log, "w") as err:
      self.proc = subprocess.Popen(
        [sys.executable, "-u", WORKER, "--serve"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
      )
    self.log = log
    self.current: Worker | None = None
    self.runs = 0
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    line = self.lines.get(timeout=300)
    assert line == "ready", f"fault worker server did not start: {line!r}; see {log}"

  def _read(self):
    for line in self.proc.stdout:
      if line.strip():
        self.lines.put(line.rstrip("\n"))
    self.lines.put(None)

  def start(self, workdir: str, overrides: dict, *, log: str, env: dict | None = None) -> Worker:
    """Forks a pretraining run; a run still going (left by a failed test) is killed and drained first."""
    self.end_current()
    argv = ["pretrain", "--config=experiments/pretrain.py:tiny", f"--workdir={workdir}"]
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    self.runs += 1
    cmd = {"id": self.runs, "argv": argv, "env": env or {}, "log": log}
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    self.current = Worker(self, self.runs, log)
    return self.current

  def end_current(self) -> None:
    """Kills the current run if it is still going and reads its output up to its `exit` line."""
    if self.current is not None and self.current.status is None:
      with contextlib.suppress(ProcessLookupError):
        self.current.kill(signal.SIGKILL)
      self.current.finish()
    self.current = None

  def close(self):
    """Ends the server, and first a run still going (a failed test must not leave a training run behind)."""
    with contextlib.suppress(AssertionError):
      self.end_current()
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


class Worker:
  """One forked training run of a Server: its markers, its pid, its exit status."""

  def __init__(self, server: Server, run_id: int, log: str):
    self.server, self.id, self.log = server, run_id, log
    self.lines: list[str] = []
    self.status: int | None = None
    first = self._next(300)
    assert first is not None and first.startswith(f"pid {run_id} "), (run_id, first)
    self.pid = int(first.split()[2])

  def _next(self, timeout: float) -> str | None:
    try:
      line = self.server.lines.get(timeout=timeout)
    except queue.Empty:
      raise AssertionError(f"no output within {timeout}s; last lines: {self.lines[-5:]}") from None
    assert line is not None, f"the fault worker server died; see {self.server.log}"
    if line.startswith("exit "):
      _, run_id, status = line.split()
      assert int(run_id) == self.id, f"run {self.id} read the exit line of run {run_id}"
      self.status = int(status)
      return None
    return line

  def wait_for(self, accept, timeout: float = 300.0) -> str | None:
    """Returns the first new line for which accept(line) holds; None when the run ended first."""
    deadline = time.monotonic() + timeout
    while self.status is None:
      line = self._next(max(0.0, deadline - time.monotonic()))
      if line is None:
        return None
      self.lines.append(line)
      if accept(line):
        return line
    return None

  def kill(self, sig: int) -> None:
    os.kill(self.pid, sig)

  def finish(self, timeout: float = 300.0) -> int:
    """Waits for the run to end, collects the rest of its output, returns its exit status."""
    self.wait_for(lambda line: False, timeout)
    return self.status

  def stderr(self) -> str:
    with open(self.log) as f:
      return f.read()

  def markers(self, kind: str) -> list[int]:
    return [int(line.split()[1]) for line in self.lines if line.startswith(kind + " ")]


@pytest.fixture(scope="module")
def ci_server(tmp_path_factory):
  server = Server(CI["devices"], str(tmp_path_factory.mktemp("server") / "server.log"))
  yield server
  server.close()


def _final_state(workdir: str, step: int) -> dict:
  """The whole train state of checkpoint `step` as numpy arrays (params, opt_state, step, rng, skipped)."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  tree = meta.tree if hasattr(meta, "tree") else meta
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=args))


def _history(workdir: str) -> dict[int, tuple]:
  """step -> (loss, grad_norm) of metrics.jsonl; a step logged twice keeps the later (resumed) record."""
  return {
    r["step"]: (r["train/loss"], r["train/grad_norm"])
    for r in metrics.read_metrics(workdir)
    if "train/loss" in r
  }


def _assert_trees_bitwise(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _reference(server: Server, prepared_dir: str, root, spec: dict) -> str:
  """An uninterrupted subprocess run of `spec`: the workdir to compare with."""
  wd = seed_workdir(prepared_dir, str(root / "reference"))
  w = server.start(wd, _run_overrides(spec), log=str(root / "reference.log"))
  assert w.finish() == 0, w.stderr()
  assert w.markers("step") == list(range(1, spec["steps"] + 1))
  return wd


@pytest.fixture(scope="module")
def ci_reference(ci_server, prepared_dir, tmp_path_factory):
  return _reference(ci_server, prepared_dir, tmp_path_factory.mktemp("ci_reference"), CI)


# A run is held at marker `phase N` (see tests/fault_worker.py, FAULT_HOLD) and killed there, N the planned
# step or the first step the run makes when it resumed past it. The thread that printed the marker sleeps
# `delay` seconds first while the others go on, so a kill lands inside a save at a random point, and a
# held run can never end before its kill.
PHASES = ("step", "save-start", "save-queued", "record-start")
# Kills at these phases land inside a save by construction: a step is saved (save-start N) and its
# record is not written (held before the save call, or in place of writing the record).
IN_SAVE = ("save-start", "record-start")


def _kill_plan(spec: dict) -> list[tuple[int, str, float]]:
  """(step, phase, delay) per kill, seeded; every phase equally often.

  Only a save-queued kill can leave a checkpoint newer than every earlier one and the planned step (its
  save may finish during the delay), by one step each; with planned steps <= steps - 1 - (save-queued
  kills) the newest checkpoint stays below the last step, so every run has a marker to be held at.
  """
  rng = random.Random(spec["seed"])
  phases = [PHASES[i % len(PHASES)] for i in range(spec["kills"])]
  rng.shuffle(phases)
  top = spec["steps"] - 1 - phases.count("save-queued")
  assert top >= 1, spec
  points = sorted(rng.randint(1, top) for _ in range(spec["kills"]))
  return [(p, ph, 0.0 if rng.random() < 0.3 else rng.uniform(0.0, 0.4)) for p, ph in zip(points, phases)]


def _trust_unrecorded_saves(server, wd: str, overrides: dict, log: str) -> tuple[dict, int | None]:
  """When no step directory has its integrity record (the first save was killed before writing it),
  a run refuses to start over on top of them, and accepts the ones orbax committed with
  train.trust_orbax_commit. Returns (the overrides of the next run, the step it resumes from or None)."""
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False)
  steps = ck.step_dirs()
  if not steps or ck.latest_step() is not None:
    return overrides, None
  w = server.start(wd, overrides, log=log)
  assert w.finish() == 2, w.stderr()
  assert "starting over would replace them: set train.trust_orbax_commit=True" in w.stderr(), w.stderr()
  assert all(ck.committed(s) for s in steps), steps  # each one was finalized by orbax's rename
  return {**overrides, "train.trust_orbax_commit": True}, steps[-1]


def _kill_loop(server, prepared_dir, root, spec, reference):
  wd = seed_workdir(prepared_dir, str(root / "killed"))
  ckpt_dir = os.path.join(wd, "checkpoints")
  overrides = _run_overrides(spec)
  newest_done, newest_started, kills_in_save, unrecorded = 0, 0, 0, 0
  expect_warning = None
  plan = _kill_plan(spec)
  for i, (point, phase, delay) in enumerate(plan):
    run_overrides, trusted = _trust_unrecorded_saves(server, wd, overrides, str(root / f"run{i}-refused.log"))
    if trusted is not None:
      expect_warning = None  # accepted on its commit marker instead of being skipped
    latest = trusted or ckpt_lib.Checkpointer(ckpt_dir, create=False).latest_step() or 0
    target = max(point, latest + 1)
    assert target <= spec["steps"], (i, target)  # see _kill_plan
    env = {"FAULT_HOLD": f"{phase} {target} {delay}"}
    w = server.start(wd, run_overrides, log=str(root / f"run{i}.log"), env=env)
    first = w.wait_for(lambda line: line.startswith("step ") or line.startswith("[pretrain] resumed"))
    # Each restart resumes from the newest complete checkpoint.
    if latest:
      assert first.startswith(f"[pretrain] resumed from step {latest} "), (i, first)
    else:
      assert first == "step 1", (i, first)
    hit = w.wait_for(lambda line: line.startswith("hold "))
    assert hit == f"hold {phase} {target}", f"run {i}: {hit!r}; {w.stderr()[-2000:]}"
    w.kill(signal.SIGKILL)
    assert w.finish() == -signal.SIGKILL
    if expect_warning is not None:
      assert f"checkpoint step {expect_warning} in {ckpt_dir} is invalid and skipped" in w.stderr(), i
      expect_warning = None
    if trusted is not None:
      assert f"checkpoint step {trusted} in {ckpt_dir} has no integrity record; accepted" in w.stderr(), i
    started, saved, done = w.markers("record-start"), w.markers("save-start"), w.markers("record-done")
    in_save = bool(saved) and (not done or done[-1] < saved[-1])
    assert in_save or phase not in IN_SAVE, (i, phase, saved, done)
    kills_in_save += in_save
    newest_done, newest_started = max([newest_done, *done]), max([newest_started, *started])
    latest = ckpt_lib.Checkpointer(ckpt_dir, create=False).latest_step() or 0
    # Never older than what was reported complete, never newer than what reached the record.
    assert newest_done <= latest <= newest_started, (i, newest_done, latest, newest_started)
    unfinished = started and started[-1] not in done
    if unfinished and not os.path.exists(os.path.join(ckpt_dir, str(started[-1]), RECORD_FILE)):
      unrecorded += 1  # orbax finished this step but the record did not: the restart must skip it
      expect_warning = started[-1]
    if phase == "record-start":  # held in place of writing the record of the finalized step `target`
      assert expect_warning == target and os.path.isdir(os.path.join(ckpt_dir, str(target))), i
  run_overrides, trusted = _trust_unrecorded_saves(server, wd, overrides, str(root / "last-refused.log"))
  w = server.start(wd, run_overrides, log=str(root / "last.log"))
  assert w.finish() == 0, w.stderr()
  if expect_warning is not None and trusted is None:
    assert f"checkpoint step {expect_warning} in {ckpt_dir} is invalid and skipped" in w.stderr()
  assert kills_in_save >= sum(phase in IN_SAVE for _, phase, _ in plan), kills_in_save
  assert unrecorded >= sum(phase == "record-start" for _, phase, _ in plan), unrecorded
  _assert_trees_bitwise(_final_state(wd, spec["steps"]), _final_state(reference, spec["steps"]))
  assert _history(wd) == _history(reference)
  assert sorted(_history(wd)) == list(range(1, spec["steps"] + 1))
  extra = ckpt_lib.Checkpointer(ckpt_dir, create=False).read_extra(spec["steps"])
  assert extra["loader"] == {"index": spec["steps"]}


def test_kill9_loop_resumes_bitwise(ci_server, prepared_dir, tmp_path, ci_reference):
  """20 seeded kill -9s (at least half inside a checkpoint save), then the uninterrupted result exactly."""
  _kill_loop(ci_server, prepared_dir, tmp_path, CI, ci_reference)


@pytest.mark.slow
def test_kill9_loop_full(prepared_dir, tmp_path):
  """The long variant: 60 kills over 30 steps on 8 devices."""
  server = Server(FULL["devices"], str(tmp_path / "server.log"))
  try:
    reference = _reference(server, prepared_dir, tmp_path, FULL)
    _kill_loop(server, prepared_dir, tmp_path, FULL, reference)
  finally:
    server.close()


def _preempt_and_resume(server, prepared_dir, tmp_path, reference, sig: signal.Signals, while_held=None):
  """A run held after step 3 gets `sig`: the step finishes, a checkpoint is written, it exits 128 + sig
  with one line, and the restart continues exactly. `while_held(workdir, worker)` runs first."""
  wd = seed_workdir(prepared_dir, str(tmp_path / "preempted"))
  go = str(tmp_path / "go")
  overrides = _run_overrides(CI, **{"train.checkpoint_every": 100})  # the signal's save is the only one
  env = {"FAULT_HOLD_AT": "3", "FAULT_HOLD_FILE": go}
  w = server.start(wd, overrides, log=str(tmp_path / "first.log"), env=env)
  assert w.wait_for(lambda line: line == "step 3") == "step 3"  # the worker now waits for `go`
  if while_held is not None:
    while_held(wd, w, overrides)
  w.kill(sig)
  assert w.wait_for(lambda line: line == f"signal {sig.name}") == f"signal {sig.name}"  # the flag is set
  open(go, "w").close()
  assert w.finish() == loop.EXIT_CODES[sig.name] == 128 + int(sig)
  lines = [line for line in w.stderr().splitlines() if line.startswith("gpt_jax")]
  assert lines == [
    f"gpt_jax: preempted ({sig.name}) at step 3: checkpoint saved in {wd}; rerun the same command to resume"
  ]
  assert "Traceback" not in w.stderr()
  assert w.markers("step") == [1, 2, 3] and w.markers("record-done") == [3]
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).all_steps() == [3]
  w = server.start(wd, overrides, log=str(tmp_path / "second.log"))
  assert w.finish() == 0, w.stderr()
  assert f"[pretrain] resumed from step 3 in {wd}" in w.lines
  assert w.markers("step") == list(range(4, CI["steps"] + 1))
  _assert_trees_bitwise(_final_state(wd, CI["steps"]), _final_state(reference, CI["steps"]))
  assert _history(wd) == _history(reference)


def test_sigterm_saves_and_resumes_exactly_and_lock_refuses_a_second_run(
  ci_server, prepared_dir, tmp_path, ci_reference
):
  """SIGTERM: the step finishes, a checkpoint is written, exit 143 with a clear message, and the restart
  continues exactly. While that run holds the workdir, a second run on it is refused and writes nothing."""

  def second_run_is_refused(wd, w, overrides):
    before = sorted(os.listdir(wd)), open(os.path.join(wd, "config.json")).read()
    with pytest.raises(CheckpointError, match=f"workdir {wd} is in use by process {w.pid}"):
      pretrain.run(tiny_config(**overrides), wd, log_fn=QUIET)
    assert (sorted(os.listdir(wd)), open(os.path.join(wd, "config.json")).read()) == before

  _preempt_and_resume(ci_server, prepared_dir, tmp_path, ci_reference, signal.SIGTERM, second_run_is_refused)


def test_sigint_saves_and_resumes_exactly(ci_server, prepared_dir, tmp_path, ci_reference):
  """Ctrl-C (SIGINT) is a preemption like SIGTERM: the step finishes, a checkpoint is written, exit 130
  with one line and no traceback, and the restart continues exactly."""
  _preempt_and_resume(ci_server, prepared_dir, tmp_path, ci_reference, signal.SIGINT)


# ----------------------------------------------------------------------------- in-process faults


def _params_np(params) -> dict:
  return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def uninterrupted(prepared_dir, tmp_path_factory):
  """tiny_config() trained to step 6 without faults: (workdir with checkpoints 3 and 6, final params)."""
  wd = seed_workdir(prepared_dir, str(tmp_path_factory.mktemp("uninterrupted") / "wd"))
  out = pretrain.run(tiny_config(), wd, log_fn=QUIET)
  return wd, _params_np(out.params)


def _copy_run(uninterrupted, dest) -> str:
  shutil.copytree(uninterrupted[0], dest, ignore=shutil.ignore_patterns(".lock"))
  return str(dest)


def _state_file(step_dir: str) -> str:
  """The largest array file of a checkpoint step: the one a bad disk or partial copy would hit."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("kind", ["truncated", "removed", "garbage", "unfinished"])
def test_corrupted_checkpoint_is_skipped_and_training_redoes_it(uninterrupted, tmp_path, caplog, kind):
  wd = _copy_run(uninterrupted, tmp_path / "wd")
  step_dir = os.path.join(wd, "checkpoints", "6")
  victim = _state_file(step_dir)
  rel = os.path.relpath(victim, step_dir)
  if kind == "truncated":
    os.truncate(victim, os.path.getsize(victim) // 2)
    reason = f"file {rel} has"
  elif kind == "removed":
    os.remove(victim)
    reason = f"file {rel} is missing"
  elif kind == "garbage":  # same size, other bytes: only the checksum tells
    data = open(victim, "rb").read()
    open(victim, "wb").write(bytes((b + 1) % 256 for b in data))
    reason = f"file {rel} has a wrong crc32"
  else:  # killed after orbax finalized step 6, before its integrity record; and a half-written step 7
    os.remove(os.path.join(step_dir, RECORD_FILE))
    os.makedirs(os.path.join(wd, "checkpoints", "7.orbax-checkpoint-tmp-99", "state"))
    reason = "save never finished"
  logs = []
  with caplog.at_level(logging.WARNING, logger="gpt_jax.checkpoint"):
    out = pretrain.run(tiny_config(), wd, log_fn=logs.append)
  assert any(
    "checkpoint step 6" in r.message and "invalid and skipped" in r.message and reason in r.message
    for r in caplog.records
  ), [r.message for r in caplog.records]
  assert f"[pretrain] resumed from step 3 in {wd}" in logs  # never loaded step 6: fell back to step 3
  _assert_trees_bitwise(_params_np(out.params), uninterrupted[1])
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).all_steps() == [3, 6]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]


def test_checkpoints_without_records_are_refused_then_trusted_on_orbax_commit(uninterrupted, tmp_path):
  """Intact checkpoints that lost their integrity records are never trained over: the run is refused
  and nothing is touched; with train.trust_orbax_commit the committed steps are accepted and resumed."""
  wd = _copy_run(uninterrupted, tmp_path / "wd")
  for step in (3, 6):
    os.remove(os.path.join(wd, "checkpoints", str(step), RECORD_FILE))
  before = snapshot(wd)
  with pytest.raises(CheckpointError, match=r"passes its integrity check.*train\.trust_orbax_commit=True"):
    pretrain.run(tiny_config(**{"train.steps": 12}), wd, log_fn=QUIET)
  assert snapshot(wd) == before
  logs = []
  out = pretrain.run(tiny_config(**{"train.trust_orbax_commit": True}), wd, log_fn=logs.append)
  assert f"[pretrain] resumed from step 6 in {wd}" in logs
  _assert_trees_bitwise(_params_np(out.params), uninterrupted[1])
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).all_steps() == [3, 6]
  # Nothing was trained: config.json still records the config of what was (not the trust key).
  assert snapshot(wd)["config.json"] == before["config.json"]


def _nan_at_step(monkeypatch, bad_step: int, vocab_size: int = 512) -> None:
  """Makes the loss and every gradient of train step `bad_step` NaN, and no other step's.

  One input token of that step's batch gets the id `vocab_size`, one past the embedding table, whose
  lookup (jnp.take's default mode) reads NaN. The compiled step is the unpoisoned one: only data differs.
  """
  make = data_lib.make_loader

  def make_loader(prepared, split, **kwargs):
    loader = make(prepared, split, **kwargs)
    if split == "train":
      host_batch = loader.host_batch

      def poisoned(k):
        batch = host_batch(k)
        if k == bad_step - 1:  # batch k feeds step k + 1
          batch = {**batch, "inputs": batch["inputs"].copy()}
          batch["inputs"][0, 0] = vocab_size
        return batch

      loader.host_batch = poisoned
    return loader

  monkeypatch.setattr(data_lib, "make_loader", make_loader)


NAN_RUN = {"train.checkpoint_every": 1, "train.keep_checkpoints": 10}


def test_nonfinite_step_stops_naming_it_and_is_never_saved(prepared_dir, tmp_path, monkeypatch):
  wd = seed_workdir(prepared_dir, str(tmp_path / "nan"))
  _nan_at_step(monkeypatch, 3)
  with pytest.raises(TrainingError, match=r"non-finite loss or gradients at step 3 \(loss=nan"):
    pretrain.run(tiny_config(**NAN_RUN), wd, log_fn=QUIET)
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).all_steps() == [1, 2]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]
  assert sorted(_history(wd)) == [1, 2]  # nothing of step 3 reached the metrics


def test_nonfinite_step_is_skipped_and_counted_with_skip(prepared_dir, tmp_path, monkeypatch, caplog):
  wd = seed_workdir(prepared_dir, str(tmp_path / "skip"))
  _nan_at_step(monkeypatch, 3)
  with caplog.at_level(logging.WARNING, logger="gpt_jax"):
    out = pretrain.run(tiny_config(**NAN_RUN, **{"train.nonfinite": "skip"}), wd, log_fn=QUIET)
  assert int(out.state["skipped"]) == 1 and out.step == 6
  assert any(
    "step 3: non-finite loss or gradients, update skipped (1 so far)" in r.message for r in caplog.records
  )
  # The skipped step changed no parameter and no optimizer moment: state 3 is state 2 plus the counters.
  s2, s3 = _final_state(wd, 2), _final_state(wd, 3)
  _assert_trees_bitwise(s3["params"], s2["params"])
  _assert_trees_bitwise(s3["opt_state"], s2["opt_state"])
  assert (int(s2["step"]), int(s2["skipped"]), int(s3["step"]), int(s3["skipped"])) == (2, 0, 3, 1)
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).read_extra(3)["loader"] == {
    "index": 3
  }
  records = {r["step"]: r for r in metrics.read_metrics(wd) if any(k.startswith("train/") for k in r)}
  assert records[3]["train/skipped_steps"] == 1 and "train/loss" not in records[3]  # no NaN in the log
  assert all(np.isfinite(records[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out.params))


class _FullDisk:
  """An orbax commit future whose background write hits a full disk, as tensorstore's would."""

  def result(self, timeout=None):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_save_keeps_the_previous_checkpoint(
  uninterrupted, prepared_dir, tmp_path, monkeypatch
):
  wd = seed_workdir(prepared_dir, str(tmp_path / "full"))
  original, calls = ocp.StandardCheckpointHandler.async_save, []

  async def save_until_full(self, *args, **kwargs):
    futures = list(await original(self, *args, **kwargs) or [])
    calls.append(1)
    return futures + [_FullDisk()] if len(calls) == 2 else futures  # the 2nd save (step 6) fails

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", save_until_full)
  with pytest.raises(
    CheckpointError, match=r"saving checkpoint step 6 to .* failed: disk full .*last valid checkpoint: step 3"
  ):
    pretrain.run(tiny_config(), wd, log_fn=QUIET)
  monkeypatch.undo()
  ckpt_dir = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["3"]  # the partial step 6 is gone, step 3 untouched
  assert ckpt_lib.Checkpointer(ckpt_dir, create=False).all_steps() == [3]
  logs = []
  out = pretrain.run(tiny_config(), wd, log_fn=logs.append)  # space is back: the same command goes on
  assert f"[pretrain] resumed from step 3 in {wd}" in logs
  _assert_trees_bitwise(_params_np(out.params), uninterrupted[1])


def _placed(model_cfg, optimizer, mesh):
  """(model, abstract train state, state shardings) of model_cfg on `mesh`, as loop.supervised builds them."""
  m = placed.Model.build(model_cfg, mesh)
  abstract = jax.eval_shape(lambda p: step_lib.init_state(p, optimizer, 0), m.shapes)
  return m, abstract, step_lib.state_shardings(mesh, optimizer, m.shardings, abstract)


@pytest.fixture(scope="module")
def fsdp8_checkpoint(tmp_path_factory):
  """A train state of the tiny model saved from 8 devices as fsdp=8: (checkpoint dir, state as numpy)."""
  cfg = tiny_config()
  model_cfg = model_lib.ModelConfig.from_config(cfg.model)
  optimizer, _ = optim.make(cfg.optim, int(cfg.train.steps), model_lib.abstract(model_cfg)[2])
  mesh8 = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  m8, _, sh8 = _placed(model_cfg, optimizer, mesh8)
  init = jax.jit(lambda p: step_lib.init_state(p, optimizer, 0), out_shardings=sh8)
  state = init(m8.init_params(0))
  # Non-zero optimizer moments, so that they are checked too.
  state["opt_state"] = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state["opt_state"])
  assert len(state["params"]["embed"].sharding.device_set) == 8
  assert any(x.addressable_shards[0].data.shape != x.shape for x in jax.tree.leaves(state["params"]))
  path = str(tmp_path_factory.mktemp("fsdp8"))
  with ckpt_lib.Checkpointer(path) as ck:
    ck.save(1, state, extra={})
  return path, jax.tree.map(np.asarray, state), model_cfg, optimizer


@pytest.mark.parametrize(
  "mesh_cfg, n",
  [
    ({"data": 2, "fsdp": 1, "tensor": 2}, 4),
    ({"data": 1, "fsdp": 4, "tensor": 1}, 4),
    ({"data": 1, "fsdp": 1, "tensor": 1}, 1),
  ],
  ids=["data2xtensor2", "fsdp4", "one_device"],
)
def test_state_saved_on_fsdp8_restores_on_another_mesh(fsdp8_checkpoint, mesh_cfg, n):
  path, saved, model_cfg, optimizer = fsdp8_checkpoint
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
  m, abstract, shardings = _placed(model_cfg, optimizer, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  restored, _ = ckpt_lib.Checkpointer(path, create=False).restore(None, target)
  _assert_trees_bitwise(jax.tree.map(np.asarray, restored), saved)
  for leaf in jax.tree.leaves(restored["params"]):
    assert leaf.sharding.mesh.devices.shape == mesh.devices.shape and len(leaf.sharding.device_set) == n
  # The params alone, as a later stage (SFT, export) reads them.
  params = ckpt_lib.restore_params(
    path, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), m.shapes, m.shardings)
  )
  _assert_trees_bitwise(jax.tree.map(np.asarray, params), saved["params"])


def test_changed_config_on_resume_accepts_schedule_and_logging_refuses_model_and_data(tmp_path, caplog):
  wd = str(tmp_path)
  runs.write_config(wd, tiny_config())
  mutable = {
    "train.steps": 12,
    "optim.decay_steps": 12,
    "optim.lr_end_ratio": 0.0,
    "train.log_every": 5,
    "train.checkpoint_every": 6,
    "metrics.tensorboard": False,
    "train.progress_bar": True,
  }
  with caplog.at_level(logging.WARNING, logger="gpt_jax"):
    runs.check_resume(wd, tiny_config(**mutable), pretrain.SCHEMA)
  runs.write_config(wd, tiny_config(**mutable))
  warned = " ".join(r.message for r in caplog.records)
  assert all(k in warned for k in mutable), warned
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 12
  refused = {"model.d_model": 96, "model.vocab_size": 1024, "data.sources.code.weight": 0.5}
  with pytest.raises(ConfigError) as e:
    runs.check_resume(wd, tiny_config(**mutable, **refused), pretrain.SCHEMA)
  msg = str(e.value)
  assert "\n" not in msg and "may not change on resume" in msg
  for k, old, new in (
    ("model.d_model", 64, 96),
    ("model.vocab_size", 512, 1024),
    ("data.sources.code.weight", 0.7, 0.5),
  ):
    assert f"{k} ({old!r} -> {new!r})" in msg
  assert "train.steps" not in msg
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["model"]["d_model"] == 64  # the workdir's config is unchanged


def test_changed_model_on_resume_is_refused_before_building(uninterrupted, tmp_path, monkeypatch):
  wd = _copy_run(uninterrupted, tmp_path / "wd")
  before = {p: open(os.path.join(wd, p), "rb").read() for p in ("config.json", "metrics.jsonl")}
  monkeypatch.setattr(placed.Model, "build", lambda *a: pytest.fail("built a model for a refused config"))
  with pytest.raises(ConfigError, match=r"model\.num_layers \(2 -> 3\); optim\.lr_peak"):
    pretrain.run(tiny_config(**{"model.num_layers": 3, "optim.lr_peak": 0.5}), wd, log_fn=QUIET)
  assert {p: open(os.path.join(wd, p), "rb").read() for p in before} == before
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), create=False).all_steps() == [3, 6]
