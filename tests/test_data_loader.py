"""Loader: schema and sharding, exact resume, determinism, mixture shares, per-host rows."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt_jax.data import make_loader, prepare
from gpt_jax.data.mixture import CYCLE_ROWS, Schedule, WindowOrder, rows_per_cycle
from gpt_jax.data.synthetic import tiny_data_config
from gpt_jax.errors import DataError

B, T = 16, 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("loader")
  cfg = tiny_data_config(str(root / "corpus"))
  return prepare(cfg, str(root / "wd"), token_budget=100_000, tokens_per_batch=B * T, log=lambda *_: None)


@pytest.fixture(scope="module")
def sharding():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def take(loader, n):
  return [host(next(loader)) for _ in range(n)]


def test_batch_schema_and_sharding(prepared, sharding):
  loader = make_loader(prepared, "train", global_batch=B, seq_len=T, sharding=sharding, seed=0)
  batch = next(loader)
  loader.close()
  assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
  for k, v in batch.items():
    assert v.shape == (B, T) and v.sharding == sharding, k
  assert batch["loss_mask"].dtype == np.float32 and batch["inputs"].dtype == np.int32
  b = host(batch)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  many = [loader.host_batch(k) for k in range(12)]
  b = {k: np.concatenate([m[k] for m in many]) for k in b}
  eot = prepared.tokenizer.eos_id
  # after each eot a new document starts: position 0, next segment
  r, t = np.nonzero(b["inputs"][:, :-1] == eot)
  assert len(r) > 0
  assert (b["positions"][r, t + 1] == 0).all() and (
    b["segment_ids"][r, t + 1] == b["segment_ids"][r, t] + 1
  ).all()


def test_rows_are_windows_of_the_source_streams(prepared, sharding):
  loader = make_loader(prepared, "train", global_batch=B, seq_len=T, sharding=sharding, seed=3, prefetch=0)
  w = loader.windows(5)
  streams = [np.concatenate([np.asarray(m) for m in s.maps]) for s in loader.streams]
  src, occ = loader.schedule.rows(np.arange(5 * B, 6 * B))
  for row, (s, o) in enumerate(zip(src, occ)):
    start = int(loader.orders[s].starts(np.array([o]))[0])
    assert start % T == 0
    np.testing.assert_array_equal(w[row], streams[s][start : start + T + 1])


def test_resume_continues_exactly(prepared, sharding):
  kw = dict(global_batch=B, seq_len=T, sharding=sharding, seed=7)
  full = take(make_loader(prepared, "train", **kw), 12)
  first = make_loader(prepared, "train", **kw)
  take(first, 5)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"index": 5}
  first.close()
  resumed = make_loader(prepared, "train", **kw)
  resumed.set_state(state)
  after = take(resumed, 7)
  for a, b in zip(full[5:], after):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  resumed.set_state({"index": 2})  # rewinding a running loader restarts its prefetch
  np.testing.assert_array_equal(host(next(resumed))["inputs"], full[2]["inputs"])
  resumed.close()


def test_seeds_differ_and_eval_is_fixed(prepared, sharding):
  kw = dict(global_batch=B, seq_len=T, sharding=sharding)
  a = take(make_loader(prepared, "train", seed=0, **kw), 2)
  b = take(make_loader(prepared, "train", seed=1, **kw), 2)
  assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])
  e0 = make_loader(prepared, "eval", seed=0, **kw)
  first_pass = take(e0, 3)
  e0.set_state({"index": 0})
  second_pass = take(e0, 3)
  other_seed = take(make_loader(prepared, "eval", seed=9, **kw), 3)
  for x, y, z in zip(first_pass, second_pass, other_seed):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["inputs"], z["inputs"])


def test_each_host_reads_only_its_rows(prepared, sharding):
  loader = make_loader(prepared, "train", global_batch=B, seq_len=T, sharding=sharding, seed=0, prefetch=0)
  full = loader.windows(3)
  assert (loader.r0, loader.r1) == (0, B)
  loader.r0, loader.r1 = 4, 8  # what process 1 of 4 would hold
  np.testing.assert_array_equal(loader.windows(3), full[4:8])


def test_document_mask_off(prepared, sharding):
  loader = make_loader(
    prepared, "train", global_batch=B, seq_len=T, sharding=sharding, seed=0, document_mask=False
  )
  b = host(next(loader))
  loader.close()
  assert (b["segment_ids"] == 1).all() and (b["positions"] == np.arange(T)).all()


def test_eval_split_too_small(prepared, sharding):
  with pytest.raises(
    DataError, match=r"source '.*': its eval split has \d+ tokens, fewer than seq_len \+ 1 = 8193"
  ):
    make_loader(prepared, "eval", global_batch=8, seq_len=8192, sharding=sharding, seed=0)


def test_schedule_shares_are_exact_and_pure():
  names, weights = ["a", "b", "c"], [67.0, 4.5, 2.5]
  counts = rows_per_cycle(names, weights)
  assert counts.sum() == CYCLE_ROWS
  np.testing.assert_allclose(counts / CYCLE_ROWS, np.array(weights) / sum(weights), atol=1 / CYCLE_ROWS)
  sched = Schedule(names, weights, seed=1)
  g = np.arange(3 * CYCLE_ROWS)
  src, occ = sched.rows(g)
  for s in range(3):
    assert (np.bincount(src[:CYCLE_ROWS], minlength=3) == counts).all()
    np.testing.assert_array_equal(occ[src == s], np.arange((src == s).sum()))  # 0, 1, 2, ... per source
  src2, occ2 = Schedule(names, weights, seed=1).rows(g[::-1][:1000])  # any order, any chunk: same answer
  np.testing.assert_array_equal(src2, src[::-1][:1000])
  np.testing.assert_array_equal(occ2, occ[::-1][:1000])
  with pytest.raises(DataError, match=r"source 'c': weight 0.0001 is below 1/8192"):
    rows_per_cycle(names, [1.0, 1.0, 1e-4])


def test_window_order_visits_each_window_once_per_epoch():
  order = WindowOrder("x", n_windows=50, stride=8, seed=0)
  starts = order.starts(np.arange(100))
  assert sorted(starts[:50]) == list(range(0, 400, 8)) and sorted(starts[50:]) == list(range(0, 400, 8))
  assert not np.array_equal(starts[:50], starts[50:])


def test_dropped_loader_stops_its_thread(prepared, sharding):
  import gc
  import threading

  def alive() -> set:
    return {t for t in threading.enumerate() if t.name == "gpt_jax-loader" and t.is_alive()}

  before = alive()  # loaders of other tests, some perhaps ending meanwhile
  loader = make_loader(prepared, "eval", global_batch=B, seq_len=T, sharding=sharding, seed=0)
  next(loader)
  (thread,) = alive() - before
  del loader  # no close(): an eval pass that just stops iterating
  gc.collect()
  thread.join(timeout=120)  # it polls its stop flag every 0.1 s: a wait for an event, not a verdict
  assert not thread.is_alive()
