"""Metrics: JSONL + TensorBoard writer, progress display, throughput/MFU arithmetic and the NaN guard.

Every stage's loop writes through MetricWriter (one JSON line per write in <workdir>/metrics.jsonl, scalars
in <workdir>/tb) and shows a Progress; StepTimer turns step completions into step_ms / tokens_per_s / mfu.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from gpt_jax.errors import ConfigError, TrainingError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _to_python(v: Any) -> Any:
  """Returns v as a plain float/int/str/bool for JSON (jax/numpy scalars become floats or ints)."""
  if isinstance(v, bool | int | float | str) or v is None:
    return v
  arr = np.asarray(v)
  if arr.size == 1 and arr.dtype.kind in "biuf":
    return arr.item()
  if arr.dtype.kind in "biuf":
    return arr.tolist()
  return str(v)


class MetricWriter:
  """Appends metrics to <workdir>/metrics.jsonl (flushed per write) and TensorBoard event files in <workdir>/tb.

  enabled=False (non-zero processes) makes every method a no-op.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, "a+b")
    # A run killed mid-write leaves a partial last line: end it so the next record starts on a fresh line.
    if self._file.tell() > 0:
      self._file.seek(-1, os.SEEK_END)
      if self._file.read(1) != b"\n":
        self._file.write(b"\n")
    if tensorboard:
      self._tb = _EventFileWriter(os.path.join(self.workdir, TB_DIR))

  def write(self, step: int, metrics: dict[str, Any], *, prefix: str = "") -> None:
    """Appends {"step", "time", prefix+key: value} as one JSON line and each numeric scalar to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time()}
    record.update({prefix + k: _to_python(v) for k, v in metrics.items()})
    self._file.write((json.dumps(record) + "\n").encode())
    self._file.flush()
    if self._tb is not None:
      scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, int | float)}
      self._tb.write_scalars(int(step), scalars, record["time"])

  def close(self) -> None:
    """Flushes and closes both outputs; safe to call twice."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir_or_file: str) -> list[dict]:
  """Returns the records of a metrics.jsonl (or of <workdir>/metrics.jsonl) in file order.

  Lines that do not parse (a partial line left by a crash) are skipped with a warning. A resumed run
  appends again from its checkpoint step, so a step can appear more than once; the later record is the
  one of the run that went on.
  """
  path = os.fspath(workdir_or_file)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  records, bad = [], 0
  with open(path, "rb") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except ValueError:
        bad += 1
  if bad:
    log.warning("%s: skipped %d unparseable line(s) (partial writes of a killed run)", path, bad)
  return records


def read_tb_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Returns {tag: [(step, value), ...]} from the TensorBoard event files in tb_dir, in file order.

  Records with a bad checksum or cut short by a crash are skipped.
  """
  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    if "tfevents" not in name:
      continue
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      end = pos + 12 + length
      if end + 4 > len(data):
        break
      body, (crc,) = data[pos + 12 : end], struct.unpack("<I", data[end : end + 4])
      pos = end + 4
      if _masked_crc32c(body) == crc:
        for tag, step, value in _decode_scalars(body):
          out.setdefault(tag, []).append((step, value))
  return out


# ----------------------------------------------------------------------------- TensorBoard event files
# Written by hand (TFRecord framing around the Event protobuf, scalars only): importing tensorboardX pulls
# in torch when it is installed, seconds and hundreds of MB in every training process, for a few bytes.


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """Returns TFRecord's masked CRC-32C (Castagnoli) of data."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # Negative int64 values are encoded as their 64-bit two's complement.
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode_event(
  wall_time: float, step: int, *, file_version: str = "", scalars: dict | None = None
) -> bytes:
  """Returns a serialized tensorboard Event (wall_time=1, step=2, file_version=3, summary=5)."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version:
    out += _field_bytes(3, file_version.encode())
  if scalars:  # Summary.value=1 -> Value{tag=1, simple_value=2 (float32)}
    values = b"".join(
      _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
      for tag, value in scalars.items()
    )
    out += _field_bytes(5, values)
  return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(data: bytes):
  """Yields (field number, wire type, value) of a protobuf message; value is int, or bytes for wire types 1/2/5."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(data, pos)
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = data[pos : pos + size], pos + size
    elif wire == 2:
      size, pos = _read_varint(data, pos)
      value, pos = data[pos : pos + size], pos + size
    else:
      return
    yield number, wire, value


def _decode_scalars(event: bytes) -> list[tuple[str, int, float]]:
  """Returns [(tag, step, simple_value)] of one serialized Event."""
  step, summaries = 0, []
  for number, wire, value in _fields(event):
    if number == 2 and wire == 0:
      step = value - (1 << 64) if value >= 1 << 63 else value
    elif number == 5 and wire == 2:
      summaries.append(value)
  out = []
  for summary in summaries:
    for number, _, value in _fields(summary):
      if number != 1:
        continue
      tag, simple = None, None
      for n, w, v in _fields(value):
        if n == 1 and w == 2:
          tag = v.decode()
        elif n == 2 and w == 5:
          simple = struct.unpack("<f", v)[0]
      if tag is not None and simple is not None:
        out.append((tag, step, simple))
  return out


