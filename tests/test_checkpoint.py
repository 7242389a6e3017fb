"""Checkpointer: roundtrip, resharding, keep-N, integrity fallbacks, disk full, architecture mismatch;
the workdir lock."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import integrity
from gpt_jax.checkpoint import Checkpointer, restore_params
from gpt_jax.errors import CheckpointError
from gpt_jax.integrity import RECORD_FILE
from gpt_jax.workdir import WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(n: int, shape=None, names=("fsdp",)) -> Mesh:
  devices = np.array(jax.devices()[:n])
  return Mesh(devices.reshape(shape or (n,)), names)


def _specs(mesh: Mesh):
  """Per-leaf PartitionSpecs: weights split along the mesh, small leaves replicated."""
  axes = mesh.axis_names
  w_spec = P(axes[0], axes[1]) if len(axes) == 2 else P(axes[0])
  return {"params": {"w": w_spec, "b": P()}, "step": P(), "rng": P()}


def _make_state(mesh: Mesh, step: int = 7):
  """A small train state: sharded f32 weight, bf16 bias, AdamW state, int step, uint32 key data."""
  specs = _specs(mesh)
  w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) * (step + 1) / 7.0
  params = {
    "w": jax.device_put(w, NamedSharding(mesh, specs["params"]["w"])),
    "b": jax.device_put(jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16), NamedSharding(mesh, P())),
  }
  tx = optax.adamw(1e-3)
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)  # Non-zero moments.
  rng = jax.random.key_data(jax.random.key(step))
  return {"params": params, "opt_state": opt_state, "step": np.int32(step), "rng": rng}


def _abstract(state, mesh: Mesh):
  """ShapeDtypeStructs of `state` carrying shardings on `mesh` (weights split as _specs says)."""
  w_spec = _specs(mesh)["params"]["w"]

  def one(path, x):
    spec = w_spec if jax.tree_util.keystr(path).endswith("['w']") else P()
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(one, state)


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _biggest_file(step_dir: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.fixture
def mesh8():
  return _mesh(8)


def test_roundtrip_is_bitwise_and_keeps_shardings(tmp_path, mesh8):
  state = _make_state(mesh8)
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(7, state, extra={"loader": {"position": 123}, "config": {"lr": 1e-3}})
    ckpt.wait()
    assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
    restored, extra = ckpt.restore(None, _abstract(state, mesh8))
  _assert_tree_equal(restored, state)
  assert extra == {"loader": {"position": 123}, "config": {"lr": 1e-3}}
  assert restored["params"]["w"].sharding == state["params"]["w"].sharding
  record = json.loads((tmp_path / "ckpt" / "7" / RECORD_FILE).read_text())
  assert any(name.startswith("state/") for name in record["files"])


@pytest.mark.parametrize(
  "n,shape,names",
  [(4, (4,), ("fsdp",)), (1, (1,), ("fsdp",)), (4, (2, 2), ("data", "tensor"))],
  ids=["fsdp4", "one_device", "data2xtensor2"],
)
def test_restore_onto_another_mesh(tmp_path, mesh8, n, shape, names):
  state = _make_state(mesh8)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, state, extra={})
  target = _mesh(n, shape, names)
  restored, _ = Checkpointer(str(tmp_path)).restore(1, _abstract(state, target))
  _assert_tree_equal(restored, state)
  w = restored["params"]["w"]
  assert w.sharding.mesh.devices.shape == shape
  assert len(w.addressable_shards) == n


def test_keep_last_n_and_same_step_is_noop(tmp_path, mesh8):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _make_state(mesh8, step), extra={"step": step})
  ckpt.save(4, _make_state(mesh8, 99), extra={"step": 99})  # Same step again: ignored.
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  assert ckpt.read_extra() == {"step": 4}
  ckpt.save(4, _make_state(mesh8, 99), extra={"step": 99}, force=True)
  ckpt.close()
  assert Checkpointer(str(tmp_path)).read_extra(4) == {"step": 99}


def _corrupt(kind: str, path: str) -> None:
  if kind == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif kind == "delete":
    os.remove(path)
  else:  # Same size, different bytes: only the checksum can tell.
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.write(bytes((b + 1) % 256 for b in open(path, "rb").read(size)))


@pytest.mark.parametrize("kind", ["truncate", "delete", "garbage"])
def test_corrupted_checkpoint_falls_back_with_warning(tmp_path, mesh8, caplog, kind):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _make_state(mesh8, 1), extra={"step": 1})
    ckpt.save(2, _make_state(mesh8, 2), extra={"step": 2})
  victim = _biggest_file(str(tmp_path / "2"))
  _corrupt(kind, victim)
  ckpt = Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="gpt_jax.checkpoint"):
    assert ckpt.latest_step() == 1
  rel = os.path.relpath(victim, tmp_path / "2")
  assert any("step 2" in r.message and rel in r.message for r in caplog.records)
  state1 = _make_state(mesh8, 1)
  restored, extra = ckpt.restore(None, _abstract(state1, mesh8))
  _assert_tree_equal(restored, state1)
  assert extra == {"step": 1}
  with pytest.raises(CheckpointError, match=f"checkpoint step 2 in .* is not usable: file {rel}"):
    ckpt.restore(2, _abstract(state1, mesh8))


def test_unfinished_save_is_skipped_then_replaced(tmp_path, mesh8, caplog):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _make_state(mesh8, 1), extra={"step": 1})
    ckpt.save(2, _make_state(mesh8, 2), extra={"step": 2})
  os.remove(tmp_path / "2" / RECORD_FILE)  # As if killed between orbax's finalize and our record.
  (tmp_path / "3.orbax-checkpoint-tmp-1234").mkdir()  # As if killed in the middle of orbax's write.
  ckpt = Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="gpt_jax.checkpoint"):
    assert ckpt.all_steps() == [1]
  assert any("step 2" in r.message and "save never finished" in r.message for r in caplog.records)
  assert ckpt.read_extra() == {"step": 1}
  ckpt.save(2, _make_state(mesh8, 2), extra={"step": "2 again"})
  ckpt.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [1, 2]
  assert Checkpointer(str(tmp_path)).read_extra() == {"step": "2 again"}


def test_disk_full_raises_and_keeps_previous(tmp_path, mesh8, monkeypatch):
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, _make_state(mesh8, 1), extra={"step": 1})
  ckpt.wait()

  class FullDisk:  # An orbax commit future whose background write hits a full disk, as tensorstore's would.
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, "No space left on device")

  original = ocp.StandardCheckpointHandler.async_save

  async def full(self, *args, **kwargs):
    return list(await original(self, *args, **kwargs) or []) + [FullDisk()]

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full)
  with pytest.raises(
    CheckpointError, match=r"saving checkpoint step 2 to .* failed: disk full.*last valid checkpoint: step 1"
  ):
    ckpt.save(2, _make_state(mesh8, 2), extra={"step": 2})
    ckpt.wait()
  monkeypatch.undo()
  assert Checkpointer(str(tmp_path)).all_steps() == [1]
  state1 = _make_state(mesh8, 1)
  restored, extra = Checkpointer(str(tmp_path)).restore(None, _abstract(state1, mesh8))
  _assert_tree_equal(restored, state1)
  ckpt.save(2, _make_state(mesh8, 2), extra={"step": 2})  # The same Checkpointer goes on once space is back.
  ckpt.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # No partial directory of the failed save is left.


def _mount_tmpfs(path: str, size: str) -> bool:
  if os.geteuid() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  return (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True
    ).returncode
    == 0
  )


def test_real_disk_full_on_tmpfs(tmp_path, mesh8):
  """Like the test above but a real ENOSPC from tensorstore in orbax's background thread (needs root)."""
  mount = str(tmp_path / "small")
  if not _mount_tmpfs(mount, "1m"):
    pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched disk-full test covers the logic")
  try:
    ckpt = Checkpointer(os.path.join(mount, "ckpt"))
    ckpt.save(1, _make_state(mesh8, 1), extra={"step": 1})
    ckpt.wait()
    big = {"params": {"w": jnp.asarray(np.random.default_rng(0).random(400_000, np.float32))}}
    with pytest.raises(CheckpointError, match="step 2 .* failed: disk full"):
      ckpt.save(2, big, extra={})
      ckpt.wait()
    assert os.listdir(os.path.join(mount, "ckpt")) == [
      "1"
    ]  # The partial write was removed to free the space.
    state1 = _make_state(mesh8, 1)
    restored, _ = Checkpointer(os.path.join(mount, "ckpt")).restore(None, _abstract(state1, mesh8))
    _assert_tree_equal(restored, state1)
  finally:
    subprocess.run(["umount", "-l", mount], check=False)


