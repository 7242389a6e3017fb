"""Checkpoints: orbax saves of the train state plus a JSON side item, checked for integrity on load.

Layout of a checkpoint directory (one per workdir):

  <dir>/<step>/state/              orbax PyTree of (sharded) arrays: params, opt_state, step, rng, ...
  <dir>/<step>/extra/              orbax JSON item: loader position, config, anything small
  <dir>/<step>/_INTEGRITY.json     written by us once the save has fully finished: relative path -> [size, crc32]

A step counts only when its integrity record exists and every listed file still has its size and crc32.
Orbax already finalizes a step by atomic rename; the record additionally catches a process killed between
finalization and bookkeeping, and files truncated or overwritten later (bad disks, partial copies).
Invalid steps are skipped with a one-line warning and the newest valid one is used instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gpt_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

INTEGRITY_FILE = "_INTEGRITY.json"
_STATE, _EXTRA = "state", "extra"
_CHUNK = 16 << 20


# ----------------------------------------------------------------------------- integrity records


def _crc32(path: str) -> int:
  """Returns the crc32 of a file, read in chunks (zlib's crc32 runs at GB/s, enough to verify on load)."""
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _list_files(step_dir: str) -> list[str]:
  """Returns the sorted relative paths of all files under step_dir except the integrity record."""
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != INTEGRITY_FILE and not rel.startswith(INTEGRITY_FILE):
        out.append(rel)
  return sorted(out)


def write_integrity_record(step_dir: str) -> None:
  """Writes <step_dir>/_INTEGRITY.json listing every file's size and crc32; atomic (tmp + fsync + rename)."""
  files = {
    rel: [os.path.getsize(os.path.join(step_dir, rel)), _crc32(os.path.join(step_dir, rel))]
    for rel in _list_files(step_dir)
  }
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": 1, "files": files}, f, indent=0, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))
  with contextlib.suppress(OSError):  # Directory fsync makes the rename durable; not supported everywhere.
    fd = os.open(step_dir, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def check_integrity(step_dir: str, *, hashes: bool = True) -> str | None:
  """Returns None when step_dir matches its integrity record, else a one-line reason naming the file."""
  record_path = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.isdir(step_dir):
    return "directory is missing"
  if not os.path.isfile(record_path):
    return f"no {INTEGRITY_FILE} (save never finished)"
  try:
    with open(record_path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{INTEGRITY_FILE} is unreadable ({type(e).__name__})"
  for rel, (size, crc) in sorted(files.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f"file {rel} is missing"
    actual = os.path.getsize(path)
    if actual != size:
      return f"file {rel} has {actual} bytes, expected {size}"
    if hashes and _crc32(path) != crc:
      return f"file {rel} has a wrong crc32 (corrupted bytes)"
  return None


def _stat_signature(step_dir: str) -> tuple:
  """Returns (path, size, mtime_ns) of every file: a cheap key to cache a verification result."""
  sig = []
  for rel in _list_files(step_dir) + [INTEGRITY_FILE]:
    try:
      st = os.stat(os.path.join(step_dir, rel))
      sig.append((rel, st.st_size, st.st_mtime_ns))
    except OSError:
      sig.append((rel, -1, -1))
  return tuple(sig)


# ----------------------------------------------------------------------------- tree comparison


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """Returns {'a/b/0': shape} for every array leaf of a pytree (None and empty nodes dropped)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    out["/".join(_key_name(k) for k in path)] = tuple(leaf.shape)
  return out


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _saved_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
  """Returns {'a/b/0': shape} for the arrays stored in an orbax PyTree item directory."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
  tree = meta.tree if hasattr(meta, "tree") else meta
  return _flat_shapes(tree)


def _check_same_tree(saved: dict, expected: dict, where: str) -> None:
  """Raises CheckpointError naming the first leaf whose presence or shape differs."""
  for path, shape in expected.items():
    if path not in saved:
      raise CheckpointError(
        f"{where} is of a different architecture: leaf {path} {shape} is not in the checkpoint"
      )
    if saved[path] != shape:
      raise CheckpointError(
        f"{where} is of a different architecture: leaf {path} has shape {saved[path]} in the checkpoint, expected {shape}"
      )
  for path, shape in saved.items():
    if path not in expected:
      raise CheckpointError(
        f"{where} is of a different architecture: checkpoint leaf {path} {shape} is not in the expected state"
      )


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _is_disk_full(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


# ----------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Saves and restores {state pytree, extra JSON} by step under one directory, keeping the newest `keep` valid.

  Saves are asynchronous (orbax writes in the background, a helper thread writes the integrity record once
  the write finished); `save` first finishes the previous save. Call `wait()` or `close()` before exiting.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 3,
    async_save: bool = True,
    create: bool = True,
    verify_hashes: bool = True,
  ):
    if keep < 1:
      raise ConfigError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.async_save = async_save
    self.verify_hashes = verify_hashes
    self._create = create
    self._manager: ocp.CheckpointManager | None = None
    self._pending: int | None = None
    self._pending_thread: threading.Thread | None = None
    self._pending_error: BaseException | None = None
    self._verified: dict[int, tuple] = {}  # step -> stat signature at the last successful verification
    self._warned: set[tuple[int, str]] = set()
    if create:
      os.makedirs(self.directory, exist_ok=True)

  # -- orbax manager, created lazily so that read-only uses (latest_step, read_extra) stay cheap

  @property
  def _mgr(self) -> ocp.CheckpointManager:
    if self._manager is None:
      if not os.path.isdir(self.directory):
        raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
      options = ocp.CheckpointManagerOptions(
        create=self._create,
        enable_async_checkpointing=self.async_save,
        cleanup_tmp_directories=True,  # Drops the half-written <step>.orbax-checkpoint-tmp dirs of a killed run.
      )
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()},
      )
    return self._manager

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _step_dirs(self) -> list[int]:
    """Returns all finalized step directories (valid or not), ascending."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(
      int(n) for n in os.listdir(self.directory) if n.isdigit() and os.path.isdir(self._step_dir(int(n)))
    )

  # -- validity

  def check(self, step: int) -> str | None:
    """Returns None when checkpoint `step` is complete and intact, else a one-line reason."""
    step_dir = self._step_dir(step)
    if step == self._pending:
      return "save still in progress"
    sig = _stat_signature(step_dir) if os.path.isdir(step_dir) else None
    if sig is not None and self._verified.get(step) == sig:
      return None
    reason = check_integrity(step_dir, hashes=self.verify_hashes)
    if reason is None:
      self._verified[step] = sig
    else:
      self._verified.pop(step, None)
    return reason

  def _warn_invalid(self, step: int, reason: str) -> None:
    if (step, reason) not in self._warned:
      self._warned.add((step, reason))
      log.warning("checkpoint step %d in %s is invalid and skipped: %s", step, self.directory, reason)

  def all_steps(self) -> list[int]:
    """Returns the steps of complete, valid checkpoints, ascending (invalid ones are warned about once)."""
    valid = []
    for step in self._step_dirs():
      reason = self.check(step)
      if reason is None:
        valid.append(step)
      elif step != self._pending:
        self._warn_invalid(step, reason)
    return valid

  def latest_step(self) -> int | None:
    """Returns the newest complete and valid step, or None; only verifies steps down to the first valid one."""
    for step in reversed(self._step_dirs()):
      reason = self.check(step)
      if reason is None:
        return step
      if step != self._pending:
        self._warn_invalid(step, reason)
    return None

  def _resolve(self, step: int | None) -> int:
    if step is None:
      latest = self.latest_step()
      if latest is None:
        raise CheckpointError(f"no valid checkpoint in {self.directory}")
      return latest
    reason = self.check(step)
    if reason is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is not usable: {reason}")
    return step

  # -- saving

  def save(self, step: int, state, *, extra: dict, force: bool = False) -> None:
    """Starts saving `state` (pytree of arrays) and `extra` (JSON dict) as `step`; returns once the write is queued.

    Device arrays are copied to host before this returns, so the caller may donate or overwrite them next.

    The previous save is finished (and its integrity record written) first. Saving a step that already has a
    valid checkpoint is a no-op unless force=True, which replaces it. An incomplete or corrupt directory of
    the same step is replaced. Raises CheckpointError when the write fails (e.g. disk full); older
    checkpoints are left untouched.
    """
    step = int(step)
    try:
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise CheckpointError(
        f"extra for checkpoint step {step} is not JSON-serializable: {_one_line(e)}"
      ) from None
    self.wait()
    if os.path.isdir(self._step_dir(step)):
      reason = self.check(step)
      if reason is None and not force:
        log.info("checkpoint step %d already exists in %s; not saving again", step, self.directory)
        return
      log.warning("replacing checkpoint step %d in %s (%s)", step, self.directory, reason or "force=True")
      self._delete(step)
    if jax.process_index() == 0:
      self._remove_tmp_dirs()  # Nothing is in flight now: leftovers of failed or killed saves only take space.
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)})
    try:
      # force=True: the caller decides when to save, not orbax's interval policy.
      self._mgr.save(step, args=args, force=True)
    except Exception as e:
      self._cleanup_failed(step)
      raise self._save_error(step, e) from e
    self._pending = step
    if self.async_save:
      self._pending_error = None
      self._pending_thread = threading.Thread(
        target=self._finish_in_background, args=(step,), name=f"ckpt-finish-{step}", daemon=True
      )
      self._pending_thread.start()
    else:
      self.wait()

  def _finish_in_background(self, step: int) -> None:
    # The only manager call while a save is pending: every other manager use joins this thread first.
    try:
      self._mgr.wait_until_finished()
      if jax.process_index() == 0:
        write_integrity_record(self._step_dir(step))
    except BaseException as e:  # noqa: BLE001 - re-raised as CheckpointError by wait().
      self._pending_error = e

  def wait(self) -> None:
    """Blocks until the pending save (if any) is on disk with its integrity record; then prunes old steps.

    Raises CheckpointError when that save failed; the failed step's partial files are removed.
    """
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    if self._pending_thread is not None:
      self._pending_thread.join()
      self._pending_thread = None
      error, self._pending_error = self._pending_error, None
    else:
      error = None
      try:
        self._mgr.wait_until_finished()
        if jax.process_index() == 0:
          write_integrity_record(self._step_dir(step))
      except Exception as e:
        error = e
    if error is not None:
      self._cleanup_failed(step)
      raise self._save_error(step, error) from error
    if jax.process_count() > 1:  # Other processes must not read the record before process 0 wrote it.
      ocp.multihost.sync_global_processes(f"gpt_jax_checkpoint_record_{step}")
    try:
      self._prune()
    except Exception as e:  # A failed clean-up costs disk space, not correctness: training goes on.
      log.warning("could not delete old checkpoints in %s: %s", self.directory, _one_line(e))

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    what = "disk full (No space left on device)" if _is_disk_full(e) else _one_line(e)
    latest = self.latest_step()
    return CheckpointError(
      f"saving checkpoint step {step} to {self.directory} failed: {what}; last valid checkpoint: step {latest}"
    )

  def _cleanup_failed(self, step: int) -> None:
    """Removes what a failed save of `step` left behind (never a valid checkpoint), freeing the space it took."""
    # A fresh manager next time: after a failure orbax may leave background work of the failed save behind.
    with contextlib.suppress(Exception):
      self._mgr.wait_until_finished()
    with contextlib.suppress(Exception):
      self._mgr.close()
    self._manager = None
    self._verified.pop(step, None)
    if jax.process_index() == 0:
      # Twice: when orbax fails synchronously, writes of its other items may still land a moment later.
      for _ in range(2):
        self._remove_tmp_dirs(step)
        if (
          os.path.isdir(self._step_dir(step))
          and check_integrity(self._step_dir(step), hashes=False) is not None
        ):
          shutil.rmtree(self._step_dir(step), ignore_errors=True)
        time.sleep(0.1)

  def _remove_tmp_dirs(self, step: int | None = None) -> None:
    """Removes orbax's unfinished '<step>.orbax-checkpoint-tmp*' directories (all steps when step is None)."""
    prefix = "" if step is None else f"{step}."
    for name in os.listdir(self.directory):
      if name.startswith(prefix) and ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _delete(self, step: int) -> None:
    self._verified.pop(step, None)
    self._mgr.reload()
    if step in self._mgr.all_steps():
      self._mgr.delete(step)
    elif jax.process_index() == 0:
      shutil.rmtree(self._step_dir(step), ignore_errors=True)

  def _prune(self) -> None:
    """Deletes valid checkpoints beyond the newest `keep`, and invalid ones older than the oldest kept."""
    valid = self.all_steps()
    if len(valid) <= self.keep:
      return
    oldest_kept = valid[-self.keep]
    for step in self._step_dirs():
      if step < oldest_kept:
        self._delete(step)

  # -- restoring

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """Returns (state, extra) of `step` (None: newest valid), arrays placed as abstract_state's shardings say.

    abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding for the current mesh); a checkpoint
    written on another mesh or device count is resharded on load. Raises CheckpointError when there is no
    valid checkpoint or when the stored leaves differ from abstract_state (another architecture).
    """
    self.wait()
    step = self._resolve(step)
    where = f"checkpoint step {step} in {self.directory}"
    _check_same_tree(
      _saved_shapes(os.path.join(self._step_dir(step), _STATE)), _flat_shapes(abstract_state), where
    )
    args = ocp.args.Composite(
      **{_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
    )
    try:
      restored = self._mgr.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(f"restoring {where} failed: {_one_line(e)}") from e
    return restored[_STATE], dict(restored[_EXTRA] or {})

  def read_extra(self, step: int | None = None) -> dict:
    """Returns the JSON item of `step` (None: newest valid) without touching the arrays."""
    self.wait()
    step = self._resolve(step)
    try:
      restored = self._mgr.restore(step, args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:
      raise CheckpointError(
        f"reading extra of checkpoint step {step} in {self.directory} failed: {_one_line(e)}"
      ) from e
    return dict(restored[_EXTRA] or {})

  def close(self) -> None:
    """Finishes the pending save and releases orbax's threads."""
    try:
      self.wait()
    finally:
      if self._manager is not None:
        self._manager.close()
        self._manager = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def restore_params(path: str, abstract_params, *, item: str = "params"):
  """Returns the subtree `item` ('params', or a nested 'a/b') of a checkpoint's state, placed as abstract_params.

  path: a checkpoint directory (its newest valid step is used) or one step directory. Only that subtree is
  read. Raises CheckpointError when the path does not exist, holds no valid checkpoint, or the subtree's
  leaves differ from abstract_params.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path} does not exist")
  if os.path.isdir(os.path.join(path, _STATE)):
    step_dir = path
    reason = check_integrity(step_dir)
    if reason is not None:
      raise CheckpointError(f"checkpoint {step_dir} is not usable: {reason}")
  else:
    ckpt = Checkpointer(path, create=False)
    step_dir = ckpt._step_dir(ckpt._resolve(None))
  keys = [k for k in item.split("/") if k]
  target = abstract_params
  for k in reversed(keys):
    target = {k: target}
  state_dir = os.path.join(step_dir, _STATE)
  saved = {
    p: s for p, s in _saved_shapes(state_dir).items() if p == item or p.startswith(item.rstrip("/") + "/")
  }
  if not saved:
    raise CheckpointError(f"checkpoint {step_dir} has no item {item!r} in its state")
  _check_same_tree(saved, _flat_shapes(target), f"item {item!r} of checkpoint {step_dir}")
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )
  except Exception as e:
    raise CheckpointError(f"restoring item {item!r} of checkpoint {step_dir} failed: {_one_line(e)}") from e
  for k in keys:
    restored = restored[k]
  return restored


# ----------------------------------------------------------------------------- workdir lock


class WorkdirLock:
  """Context manager holding an exclusive flock on <workdir>/.lock (with our pid inside).

  A second holder gets CheckpointError instead of two runs writing the same workdir. The kernel releases
  the lock when the process dies, even on kill -9, so a stale .lock file never blocks a restart.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, ".lock")
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
      os.close(fd)
      raise CheckpointError(
        f"workdir {self.workdir} is in use by process {holder} (lock {self.path})"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
