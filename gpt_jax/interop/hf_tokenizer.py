"""Tokenizers of Hugging Face model directories: byte-level BPE (tokenizer.json) or SentencePiece.

GPT-2's byte-level BPE is read with the `tokenizers` library (the reference implementation, shipped
with transformers); LLaMA's tokenizer.model with sentencepiece. Both get the same small interface.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from gpt_jax.errors import DataError


def _special_token(model_dir: str, key: str) -> str | None:
  """Returns tokenizer_config.json's `key` (e.g. eos_token) as a string, if any."""
  path = os.path.join(model_dir, "tokenizer_config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    value = json.load(f).get(key)
  return value.get("content") if isinstance(value, dict) else value


class HfTokenizer:
  """encode/decode over either backend; eos_id/bos_id are None when the tokenizer has none."""

  def __init__(self, backend, kind: str, path: str, eos_id: int | None, bos_id: int | None):
    self.backend, self.kind, self.path = backend, kind, path
    self.eos_id, self.bos_id = eos_id, bos_id
    if kind == "bpe":
      self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    else:
      self.vocab_size = int(backend.get_piece_size())

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no bos/eos added)."""
    if self.kind == "bpe":
      return list(self.backend.encode(text, add_special_tokens=False).ids)
    return list(self.backend.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids` (special tokens dropped)."""
    ids = [int(i) for i in ids]
    if self.kind == "bpe":
      return self.backend.decode(ids, skip_special_tokens=True)
    return self.backend.decode(ids)


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
