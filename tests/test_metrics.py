"""Metrics: JSONL + TensorBoard outputs, crash-truncated files, progress output, MFU arithmetic, NaN guard."""

import io
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax.errors import ConfigError, TrainingError
from gpt_jax.metrics import (
  PEAK_FLOPS,
  MetricWriter,
  Progress,
  StepTimer,
  check_finite,
  mfu,
  model_flops_per_token,
  peak_flops_per_device,
  read_metrics,
  read_tb_scalars,
)


def test_jsonl_and_tensorboard_roundtrip(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)}, prefix="train/")
    writer.write(2, {"loss": jnp.asarray(2.25)}, prefix="train/")
    writer.write(2, {"loss": 3.0, "note": "eval on heldout"}, prefix="eval/")
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 2]
  assert records[0]["train/loss"] == 2.5 and records[0]["train/lr"] == pytest.approx(1e-3)
  assert records[1]["train/loss"] == 2.25 and records[2]["eval/note"] == "eval on heldout"
  assert all(isinstance(r["time"], float) for r in records)
  scalars = read_tb_scalars(str(tmp_path / "tb"))
  assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)]
  assert scalars["eval/loss"] == [(2, 3.0)]
  assert "eval/note" not in scalars


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C (Castagnoli), bit by bit: a reference independent of tensorboardX's."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(data: bytes) -> list[bytes]:
  """The records of a TFRecord file, each checked against its two checksums."""
  out, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    body = data[pos + 12 : pos + 12 + length]
    for payload, crc_at in ((data[pos : pos + 8], pos + 8), (body, pos + 12 + length)):
      assert struct.unpack("<I", data[crc_at : crc_at + 4])[0] == _masked_crc32c(payload)
    out.append(body)
    pos += 16 + length
  return out


def test_event_file_is_valid_tfrecord_for_tensorboard(tmp_path):
  """The event file parses with the reference checksums and protobuf definitions; one event per write."""
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(-3, {"loss": 0.125, "big": 1e30}, prefix="train/")
  (name,) = os.listdir(tmp_path / "tb")
  assert name.startswith("events.out.tfevents.")
  from tensorboardX.proto import event_pb2  # loaded (torch hidden) by the writer above

  events = [event_pb2.Event.FromString(r) for r in _records((tmp_path / "tb" / name).read_bytes())]
  assert events[0].file_version == "brain.Event:2" and len(events) == 2
  assert events[1].step == -3
  assert {v.tag: v.simple_value for v in events[1].summary.value} == {
    "train/loss": 0.125,
    "train/big": np.float32(1e30),
  }


