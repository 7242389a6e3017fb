"""Weighted, seeded mixture of sources, and the table of token shares and epochs.

The mixture is drawn at the level of training rows: every row of every batch is a window of
seq_len + 1 tokens cut from one source's token stream (its documents joined by the end-of-text id),
and the source of each row is drawn by weight. Rows come in cycles of CYCLE_ROWS; each cycle holds
exactly round(weight * CYCLE_ROWS) rows of each source, in an order shuffled by (seed, cycle). So
the token share of each source equals its weight whatever its documents' lengths, and the source
of global row g, and how many rows of that source came before it, are a pure function of
(seed, g): no state beyond the batch index is needed to resume exactly.

Within a source, epoch e visits every window start (multiples of seq_len) once, in an order
shuffled by (seed, source name, e); a source smaller than its share of the budget is repeated,
which is what the LLaMA table's "epochs" column counts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from gpt_jax.errors import DataError

CYCLE_ROWS = 8192


def rows_per_cycle(
  names: Sequence[str], weights: Sequence[float], cycle_rows: int = CYCLE_ROWS
) -> np.ndarray:
  """Returns int64 (S,): rows of each source per cycle, summing to cycle_rows (largest remainder)."""
  w = np.asarray(weights, np.float64)
  exact = w / w.sum() * cycle_rows
  counts = np.floor(exact).astype(np.int64)
  rest = cycle_rows - int(counts.sum())
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[:rest]] += 1
  for name, c, wi in zip(names, counts, w):
    if c == 0:
      raise DataError(
        f"source {name!r}: weight {wi:g} is below 1/{cycle_rows} of the total weight; raise it or drop the source"
      )
  return counts


class Schedule:
  """Which source each global row reads, and its occurrence number within that source."""

  def __init__(self, names: Sequence[str], weights: Sequence[float], seed: int, cycle_rows: int = CYCLE_ROWS):
    self.counts = rows_per_cycle(names, weights, cycle_rows)
    self.seed = int(seed)
    self.cycle_rows = int(cycle_rows)
    self._base = np.repeat(np.arange(len(self.counts)), self.counts)
    self._starts = np.cumsum(self.counts) - self.counts
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _cycle(self, c: int) -> tuple[np.ndarray, np.ndarray]:
    if c not in self._cache:
      if len(self._cache) > 4:
        self._cache.pop(next(iter(self._cache)))
      src = np.random.default_rng([self.seed, c]).permutation(self._base)
      order = np.argsort(src, kind="stable")
      occ = np.empty(self.cycle_rows, np.int64)
      occ[order] = np.arange(self.cycle_rows) - self._starts[src[order]]
      self._cache[c] = (src, occ)
    return self._cache[c]

  def rows(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For global row numbers g (N,), returns (source index (N,), occurrence (N,)): the row is the
    occurrence-th row drawn from that source since row 0."""
    g = np.asarray(g, np.int64)
    cyc, pos = np.divmod(g, self.cycle_rows)
    src = np.empty_like(g)
    occ = np.empty_like(g)
    for c in np.unique(cyc):
      sel = cyc == c
      s, o = self._cycle(int(c))
      src[sel] = s[pos[sel]]
      occ[sel] = o[pos[sel]] + int(c) * self.counts[s[pos[sel]]]
    return src, occ


class WindowOrder:
  """Start offsets of a source's windows: epoch-wise seeded permutations (or in order, shuffle=False)."""

  def __init__(self, name: str, n_windows: int, stride: int, seed: int, shuffle: bool = True):
    self.n = int(n_windows)
    self.stride = int(stride)
    self.shuffle = shuffle
    self._key = [int(seed), zlib.crc32(name.encode())]
    self._perms: dict[int, np.ndarray] = {}

  def starts(self, occ: np.ndarray) -> np.ndarray:
    """Returns int64 token offsets of the windows for occurrence numbers occ (N,)."""
    epoch, w = np.divmod(np.asarray(occ, np.int64), self.n)
    if not self.shuffle:
      return w * self.stride
    out = np.empty_like(w)
    for e in np.unique(epoch):
      e = int(e)
      if e not in self._perms:
        if len(self._perms) > 1:
          self._perms.pop(next(iter(self._perms)))
        self._perms[e] = np.random.default_rng([*self._key, e]).permutation(self.n)
      sel = epoch == e
      out[sel] = self._perms[e][w[sel]]
    return out * self.stride


def mixture_table(names, weights, stats: dict, token_budget: int) -> list[dict]:
  """Returns one row per source: source, weight (normalized), documents, tokens, bytes (train
  split), share (of the training tokens) and epochs (passes over the source the budget implies)."""
  w = np.asarray(weights, np.float64)
  w = w / w.sum()
  rows = []
  for name, wi in zip(names, w):
    st = stats[name]
    share = float(wi)
    rows.append(
      {
        "source": name,
        "weight": share,
        "documents": int(st["documents"]),
        "tokens": int(st["tokens"]),
        "bytes": int(st["bytes"]),
        "share": share,
        "epochs": share * token_budget / max(int(st["tokens"]), 1),
      }
    )
  return rows


def format_table(rows: list[dict]) -> str:
  """Returns the mixture table as aligned text (the LLaMA paper's columns)."""
  lines = [f"{'source':<16}{'share':>8}{'epochs':>9}{'documents':>11}{'tokens':>13}{'MB':>9}"]
  for r in rows:
    lines.append(
      f"{r['source']:<16}{100 * r['share']:>7.1f}%{r['epochs']:>9.2f}{r['documents']:>11d}"
      f"{r['tokens']:>13d}{r['bytes'] / 1e6:>9.2f}"
    )
  return "\n".join(lines)
