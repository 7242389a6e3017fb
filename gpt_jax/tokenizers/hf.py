"""Tokenizers of Hugging Face model directories: byte-level BPE (tokenizer.json) or SentencePiece.

GPT-2's byte-level BPE is read with the `tokenizers` library (the reference implementation, shipped
with transformers); LLaMA's tokenizer.model with sentencepiece. Both get the same small interface.

ChatTokenizer puts that interface behind the common one (tokenizers/base.py Tokenizer: chat template,
special ids, identity hash), so that every stage can finetune and sample an imported model in its own
vocabulary; load_chat_tokenizer reads it from <import>/hf_tokenizer or <workdir>/hf_tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence

from gpt_jax.errors import DataError
from gpt_jax.tokenizers.base import CHAT_ROLES, render_turns


def _special_token(model_dir: str, key: str) -> str | None:
  """Returns tokenizer_config.json's `key` (e.g. eos_token) as a string, if any."""
  path = os.path.join(model_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    value = json.load(f).get(key)
  return value.get("content") if isinstance(value, dict) else value


class HfTokenizer:
  """encode/decode over either backend (format "bpe": a `tokenizers` Tokenizer, "spm": a
  SentencePieceProcessor); eos_id/bos_id are None when the tokenizer has none."""

  def __init__(self, backend, format: str, path: str, eos_id: int | None, bos_id: int | None):
    self.backend, self.format, self.path = backend, format, path
    self.eos_id, self.bos_id = eos_id, bos_id
    if format == "bpe":
      self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    else:
      self.vocab_size = int(backend.get_piece_size())

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no bos/eos added)."""
    if self.format == "bpe":
      return list(self.backend.encode(text, add_special_tokens=False).ids)
    return list(self.backend.encode(text))

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Returns the ids of each text: `tokenizers` encodes the batch on its own thread pool,
    SentencePiece on `num_threads` threads."""
    if self.format == "bpe":
      return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in self.backend.encode(list(texts), num_threads=max(1, int(num_threads)))]

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids` (special tokens dropped)."""
    ids = [int(i) for i in ids]
    if self.format == "bpe":
      return self.backend.decode(ids, skip_special_tokens=True)
    return self.backend.decode(ids)

  def encoder_spec(self) -> tuple[str, bytes]:
    """(format, file bytes): "bpe" and the tokenizer.json, or "spm" and the SentencePiece model; what a
    worker process needs to encode as this tokenizer does (shards.py)."""
    with open(self.path, "rb") as f:
      return self.format, f.read()

  def token_to_id(self, piece: str) -> int | None:
    """Returns the id of one whole token, or None when the vocabulary has no such token."""
    if self.format == "bpe":
      return self.backend.token_to_id(piece)
    i = int(self.backend.piece_to_id(piece))
    return i if self.backend.id_to_piece(i) == piece else None


def load_hf_tokenizer(model_dir: str) -> HfTokenizer:
  """Returns the tokenizer of a Hugging Face model directory: tokenizer.json (BPE) or tokenizer.model (SentencePiece)."""
  bpe, spm_path = os.path.join(model_dir, "tokenizer.json"), os.path.join(model_dir, "tokenizer.model")
  if os.path.isfile(spm_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
      sp.load(spm_path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"tokenizer {spm_path}: not a SentencePiece model ({e})") from None

    def sp_id(key: str, default: int) -> int | None:
      piece = _special_token(model_dir, key)
      i = sp.piece_to_id(piece) if piece else default
      return int(i) if i is not None and i >= 0 else None

    return HfTokenizer(sp, "spm", spm_path, sp_id("eos_token", sp.eos_id()), sp_id("bos_token", sp.bos_id()))
  if os.path.isfile(bpe):
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise DataError(
        f"tokenizer {bpe}: reading it needs the `tokenizers` package (pip install tokenizers)"
      ) from None
    try:
      tok = Tokenizer.from_file(bpe)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception
      raise DataError(f"tokenizer {bpe}: not a tokenizers JSON file ({e})") from None

    def tok_id(key: str, fallback: str | None) -> int | None:
      piece = _special_token(model_dir, key) or fallback
      return None if piece is None else tok.token_to_id(piece)

    return HfTokenizer(tok, "bpe", bpe, tok_id("eos_token", "<|endoftext|>"), tok_id("bos_token", None))
  raise DataError(f"tokenizer: {model_dir} has neither tokenizer.model nor tokenizer.json")


# --- the chat adapter of an imported model -----------------------------------------------------------

# Files of a Hugging Face tokenizer that an import (and a workdir started from one) carries along.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Named in sha256(): a change of the template below must change every adapter's identity.
CHAT_TEMPLATE = "gpt_jax text role markers v1"
ROLE_MARKER = "<|{role}|>\n"


class ChatTokenizer:
  """An imported model's own tokenizer behind the common interface (tokenizers/base.py Tokenizer).

  The model keeps its vocabulary: nothing is added to it, so no embedding row is resized or left
  untrained. The chat template therefore uses only what every tokenizer has:

    [bos] "<|role|>\\n" content <eos> "<|role|>\\n" content <eos> ... ["<|assistant|>\\n"]

  * a role marker ("<|system|>\\n", "<|user|>\\n", "<|assistant|>\\n") is plain text, encoded with
    the model's own tokenizer (several tokens; each segment is encoded on its own, so content tokens
    never merge with a marker);
  * end_of_turn is the model's eos token (GPT-2 <|endoftext|>, LLaMA </s>): generation stops there;
  * bos is the tokenizer's bos (LLaMA <s>); a tokenizer without one (GPT-2) starts with eos, GPT-2's
    own convention (its bos_token is <|endoftext|>);
  * pad is the tokenizer's pad token, else eos (padding is always masked by lengths, never by id).

  render_chat's mask is 1 on each assistant content token and its closing eos, as for the project's
  SentencePieceTokenizer. special_id answers bos, eos, pad and end_of_turn; a role has no single-token id (the
  stages need none) and marker_ids(role) returns its tokens. Content is encoded with special tokens
  read as plain text (a message containing "<|endoftext|>" cannot end a turn), but a message that
  contains a marker's text, e.g. "<|user|>\\n", reads like a turn boundary: the price of text markers.
  sha256 hashes the tokenizer files and the template name.
  """

  kind = "hf"

  def __init__(self, hf: HfTokenizer, files: dict[str, bytes], pad_id: int | None = None):
    if hf.eos_id is None:
      raise DataError(
        f"tokenizer {hf.path}: no eos token (tokenizer_config.json eos_token); the chat template ends "
        "each turn with it"
      )
    if hf.format == "bpe" and hasattr(hf.backend, "encode_special_tokens"):
      hf.backend.encode_special_tokens = True  # content never forges a special token
    self.hf, self.path = hf, os.path.dirname(hf.path)
    self.vocab_size = hf.vocab_size
    self.eos_id = int(hf.eos_id)
    self.bos_id = int(hf.bos_id) if hf.bos_id is not None else self.eos_id
    self.pad_id = int(pad_id) if pad_id is not None else self.eos_id
    self._special = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "end_of_turn": self.eos_id}
    self._markers = {role: hf.encode(ROLE_MARKER.format(role=role)) for role in CHAT_ROLES}
    h = hashlib.sha256(CHAT_TEMPLATE.encode())
    for name in sorted(files):
      h.update(f"\0{name}\0{len(files[name])}\0".encode())
      h.update(files[name])
    self._sha256 = h.hexdigest()

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no bos/eos added)."""
    return self.hf.encode(text)

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Returns the ids of each text (see HfTokenizer.encode_batch)."""
    return self.hf.encode_batch(texts, num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; special tokens decode to nothing."""
    return self.hf.decode(ids)

  def encoder_spec(self) -> tuple[str, bytes]:
    """What a worker process needs to encode as encode() does (see HfTokenizer.encoder_spec)."""
    return self.hf.encoder_spec()

  def special_id(self, name: str) -> int:
    """Returns the id of bos, eos, pad or end_of_turn (= eos). DataError for a role: its marker is text."""
    if name in CHAT_ROLES:
      raise DataError(
        f"tokenizer {self.path}: role {name!r} has no token of its own in an imported model's chat template "
        f"(its marker is the text {ROLE_MARKER.format(role=name)!r}); use marker_ids({name!r})"
      )
    if name not in self._special:
      raise DataError(f"tokenizer: unknown special token {name!r}; expected one of {tuple(self._special)}")
    return self._special[name]

  def marker_ids(self, role: str) -> list[int]:
    """Returns the tokens of a role's marker text."""
    if role not in self._markers:
      raise DataError(f"chat: unknown role {role!r}; expected one of {CHAT_ROLES}")
    return list(self._markers[role])

  def render_chat(
    self, messages: Sequence[dict], add_generation_prompt: bool = False
  ) -> tuple[list[int], list[int]]:
    """Renders [{role, content}, ...] with the template above; returns (ids, mask) as render_turns does."""
    return render_turns(
      messages,
      self.hf.encode,
      bos_id=self.bos_id,
      role_ids=self._markers,
      end_id=self.eos_id,
      add_generation_prompt=add_generation_prompt,
    )

  def sha256(self) -> str:
    """Returns the sha256 hex digest of the tokenizer files and the chat template's name."""
    return self._sha256


def tokenizer_files(tok_dir: str) -> dict[str, bytes]:
  """name -> bytes of the TOKENIZER_FILES present in tok_dir."""
  out = {}
  for name in TOKENIZER_FILES:
    path = os.path.join(tok_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


def tokenizer_dir(path: str, what: str) -> str:
  """The directory of Hugging Face tokenizer files that `path` names: the directory itself, or the
  directory of a tokenizer.json / tokenizer.model in it. DataError naming `what` otherwise."""
  p = os.path.abspath(os.path.expanduser(str(path)))
  if os.path.isfile(p) and os.path.basename(p) in ("tokenizer.json", "tokenizer.model"):
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    raise DataError(f"{what}: {p} does not exist (expected a Hugging Face tokenizer directory)")
  if not any(os.path.isfile(os.path.join(p, n)) for n in ("tokenizer.json", "tokenizer.model")):
    raise DataError(f"{what}: {p} holds neither tokenizer.json nor tokenizer.model")
  return p


def install_files(src_dir: str, dest_dir: str) -> None:
  """Copies the TOKENIZER_FILES of src_dir into dest_dir, which must not exist yet: written into a
  temporary directory renamed at the end, so that its presence marks a finished copy."""
  tmp = f"{dest_dir}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  for name, data in tokenizer_files(src_dir).items():
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(data)
  os.replace(tmp, dest_dir)


def load_chat_tokenizer(tok_dir: str) -> ChatTokenizer:
  """Returns the ChatTokenizer of a directory of Hugging Face tokenizer files (e.g. <import>/hf_tokenizer)."""
  hf = load_hf_tokenizer(tok_dir)
  pad = _special_token(tok_dir, "pad_token")
  pad_id = hf.token_to_id(pad) if pad else None
  return ChatTokenizer(hf, tokenizer_files(tok_dir), pad_id)