def test_tb_reader_skips_bad_records_and_stops_at_a_cut(tmp_path):
  for run in range(2):  # two writers in one second and one process: two files, nothing overwritten
    with MetricWriter(str(tmp_path)) as writer:
      for step in (1, 2, 3):
        writer.write(step + 10 * run, {"loss": float(step)})
  files = sorted((tmp_path / "tb").iterdir())
  assert len(files) == 2
  assert read_tb_scalars(str(tmp_path / "tb"))["loss"] == [(s, float(s % 10)) for s in (1, 2, 3, 11, 12, 13)]
  data = bytearray(files[0].read_bytes())
  records = _records(bytes(data))
  second = 16 + len(records[0]) + 16 + len(records[1])  # the offset of the step-2 event
  data[second + 12] ^= 0xFF  # a flipped byte in the step-2 record: its checksum fails
  files[0].write_bytes(bytes(data))
  files[1].write_bytes(files[1].read_bytes()[:-3])  # the step-13 record cut short by a crash
  assert read_tb_scalars(str(tmp_path / "tb"))["loss"] == [(1, 1.0), (3, 3.0), (11, 1.0), (12, 2.0)]


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX is loaded with torch hidden; torch stays importable afterwards."""
  code = (
    "import importlib.util, sys\n"
    "from gpt_jax.metrics import MetricWriter, read_tb_scalars\n"
    f"with MetricWriter({str(tmp_path)!r}) as w:\n"
    "  w.write(1, {'loss': 1.0})\n"
    f"assert read_tb_scalars({str(tmp_path / 'tb')!r}) == {{'loss': [(1, 1.0)]}}\n"
    "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
    "if importlib.util.find_spec('torch') is not None:\n"
    "  import torch  # noqa: F401\n"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path, caplog):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
  path = tmp_path / "metrics.jsonl"
  data = path.read_bytes()
  path.write_bytes(data[:-7])  # A crash in the middle of the second line.
  assert [r["step"] for r in read_metrics(str(path))] == [1]
  assert "skipped 1 unparseable line" in caplog.text
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:  # The resumed run appends on a fresh line.
    writer.write(2, {"loss": 0.5})
  assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 0.5)]


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(str(tmp_path / "w"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


def test_progress_without_tty_logs_every_n_steps():
  out = io.StringIO()  # Not a TTY: one line every log_every steps instead of a bar.
  progress = Progress(10, 0, desc="pretrain", log_every=5, stream=out)
  for step in range(1, 11):
    progress.update(step, {"loss": 1.0 / step, "tokens_per_s": 12345.6, "mfu": 0.4123, "other": 1})
  progress.close()
  assert out.getvalue().splitlines() == [
    "pretrain step 5/10 loss=0.2 tokens_per_s=12,346 mfu=0.412",
    "pretrain step 10/10 loss=0.1 tokens_per_s=12,346 mfu=0.412",
  ]
  quiet = io.StringIO()
  Progress(10, enabled=False, stream=quiet).update(10, {"loss": 1.0})
  assert quiet.getvalue() == ""


def test_model_flops_and_mfu_by_hand():
  # GPT-2 124M-like: N = 85M non-embedding, L=12, H=12, Q=64, T=1024.
  flops = model_flops_per_token(85_000_000, 12, 12, 64, 1024)
  assert flops == 6 * 85_000_000 + 12 * 12 * 12 * 64 * 1024 == 510_000_000 + 113_246_208
  # 100k tokens/s on 8 devices of 1e14 FLOP/s: 100e3 * 623_246_208 / 8e14.
  assert mfu(100e3, flops, 8, 1e14) == pytest.approx(0.07790577600)
  assert mfu(100e3, flops, 8, None) is None


def test_peak_flops_lookup():
  class Dev:
    platform = "gpu"

    def __init__(self, kind):
      self.device_kind = kind

  assert peak_flops_per_device(Dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert (
    peak_flops_per_device(Dev("NVIDIA H100 PCIe"), "float32") == PEAK_FLOPS["NVIDIA H100 PCIe"]["float32"]
  )
  assert peak_flops_per_device(Dev("NVIDIA H200"), jnp.bfloat16) == 989e12
  assert peak_flops_per_device(Dev("NVIDIA A100-SXM4-40GB"), "bf16") == 312e12
  assert peak_flops_per_device(Dev("TPU v5 lite")) == 197e12
  assert peak_flops_per_device(Dev("TPU v5")) == 459e12
  assert peak_flops_per_device(Dev("Some Future Chip")) is None
  assert peak_flops_per_device() is None  # The CPU devices of the test machine: unknown.
  assert peak_flops_per_device(override=5e12) == 5e12
  with pytest.raises(ConfigError, match="peak FLOP/s dtype 'int8'"):
    peak_flops_per_device(Dev("NVIDIA H200"), "int8")


def test_step_timer_excludes_compile_and_pauses():
  now = [0.0]
  timer = StepTimer(
    1000, warmup_steps=1, flops_per_token=10.0, n_devices=2, peak_per_device=1e4, clock=lambda: now[0]
  )
  assert timer.summary() == {}
  now[0] = 30.0  # First step: compilation, not counted.
  timer.step_done()
  for _ in range(4):
    now[0] += 0.5
    timer.step_done()
  with timer.paused():
    now[0] += 100.0  # An eval: not counted.
  now[0] += 0.5
  timer.step_done()
  summary = timer.summary()
  assert summary == pytest.approx({"step_ms": 500.0, "tokens_per_s": 2000.0, "mfu": 2000.0 * 10 / 2e4})
  assert timer.summary() == {}  # Reset after each summary.


def test_check_finite_names_step_and_key():
  check_finite(3, {"loss": 1.0, "grad_norm": np.float32(2.0), "name": "x", "count": 4})
  with pytest.raises(TrainingError, match=r"^non-finite loss at step 12: loss=nan$"):
    check_finite(12, {"loss": jnp.asarray(float("nan"))})
  with pytest.raises(TrainingError, match=r"non-finite grad_norm at step 5: grad_norm=inf"):
    check_finite(5, {"loss": 1.0, "grad_norm": math.inf})
  with pytest.raises(
    TrainingError, match=r"non-finite per_token at step 1: per_token=array with 1 non-finite"
  ):
    check_finite(1, {"per_token": np.array([1.0, -np.inf])})


def test_nan_is_written_and_read_back(tmp_path):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(4, {"loss": float("nan")})
  (record,) = read_metrics(str(tmp_path / "metrics.jsonl"))
  assert math.isnan(record["loss"])
  assert '"loss": NaN' in (tmp_path / "metrics.jsonl").read_text()  # Python's JSON dialect, read back as nan.
