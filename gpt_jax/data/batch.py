"""The one batch schema every stage feeds to the model.

Legend: B batch rows, T time (sequence length).

  inputs       int32   (B, T)  token ids fed to the model
  targets      int32   (B, T)  next-token ids the loss predicts
  positions    int32   (B, T)  position of each token inside its document (resets at each packed document)
  segment_ids  int32   (B, T)  document number inside the row, 1, 2, ...; 0 marks padding.
                               Tokens attend only to earlier tokens of the same segment.
  loss_mask    float32 (B, T)  1 where the label counts in the loss, 0 elsewhere (padding, prompts)

Comparison batches (reward modeling) and rollout batches (PPO) add their own keys beside these.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from gpt_jax.errors import DataError

KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
DTYPES = {
  "inputs": np.int32,
  "targets": np.int32,
  "positions": np.int32,
  "segment_ids": np.int32,
  "loss_mask": np.float32,
}


def from_windows(windows_BT1: np.ndarray, eot_id: int, document_mask: bool = True) -> dict[str, np.ndarray]:
  """Turns (B, T+1) windows of a token stream into a batch.

  Documents are separated by `eot_id`. With document_mask, each document (the eot token closes the
  document it ends) gets its own segment id and positions restart at 0 after every eot, so packed
  documents never attend to each other; without it the whole row is one segment (nanoGPT style).
  """
  w = np.asarray(windows_BT1)
  inputs = w[:, :-1].astype(np.int32)
  targets = w[:, 1:].astype(np.int32)
  B, T = inputs.shape
  if document_mask:
    is_eot = inputs == eot_id
    # A new segment starts on the token after each eot.
    starts = np.zeros_like(is_eot)
    starts[:, 1:] = is_eot[:, :-1]
    segment_ids = (np.cumsum(starts, axis=1) + 1).astype(np.int32)
    idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    start_idx = np.where(starts, idx, 0)
    start_idx = np.maximum.accumulate(start_idx, axis=1)
    positions = (idx - start_idx).astype(np.int32)
  else:
    segment_ids = np.ones((B, T), np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
  return {
    "inputs": inputs,
    "targets": targets,
    "positions": positions,
    "segment_ids": segment_ids,
    "loss_mask": np.ones((B, T), np.float32),
  }


def to_global(host: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """A whole global batch in numpy, built alike on every process -> global jax.Arrays. `sharding` is a
  Sharding or a function ndim -> Sharding; each process hands over only the slices its devices hold."""
  shard: Callable = sharding if callable(sharding) else (lambda ndim: sharding)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, shard(v.ndim)) for k, v in host.items()}
  return {
    k: jax.make_array_from_callback(v.shape, shard(v.ndim), lambda i, v=v: v[i]) for k, v in host.items()
  }


class EpochIndexLoader:
  """What the in-memory loaders (SFT conversations, comparisons) share: the position is {"epoch",
  "index"}, host_batch() builds the next global batch (the same on every process: building it costs far
  less than a step) and advances the position, and iteration puts it on the devices under `sharding`."""

  name = "loader"  # in error messages
  sharding = None
  _epoch = _index = 0

  def host_batch(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return to_global(self.host_batch(), self.sharding)

  def get_state(self) -> dict:
    """{"epoch", "index"}: where the next batch starts (see the loader's docstring)."""
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def set_state(self, state: dict) -> None:
    try:
      epoch, index = int(state["epoch"]), int(state["index"])
    except (KeyError, TypeError, ValueError):
      raise DataError(f"{self.name} state {state!r}: expected {{'epoch': int, 'index': int}}") from None
    if epoch < 0 or index < 0:
      raise DataError(f"{self.name} state {state!r}: epoch and index must be >= 0")
    self._epoch, self._index = epoch, index

  def close(self) -> None:
    """Nothing to stop (no background thread)."""
