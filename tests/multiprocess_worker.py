"""One process of a multi-process test job: `python tests/multiprocess_worker.py SPEC_JSON`.

SPEC_JSON keys: coordinator_address, num_processes, process_id, init_timeout_s (given to
gpt_jax.distributed.initialize as a real launcher would), workdir and overrides (a tiny pretraining
config, see tests/helpers.py), mode ("pretrain"; "init": stop after joining and checking the config;
"lock": then take the job's workdir lock, as a stage does first),
stall_at (optional: the train loader blocks before batch k, so the test can kill a run mid-way) and
result (optional: a JSON file this process writes its view of the job to).

The environment (XLA_FLAGS with the device count, JAX_PLATFORMS=cpu) is set by the test. A gpt_jax
error prints one line to stderr and exits with status 2, as the CLI does.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stall_loader(stall_at: int):
  """Makes pretraining's train loader block forever before batch `stall_at` (a run to be killed)."""
  from gpt_jax import data as data_lib

  make = data_lib.make_loader

  def make_stalling(prepared, split, **kw):
    loader = make(prepared, split, **kw)
    if split != "train":
      return loader

    class Stalling(type(loader)):
      def __next__(self):
        if self._index >= stall_at:
          print(f"worker {os.getpid()}: stalled before batch {self._index}", file=sys.stderr, flush=True)
          while True:
            time.sleep(1)
        return super().__next__()

    loader.__class__ = Stalling
    return loader

  data_lib.make_loader = make_stalling


def main(spec: dict) -> dict:
  t0 = time.perf_counter()
  from gpt_jax import distributed

  joined = distributed.initialize(
    spec.get("coordinator_address"),
    spec.get("num_processes"),
    spec.get("process_id"),
    timeout_s=spec.get("init_timeout_s"),
  )
  import jax

  t_init = time.perf_counter() - t0
  from gpt_jax import config as config_lib
  from gpt_jax import sharding
  from gpt_jax.data import loader as loader_lib
  from tests.helpers import tiny_config

  cfg = tiny_config(**spec.get("overrides", {}))
  distributed.check_same_config(config_lib.to_dict(cfg), timeout_s=int(spec.get("init_timeout_s") or 60))
  distributed.check_train(cfg)
  t = cfg.train
  mesh = sharding.make_mesh(cfg.mesh)
  rows = loader_lib._local_rows(sharding.batch_sharding(mesh), int(t.global_batch), int(t.seq_len))
  view = {
    "joined": joined,
    "process_index": jax.process_index(),
    "process_count": jax.process_count(),
    "local_devices": jax.local_device_count(),
    "global_devices": jax.device_count(),
    "is_main": distributed.is_main(),
    "describe": distributed.describe(),
    "rows": list(rows),
    "init_s": round(t_init, 2),
  }
  if spec.get("mode") == "lock":
    from gpt_jax.workdir import WorkdirLock

    with WorkdirLock(spec["workdir"]):
      view["locked"] = True
  if spec.get("mode", "pretrain") == "pretrain":
    from gpt_jax.stages import pretrain

    if spec.get("stall_at") is not None:
      _stall_loader(int(spec["stall_at"]))
    out = pretrain.run(cfg, spec["workdir"], log_fn=lambda *a: print(*a, file=sys.stderr, flush=True))
    view["run_s"] = round(time.perf_counter() - t0 - t_init, 2)
    view["step"] = out.step
    view["eval_loss"] = out.eval.get("loss")
  return view


if __name__ == "__main__":
  import faulthandler
  import signal

  faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck worker waits
  spec = json.loads(sys.argv[1])
  from gpt_jax.errors import GptJaxError

  try:
    view = main(spec)
  except GptJaxError as e:
    print(f"gpt_jax: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if spec.get("result"):
    with open(spec["result"], "w") as f:
      json.dump(view, f)
  print(json.dumps(view), flush=True)
