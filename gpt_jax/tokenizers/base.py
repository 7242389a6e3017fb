"""What every tokenizer shares: the special pieces, chat roles, message and vocabulary checks, the file
names of a run directory, the chat-template renderer, and the interface (Tokenizer) the stages use.

Two kinds implement Tokenizer:
  "sentencepiece"  the project's own SentencePiece model (tokenizers/sentencepiece.py), with special
                   tokens for bos, eos, pad and each chat role;
  "hf"             an imported Hugging Face model's own tokenizer behind a chat adapter
                   (tokenizers/hf.py): role markers are plain text, end of turn is the model's eos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from gpt_jax.errors import DataError

# A run directory holds the project's tokenizer as SENTENCEPIECE_DIR/{MODEL_FILE, META_FILE}, or an
# imported model's own tokenizer files (Hugging Face layout) in HF_TOKENIZER_DIR.
SENTENCEPIECE_DIR = "tokenizer"
MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
HF_TOKENIZER_DIR = "hf_tokenizer"

SPECIAL_PIECES = {
  "unk": "<|unk|>",
  "bos": "<|bos|>",
  "eos": "<|endoftext|>",
  "pad": "<|pad|>",
  "system": "<|system|>",
  "user": "<|user|>",
  "assistant": "<|assistant|>",
  "end_of_turn": "<|end_of_turn|>",
}
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
  """The interface of every tokenizer the stages load (SentencePieceTokenizer, hf.ChatTokenizer)."""

  kind: str  # "sentencepiece" or "hf"
  path: str  # the file (sentencepiece) or directory (hf) it was read from
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no bos/eos added)."""

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Returns the ids of each text."""

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; special tokens decode to nothing."""

  def special_id(self, name: str) -> int:
    """Returns the id of a special token (bos, eos, pad, end_of_turn, ...); DataError if it has none."""

  def render_chat(
    self, messages: Sequence[dict], add_generation_prompt: bool = False
  ) -> tuple[list[int], list[int]]:
    """Returns (ids, mask) of [{role, content}, ...] in the chat template (see render_turns)."""

  def sha256(self) -> str:
    """Returns the hex digest that identifies the tokenizer (its files and template)."""

  def encoder_spec(self) -> tuple[str, bytes]:
    """Returns ("spm", model bytes) or ("bpe", tokenizer.json bytes): what a worker process needs to
    encode text exactly as encode() does (data/shards.py)."""


def check_message(i: int, m: dict, where: str = "chat") -> tuple[str, str]:
  """Returns (role, content) of chat message i; DataError naming `where` for an unknown role, non-text
  content or an empty assistant turn."""
  role, content = m.get("role"), m.get("content")
  if role not in CHAT_ROLES:
    raise DataError(f"{where}: message {i} has unknown role {role!r}; expected one of {CHAT_ROLES}")
  if not isinstance(content, str):
    raise DataError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
  if role == "assistant" and not content.strip():
    raise DataError(f"{where}: message {i} is an empty assistant turn; nothing to learn")
  return role, content


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises DataError if the model's embedding table cannot hold every token id."""
  if int(model_vocab_size) < tokenizer.vocab_size:
    raise DataError(
      f"model vocab_size {model_vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
      f"({tokenizer.path}); set the model's vocab_size to at least {tokenizer.vocab_size}"
    )


def render_turns(
  messages: Sequence[dict],
  encode: Callable[[str], list[int]],
  *,
  bos_id: int,
  role_ids: Mapping[str, Sequence[int]],
  end_id: int,
  add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
  """Renders [{role, content}, ...] as  bos (role_ids[role] content end_id)* [role_ids["assistant"]].

  Returns (ids, mask), two lists of equal length; mask is 1 on the tokens the model must learn to
  produce (each assistant content and its end_id), 0 elsewhere. Each content is encoded on its own,
  so its tokens never merge with a role's.
  """
  ids, mask = [bos_id], [0]
  for i, m in enumerate(messages):
    role, content = check_message(i, m)
    marker, body = role_ids[role], encode(content)
    learn = 1 if role == "assistant" else 0
    ids += [*marker, *body, end_id]
    mask += [0] * len(marker) + [learn] * (len(body) + 1)
  if add_generation_prompt:
    ids += role_ids["assistant"]
    mask += [0] * len(role_ids["assistant"])
  return ids, mask
