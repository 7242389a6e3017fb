"""The workdir of a run: the check that it can be written, and the lock that keeps a second run out.

One run per workdir: `WorkdirLock` holds an exclusive flock on <workdir>/.lock (with the holder's pid
inside). The kernel releases a flock when its process dies, even on kill -9, so a stale .lock file never
blocks a restart. In a multi-process job process 0 holds the lock and every process learns whether it
got it, so a workdir in use fails with the same CheckpointError everywhere instead of leaving the other
processes waiting in their first collective.
"""

from __future__ import annotations

import fcntl
import os

import jax

from gpt_jax import distributed
from gpt_jax.errors import CheckpointError, ConfigError

LOCK_FILE = ".lock"


def check_writable(workdir: str) -> None:
  """ConfigError unless the workdir can be created and written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir: {workdir} is not writable ({e.strerror or e})") from None


class WorkdirLock:
  """Context manager (or acquire/release) holding the job's exclusive lock on a workdir.

  Raises CheckpointError "workdir W is in use by process PID (lock W/.lock)" when another run holds it;
  flock locks are per open file, so a second WorkdirLock in the same process is refused too.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock (process 0 of a multi-process job; all processes raise when it fails); returns self."""
    if jax.process_count() == 1:
      self._lock_file()
      return self
    error = ""
    if distributed.is_main():
      try:
        self._lock_file()
      except CheckpointError as e:
        error = str(e)
    views = distributed.exchange("workdir_lock", error)
    if views[0]:
      raise CheckpointError(
        views[0] if distributed.is_main() else f"process 0 could not lock the workdir: {views[0]}"
      )
    return self

  def _lock_file(self) -> None:
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

  @property
  def held(self) -> bool:
    """True while this process holds the flock (process 0 of a multi-process job, after acquire)."""
    return self._fd is not None

  def release(self) -> None:
    """Releases the flock if this process holds it (idempotent)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