class _EventFileWriter:
  """Appends scalar summaries to <logdir>/events.out.tfevents.<time>.<host>.<pid>, flushed per write."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(_encode_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, event: bytes) -> None:
    header = struct.pack("<Q", len(event))
    self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + event)
    self._file.write(struct.pack("<I", _masked_crc32c(event)))
    self._file.flush()

  def write_scalars(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
    if scalars:
      self._write(_encode_event(wall_time, step, scalars={k: float(v) for k, v in scalars.items()}))

  def close(self) -> None:
    self._file.close()


# ----------------------------------------------------------------------------- progress


class Progress:
  """A tqdm bar over steps with loss / tokens/s / MFU in its postfix.

  Without a TTY (batch jobs, log files) or on a non-zero process it prints one line every log_every steps
  instead, so logs stay readable. enabled=False shows nothing.
  """

  def __init__(
    self,
    total_steps: int,
    initial_step: int = 0,
    *,
    enabled: bool = True,
    desc: str = "",
    log_every: int = 50,
    keys: tuple[str, ...] = ("loss", "tokens_per_s", "mfu"),
    stream=None,
  ):
    import jax

    self.total_steps = total_steps
    self.step = initial_step
    self.log_every = max(1, log_every)
    self.keys = keys
    self.desc = desc
    self.stream = stream or sys.stderr
    self.enabled = enabled and jax.process_index() == 0
    self._bar = None
    if self.enabled and getattr(self.stream, "isatty", lambda: False)():
      from tqdm import tqdm

      self._bar = tqdm(
        total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=self.stream
      )

  def _postfix(self, metrics: dict) -> dict[str, str]:
    out = {}
    for k in self.keys:
      if k in metrics and metrics[k] is not None:
        v = float(_to_python(metrics[k]))
        out[k] = f"{v:.3g}" if k != "tokens_per_s" else f"{v:,.0f}"
    return out

  def update(self, step: int, metrics: dict) -> None:
    """Moves the display to `step` (the number of steps done) showing the selected metrics."""
    if not self.enabled:
      return
    previous, self.step = self.step, step
    if self._bar is not None:
      self._bar.update(step - previous)
      self._bar.set_postfix(self._postfix(metrics), refresh=False)
    elif step % self.log_every == 0 or step == self.total_steps:
      fields = " ".join(f"{k}={v}" for k, v in self._postfix(metrics).items())
      prefix = f"{self.desc} " if self.desc else ""
      print(f"{prefix}step {step}/{self.total_steps} {fields}".rstrip(), file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


# ----------------------------------------------------------------------------- throughput and MFU

# Dense (no sparsity) peak FLOP/s per JAX device, by jax.devices()[0].device_kind.
# "float32": NVIDIA Ampere+ run fp32 matmuls as TF32 under JAX's default precision, TPUs as one bf16 pass,
# so the matching tensor-core peak is the honest denominator. CPU: unknown (None).
_H100_SXM = {"bfloat16": 989e12, "float32": 494.5e12}
_H100_PCIE = {"bfloat16": 756e12, "float32": 378e12}
_A100 = {"bfloat16": 312e12, "float32": 156e12}
PEAK_FLOPS: dict[str, dict[str, float] | None] = {
  "NVIDIA H100 80GB HBM3": _H100_SXM,
  "NVIDIA H100": _H100_SXM,
  "NVIDIA H100 PCIe": _H100_PCIE,
  "NVIDIA H200": _H100_SXM,  # Same compute as H100 SXM, more and faster memory.
  "NVIDIA GH200 480GB": _H100_SXM,
  "NVIDIA A100-SXM4-80GB": _A100,
  "NVIDIA A100-SXM4-40GB": _A100,
  "NVIDIA A100-PCIE-40GB": _A100,
  "NVIDIA A100 80GB PCIe": _A100,
  "NVIDIA L4": {"bfloat16": 121e12, "float32": 60e12},
  "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
  "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
  "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
  "TPU v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p
  "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
  "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
  "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
  "cpu": None,
}

_DTYPE_ALIASES = {
  "bfloat16": "bfloat16",
  "bf16": "bfloat16",
  "float16": "bfloat16",  # fp16 and bf16 tensor-core peaks are equal on every device listed.
  "fp16": "bfloat16",
  "half": "bfloat16",
  "float32": "float32",
  "fp32": "float32",
  "tf32": "float32",
}


def _lookup_kind(kind: str) -> dict[str, float] | None:
  """Returns the PEAK_FLOPS entry for a device kind: exact match, else the longest table key it starts with."""
  if kind in PEAK_FLOPS:
    return PEAK_FLOPS[kind]
  low = kind.lower()
  if "pcie" in low and "h100" in low:
    return PEAK_FLOPS["NVIDIA H100 PCIe"]
  matches = [k for k in PEAK_FLOPS if low.startswith(k.lower())]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def peak_flops_per_device(
  device=None, dtype: Any = "bfloat16", override: float | None = None
) -> float | None:
  """Returns the dense peak FLOP/s of one device for matmuls in `dtype`, or None when unknown (CPU, new chips).

  override (e.g. from a config key) wins over the table.
  """
  if override is not None:
    return float(override)
  name = getattr(dtype, "name", None) or getattr(getattr(dtype, "dtype", None), "name", None) or str(dtype)
  key = _DTYPE_ALIASES.get(name.lower())
  if key is None:
    raise ConfigError(f"peak FLOP/s dtype {name!r} is not one of {sorted(_DTYPE_ALIASES)}")
  if device is None:
    import jax

    device = jax.devices()[0]
  if getattr(device, "platform", "") == "cpu":
    return None
  entry = _lookup_kind(getattr(device, "device_kind", str(device)))
  return None if entry is None else entry[key]


def model_flops_per_token(
  n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int
) -> float:
  """Returns training FLOPs per token, 6*N + 12*L*H*Q*T (PaLM, appendix B): matmuls forward+backward plus attention."""
  return 6.0 * n_params_non_embedding + 12.0 * n_layers * n_heads * head_dim * seq_len


def mfu(
  tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float | None
) -> float | None:
  """Returns model FLOPs utilization in [0, 1] (tokens/s * FLOPs/token over the devices' peak), None if peak unknown."""
  if not peak_per_device or n_devices <= 0:
    return None
  return tokens_per_s * flops_per_token / (n_devices * peak_per_device)


class StepTimer:
  """Throughput over completed steps, excluding the first `warmup_steps` (compilation) and paused spans.

  Call step_done() when a step's outputs are ready (e.g. after reading its metrics); summary() returns
  step_ms, tokens_per_s and, when flops_per_token and a peak are known, mfu, averaged since the last summary.
  """

  def __init__(
    self,
    tokens_per_step: int,
    *,
    warmup_steps: int = 1,
    flops_per_token: float | None = None,
    n_devices: int = 1,
    peak_per_device: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.tokens_per_step = tokens_per_step
    self.warmup_steps = warmup_steps
    self.flops_per_token = flops_per_token
    self.n_devices = n_devices
    self.peak_per_device = peak_per_device
    self._clock = clock
    self._seen = 0
    self._steps = 0
    self._t0: float | None = None
    self._t_last: float | None = None

  def step_done(self, n: int = 1) -> None:
    """Records that n more steps finished now."""
    now = self._clock()
    self._seen += n
    if self._seen <= self.warmup_steps or self._t0 is None:
      # Timing starts at the end of the warmup (compile) steps; steps of a window that straddles it are dropped.
      if self._seen >= self.warmup_steps:
        self._t0 = now
      return
    self._steps += n
    self._t_last = now

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Context manager: time spent inside (eval, checkpointing) does not count against throughput."""
    start = self._clock()
    try:
      yield
    finally:
      if self._t0 is not None:
        self._t0 += self._clock() - start

  def summary(self, reset: bool = True) -> dict[str, float]:
    """Returns {"step_ms", "tokens_per_s"[, "mfu"]} over the steps timed since the last reset; {} if none."""
    if not self._steps or self._t_last is None or self._t_last <= self._t0:
      return {}
    seconds = self._t_last - self._t0
    out = {
      "step_ms": 1e3 * seconds / self._steps,
      "tokens_per_s": self._steps * self.tokens_per_step / seconds,
    }
    if self.flops_per_token is not None:
      u = mfu(out["tokens_per_s"], self.flops_per_token, self.n_devices, self.peak_per_device)
      if u is not None:
        out["mfu"] = u
    if reset:
      self._t0, self._steps = self._t_last, 0
    return out


# ----------------------------------------------------------------------------- NaN guard


def check_finite(step: int, metrics: dict[str, Any]) -> None:
  """Raises TrainingError naming the step and the first key whose (numeric) value is NaN or infinite."""
  for k, v in metrics.items():
    if isinstance(v, str) or v is None:
      continue
    arr = np.asarray(v)
    if arr.dtype.kind not in "fc" or np.all(np.isfinite(arr)):
      continue
    shown = arr.item() if arr.size == 1 else f"array with {int(np.sum(~np.isfinite(arr)))} non-finite values"
    if isinstance(shown, float):
      shown = "nan" if math.isnan(shown) else ("inf" if shown > 0 else "-inf")
    raise TrainingError(f"non-finite {k} at step {step}: {k}={shown}")
