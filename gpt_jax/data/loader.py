"""Global batches of (B, T) windows on the mesh, with an exact, checkpointable position.

Batch k is a pure function of (seed, k): global row g = k * B + r reads the window that the mixture
schedule assigns to g (see mixture.py) from the memory-mapped shards of its source. So the
loader's whole state is {"index": k}, and after set_state the batches continue exactly. Each process
computes only the rows of its addressable devices and assembles the global jax.Arrays with
jax.make_array_from_process_local_data. A background thread prepares the next `prefetch` batches.

The eval split ignores the seed: its rows follow the schedule of seed 0 and visit windows in order,
so every run and every eval pass (set_state({"index": 0})) sees the same batches.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref

import jax
import numpy as np

from gpt_jax.data import batch as batch_lib
from gpt_jax.data import mixture, shards
from gpt_jax.errors import ConfigError, DataError


class _SourceStream:
  """One source's shards as one memory-mapped token stream."""

  def __init__(self, split_dir: str, entry: dict, dtype: np.dtype, name: str):
    shards.check_shard_sizes(split_dir, entry, dtype.itemsize, name)
    self.maps = [
      np.memmap(os.path.join(split_dir, r["file"]), dtype=dtype, mode="r")
      if r["tokens"]
      else np.zeros(0, dtype)
      for r in entry["shards"]
    ]
    lengths = [len(m) for m in self.maps]
    self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    self.tokens = int(self.offsets[-1])

  def read(self, start: int, n: int) -> np.ndarray:
    """Returns tokens [start, start + n) of the stream."""
    i = int(np.searchsorted(self.offsets, start, side="right")) - 1
    local = start - int(self.offsets[i])
    if local + n <= len(self.maps[i]):
      return self.maps[i][local : local + n]
    parts, need = [], n
    while need:
      part = self.maps[i][local : local + need]
      parts.append(part)
      need -= len(part)
      i, local = i + 1, 0
    return np.concatenate(parts)


def _local_rows(sharding, global_batch: int, seq_len: int) -> tuple[int, int]:
  """Returns the contiguous block [r0, r1) of global rows this process's devices hold."""
  try:
    idx_map = sharding.addressable_devices_indices_map((global_batch, seq_len))
  except ValueError as e:
    raise ConfigError(
      f"global_batch {global_batch} does not divide over the batch sharding {sharding.spec} ({e})"
    ) from None
  rows = set()
  for idx in idx_map.values():
    r, t = (tuple(idx) + (slice(None),) * 2)[:2]
    if t.indices(seq_len) != (0, seq_len, 1):
      raise ConfigError(
        f"loader: sharding {sharding.spec} splits the sequence axis; only the batch axis may be sharded"
      )
    rows.update(range(*r.indices(global_batch)))
  r0, r1 = min(rows), max(rows) + 1
  if len(rows) != r1 - r0:
    raise ConfigError(f"loader: this process's rows under {sharding.spec} are not one contiguous block")
  return r0, r1


