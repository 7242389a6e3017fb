"""Shards: contents equal the encoded documents; idempotent re-runs; resume; repair; refusals."""

import json
import os
import shutil

import numpy as np
import pytest

from gpt_jax.data import make_loader, prepare
from gpt_jax.data.shards import split_documents
from gpt_jax.data.sources import parse_sources, resolve_files
from gpt_jax.data.synthetic import tiny_data_config
from gpt_jax.errors import DataError

QUIET = {"log": lambda *_: None}
BUDGET = {"token_budget": 200_000, "tokens_per_batch": 2048}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  cfg = tiny_data_config(str(root / "corpus"))
  wd = str(root / "wd")
  return cfg, wd, prepare(cfg, wd, **BUDGET, **QUIET)


def copy_wd(built, tmp_path):
  cfg, wd, _ = built
  dst = str(tmp_path / "wd")
  shutil.copytree(wd, dst)
  return cfg, dst


def snapshot(wd):
  out = {}
  for root, _, files in os.walk(os.path.join(wd, "shards")):
    for f in files:
      if f.endswith(".bin"):
        p = os.path.join(root, f)
        with open(p, "rb") as fh:
          out[os.path.relpath(p, wd)] = (fh.read(), os.stat(p).st_mtime_ns)
  return out


def test_shards_hold_the_encoded_documents(built):
  cfg, wd, p = built
  m = p.manifest["train"]
  assert m["dtype"] == "uint16" and m["tokenizer_sha256"] == p.tokenizer.sha256()
  srcs = {s.name: s for s in parse_sources(cfg.sources)}
  for split in ("train", "eval"):
    for name, src in srcs.items():
      entry = p.manifest[split]["sources"][name]
      stream = np.concatenate(
        [np.fromfile(os.path.join(wd, "shards", split, r["file"]), np.uint16) for r in entry["shards"]]
      )
      docs = list(split_documents(src, resolve_files(src), split, float(cfg.eval_fraction)))
      expect = np.concatenate([np.array(p.tokenizer.encode(d) + [p.tokenizer.eos_id]) for d in docs])
      np.testing.assert_array_equal(stream, expect)
      assert entry["documents"] == len(docs) and entry["tokens"] == len(expect)
      assert entry["bytes"] == sum(len(d.encode()) for d in docs)
      assert all(r["tokens"] == cfg.shard_tokens for r in entry["shards"][:-1])
  assert len(p.manifest["train"]["sources"]["code"]["shards"]) > 3
  assert p.train_tokens == sum(e["tokens"] for e in p.manifest["train"]["sources"].values())
  assert 1.0 < p.eval_bytes_per_token < 8.0


def test_mixture_table(built):
  _, _, p = built
  rows = {r["source"]: r for r in p.mixture_table}
  assert set(rows) == {"code", "docs", "web", "web_parquet"}
  assert rows["code"]["share"] == pytest.approx(0.6 / 1.1)
  for r in rows.values():
    assert r["epochs"] == pytest.approx(r["share"] * BUDGET["token_budget"] / r["tokens"])


def test_rerun_is_idempotent(built, tmp_path):
  cfg, wd = copy_wd(built, tmp_path)
  before = snapshot(wd)
  again = prepare(cfg, wd, **BUDGET, **QUIET)
  assert snapshot(wd) == before  # same bytes, files not even rewritten
  assert again.manifest == built[2].manifest


def test_resume_after_interruption_gives_identical_shards(built, tmp_path):
  cfg, wd = copy_wd(built, tmp_path)
  before = {k: v[0] for k, v in snapshot(wd).items()}
  man_path = os.path.join(wd, "shards", "train", "manifest.json")
  with open(man_path) as f:
    m = json.load(f)
  entry = m["sources"]["code"]
  for r in entry["shards"][3:]:  # as if the run died after its third shard
    os.remove(os.path.join(wd, "shards", "train", r["file"]))
  entry["shards"] = entry["shards"][:3]
  entry["complete"] = False
  with open(man_path, "w") as f:
    json.dump(m, f)
  prepare(cfg, wd, **BUDGET, **QUIET)
  assert {k: v[0] for k, v in snapshot(wd).items()} == before


def test_corrupt_and_truncated_shards_are_refused_then_rebuilt(built, tmp_path):
  cfg, wd = copy_wd(built, tmp_path)
  p = built[2]
  before = {k: v[0] for k, v in snapshot(wd).items()}
  shard = os.path.join(wd, "shards", "train", "code", "00002.bin")
  with open(shard, "r+b") as f:  # same size, other bytes: only the hash sees it
    f.seek(100)
    f.write(b"\xff\xff\xff\xff")
  other = os.path.join(wd, "shards", "train", "web", "00000.bin")
  with open(other, "r+b") as f:
    f.truncate(1000)
  moved = type(p)(**{**p.__dict__, "workdir": wd})
  with pytest.raises(
    DataError, match=rf"shard {other} of source 'web' has 1000 bytes, the manifest says 8192"
  ):
    make_loader(moved, "train", global_batch=8, seq_len=64, sharding=None, seed=0)
  prepare(cfg, wd, **BUDGET, **QUIET)
  assert {k: v[0] for k, v in snapshot(wd).items()} == before


def test_manifest_from_other_tokenizer_is_refused(built, tmp_path):
  cfg, wd = copy_wd(built, tmp_path)
  man_path = os.path.join(wd, "shards", "eval", "manifest.json")
  with open(man_path) as f:
    m = json.load(f)
  m["tokenizer_sha256"] = "0" * 64
  with open(man_path, "w") as f:
    json.dump(m, f)
  before = snapshot(wd)
  with pytest.raises(
    DataError,
    match=r"manifest .*/shards/eval/manifest.json was built with the sentencepiece tokenizer 000000000000, not",
  ):
    prepare(cfg, wd, **BUDGET, **QUIET)
  assert snapshot(wd) == before


def test_changed_vocab_or_source_is_refused(built, tmp_path):
  cfg, wd = copy_wd(built, tmp_path)
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.tokenizer.vocab_size = 1024
  with pytest.raises(
    DataError, match=r"tokenizer .* was trained with vocab_size 512, the config asks for 1024"
  ):
    prepare(cfg2, wd, **BUDGET, **QUIET)
  cfg3 = cfg.copy_and_resolve_references()
  cfg3.sources.code.min_chars = 500
  with pytest.raises(DataError, match=r"source 'code' changed .* since .*/shards/train was built"):
    prepare(cfg3, wd, **BUDGET, **QUIET)
  cfg4 = cfg.copy_and_resolve_references()
  cfg4.sources.code.weight = 3.0  # weights only steer the loader: shards stay valid
  p4 = prepare(cfg4, wd, **BUDGET, **QUIET)
  assert p4.mixture_table[0]["share"] == pytest.approx(3.0 / 3.5)
