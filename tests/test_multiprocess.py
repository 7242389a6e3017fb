"""Multi-process runs on JAX's distributed runtime (CPU, gloo collectives): 2 processes x 4 devices
train exactly like 1 process x 8 devices, survive SIGKILL + restart, resume on another process count,
and bad job settings or a workdir in use fail with one-line errors on every process instead of hanging."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt_jax import distributed, metrics
from gpt_jax.errors import ConfigError
from gpt_jax.stages import pretrain
from gpt_jax.workdir import WorkdirLock
from tests.helpers import REPO, seed_workdir, tiny_config

WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
# Four steps, a checkpoint every two; no eval (saves compiling the eval step in every process).
OVERRIDES = {"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 4, "train.eval_batches": 0}
JOB_TIMEOUT_S = 420  # per launch; a healthy job on a loaded 2-core box takes a fraction of it
INIT_TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  return dict(
    os.environ,
    XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=REPO,
  )


class Job:
  """N worker processes of one job, their stderr in files, all killed (SIGKILL) on exit."""

  def __init__(self, tmp_path, name: str, specs: list[dict], devices: int = 4):
    self.logs = [tmp_path / f"{name}.{i}.log" for i in range(len(specs))]
    self.results = [tmp_path / f"{name}.{i}.json" for i in range(len(specs))]
    self.procs = []
    for spec, log, res in zip(specs, self.logs, self.results):
      with open(log, "w") as f:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, WORKER, json.dumps({**spec, "result": str(res)})],
            env=_env(devices),
            stdout=subprocess.DEVNULL,
            stderr=f,
            cwd=REPO,
          )
        )

  def log(self, i: int) -> str:
    return self.logs[i].read_text(errors="replace")

  def tails(self) -> str:
    return "\n".join(f"--- process {i}:\n" + self.log(i)[-3000:] for i in range(len(self.procs)))

  def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> list[int]:
    """Returns the exit codes; fails the test (after killing the job) when it outlives timeout_s."""
    deadline = time.monotonic() + timeout_s
    try:
      return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"job did not finish within {timeout_s}s:\n{self.tails()}")

  def until(self, condition, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
      if any(p.poll() is not None for p in self.procs):
        self.kill()
        pytest.fail(f"a process ended early:\n{self.tails()}")
      if time.monotonic() > deadline:
        self.kill()
        pytest.fail(f"condition not met within {timeout_s}s:\n{self.tails()}")
      time.sleep(0.2)

  def result(self, i: int) -> dict:
    return json.loads(self.results[i].read_text())

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.procs:
      p.wait()


def _specs(n: int, *, ids=None, counts=None, **common) -> list[dict]:
  addr = f"127.0.0.1:{_free_port()}"
  ids = list(range(n)) if ids is None else ids
  counts = [n] * n if counts is None else counts
  return [
    dict(coordinator_address=addr, num_processes=c, process_id=i, init_timeout_s=INIT_TIMEOUT_S, **common)
    for i, c in zip(ids, counts)
  ]


def _train_losses(workdir: str) -> dict[int, list[float]]:
  """Returns {step: [train/loss of every record of that step]} from metrics.jsonl."""
  out: dict[int, list[float]] = {}
  for r in metrics.read_metrics(workdir):
    if "train/loss" in r:
      out.setdefault(r["step"], []).append(r["train/loss"])
  return out


@pytest.fixture(scope="module")
def reference(prepared_dir, tmp_path_factory):
  """Train losses of the uninterrupted 1-process, 8-device run."""
  wd = seed_workdir(prepared_dir, str(tmp_path_factory.mktemp("mp_ref") / "run"))
  pretrain.run(tiny_config(**OVERRIDES), wd, log_fn=lambda *a: None)
  return {s: v[-1] for s, v in _train_losses(wd).items()}


def test_two_processes_match_one_survive_kill_and_resume_on_one(prepared_dir, tmp_path, reference):
  wd = seed_workdir(prepared_dir, str(tmp_path / "run"))
  common = dict(workdir=wd, overrides=OVERRIDES)
  # Run 1: the loader stalls before the 4th batch, i.e. mid-run after checkpoint 2; then SIGKILL both.
  job = Job(tmp_path, "first", _specs(2, stall_at=3, **common))
  record = os.path.join(wd, "checkpoints", "2", "_INTEGRITY.json")
  job.until(lambda: os.path.exists(record) and all("stalled" in job.log(i) for i in range(2)))
  job.kill()
  losses = _train_losses(wd)
  # Only process 0 writes metrics: each step exactly once.
  assert {s: len(v) for s, v in losses.items()} == {1: 1, 2: 1}, losses
  np.testing.assert_allclose([losses[s][0] for s in (1, 2)], [reference[s] for s in (1, 2)], rtol=1e-5)
  assert not os.path.exists(os.path.join(wd, "checkpoints", "4"))
  one_proc = str(tmp_path / "one_proc")
  shutil.copytree(wd, one_proc)

  # Run 2: the same command in the same workdir resumes from step 2 and finishes.
  job = Job(tmp_path, "resume", _specs(2, **common))
  assert job.wait() == [0, 0], job.tails()
  views = [job.result(i) for i in range(2)]
  assert [
    (v["process_index"], v["process_count"], v["local_devices"], v["global_devices"]) for v in views
  ] == [
    (0, 2, 4, 8),
    (1, 2, 4, 8),
  ]
  assert [v["rows"] for v in views] == [[0, 4], [4, 8]]  # each process loads only its half of every batch
  assert [v["is_main"] for v in views] == [True, False]
  assert all(v["step"] == 4 for v in views)
  assert "resumed from step 2" in job.log(0) and "resumed from step 2" in job.log(1)
  losses = {s: v[-1] for s, v in _train_losses(wd).items()}
  np.testing.assert_allclose(
    [losses[s] for s in (1, 2, 3, 4)], [reference[s] for s in (1, 2, 3, 4)], rtol=1e-5
  )

  # The 2-process checkpoint of step 2, resumed by 1 process with 8 devices.
  out = pretrain.run(tiny_config(**OVERRIDES), one_proc, log_fn=lambda *a: None)
  assert out.step == 4
  losses = {s: v[-1] for s, v in _train_losses(one_proc).items()}
  np.testing.assert_allclose([losses[s] for s in (3, 4)], [reference[s] for s in (3, 4)], rtol=1e-5)


@pytest.mark.parametrize(
  "case, expected",
  [
    # Process 1 is told an id outside the job: it stops at once; process 0 stops at its connect deadline.
    (
      "bad_id",
      [r"could not join the 2-process job", r"--process_id: 2 is out of range for --num_processes=2"],
    ),
    # Both connect (the coordinator counts 2); the disagreement is found by comparing what each was told.
    ("bad_count", [r"--num_processes: process 1 was started with 3"] * 2),
    ("bad_batch", [r"train\.global_batch: 5 is not divisible by the 2 processes"] * 2),
    # Process 0 finds the workdir locked by another run (this test); process 1 learns it from process 0.
    (
      "locked",
      [r"workdir \S+ is in use by process (\d+)", r"process 0 could not lock the workdir: .* process (\d+)"],
    ),
  ],
)
def test_bad_job_settings_fail_on_every_process(tmp_path, case, expected):
  overrides = {}
  kw = {}
  if case == "bad_id":
    kw = dict(ids=[0, 2])
  elif case == "bad_count":
    kw = dict(counts=[2, 3])
  elif case == "bad_batch":  # a tensor-parallel mesh: 5 rows are fine for the mesh, not for 2 processes
    overrides = {"train.global_batch": 5, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8}
  wd = str(tmp_path / "wd")
  specs = _specs(2, mode="lock" if case == "locked" else "init", workdir=wd, overrides=overrides, **kw)
  if case == "bad_id":  # process 0 waits this long for a process that never comes
    for s in specs:
      s["init_timeout_s"] = 8
  with contextlib.ExitStack() as held:
    if case == "locked":
      held.enter_context(WorkdirLock(wd))
    job = Job(tmp_path, case, specs)
    codes = job.wait()
  for i, pattern in enumerate(expected):
    assert codes[i] == 2, job.tails()
    errors = [line for line in job.log(i).splitlines() if line.startswith("gpt_jax: error:")]
    assert len(errors) == 1, job.tails()
    found = re.search(pattern, errors[0])
    assert found, job.tails()
    if case == "locked":
      assert found.group(1) == str(os.getpid()), errors[0]


def test_initialize_checks_settings_before_connecting(monkeypatch):
  for names in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
    for name in names:
      monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv(distributed.ENV_MODE, raising=False)
  # Nothing given and no cluster around: a plain single-process run.
  monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
  assert distributed.initialize() is False
  with pytest.raises(ConfigError, match=r"--process_id: 3 is out of range for --num_processes=2"):
    distributed.initialize("127.0.0.1:1234", 2, 3)
  with pytest.raises(ConfigError, match=r"--num_processes: needed for a multi-process run"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(ConfigError, match=r"--coordinator_address: expected HOST:PORT, got 'localhost'"):
    distributed.initialize("localhost", 2, 0)
  monkeypatch.setenv("GPT_JAX_NUM_PROCESSES", "two")
  with pytest.raises(ConfigError, match=r"GPT_JAX_NUM_PROCESSES: expected an integer, got 'two'"):
    distributed.initialize()
  parser = argparse.ArgumentParser()
  distributed.add_flags(parser)
  args = parser.parse_args(["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"])
  with pytest.raises(ConfigError, match=r"--process_id: 2 is out of range"):
    distributed.initialize_from_args(args)
  monkeypatch.setenv(distributed.ENV_MODE, "0")
  assert distributed.initialize() is False  # switched off: the environment is ignored


def test_check_train_names_the_mesh_and_describes_the_job():
  with pytest.raises(ConfigError, match=r"mesh: data\*fsdp\*tensor = .* must cover all 8 global devices"):
    distributed.check_train(tiny_config(**{"mesh.data": 4, "mesh.fsdp": 1, "mesh.tensor": 1}))
  distributed.check_train(tiny_config())
  assert distributed.is_main()
  assert distributed.main_only(print) is print
  assert distributed.main_first(lambda: 7, what="nothing") == 7
  assert distributed.describe().startswith("process 0/1 on ")
  assert distributed.describe().endswith("8 local of 8 global devices (cpu)")
  assert distributed.exchange("anything", "v") == {0: "v"}