class Loader:
  """Iterator of batch dicts (see batch.py) of global jax.Arrays; state {"index": k}."""

  def __init__(
    self,
    prepared,
    split: str,
    *,
    global_batch: int,
    seq_len: int,
    sharding,
    seed: int,
    document_mask: bool = True,
    prefetch: int = 2,
  ):
    if split not in ("train", "eval"):
      raise DataError(f"loader: unknown split {split!r}; expected 'train' or 'eval'")
    if global_batch <= 0 or seq_len <= 0:
      raise ConfigError(f"loader: global_batch and seq_len must be positive, got {global_batch}, {seq_len}")
    man = prepared.manifest[split]
    split_dir = prepared.split_dir(split)
    dtype = np.dtype(man["dtype"])
    self.eot_id = int(man["eot_id"])
    self.B, self.T = int(global_batch), int(seq_len)
    self.sharding = sharding
    self.document_mask = bool(document_mask)
    self.prefetch = int(prefetch)
    names = [n for n, _ in prepared.sources]
    self.streams, self.orders = [], []
    for name in names:
      entry = man["sources"].get(name)
      if entry is None:
        raise DataError(f"loader: source {name!r} is not in {split_dir}/{shards.MANIFEST}; re-run prepare")
      st = _SourceStream(split_dir, entry, dtype, name)
      n_windows = (st.tokens - 1) // self.T
      if n_windows < 1:
        raise DataError(
          f"source {name!r}: its {split} split has {st.tokens} tokens, fewer than seq_len + 1 = {self.T + 1}; "
          "raise data.eval_fraction or lower seq_len"
        )
      self.streams.append(st)
      self.orders.append(mixture.WindowOrder(name, n_windows, self.T, seed, shuffle=split == "train"))
    self.schedule = mixture.Schedule(names, [w for _, w in prepared.sources], seed if split == "train" else 0)
    self.r0, self.r1 = _local_rows(sharding, self.B, self.T)
    self._index = 0
    self._thread = None
    self._queue = None
    self._stop = None

  # --- pure batch construction -------------------------------------------------------------------
  def windows(self, k: int) -> np.ndarray:
    """Returns this process's rows of batch k: int (r1 - r0, T + 1) token windows."""
    g = np.arange(self.r0, self.r1, dtype=np.int64) + int(k) * self.B
    src, occ = self.schedule.rows(g)
    out = np.empty((len(g), self.T + 1), np.int32)
    for s in np.unique(src):
      sel = np.nonzero(src == s)[0]
      starts = self.orders[s].starts(occ[sel])
      for row, start in zip(sel, starts):
        out[row] = self.streams[s].read(int(start), self.T + 1)
    return out

  def host_batch(self, k: int) -> dict[str, np.ndarray]:
    """Returns this process's rows of batch k in the batch schema (numpy)."""
    return batch_lib.from_windows(self.windows(k), self.eot_id, self.document_mask)

  def _device_batch(self, k: int) -> dict[str, jax.Array]:
    local = self.host_batch(k)
    if jax.process_count() == 1:  # local rows are the global batch: one transfer call for all keys
      return jax.device_put(local, self.sharding)
    shape = (self.B, self.T)
    return {key: jax.make_array_from_process_local_data(self.sharding, v, shape) for key, v in local.items()}

  # --- iteration with prefetch ---------------------------------------------------------------------
  @staticmethod
  def _worker(ref, start: int, q: queue.Queue, stop: threading.Event) -> None:
    # Holds the loader only through a weak reference, so a loader that is dropped without close()
    # (e.g. one eval pass) is collected and its thread ends.
    k = start
    while not stop.is_set():
      loader = ref()
      if loader is None:
        return
      try:
        item = loader._device_batch(k)
      except Exception as e:  # handed to the consumer, raised there
        item = e
      del loader
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          if ref() is None:
            return
      if isinstance(item, Exception):
        return
      k += 1

  def _start(self) -> None:
    if self.prefetch <= 0 or self._thread is not None:
      return
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self.prefetch)
    self._thread = threading.Thread(
      target=Loader._worker,
      args=(weakref.ref(self), self._index, self._queue, self._stop),
      daemon=True,
      name="gpt_jax-loader",
    )
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self.prefetch <= 0:
      item = self._device_batch(self._index)
    else:
      self._start()
      item = self._queue.get()
      if isinstance(item, Exception):
        self.close()
        raise item
    self._index += 1
    return item

  def get_state(self) -> dict:
    """Returns {"index": k}: the next batch returned is batch k."""
    return {"index": int(self._index)}

  def set_state(self, state: dict) -> None:
    """Moves to batch state["index"]; the prefetch thread restarts from there."""
    try:
      index = int(state["index"])
    except (KeyError, TypeError, ValueError):
      raise DataError(f"loader state {state!r}: expected {{'index': int}}") from None
    if index < 0:
      raise DataError(f"loader state index must be >= 0, got {index}")
    self.close()
    self._index = index

  def close(self) -> None:
    """Stops the prefetch thread (the loader can still be used; it restarts on the next batch)."""
    if self._thread is not None:
      self._stop.set()
      if self._thread is not threading.current_thread():
        self._thread.join()
      self._thread = None
      self._queue = None

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


def make_loader(
  prepared,
  split: str,
  *,
  global_batch: int,
  seq_len: int,
  sharding,
  seed: int,
  document_mask: bool = True,
  prefetch: int = 2,
) -> Loader:
  """Returns a Loader over the prepared shards of `split` ('train': endless, a pure function of
  (seed, index); 'eval': the same fixed sequence for every seed)."""
  return Loader(
    prepared,
    split,
    global_batch=global_batch,
    seq_len=seq_len,
    sharding=sharding,
    seed=seed,
    document_mask=document_mask,
    prefetch=prefetch,
  )
