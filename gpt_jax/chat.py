"""`python -m gpt_jax chat --workdir=DIR`: talk to any checkpoint in the terminal.

A finetuned (SFT or PPO) model answers in the chat template and keeps the conversation; a
pretrained model only continues the text it is given, which shows the difference between a base
model and an assistant. Tokens are printed as they are made. `--prompt` answers once and exits.
"""

from __future__ import annotations

import sys

from gpt_jax import inference, runs, sampling
from gpt_jax.config import Key, check_value
from gpt_jax.errors import ConfigError

# The sampling flags, typed and bounded like config keys (checked before the model is loaded).
FLAGS = {
  "temperature": Key(0.8, ">= 0"),
  "top_k": Key(0, ">= 0"),
  "top_p": Key(0.95, "(0, 1]"),
  "max_new_tokens": Key(64, ">= 1"),
  "seed": Key(0, ">= 0"),
}


def _stream_reply(loaded, ids, sample_cfg, seed, out) -> str:
  tok = loaded.tokenizer
  stop = inference.stop_id(loaded)
  reply: list[int] = []
  shown = ""
  for t in sampling.stream(
    loaded.params, loaded.graphdef, loaded.cfg, ids, eos_id=stop, sample_cfg=sample_cfg, seed=seed
  ):
    if t in (stop, tok.eos_id):
      break
    reply.append(t)
    text = tok.decode(reply)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      out.write(text[len(shown) :])
      out.flush()
      shown = text
  out.write(tok.decode(reply)[len(shown) :] + "\n")
  out.flush()
  return tok.decode(reply)


def run(
  workdir: str,
  *,
  prompt: str | None = None,
  system: str = "",
  temperature: float = 0.8,
  top_k: int = 0,
  top_p: float = 0.95,
  max_new_tokens: int = 64,
  seed: int = 0,
  stdin=None,
  out=None,
) -> list[str]:
  """Interactive chat (or one reply with `prompt`); returns the replies."""
  stdin = stdin or sys.stdin
  out = out or sys.stdout
  flags = dict(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
  for name, value in flags.items():
    check_value(f"--{name}", value, FLAGS[name])
  context = runs.open(workdir, "--workdir").model_config().max_seq_len  # before the weights are read
  if max_new_tokens >= context:
    raise ConfigError(
      f"--max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's context of "
      f"{context} tokens (at most {context - 1})"
    )
  loaded = inference.load(workdir)
  kind = "assistant" if loaded.is_chat else "base model: continues your text"
  sample_cfg = sampling.SampleConfig(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  ).validate()
  messages = [{"role": "system", "content": system}] if system else []
  replies = []
  if prompt is None:
    out.write(
      f"[{loaded.stage} model from {loaded.workdir}; {kind}. /reset clears the conversation, Ctrl-D quits]\n"
    )
  turn = 0
  while True:
    if prompt is not None:
      if turn:
        break
      line = prompt
    else:
      out.write("you> ")
      out.flush()
      line = stdin.readline()
      if not line:
        out.write("\n")
        break
      line = line.rstrip("\n")
      if line.strip() == "/reset":
        messages = messages[:1] if system else []
        continue
      if not line.strip():
        continue
    if loaded.is_chat:
      messages.append({"role": "user", "content": line})
      ids = inference.prompt_ids(loaded, messages)
    else:
      ids = inference.prompt_ids(loaded, line)
    room = loaded.cfg.max_seq_len - max_new_tokens
    if len(ids) > room:
      if loaded.is_chat and len(messages) > 1:  # drop the oldest turns to make room, and say so
        while len(ids) > room and len(messages) > 1:
          messages.pop(1 if system else 0)
          ids = inference.prompt_ids(loaded, messages)
        out.write("[older turns dropped to fit the context]\n")
      if len(ids) > room:
        ids = ids[-room:]
        out.write(f"[prompt cut to its last {room} tokens to fit the context]\n")
    if prompt is None:
      out.write("model> ")
    reply = _stream_reply(loaded, ids, sample_cfg, seed + turn, out)
    replies.append(reply)
    if loaded.is_chat:
      if reply.strip():
        messages.append({"role": "assistant", "content": reply})
      else:  # an empty turn cannot be rendered again: leave this exchange out of the history
        messages.pop()
        out.write("[empty reply: this exchange is not kept in the conversation]\n")
    turn += 1
  return replies
