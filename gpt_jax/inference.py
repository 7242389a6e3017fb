"""Loading a trained model from any stage's workdir, for sampling (chat, report, notebooks)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import model as model_lib
from gpt_jax import sharding
from gpt_jax.data import load_any_tokenizer
from gpt_jax.errors import CheckpointError


@dataclasses.dataclass
class Loaded:
  stage: str  # pretrain | sft | rm | ppo
  workdir: str
  cfg: model_lib.ModelConfig
  graphdef: Any
  params: Any
  tokenizer: Any
  mesh: Any

  @property
  def is_chat(self) -> bool:
    """Finetuned models answer in the chat template; a pretrained one only continues text."""
    return self.stage != "pretrain"


def _workdir_of(path: str) -> str:
  p = os.path.abspath(os.path.expanduser(path))
  for cand in (p, os.path.dirname(p), os.path.dirname(os.path.dirname(p))):
    if os.path.exists(os.path.join(cand, "config.json")):
      return cand
  raise CheckpointError(
    f"{path}: no config.json here or above it (expected a stage workdir or a checkpoint in one)"
  )


def _read_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def model_config_of(workdir: str) -> tuple[str, dict]:
  """(stage, model config dict) of a stage workdir; a PPO workdir's model is its SFT policy's."""
  cfg = _read_config(workdir)
  stage = cfg.get("stage", "pretrain")
  if "model" in cfg:
    return stage, cfg["model"]
  sft_dir = (cfg.get("ppo") or {}).get("sft_workdir")
  if sft_dir and os.path.exists(os.path.join(sft_dir, "config.json")):
    return stage, _read_config(sft_dir)["model"]
  raise CheckpointError(f"{workdir}/config.json has no model config")


def load(path: str, *, mesh=None, items=("params", "policy")) -> Loaded:
  """The newest valid checkpoint of a workdir (or the given checkpoint path), placed on `mesh`
  (default: all devices as data-parallel replicas), with its model config and tokenizer."""
  workdir = _workdir_of(path)
  stage, model_dict = model_config_of(workdir)
  model_cfg = model_lib.ModelConfig.from_config(model_dict)
  mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  graphdef, shapes, axes = model_lib.abstract(model_cfg)
  shardings = sharding.tree_shardings(mesh, axes, shapes)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  ckpt = path if os.path.abspath(path) != workdir else os.path.join(workdir, "checkpoints")
  errors = []
  for item in items:
    try:
      params = ckpt_lib.restore_params(ckpt, abstract, item=item)
      break
    except CheckpointError as e:
      errors.append(str(e))
  else:
    raise CheckpointError(f"{path}: no model parameters found ({'; '.join(errors)})")
  tokenizer = load_any_tokenizer(workdir)
  return Loaded(stage, workdir, model_cfg, graphdef, params, tokenizer, mesh)


def prompt_ids(loaded: Loaded, messages_or_text) -> list[int]:
  """Token ids to sample from: the chat template for finetuned models, bos + text for a base model."""
  tok = loaded.tokenizer
  if loaded.is_chat:
    messages = (
      messages_or_text
      if isinstance(messages_or_text, list)
      else [{"role": "user", "content": str(messages_or_text)}]
    )
    return tok.render_chat(messages, add_generation_prompt=True)[0]
  text = (
    messages_or_text
    if isinstance(messages_or_text, str)
    else "\n".join(m["content"] for m in messages_or_text)
  )
  return [tok.bos_id, *tok.encode(text)]


def stop_id(loaded: Loaded) -> int:
  """A finetuned model ends its turn with <|end_of_turn|>; a base model ends a document with eos."""
  return loaded.tokenizer.special_id("end_of_turn") if loaded.is_chat else loaded.tokenizer.eos_id


def answer(loaded: Loaded, prompts: list, *, sample_cfg=None, seed: int = 0) -> list[str]:
  """Batched replies (text) to prompts (strings or message lists)."""
  from gpt_jax import sampling

  sample_cfg = sample_cfg or sampling.SampleConfig(max_new_tokens=32, greedy=True)
  ids = [prompt_ids(loaded, p) for p in prompts]
  stop = stop_id(loaded)
  outs = sampling.generate(
    loaded.params,
    loaded.graphdef,
    loaded.cfg,
    ids,
    eos_id=stop,
    pad_id=loaded.tokenizer.pad_id,
    sample_cfg=sample_cfg,
    seed=seed,
    mesh=loaded.mesh,
  )
  return [loaded.tokenizer.decode([t for t in o if t not in (stop, loaded.tokenizer.eos_id)]) for o in outs]