def test_different_architecture_names_the_leaf(tmp_path, mesh8):
  state = _make_state(mesh8)
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(3, state, extra={})
  abstract = _abstract(state, mesh8)
  abstract["params"]["w"] = jax.ShapeDtypeStruct((32, 8), jnp.float32)
  ckpt = Checkpointer(str(tmp_path))
  with pytest.raises(
    CheckpointError,
    match=r"different architecture: leaf params/w has shape \(16, 8\) in the checkpoint, expected \(32, 8\)",
  ):
    ckpt.restore(None, abstract)
  abstract = _abstract(state, mesh8)
  abstract["params"]["extra_layer"] = jax.ShapeDtypeStruct((4,), jnp.float32)
  with pytest.raises(CheckpointError, match=r"leaf params/extra_layer \(4,\) is not in the checkpoint"):
    ckpt.restore(3, abstract)


def test_errors_for_missing_checkpoints(tmp_path, mesh8):
  with pytest.raises(CheckpointError, match="no valid checkpoint in"):
    Checkpointer(str(tmp_path / "empty")).restore(None, {})
  assert Checkpointer(str(tmp_path / "absent"), create=False).latest_step() is None
  with pytest.raises(CheckpointError, match="absent2 does not exist"):
    restore_params(str(tmp_path / "absent2"), {})
  with pytest.raises(CheckpointError, match="extra for checkpoint step 1 is not JSON-serializable"):
    Checkpointer(str(tmp_path / "x")).save(1, _make_state(mesh8), extra={"bad": object()})


