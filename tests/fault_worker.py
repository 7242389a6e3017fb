"""`python tests/fault_worker.py COMMAND ARGS...`: the gpt_jax CLI with progress markers for fault tests.

Prints one line per event on stdout (flushed), so a test can kill the process at a chosen point:

  step N            step N finished (its metrics and checkpoint come next)
  save-start N      Checkpointer.save(N) called
  save-queued N     the arrays of step N are on the host; orbax writes them in the background
  record-start N    orbax finalized step N; its integrity record is being written
  record-done N     step N is a complete checkpoint

Environment knobs (test-only, so production code carries no fault hooks):
  FAULT_RECORD_PAUSE=S           sleep S seconds before writing each integrity record (a wider window
                                 between orbax's finalize and the record, to kill a process in it)
  FAULT_HOLD_AT=N FAULT_HOLD_FILE=PATH   after step N, wait until PATH exists (the test acts meanwhile)

Exits with the CLI's status (0, 2 on a GptJaxError, 143 after SIGTERM).
"""

from __future__ import annotations

import os
import sys
import time


def _emit(line: str) -> None:
  sys.stdout.write(line + "\n")
  sys.stdout.flush()


def install_hooks() -> None:
  from gpt_jax import checkpoint
  from gpt_jax import step as step_lib

  save = checkpoint.Checkpointer.save

  def traced_save(self, step, state, **kwargs):
    _emit(f"save-start {int(step)}")
    save(self, step, state, **kwargs)
    _emit(f"save-queued {int(step)}")

  checkpoint.Checkpointer.save = traced_save

  record = checkpoint.write_integrity_record
  pause = float(os.environ.get("FAULT_RECORD_PAUSE", "0"))

  def traced_record(step_dir):
    step = os.path.basename(os.path.normpath(step_dir))
    _emit(f"record-start {step}")
    if pause:
      time.sleep(pause)
    record(step_dir)
    _emit(f"record-done {step}")

  checkpoint.write_integrity_record = traced_record

  make_train_step = step_lib.make_train_step
  hold_at = int(os.environ.get("FAULT_HOLD_AT", "-1"))
  hold_file = os.environ.get("FAULT_HOLD_FILE", "")

  def traced_make_train_step(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step_fn(state, batch):
      state, metrics = train_step(state, batch)
      n = int(state["step"])  # waits for the step, so the marker follows the real progress
      _emit(f"step {n}")
      if n == hold_at:
        while not os.path.exists(hold_file):
          time.sleep(0.02)
      return state, metrics

    return step_fn

  step_lib.make_train_step = traced_make_train_step


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  install_hooks()
  from gpt_jax.__main__ import main

  sys.exit(main(sys.argv[1:]))
