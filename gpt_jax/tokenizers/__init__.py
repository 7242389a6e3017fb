"""Tokenizers: the project's SentencePiece model and an imported model's own (Hugging Face) tokenizer,
both behind one interface (base.Tokenizer).

tok = load(workdir)                     # whichever tokenizer a run directory holds
tok = sentencepiece.train_tokenizer(docs, out_dir, vocab_size=...)
ids, mask = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import os

from gpt_jax.errors import DataError
from gpt_jax.tokenizers import hf, sentencepiece
from gpt_jax.tokenizers.base import (
  CHAT_ROLES,
  HF_TOKENIZER_DIR,
  META_FILE,
  MODEL_FILE,
  SENTENCEPIECE_DIR,
  SPECIAL_PIECES,
  Tokenizer,
  check_message,
  check_vocab,
)
from gpt_jax.tokenizers.hf import ChatTokenizer, HfTokenizer, load_chat_tokenizer, load_hf_tokenizer
from gpt_jax.tokenizers.sentencepiece import SentencePieceTokenizer, train_tokenizer

__all__ = [
  "CHAT_ROLES",
  "HF_TOKENIZER_DIR",
  "META_FILE",
  "MODEL_FILE",
  "SENTENCEPIECE_DIR",
  "SPECIAL_PIECES",
  "ChatTokenizer",
  "HfTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "check_message",
  "check_vocab",
  "has_tokenizer",
  "hf",
  "load",
  "load_chat_tokenizer",
  "load_hf_tokenizer",
  "sentencepiece",
  "train_tokenizer",
]


def has_tokenizer(workdir: str) -> bool:
  """True when a workdir (or an imported checkpoint) holds a tokenizer that load() reads."""
  p = os.path.expanduser(str(workdir))
  return os.path.isfile(os.path.join(p, SENTENCEPIECE_DIR, MODEL_FILE)) or os.path.isdir(
    os.path.join(p, HF_TOKENIZER_DIR)
  )


def load(path: str) -> Tokenizer:
  """Returns the tokenizer of a stage workdir or an imported checkpoint: <path>/tokenizer/tokenizer.model
  (a SentencePieceTokenizer), else <path>/hf_tokenizer/ (the imported model's own tokenizer behind the
  chat adapter, a ChatTokenizer). A model file or a directory holding tokenizer.model loads as
  sentencepiece.load does. DataError when there is none."""
  p = os.path.expanduser(str(path))
  if os.path.isfile(p) or os.path.isfile(os.path.join(p, MODEL_FILE)):
    return sentencepiece.load(p)
  if os.path.isfile(os.path.join(p, SENTENCEPIECE_DIR, MODEL_FILE)):
    return sentencepiece.load(os.path.join(p, SENTENCEPIECE_DIR))
  if os.path.isdir(os.path.join(p, HF_TOKENIZER_DIR)):
    return load_chat_tokenizer(os.path.join(p, HF_TOKENIZER_DIR))
  raise DataError(f"tokenizer: {p} has neither {SENTENCEPIECE_DIR}/{MODEL_FILE} nor {HF_TOKENIZER_DIR}/")
