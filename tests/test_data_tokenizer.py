"""Tokenizer: exact round trips, special tokens, chat template, vocabulary check."""

import itertools
import os

import pytest

from gpt_jax import tokenizers as tok_lib
from gpt_jax.data.sources import iter_documents, parse_sources
from gpt_jax.errors import DataError
from gpt_jax.tokenizers import SPECIAL_PIECES, check_vocab, train_tokenizer
from gpt_jax.tokenizers import sentencepiece as sp_tok

SAMPLES = [
  "The quick brown fox jumps over the lazy dog.  Two spaces, a\ttab and a newline\n",
  "def f(x: int) -> int:\n    return x ** 2  # 1234567890\n\n\nclass A:\n\tpass\n",
  "机器学习是人工智能的一个分支。你好，世界！",
  "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷 math ∑∫ ✓",
  "  leading and trailing spaces  ",
  "\r\n\x00\x7f\u200b mixed \ufeff",
  "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  parts = []
  for part in ("pydoc_topics", "stdlib_code"):
    (src,) = parse_sources({part: {"paths": part, "format": "embedded", "weight": 1.0}})
    parts += [d[:20000] for d in itertools.islice(iter_documents(src), 15)]
  return train_tokenizer(parts, str(tmp_path_factory.mktemp("tok")), vocab_size=512, num_threads=2)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.sp.unk_id() not in ids  # byte fallback: nothing is unknown


def test_digits_split_and_vocab(tok):
  assert tok.vocab_size == 512
  pieces = [tok.sp.id_to_piece(i) for i in tok.encode("2024")]
  assert pieces == ["2", "0", "2", "4"]


def test_special_ids_distinct_and_not_forgeable(tok):
  ids = {name: tok.special_id(name) for name in SPECIAL_PIECES}
  assert len(set(ids.values())) == len(ids)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["bos"], ids["eos"], ids["pad"])
  text = "<|user|> hi <|endoftext|>"
  assert not set(tok.encode(text)) & set(ids.values())
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(DataError, match=r"unknown special token 'tool'"):
    tok.special_id("tool")


def test_render_chat_mask(tok):
  msgs = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
  ]
  ids, mask = tok.render_chat(msgs)
  sid = tok.special_id
  expect = [tok.bos_id]
  expect_mask = [0]
  for m in msgs:
    body = tok.encode(m["content"])
    learn = int(m["role"] == "assistant")
    expect += [sid(m["role"]), *body, sid("end_of_turn")]
    expect_mask += [0] + [learn] * (len(body) + 1)
  assert ids == expect and mask == expect_mask
  learned = [i for i, m in zip(ids, mask) if m]
  assert learned == tok.encode("4") + [sid("end_of_turn")]
  ids2, mask2 = tok.render_chat(msgs[:2], add_generation_prompt=True)
  assert ids2[-1] == sid("assistant") and ids2 == ids[: len(ids2)] and sum(mask2) == 0


def test_render_chat_errors(tok):
  with pytest.raises(DataError, match=r"chat: message 1 has unknown role 'tool'"):
    tok.render_chat([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
  with pytest.raises(DataError, match=r"chat: message 0 is an empty assistant turn"):
    tok.render_chat([{"role": "assistant", "content": "  "}])


def test_save_load_hash(tok, tmp_path):
  again = sp_tok.load(os.path.dirname(tok.path))
  assert again.sha256() == tok.sha256() and len(tok.sha256()) == 64
  with open(tok.path, "rb") as f:
    assert again.model_proto() == f.read()
  with pytest.raises(DataError, match=r"tokenizer: no tokenizer.model at"):
    sp_tok.load(str(tmp_path))
  # A run directory: <dir>/tokenizer/tokenizer.model, found by the loader of any tokenizer.
  run = tmp_path / "run"
  assert not tok_lib.has_tokenizer(str(run))
  (run / "tokenizer").mkdir(parents=True)
  (run / "tokenizer" / "tokenizer.model").write_bytes(tok.model_proto())
  assert tok_lib.has_tokenizer(str(run))
  loaded = tok_lib.load(str(run))
  assert loaded.kind == "sentencepiece" and loaded.sha256() == tok.sha256()
  with pytest.raises(DataError, match=r"has neither tokenizer/tokenizer.model nor hf_tokenizer/"):
    tok_lib.load(str(tmp_path / "empty"))


def test_check_vocab(tok):
  check_vocab(tok, 512)
  check_vocab(tok, 1024)
  with pytest.raises(DataError, match=r"model vocab_size 256 is smaller than the tokenizer's 512"):
    check_vocab(tok, 256)


def test_training_errors(tmp_path):
  with pytest.raises(DataError, match=r"vocab_size: 100 is too small"):
    train_tokenizer(["text"], str(tmp_path), vocab_size=100)
  with pytest.raises(DataError, match=r"training sample is empty"):
    train_tokenizer(["   \n  "], str(tmp_path), vocab_size=512)
  assert not (tmp_path / "tokenizer.model").exists()
