"""The project's SentencePiece BPE tokenizer: training, encode/decode, special tokens and the chat template.

The model is trained so that every string round-trips exactly: identity normalization, no dummy
prefix, whitespace kept as is, and byte fallback (a character outside the vocabulary becomes its
UTF-8 bytes, so nothing is ever unknown). Digits are split one per token.

Special tokens (ids fixed by the trainer, so they are the same for every trained model):
  0 <|unk|>  1 <|bos|>  2 <|endoftext|> (eos: the separator between documents)  3 <|pad|>
  then the chat control tokens <|system|> <|user|> <|assistant|> <|end_of_turn|>.
The chat tokens are control symbols: text that happens to contain "<|user|>" encodes as plain
characters, so a document cannot forge a turn.

Chat template (render_chat):
  <|bos|> <|role|> content <|end_of_turn|> <|role|> content <|end_of_turn|> ... [<|assistant|>]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from gpt_jax.errors import DataError
from gpt_jax.files import write_atomic
from gpt_jax.tokenizers.base import (
  CHAT_ROLES,
  META_FILE,
  MODEL_FILE,
  SENTENCEPIECE_DIR,
  SPECIAL_PIECES,
  render_turns,
)

# SentencePiece skips training sentences longer than this (bytes); longer lines are cut first.
_MAX_SENTENCE_BYTES = 4096
# Below this the 256 byte pieces and the specials leave almost no room for merges.
MIN_VOCAB_SIZE = 300


class SentencePieceTokenizer:
  """A trained SentencePiece model with the project's special tokens and chat template."""

  kind = "sentencepiece"

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self.path = path
    self._proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = int(self.sp.get_piece_size())
    self._special = {}
    for name, piece in SPECIAL_PIECES.items():
      i = self.sp.piece_to_id(piece)
      if self.sp.id_to_piece(i) != piece:
        raise DataError(
          f"tokenizer {path}: special token {piece!r} ({name}) missing; retrain it with gpt_jax"
        )
      self._special[name] = int(i)
    self.bos_id = self._special["bos"]
    self.eos_id = self._special["eos"]
    self.pad_id = self._special["pad"]
    self._role_ids = {role: [self._special[role]] for role in CHAT_ROLES}

  def encode(self, text: str) -> list[int]:
    """Returns the token ids of `text` (no bos/eos added)."""
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
    """Returns the ids of each text; SentencePiece encodes the list on `num_threads` threads."""
    return self.sp.encode(texts, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Returns the text of `ids`; special tokens decode to nothing."""
    return self.sp.decode([int(i) for i in ids])

  def special_id(self, name: str) -> int:
    """Returns the id of a special token: bos, eos, pad, unk, system, user, assistant, end_of_turn."""
    if name not in self._special:
      raise DataError(f"tokenizer: unknown special token {name!r}; expected one of {tuple(self._special)}")
    return self._special[name]

  def render_chat(
    self, messages: Sequence[dict], add_generation_prompt: bool = False
  ) -> tuple[list[int], list[int]]:
    """Renders [{role, content}, ...] with the chat template.

    Returns (ids, mask), two lists of equal length; mask is 1 on the tokens the model must learn to
    produce (each assistant content and its <|end_of_turn|>), 0 elsewhere. With
    add_generation_prompt the ids end with <|assistant|>, ready for sampling the reply.
    """
    return render_turns(
      messages,
      self.encode,
      bos_id=self.bos_id,
      role_ids=self._role_ids,
      end_id=self._special["end_of_turn"],
      add_generation_prompt=add_generation_prompt,
    )

  def sha256(self) -> str:
    """Returns the sha256 hex digest of the serialized model."""
    return hashlib.sha256(self._proto).hexdigest()

  def model_proto(self) -> bytes:
    """Returns the serialized model (to rebuild the tokenizer in another process)."""
    return self._proto

  def encoder_spec(self) -> tuple[str, bytes]:
    """("spm", the serialized model): what a worker process needs to encode as this tokenizer does."""
    return "spm", self._proto


def load(path_or_workdir: str) -> SentencePieceTokenizer:
  """Returns the tokenizer of a model file, a tokenizer directory, or a workdir holding tokenizer/tokenizer.model."""
  p = os.path.expanduser(str(path_or_workdir))
  for cand in (p, os.path.join(p, MODEL_FILE), os.path.join(p, SENTENCEPIECE_DIR, MODEL_FILE)):
    if os.path.isfile(cand):
      with open(cand, "rb") as f:
        proto = f.read()
      try:
        return SentencePieceTokenizer(proto, cand)
      except RuntimeError as e:
        raise DataError(f"tokenizer {cand}: not a SentencePiece model ({e})") from None
  raise DataError(f"tokenizer: no {MODEL_FILE} at {p} (nor in {p}/tokenizer/)")


def training_sentences(docs: Iterable[str]) -> Iterable[str]:
  """Yields the non-blank lines of `docs`, cut to SentencePiece's sentence length limit."""
  for doc in docs:
    for line in doc.split("\n"):
      if not line.strip():
        continue
      while len(line.encode("utf-8", "surrogatepass")) > _MAX_SENTENCE_BYTES:
        yield line[: _MAX_SENTENCE_BYTES // 4]
        line = line[_MAX_SENTENCE_BYTES // 4 :]
      yield line


def train_tokenizer(
  docs: Sequence[str], out_dir: str, *, vocab_size: int, num_threads: int = 1, seed: int = 0
) -> SentencePieceTokenizer:
  """Trains a BPE model on `docs`, writes out_dir/tokenizer.model (atomically) and its metadata.

  Returns the loaded SentencePieceTokenizer. Raises DataError if the sample is empty or vocab_size too small.
  """
  if vocab_size < MIN_VOCAB_SIZE:
    raise DataError(
      f"data.tokenizer.vocab_size: {vocab_size} is too small; expected at least {MIN_VOCAB_SIZE}"
    )
  sentences = list(training_sentences(docs))
  if not sentences:
    raise DataError(
      "tokenizer: the training sample is empty; check data.tokenizer.sample_bytes and the sources"
    )
  model = io.BytesIO()
  controls = [SPECIAL_PIECES[k] for k in ("system", "user", "assistant", "end_of_turn")]
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      minloglevel=2,  # the trainer logs every step otherwise
      model_type="bpe",
      vocab_size=int(vocab_size),
      byte_fallback=True,
      split_digits=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      character_coverage=0.9995,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      num_threads=max(1, int(num_threads)),
      unk_id=0,
      bos_id=1,
      eos_id=2,
      pad_id=3,
      unk_piece=SPECIAL_PIECES["unk"],
      bos_piece=SPECIAL_PIECES["bos"],
      eos_piece=SPECIAL_PIECES["eos"],
      pad_piece=SPECIAL_PIECES["pad"],
      control_symbols=controls,
      hard_vocab_limit=False,
    )
  except RuntimeError as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"tokenizer training failed (vocab_size={vocab_size}): {msg}") from None
  proto = model.getvalue()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, MODEL_FILE)
  tok = SentencePieceTokenizer(proto, path)
  meta = {
    "vocab_size_requested": int(vocab_size),
    "vocab_size": tok.vocab_size,
    "sha256": tok.sha256(),
    "sentences": len(sentences),
    "sample_bytes": sum(len(s.encode("utf-8", "surrogatepass")) for s in sentences),
    "special_ids": {k: tok.special_id(k) for k in SPECIAL_PIECES},
  }
  write_atomic(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=2).encode())
  write_atomic(path, proto)  # the model last: its presence marks a finished tokenizer
  return tok
