"""Reading Hugging Face weight files tensor by tensor (safetensors, sharded or not; PyTorch .bin via torch).

Names are canonicalized by dropping the base-model prefix ("transformer." for GPT-2, "model." for
LLaMA), so GPT2LMHeadModel, GPT2Model and the original hub checkpoints read alike.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from gpt_jax.errors import CheckpointError

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PREFIXES = ("transformer.", "model.")


def _canonical(name: str) -> str:
  for p in PREFIXES:
    if name.startswith(p):
      return name[len(p) :]
  return name


def _raw_safetensors(path: str, name: str) -> np.ndarray:
  """Memory-maps one tensor of a safetensors file whose dtype numpy lacks (bfloat16, float8).

  safe_open(framework="numpy") cannot return bfloat16, which most LLaMA checkpoints use; the format
  is an 8-byte little-endian header size, a JSON header with byte offsets, then the raw data.
  """
  import ml_dtypes  # installed with jax

  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    info = json.loads(f.read(n))[name]
  dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
  if info["dtype"] not in dtypes:
    raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which gpt_jax cannot read")
  begin, end = info["data_offsets"]
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + begin, shape=(end - begin,))
  return data.view(dtypes[info["dtype"]]).reshape(info["shape"])


class TensorFiles:
  """The tensors of a Hugging Face model directory: names, shapes (headers only) and one-at-a-time reads."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self._where: dict[str, tuple[str, str]] = {}  # canonical name -> (file path, name in file)
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._handles: dict[str, object] = {}
    files = self._weight_files(model_dir)
    for path in files:
      if path.endswith(".safetensors"):
        self._index_safetensors(path)
      else:
        self._index_bin(path)

  @staticmethod
  def _weight_files(model_dir: str) -> list[str]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
      index = os.path.join(model_dir, index_name)
      if os.path.isfile(index):
        try:
          with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
          raise CheckpointError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
        paths = [os.path.join(model_dir, n) for n in names]
        for p in paths:
          if not os.path.isfile(p):
            raise CheckpointError(f"weight file {p} listed in {index_name} is missing")
        return paths
    for single in (SAFE, BIN):
      if os.path.isfile(os.path.join(model_dir, single)):
        return [os.path.join(model_dir, single)]
    raise CheckpointError(f"{model_dir}: no weights (expected {SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX})")

  def _index_safetensors(self, path: str) -> None:
    from safetensors import safe_open

    try:
      handle = safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise CheckpointError(f"weight file {path} is not a readable safetensors file ({e})") from None
    self._handles[path] = handle
    for name in handle.keys():
      self._add(_canonical(name), path, name, tuple(handle.get_slice(name).get_shape()))

  def _index_bin(self, path: str) -> None:
    try:
      import torch
    except ImportError:
      raise CheckpointError(
        f"{path} is a PyTorch pickle: reading it needs torch (pip install torch) or a safetensors copy"
      ) from None
    try:  # mmap: tensors stay on disk until read
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"weight file {path} is not a readable PyTorch state dict ({e})") from None
    self._handles[path] = state
    for name, t in state.items():
      self._add(_canonical(name), path, name, tuple(t.shape))

  def _add(self, canonical: str, path: str, name: str, shape: tuple[int, ...]) -> None:
    self._where[canonical] = (path, name)
    self._shapes[canonical] = shape

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def read(self, name: str) -> np.ndarray:
    """Returns one tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16)."""
    path, stored = self._where[name]
    handle = self._handles[path]
    if isinstance(handle, dict):  # a torch state dict
      t = handle[stored]
      import torch

      return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    try:
      return handle.get_tensor(stored)
    except TypeError:  # a dtype numpy does not know (bfloat16)
      return _raw_safetensors(path, stored)

  def close(self) -> None:
    self._handles.clear()