def test_restore_params_from_dir_and_step_dir(tmp_path, mesh8):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(1, _make_state(mesh8, 1), extra={})
    ckpt.save(2, _make_state(mesh8, 2), extra={})
  mesh2 = _mesh(2)
  expected = _make_state(mesh8, 2)["params"]
  abstract = _abstract(expected, mesh2)
  from_dir = restore_params(str(tmp_path), abstract)
  _assert_tree_equal(from_dir, expected)
  assert from_dir["w"].sharding.mesh.devices.size == 2
  _assert_tree_equal(restore_params(str(tmp_path / "1"), abstract), _make_state(mesh8, 1)["params"])
  with pytest.raises(
    CheckpointError, match=r"leaf params/w has shape \(16, 8\) in the checkpoint, expected \(8, 8\)"
  ):
    restore_params(str(tmp_path), {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32), "b": abstract["b"]})


def test_integrity_record_check_and_cache(tmp_path):
  d = tmp_path / "dir"
  (d / "sub").mkdir(parents=True)
  (d / "a.bin").write_bytes(b"abcd")
  (d / "sub" / "b.bin").write_bytes(b"xyz")
  assert integrity.check(str(d)) == f"no {RECORD_FILE} (save never finished)"
  integrity.write_record(str(d))
  record = json.loads((d / RECORD_FILE).read_text())
  assert sorted(record["files"]) == ["a.bin", os.path.join("sub", "b.bin")] and record["format"] == 1
  cache = integrity.Cache()
  assert cache.check(str(d)) is None and integrity.check(str(d)) is None
  st = os.stat(d / "a.bin")
  (d / "a.bin").write_bytes(b"abce")  # same size, other bytes
  os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, whatever the clock
  assert cache.check(str(d)) == "file a.bin has a wrong crc32 (corrupted bytes)"
  assert integrity.check(str(d), hashes=False) is None  # sizes only
  (d / "sub" / "b.bin").unlink()
  assert integrity.check(str(d), hashes=False) == f"file {os.path.join('sub', 'b.bin')} is missing"
  assert integrity.check(str(tmp_path / "absent")) == "directory is missing"


_HOLDER = """
import sys
from gpt_jax.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # holds the lock until killed
"""


def test_workdir_lock_refuses_second_holder_until_it_dies(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(tmp_path)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    env=env,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointError, match=f"workdir {tmp_path} is in use by process {holder.pid}"):
      WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with WorkdirLock(str(tmp_path)) as lock:  # The kernel released the dead holder's flock.
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(CheckpointError, match="in use by process"):
      WorkdirLock(str(tmp_path)).acquire()  # flock locks are per open file: also exclusive within a process.
  assert not lock.held


_SAVER = """
import sys
import numpy as np
from gpt_jax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=2)
step = 0
while True:
  step += 1
  ckpt.save(step, {"w": np.full((256, 256), step, np.float32), "step": np.int32(step)}, extra={"step": step})
  if step == 2:
    print("saving", flush=True)
"""


def test_kill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  for delay in (0.0, 0.3):
    saver = subprocess.Popen(
      [sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    assert saver.stdout.readline().strip() == "saving"
    time.sleep(delay)
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    ckpt = Checkpointer(str(tmp_path))
    step = ckpt.latest_step()
    assert step is not None and step >= 1
    abstract = {"w": jax.ShapeDtypeStruct((256, 256), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
    state, extra = ckpt.restore(None, abstract)
    assert extra == {"step": step} and int(state["step"]) == step
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((256, 256), step, np.float32))
    ckpt.close()
