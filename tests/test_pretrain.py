"""The pretraining stage end to end: falling loss, metrics, exact resume, resharded resume, errors."""

import json
import os

import jax
import numpy as np
import pytest

from gpt_jax import metrics
from gpt_jax.errors import ConfigError, DataError
from gpt_jax.stages import pretrain
from tests.helpers import seed_workdir, tiny_config


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}


def test_trains_with_falling_loss_and_writes_metrics(prepared_dir, tmp_path):
  wd = seed_workdir(prepared_dir, str(tmp_path / "run"))
  cfg = tiny_config(
    **{"train.steps": 12, "train.eval_every": 12, "train.checkpoint_every": 12, "optim.lr_peak": 1e-2}
  )
  out = pretrain.run(cfg, wd, log_fn=lambda *a: None)
  losses = _losses(wd)
  assert sorted(losses) == list(range(1, 13))
  assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5
  ev = out.eval
  assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]), rel=1e-6)
  assert 0 < ev["bits_per_byte"] < ev["loss"] / np.log(2)
  assert os.listdir(os.path.join(wd, "tb"))
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["train"]["steps"] == 12


def test_resume_is_bitwise(prepared_dir, tmp_path):
  whole = seed_workdir(prepared_dir, str(tmp_path / "whole"))
  split = seed_workdir(prepared_dir, str(tmp_path / "split"))
  a = pretrain.run(tiny_config(), whole, log_fn=lambda *a: None)
  pretrain.run(tiny_config(**{"train.steps": 3}), split, log_fn=lambda *a: None)
  b = pretrain.run(tiny_config(), split, log_fn=lambda *a: None)  # same command, more steps: resumes at 3
  la, lb = _losses(whole), _losses(split)
  assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_changed_model_is_refused_on_resume(prepared_dir, tmp_path):
  wd = seed_workdir(prepared_dir, str(tmp_path / "changed"))
  pretrain.run(tiny_config(**{"train.steps": 3}), wd, log_fn=lambda *a: None)
  with pytest.raises(ConfigError, match=r"model\.d_model \(64 -> 96\)"):
    pretrain.run(tiny_config(**{"model.d_model": 96}), wd, log_fn=lambda *a: None)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"train.global_batch": 12}, r"train\.global_batch"),
    ({"mesh.data": 3}, "mesh"),
    ({"train.seq_len": 128}, r"train\.seq_len.*model\.max_seq_len=64"),
    ({"optim.lr_peak": -1.0}, r"optim\.lr_peak"),
    ({"train.grad_accum": 3}, r"train\.grad_accum"),
    ({"model.num_heads": 3}, r"model\.num_heads"),
  ],
)
def test_bad_config_fails_before_anything_is_built(tmp_path, overrides, match):
  wd = str(tmp_path / "bad")
  with pytest.raises(ConfigError, match=match):
    pretrain.run(tiny_config(**overrides), wd, log_fn=lambda *a: None)
  assert not os.path.exists(os.path.join(wd, "shards"))


def test_unknown_key_and_wrong_type_name_the_key():
  with pytest.raises(ConfigError, match=r"train\.bogus"):
    tiny_config(**{"train.bogus": 1})
  with pytest.raises(ConfigError, match=r"train\.steps: expected int"):
    tiny_config(**{"train.steps": "many"})


def test_model_vocabulary_smaller_than_tokenizer_is_refused(prepared_dir, tmp_path):
  wd = seed_workdir(prepared_dir, str(tmp_path / "vocab"))
  with pytest.raises(DataError, match="256"):
    pretrain.run(tiny_config(**{"model.vocab_size": 256}), wd, log_fn=lambda *a: None)


def test_unwritable_workdir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  (ro / "file").write_text("x")
  with pytest.raises(ConfigError, match="not writable"):
    pretrain.run(tiny_config(), str(ro / "file" / "sub"), log_fn=lambda *a: None)
