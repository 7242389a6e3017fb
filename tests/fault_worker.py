"""`python tests/fault_worker.py COMMAND ARGS...`: the gpt_jax CLI with progress markers for fault tests.

`python tests/fault_worker.py --serve` imports the CLI's modules once and then, for each JSON line
{"id": ID, "argv": [...], "env": {...}, "log": PATH} on stdin, forks one run (its stderr to PATH) that
prints `pid ID N` first; after the run ends the server prints `exit ID STATUS` (-9 after kill -9, 143
after SIGTERM). Runs are sequential, so every line between `pid ID` and `exit ID` is run ID's. Forking
after the imports (JAX's backend is only started in the child) makes each of the many killed and
restarted runs of the fault suite cost its training work, not seconds of imports.

Prints one line per event on stdout (flushed), so a test can kill the process at a chosen point:

  step N            step N finished (its metrics and checkpoint come next)
  save-start N      Checkpointer.save(N) called
  save-queued N     the arrays of step N are on the host; orbax writes them in the background
  record-start N    orbax finalized step N; its integrity record is being written
  record-done N     step N is a complete checkpoint
  hold PHASE N      see FAULT_HOLD
  signal SIG        the run's SIGTERM or SIGINT handler ran (while held by FAULT_HOLD_AT)

Environment knobs (test-only, so production code carries no fault hooks):
  FAULT_HOLD="PHASE N DELAY"     the thread that prints marker `PHASE N` (the main thread for step,
                                 save-start and save-queued; the background thread that finishes a save
                                 for record-start, before it writes the record) then sleeps DELAY
                                 seconds, prints `hold PHASE N` and blocks forever: the run cannot end
                                 before the test kills it, and the other threads go on meanwhile
  FAULT_HOLD_AT=N FAULT_HOLD_FILE=PATH   after step N, wait until PATH exists (the test acts meanwhile)

Exits with the CLI's status (0, 2 on a GptJaxError, 143 after SIGTERM, 130 after SIGINT).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def _emit(line: str) -> None:
  sys.stdout.write(line + "\n")
  sys.stdout.flush()


def _hold_point() -> tuple[str, int, float] | None:
  """(phase, step, delay) of FAULT_HOLD, or None."""
  spec = os.environ.get("FAULT_HOLD", "").split()
  if not spec:
    return None
  phase, step, delay = spec
  return phase, int(step), float(delay)


def install_hooks() -> None:
  from gpt_jax import checkpoint, integrity
  from gpt_jax import step as step_lib

  hold = _hold_point()

  def marker(phase: str, step: int) -> None:
    _emit(f"{phase} {step}")
    if hold is not None and hold[:2] == (phase, step):
      time.sleep(hold[2])
      _emit(f"hold {phase} {step}")
      while True:
        time.sleep(3600)

  save = checkpoint.Checkpointer.save

  def traced_save(self, step, state, **kwargs):
    marker("save-start", int(step))
    save(self, step, state, **kwargs)
    marker("save-queued", int(step))

  checkpoint.Checkpointer.save = traced_save

  # checkpoint.py calls integrity.write_record through the module: replacing the attribute hooks it.
  record = integrity.write_record

  def traced_record(step_dir):
    step = int(os.path.basename(os.path.normpath(step_dir)))
    marker("record-start", step)
    record(step_dir)
    _emit(f"record-done {step}")

  integrity.write_record = traced_record

  make_train_step = step_lib.make_train_step
  hold_at = int(os.environ.get("FAULT_HOLD_AT", "-1"))
  hold_file = os.environ.get("FAULT_HOLD_FILE", "")

  def traced_make_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step_fn(state, batch):
      state, metrics = train_step(state, batch)
      n = int(state["step"])  # waits for the step, so the marker follows the real progress
      if n != hold_at:
        marker("step", n)
      else:
        with _tracing_signals():  # before the marker: the test may signal as soon as it reads it
          marker("step", n)
          while not os.path.exists(hold_file):
            time.sleep(0.02)
      return state, metrics

    return step_fn

  step_lib.make_train_step = traced_make_train_step


@contextlib.contextmanager
def _tracing_signals():
  """Within: a SIGTERM or SIGINT runs the run's own handler, then prints `signal SIGTERM` / `signal SIGINT`."""
  handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

  def traced(signum, frame):
    handler = handlers[signum]
    if callable(handler):
      handler(signum, frame)
    _emit(f"signal {signal.Signals(signum).name}")

  for sig in handlers:
    signal.signal(sig, traced)
  try:
    yield
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)


def serve() -> None:
  """Forks one CLI run per command line on stdin (see the module docstring)."""
  import json
  import traceback

  # Everything a run imports, loaded once here; nothing of JAX's backend is started in this process.
  from gpt_jax import __main__ as cli  # noqa: F401
  from gpt_jax import checkpoint, integrity, loop  # noqa: F401
  from gpt_jax.data import loader, pipeline  # noqa: F401
  from gpt_jax.stages import pretrain  # noqa: F401

  _emit("ready")
  for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
      status = 1
      try:
        os.environ.update(cmd.get("env", {}))
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
        _emit(f"pid {cmd['id']} {os.getpid()}")
        install_hooks()
        status = cli.main(cmd["argv"])
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
      except BaseException:  # noqa: BLE001 - reported in the run's log, status 1
        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    # A fresh line first: a run killed in the middle of a marker leaves a partial line behind.
    _emit(f"\nexit {cmd['id']} {os.waitstatus_to_exitcode(wait_status)}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if sys.argv[1:] == ["--serve"]:
    serve()
    sys.exit(0)
  install_hooks()
  from gpt_jax.__main__ import main

  sys.exit(main(sys.argv[1:]))
