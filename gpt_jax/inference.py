"""Loading the model of any run directory for sampling (chat, report, notebooks, evaluation)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gpt_jax import placed, runs, sharding


@dataclasses.dataclass
class Loaded:
  run: runs.Run
  model: placed.Model  # the plain transformer (a reward model's trunk, an RL run's policy)
  params: Any
  tokenizer: Any

  @property
  def stage(self) -> str:
    return self.run.stage

  @property
  def workdir(self) -> str:
    return self.run.workdir

  @property
  def cfg(self):
    return self.model.cfg

  @property
  def graphdef(self):
    return self.model.graphdef

  @property
  def mesh(self):
    return self.model.mesh

  @property
  def is_chat(self) -> bool:
    """Finetuned models answer in the chat template; a pretrained (or imported) one continues text."""
    return self.run.is_chat


def load(path: str, *, mesh=None, what: str = "--workdir") -> Loaded:
  """The model of the run at `path` (a workdir, a checkpoint in one, or an import), its newest valid
  checkpoint placed on `mesh` (default: all devices as data-parallel replicas), and its tokenizer."""
  run = runs.open(path, what)
  mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = placed.Model.build(run.model_config(), mesh)
  return Loaded(run, model, run.restore(model.abstract()), run.tokenizer())


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
