"""Multi-process runs on JAX's own distributed runtime (GPU nodes, TPU slices, CPU hosts).

Every process runs the same command; `initialize` joins them into one JAX job, after which
jax.devices() lists all processes' devices, the mesh spans them all, each process feeds only its
rows of every batch, and orbax writes checkpoints from all processes together.

Where the job's shape comes from, first match wins:
  1. explicit arguments (the CLI flags --coordinator_address / --num_processes / --process_id);
  2. GPT_JAX_COORDINATOR_ADDRESS / GPT_JAX_NUM_PROCESSES / GPT_JAX_PROCESS_ID
     (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
  3. JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI), when such an environment is present;
  4. otherwise a plain single-process run: nothing to initialize.

Misconfigurations end with one-line ConfigErrors on every process rather than a hang: arguments are
checked before connecting, connecting has a deadline, and after connecting the processes compare
what each was told (process count, config fingerprint) through the coordinator's key-value store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence

import jax

from gpt_jax.errors import ConfigError

log = logging.getLogger("gpt_jax")

ENV_ADDRESS = ("GPT_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("GPT_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("GPT_JAX_PROCESS_ID", "JAX_PROCESS_ID")
ENV_TIMEOUT = "GPT_JAX_INIT_TIMEOUT_S"  # seconds to wait for all processes to connect (default 300)
ENV_MODE = "GPT_JAX_DISTRIBUTED"  # "auto" (default), "1": always initialize, "0": never
DEFAULT_TIMEOUT_S = 300

_state = {"exchanges": 0}  # exchanges: a counter that keeps key-value keys unique


def _env(names: Sequence[str]) -> tuple[str, str] | None:
  """Returns (name, value) of the first set environment variable among names, else None."""
  for name in names:
    value = os.environ.get(name, "").strip()
    if value:
      return name, value
  return None


def _int_arg(value, env_names: Sequence[str], what: str) -> int | None:
  if value is not None:
    source = f"--{what}"
  else:
    found = _env(env_names)
    if found is None:
      return None
    source, value = found
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{source}: expected an integer, got {value!r}") from None


def detected_cluster() -> str | None:
  """Returns the name of the cluster environment JAX would auto-detect (TPU, SLURM, Open MPI), or None."""
  try:  # JAX's own detectors, so that we agree with jax.distributed.initialize() on what is present.
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
      if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
        return env.__name__
    return None
  except Exception:  # noqa: BLE001 - private API of JAX; fall back to the variables the launchers set.
    for var, name in (("SLURM_JOB_ID", "SlurmCluster"), ("OMPI_MCA_orte_hnp_uri", "OmpiCluster")):
      if var in os.environ:
        return name
    return None


def is_initialized() -> bool:
  """True once this process has joined a multi-process job."""
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client is not None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
  *,
  timeout_s: int | None = None,
) -> bool:
  """Joins this process to the job described by the arguments, the environment, or the cluster.

  Must run before anything touches JAX devices. Returns True when a multi-process job was joined,
  False for a plain single-process run (nothing given, no cluster detected, or GPT_JAX_DISTRIBUTED=0).
  Raises ConfigError (one line) when the settings are incomplete or inconsistent, when not all
  processes connect within timeout_s, or when processes disagree on the process count.
  """
  mode = os.environ.get(ENV_MODE, "auto").strip().lower()
  if mode not in ("auto", "0", "1"):
    raise ConfigError(f"{ENV_MODE}: expected 'auto', '0' or '1', got {mode!r}")
  if is_initialized():
    return True
  if mode == "0":
    return False
  if coordinator_address is None and (found := _env(ENV_ADDRESS)):
    coordinator_address = found[1]
  num_processes = _int_arg(num_processes, ENV_NUM_PROCESSES, "num_processes")
  process_id = _int_arg(process_id, ENV_PROCESS_ID, "process_id")
  timeout_s = _int_arg(timeout_s, (ENV_TIMEOUT,), "init_timeout_s") or DEFAULT_TIMEOUT_S
  explicit = (coordinator_address, num_processes, process_id)
  cluster = detected_cluster()
  if mode == "auto" and all(v is None for v in explicit) and cluster is None:
    return False
  if cluster is None and None in explicit:
    missing = [
      n for n, v in zip(("coordinator_address", "num_processes", "process_id"), explicit) if v is None
    ]
    raise ConfigError(
      f"--{missing[0]}: needed for a multi-process run outside TPU/SLURM/Open MPI (also missing: "
      f"{', '.join(missing[1:]) or 'nothing'}); set it or GPT_JAX_{missing[0].upper()}"
    )
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes: must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(
      f"--process_id: {process_id} is out of range for --num_processes={num_processes} (expected 0..{num_processes - 1})"
    )
  if coordinator_address is not None and ":" not in coordinator_address:
    raise ConfigError(f"--coordinator_address: expected HOST:PORT, got {coordinator_address!r}")
  # CPU hosts exchange data over gloo; without it cross-process collectives on CPU are unsupported.
  # The option only concerns the CPU backend, so setting it on GPU/TPU hosts changes nothing there.
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError):  # a JAX without the option: its default is used
    log.warning("this JAX has no jax_cpu_collectives_implementation option; using its default")
  # JAX aborts the process (a C++ fatal error, no Python exception) when the connect deadline passes.
  # Our own deadline comes first and ends the process with the project's one-line error instead.
  late = (
    f"process {process_id}: could not join the {num_processes}-process job at {coordinator_address} within "
    f"{timeout_s}s; check that every process got the same --num_processes, a distinct --process_id and the "
    "same --coordinator_address, and that all of them were started"
  )
  watchdog = threading.Timer(float(timeout_s), _exit_with, args=(late,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      local_device_ids,
      initialization_timeout=int(timeout_s) + 60,
    )
  except RuntimeError as e:
    if "must be called before" in str(e) or "only be called once" in str(e):
      raise ConfigError(f"distributed.initialize: {_first_line(e)}") from None
    raise ConfigError(f"{late} ({_first_line(e)})") from None
  except (ValueError, TypeError) as e:
    raise ConfigError(f"distributed.initialize: {_first_line(e)}") from None
  finally:
    watchdog.cancel()
  _check_same_count(coordinator_address, timeout_s)
  _warm_up()
  log.info("%s", describe())
  return True


def _check_same_count(coordinator_address, timeout_s: int) -> None:
  """ConfigError on every process unless all were told the same process count.

  Compares through the key-value store only: creating the backend first would make a process that
  was told a wrong count wait for devices of processes that do not exist.
  """
  from jax._src import distributed as jax_distributed

  told = jax_distributed.global_state.num_processes
  views = exchange("num_processes", str(told), timeout_s=timeout_s)
  bad = sorted(p for p, v in views.items() if v != views[0])
  if bad:
    raise ConfigError(
      f"--num_processes: process {bad[0]} was started with {views[bad[0]]} but process 0 (the coordinator at "
      f"{coordinator_address}) with {views[0]}; give every process the same --num_processes"
    )


def _warm_up() -> None:
  """Runs one collective over all devices while the processes are still in step.

  The CPU (gloo) runtime connects the processes of a device group on the group's first collective and
  gives up when they arrive more than 30 s apart; later collectives reuse the connection. Connecting
  here, right after the coordinator's own barrier, keeps uneven compile times of the first train step
  (one process hitting the compilation cache, another compiling) from failing the run.
  """
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.asarray(jax.devices()), ("all",))
  ones = np.ones((jax.local_device_count(),), np.int32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("all")), ones)
  total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
  if int(total) != jax.device_count():
    raise ConfigError(f"distributed: a sum over all devices gave {int(total)}, expected {jax.device_count()}")
  multihost_utils.sync_global_devices("gpt_jax_distributed_initialize")  # the one-device-per-process groups


def _exit_with(message: str) -> None:
  print(f"gpt_jax: error: {message}", file=sys.stderr, flush=True)
  os._exit(2)  # the main thread is blocked inside the runtime's connect: nothing else can end it


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def exchange(tag: str, value: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> dict[int, str]:
  """Publishes `value` under `tag` and returns {process index: value} from every process of the job.

  Uses the coordinator's key-value store (no devices involved), so it works before any mesh exists
  and fails with ConfigError after timeout_s instead of hanging. Single-process: {0: value}.
  """
  if not is_initialized():
    return {0: value}
  from jax._src import distributed as jax_distributed

  state = jax_distributed.global_state
  client, me = state.client, state.process_id
  # Keys cannot be rewritten: number every exchange (all processes make the same calls in the same order).
  _state["exchanges"] += 1
  key = f"gpt_jax/{tag}#{_state['exchanges']}"

  def get(name: str, who: int) -> str:
    try:
      return client.blocking_key_value_get(name, int(timeout_s) * 1000)
    except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
      raise ConfigError(
        f"process {me}: process {who} did not report {tag!r} within {timeout_s}s ({_first_line(e)})"
      ) from None

  if _state.get("job_size") is None:
    # The job's size is process 0's count (the coordinator was started with it), not this process's.
    if me == 0:
      client.key_value_set("gpt_jax/job_size", str(state.num_processes))
    _state["job_size"] = int(get("gpt_jax/job_size", 0))
  client.key_value_set(f"{key}/{me}", value)
  return {p: get(f"{key}/{p}", p) for p in range(_state["job_size"])}


def check_same_config(cfg_dict: dict, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """ConfigError on every process unless all processes were given the same config (compared by hash)."""
  digest = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
  views = exchange("config_sha256", digest, timeout_s=timeout_s)
  differ = sorted(p for p, d in views.items() if d != views[0])
  if differ:
    raise ConfigError(
      f"--config: process {differ[0]} was given a different config than process 0 "
      f"(sha256 {views[differ[0]]} vs {views[0]}); every process must get the same flags"
    )


def is_main() -> bool:
  """True on the process that writes logs, metrics and other single-copy files (process 0)."""
  return jax.process_index() == 0


def describe() -> str:
  """Returns e.g. 'process 1/2 on host-a: 4 local of 8 global devices (cpu)'."""
  import socket

  return (
    f"process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: "
    f"{jax.local_device_count()} local of {jax.device_count()} global devices ({jax.default_backend()})"
  )


def check_train(cfg) -> None:
  """Checks that cfg's batch and mesh fit this job's processes and devices (one-line ConfigError).

  Every process runs the same check on the same config, so all of them fail together, before any
  compile or collective that would otherwise wait for the failed ones.
  """
  t = cfg.train
  n_proc = jax.process_count()
  sizes = {a: int(cfg.mesh[a]) for a in ("data", "fsdp", "tensor")}
  n_dev = jax.device_count()
  fixed = 1
  for s in sizes.values():
    fixed *= s if s != -1 else 1
  if (-1 not in sizes.values() and fixed != n_dev) or (-1 in sizes.values() and n_dev % fixed):
    raise ConfigError(
      f"mesh: data*fsdp*tensor = {sizes} must cover all {n_dev} global devices "
      f"({n_proc} processes x {jax.local_device_count()} local); set one axis to -1 or multiply the sizes to {n_dev}"
    )
  if int(t.global_batch) % n_proc:
    raise ConfigError(
      f"train.global_batch: {t.global_batch} is not divisible by the {n_proc} processes "
      "(each process loads an equal share of every batch)"
    )
  micro = int(t.global_batch) // max(int(t.grad_accum), 1)
  if micro % n_proc:
    raise ConfigError(
      f"train.grad_accum: microbatches of {micro} rows (train.global_batch={t.global_batch} / "
      f"{t.grad_accum}) are not divisible by the {n_proc} processes"
    )


def add_flags(parser) -> None:
  """Adds --coordinator_address, --num_processes, --process_id, --init_timeout_s to an argparse parser."""
  g = parser.add_argument_group("multi-process (optional; auto-detected on Cloud TPU, SLURM, Open MPI)")
  g.add_argument(
    "--coordinator_address", default=None, help="HOST:PORT of process 0 [GPT_JAX_COORDINATOR_ADDRESS]"
  )
  g.add_argument(
    "--num_processes", type=int, default=None, help="processes in the job [GPT_JAX_NUM_PROCESSES]"
  )
  g.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1 [GPT_JAX_PROCESS_ID]")
  g.add_argument(
    "--init_timeout_s",
    type=int,
    default=None,
    help=f"wait for all processes [{ENV_TIMEOUT}, {DEFAULT_TIMEOUT_S}]",
  )


def initialize_from_args(args) -> bool:
  """`initialize` with the flags of `add_flags` (missing attributes count as not given); returns its result."""
  return initialize(
    getattr(args, "coordinator_address", None),
    getattr(args, "num_processes", None),
    getattr(args, "process_id", None),
    timeout_s=getattr(args, "init_timeout_s", None),
  )


def main_only(fn):
  """Returns fn on process 0 and a no-op elsewhere: log functions print once per job, not per process."""
  return fn if jax.process_index() == 0 else (lambda *a, **k: None)


def main_first(fn, *, what: str, timeout_s: int = 24 * 3600):
  """Returns fn(), run by process 0 first and by the other processes only after it succeeded.

  For work that writes shared files once (tokenizer training, tokenizing to shards): process 0 does
  it, the others then find the files and only verify them. When fn fails on process 0 the others
  raise GptJaxError with its message instead of waiting; single-process: just fn().
  """
  if not is_initialized():
    return fn()
  from jax._src import distributed as jax_distributed

  from gpt_jax.errors import GptJaxError

  _state["exchanges"] += 1
  key = f"gpt_jax/{what}#{_state['exchanges']}/process_0"
  client = jax_distributed.global_state.client
  if jax_distributed.global_state.process_id == 0:
    try:
      out = fn()
    except BaseException as e:
      client.key_value_set(key, f"{type(e).__name__}: {_first_line(e)}")
      raise
    client.key_value_set(key, "")
    return out
  try:
    status = client.blocking_key_value_get(key, int(timeout_s) * 1000)
  except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
    raise GptJaxError(f"{what}: process 0 did not finish within {timeout_s}s ({_first_line(e)})") from None
  if status:
    raise GptJaxError(f"{what} failed on process 0: {status}")
  return fn()


def barrier(name: str) -> None:
  """Waits until every process of the job reached this point (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """A pytree of (possibly multi-host) global arrays as numpy arrays, the same on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)
