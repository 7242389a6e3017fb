"""Checkpoints: orbax saves of the train state plus a JSON side item, checked for integrity on load.

  <dir>/<step>/state/            orbax PyTree of (sharded) arrays: params, opt_state, step, rng, ...
  <dir>/<step>/extra/            orbax JSON item: loader position, config, anything small
  <dir>/<step>/_INTEGRITY.json   size and crc32 of every file, written once the save fully finished

Orbax finalizes a step by atomic rename; the integrity record (gpt_jax.integrity) also catches a process
killed between finalization and bookkeeping, and files truncated or overwritten later (bad disks, partial
copies). A step without an intact record is skipped with a one-line warning; the newest valid one is used.
With trust_commit, a step without a record whose orbax commit marker (commit_success.txt, written just
before orbax's final rename) is present is accepted and its record written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gpt_jax import integrity
from gpt_jax.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

_STATE, _EXTRA = "state", "extra"
COMMIT_MARKER = "commit_success.txt"  # orbax's: the step's files were all written before its final rename


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """Returns {'a/b/0': shape} for every array leaf of a pytree (None and empty nodes dropped)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
    for path, leaf in leaves
    if leaf is not None and hasattr(leaf, "shape")
  }


def saved_shapes(step_dir: str) -> dict[str, tuple[int, ...]]:
  """Returns {'a/b/0': shape} for the arrays of a step directory's state, read from its metadata only."""
  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, _STATE)))
  tree = meta.tree if hasattr(meta, "tree") else meta
  return _flat_shapes(tree)


def _check_same_tree(saved: dict, expected: dict, where: str) -> None:
  """Raises CheckpointError naming the first leaf whose presence or shape differs (both as _flat_shapes gives them)."""
  why = f"{where} is of a different architecture"
  for path, shape in expected.items():
    if path not in saved:
      raise CheckpointError(f"{why}: leaf {path} {shape} is not in the checkpoint")
    if saved[path] != shape:
      raise CheckpointError(f"{why}: leaf {path} has shape {saved[path]} in the checkpoint, expected {shape}")
  for path, shape in saved.items():
    if path not in expected:
      raise CheckpointError(f"{why}: checkpoint leaf {path} {shape} is not in the expected state")


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _is_disk_full(e: BaseException) -> bool:
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


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
    trust_commit: bool = False,
  ):
    if keep < 1:
      raise ConfigError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.async_save = async_save
    self._create = create
    self._manager: ocp.CheckpointManager | None = None
    self._pending: int | None = None
    self._pending_thread: threading.Thread | None = None
    self._pending_error: BaseException | None = None
    self._integrity = integrity.Cache(hashes=verify_hashes)
    self._warned: set[tuple[int, str]] = set()
    self.trust_commit = trust_commit
    if create:
      os.makedirs(self.directory, exist_ok=True)

  @property
  def _mgr(self) -> ocp.CheckpointManager:
    # Created on first use, so that read-only uses (latest_step, all_steps) stay cheap.
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

  def step_dir(self, step: int) -> str:
    """Returns the path of step `step`'s directory (whether or not it exists)."""
    return os.path.join(self.directory, str(step))

  def step_dirs(self) -> list[int]:
    """Returns the steps of all finalized step directories (valid or not), ascending."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(
      int(n) for n in os.listdir(self.directory) if n.isdigit() and os.path.isdir(self.step_dir(int(n)))
    )

  def committed(self, step: int) -> bool:
    """True when orbax's commit marker of step `step` is present (all its files were written)."""
    return os.path.isfile(os.path.join(self.step_dir(step), COMMIT_MARKER))

  def check(self, step: int) -> str | None:
    """Returns None when checkpoint `step` is complete and intact, else a one-line reason."""
    if step == self._pending:
      return "save still in progress"
    reason = self._integrity.check(self.step_dir(step))
    if reason == integrity.NO_RECORD and self.trust_commit and self.committed(step):
      log.warning(
        "checkpoint step %d in %s has no integrity record; accepted on orbax's commit marker "
        "(train.trust_orbax_commit) and its record written now",
        step,
        self.directory,
      )
      if jax.process_index() == 0:
        integrity.write_record(self.step_dir(step))
      return None
    return reason

  def _valid(self, steps):
    """Yields the valid ones of `steps`, in order; warns once about each invalid one (a pending save aside)."""
    for step in steps:
      reason = self.check(step)
      if reason is None:
        yield step
      elif step != self._pending and (step, reason) not in self._warned:
        self._warned.add((step, reason))
        log.warning("checkpoint step %d in %s is invalid and skipped: %s", step, self.directory, reason)

  def all_steps(self) -> list[int]:
    """Returns the steps of complete, valid checkpoints, ascending (invalid ones are warned about once)."""
    return list(self._valid(self.step_dirs()))

  def latest_step(self) -> int | None:
    """Returns the newest complete and valid step, or None; only verifies steps down to the first valid one."""
    return next(self._valid(reversed(self.step_dirs())), None)

  def resolve(self, step: int | None) -> int:
    """Returns `step` when it is a valid checkpoint, the newest valid one when step is None.

    Raises CheckpointError naming the reason otherwise (no valid checkpoint, or why `step` is unusable).
    """
    if step is None:
      latest = self.latest_step()
      if latest is None:
        raise CheckpointError(f"no valid checkpoint in {self.directory}")
      return latest
    reason = self.check(step)
    if reason is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is not usable: {reason}")
    return step

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
    if os.path.isdir(self.step_dir(step)):
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
      raise self._failed(step, e) from e
    self._pending = step
    if self.async_save:
      self._pending_error = None
      self._pending_thread = threading.Thread(
        target=self._finish_in_background, args=(step,), name=f"ckpt-finish-{step}", daemon=True
      )
      self._pending_thread.start()
    else:
      self.wait()

  def _finish(self, step: int) -> None:
    """Waits until orbax's write of `step` is finalized, then writes its integrity record (process 0)."""
    self._mgr.wait_until_finished()
    if jax.process_index() == 0:
      integrity.write_record(self.step_dir(step))

  def _finish_in_background(self, step: int) -> None:
    # The only manager call while a save is pending: every other manager use joins this thread first.
    try:
      self._finish(step)
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
        self._finish(step)
      except Exception as e:
        error = e
    if error is not None:
      raise self._failed(step, error) from error
    if jax.process_count() > 1:  # Other processes must not read the record before process 0 wrote it.
      ocp.multihost.sync_global_processes(f"gpt_jax_checkpoint_record_{step}")
    try:
      self._prune()
    except Exception as e:  # A failed clean-up costs disk space, not correctness: training goes on.
      log.warning("could not delete old checkpoints in %s: %s", self.directory, _one_line(e))

  def _failed(self, step: int, e: BaseException) -> CheckpointError:
    """Removes what the failed save of `step` left behind (never a valid checkpoint), freeing the space it
    took; returns the error to raise, naming the cause and the newest valid checkpoint."""
    # A fresh manager next time: after a failure orbax may leave background work of the failed save behind.
    with contextlib.suppress(Exception):
      self._mgr.wait_until_finished()
    with contextlib.suppress(Exception):
      self._mgr.close()
    self._manager = None
    self._integrity.forget(self.step_dir(step))
    if jax.process_index() == 0:
      # Twice: when orbax fails synchronously, writes of its other items may still land a moment later.
      for _ in range(2):
        self._remove_tmp_dirs(step)
        if (
          os.path.isdir(self.step_dir(step))
          and integrity.check(self.step_dir(step), hashes=False) is not None
        ):
          shutil.rmtree(self.step_dir(step), ignore_errors=True)
        time.sleep(0.1)
    what = "disk full (No space left on device)" if _is_disk_full(e) else _one_line(e)
    return CheckpointError(
      f"saving checkpoint step {step} to {self.directory} failed: {what}; "
      f"last valid checkpoint: step {self.latest_step()}"
    )

  def _remove_tmp_dirs(self, step: int | None = None) -> None:
    """Removes orbax's unfinished '<step>.orbax-checkpoint-tmp*' directories (all steps when step is None)."""
    prefix = "" if step is None else f"{step}."
    for name in os.listdir(self.directory):
      if name.startswith(prefix) and ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _delete(self, step: int) -> None:
    self._integrity.forget(self.step_dir(step))
    self._mgr.reload()
    if step in self._mgr.all_steps():
      self._mgr.delete(step)
    elif jax.process_index() == 0:
      shutil.rmtree(self.step_dir(step), ignore_errors=True)

  def _prune(self) -> None:
    """Deletes valid checkpoints beyond the newest `keep`, and invalid ones older than the oldest kept."""
    valid = self.all_steps()
    if len(valid) <= self.keep:
      return
    oldest_kept = valid[-self.keep]
    for step in self.step_dirs():
      if step < oldest_kept:
        self._delete(step)

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """Returns (state, extra) of `step` (None: newest valid), arrays placed as abstract_state's shardings say.

    abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding for the current mesh); a checkpoint
    written on another mesh or device count is resharded on load. Raises CheckpointError when there is no
    valid checkpoint or when the stored leaves differ from abstract_state (another architecture).
    """
    self.wait()
    step = self.resolve(step)
    where = f"checkpoint step {step} in {self.directory}"
    _check_same_tree(saved_shapes(self.step_dir(step)), _flat_shapes(abstract_state), where)
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
    return read_extra(self.step_dir(self.resolve(step)))

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


