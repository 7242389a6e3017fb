"""Metrics: JSONL + TensorBoard writer, progress display, throughput/MFU arithmetic and the NaN guard.

Every stage's loop writes through MetricWriter (one JSON line per write in <workdir>/metrics.jsonl, scalars
in <workdir>/tb) and shows a Progress; StepTimer turns step completions into step_ms / tokens_per_s / mfu.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
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
  """Appends metrics to <workdir>/metrics.jsonl (flushed per write) and TensorBoard event files in <workdir>/tb
  (written by tensorboardX, on the disk within TB_FLUSH_SECS and at close).

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

  Records with a bad checksum are skipped; a file's reading stops at a record cut short by a crash.
  """
  tbx = _tensorboardx()
  masked_crc32c, event_pb2 = tbx.record_writer.masked_crc32c, tbx.proto.event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(tb_dir)):
    if "tfevents" not in name:
      continue
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0  # TFRecord framing: u64 length, u32 masked crc of it, the record, u32 masked crc of the record
    while pos + 12 <= len(data):
      header, (header_crc,) = data[pos : pos + 8], struct.unpack("<I", data[pos + 8 : pos + 12])
      (length,) = struct.unpack("<Q", header)
      end = pos + 12 + length
      if masked_crc32c(header) != header_crc or end + 4 > len(data):
        break
      body, (crc,) = data[pos + 12 : end], struct.unpack("<I", data[end : end + 4])
      pos = end + 4
      if masked_crc32c(body) == crc:
        event = event_pb2.Event.FromString(body)
        for v in event.summary.value:
          if v.WhichOneof("value") == "simple_value":
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


# ----------------------------------------------------------------------------- TensorBoard event files

# Events reach the disk within this many seconds (tensorboardX writes them on a background thread).
TB_FLUSH_SECS = 5
_TB_FILE_IDS = itertools.count()


@contextlib.contextmanager
def _torch_hidden() -> Iterator[None]:
  """Makes `import torch` fail inside the block, unless torch is already imported."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None
  try:
    yield
  finally:
    if hide and sys.modules.get("torch", False) is None:
      del sys.modules["torch"]


def _tensorboardx():
  """Returns the tensorboardX package (with its proto and record_writer modules loaded)."""
  # tensorboardX imports torch at load, only to accept torch tensors (gpt_jax passes none): with torch
  # installed that costs every training process about a second and 200 MB, so torch is hidden meanwhile.
  with _torch_hidden():
    import tensorboardX
    import tensorboardX.proto.event_pb2
    import tensorboardX.proto.summary_pb2
    import tensorboardX.record_writer
  return tensorboardX


class _EventFileWriter:
  """Scalar summaries into <logdir>/events.out.tfevents.<time>.<host>.<pid>.<n> through tensorboardX."""

  def __init__(self, logdir: str):
    tbx = _tensorboardx()
    self._summary = tbx.proto.summary_pb2.Summary
    suffix = f".{os.getpid()}.{next(_TB_FILE_IDS):03d}"  # one file per writer, even within one second
    self._writer = tbx.FileWriter(logdir, flush_secs=TB_FLUSH_SECS, filename_suffix=suffix)

  def write_scalars(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
    if scalars:
      values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
      self._writer.add_summary(self._summary(value=values), step, wall_time)

  def close(self) -> None:
    self._writer.close()


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