def read_extra(step_dir: str) -> dict:
  """The JSON item of one (already checked) step directory, read by orbax's handler alone: no
  CheckpointManager, which would clean the directory's unfinished saves (another run's, maybe)."""
  try:
    extra = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / _EXTRA)
  except Exception as e:
    raise CheckpointError(f"reading the extra of checkpoint {step_dir} failed: {_one_line(e)}") from e
  if not isinstance(extra, dict):
    raise CheckpointError(f"the extra of checkpoint {step_dir} is not a JSON object")
  return extra


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
    reason = integrity.check(step_dir)
    if reason is not None:
      raise CheckpointError(f"checkpoint {step_dir} is not usable: {reason}")
  else:
    ckpt = Checkpointer(path, create=False)
    step_dir = ckpt.step_dir(ckpt.resolve(None))
  keys = [k for k in item.split("/") if k]
  target = abstract_params
  for k in reversed(keys):
    target = {k: target}
  saved = {
    p: s for p, s in saved_shapes(step_dir).items() if p == item or p.startswith(item.rstrip("/") + "/")
  }
  if not saved:
    raise CheckpointError(f"checkpoint {step_dir} has no item {item!r} in its state")
  _check_same_tree(saved, _flat_shapes(target), f"item {item!r} of checkpoint {step_dir}")
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(step_dir, _STATE),
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
  except Exception as e:
    raise CheckpointError(f"restoring item {item!r} of checkpoint {step_dir} failed: {_one_line(e)}") from e
  for k in keys:
    restored = restored[k]
  return restored
