"""The embedded graded tasks: correct answers, disjoint splits, the grader, comparisons, knobs."""

import json
import random
import re

import pytest

from gpt_jax.data import jsonl, tasks
from gpt_jax.data.tasks import Task, TaskSpec
from gpt_jax.errors import ConfigError, DataError


def solve(question: str) -> str:
  """An independent solver of the four task kinds, from the prompt text alone."""
  if m := re.fullmatch(r"Add (\d+) and (\d+)\.", question):
    return str(int(m[1]) + int(m[2]))
  kind, _, rest = question.partition(": ")
  items = rest.split(" ")
  if kind == "Reverse":
    return " ".join(items[::-1])
  if kind == "Sort":
    return " ".join(sorted(items, key=int))
  if kind == "Uppercase":
    return rest.upper()
  raise AssertionError(f"unknown prompt {question!r}")


def test_answers_are_correct_and_kinds_cycle():
  ts = tasks.make_tasks("train", 400, seed=3)
  assert [t.kind for t in ts[:8]] == list(tasks.KINDS) * 2
  for t in ts:
    assert t.answer == solve(t.question), t
  assert {t.kind for t in ts} == set(tasks.KINDS)


def test_deterministic_and_seeded():
  a = tasks.make_tasks("train", 50, seed=1)
  assert a == tasks.make_tasks("train", 50, seed=1)
  assert a != tasks.make_tasks("train", 50, seed=2)


def test_eval_prompts_never_in_train_whatever_the_seeds():
  spec = TaskSpec(digits=1, list_len=3, word_len=2)  # a small space: collisions would show up
  train = {t.question for seed in range(3) for t in tasks.make_tasks("train", 3000, seed, spec)}
  held = tasks.make_tasks("eval", 32, seed=7, spec=spec)  # 9 of the 100 one-digit sums are eval
  assert len({t.question for t in held}) == 32  # eval prompts are distinct
  assert not train & {t.question for t in held}
  for t in held:
    assert tasks.split_of(t.question, spec.eval_fraction) == "eval"


def test_dev_and_eval_halve_the_held_out_share_and_never_overlap():
  spec = TaskSpec(digits=1, list_len=3, word_len=2)  # a small space: collisions would show up
  train = {t.question for seed in range(3) for t in tasks.make_tasks("train", 3000, seed, spec)}
  dev = tasks.make_tasks("dev", 32, seed=7, spec=spec)
  test = tasks.make_tasks("eval", 32, seed=7, spec=spec)
  dev_q, test_q = {t.question for t in dev}, {t.question for t in test}
  assert len(dev_q) == len(test_q) == 32  # distinct within each split
  assert not dev_q & test_q and not train & (dev_q | test_q)
  for t in dev:
    assert tasks.hash_fraction(t.question) < spec.eval_fraction / 2
    assert tasks.split_of(t.question, spec.eval_fraction) == "dev"
  for t in test:
    assert spec.eval_fraction / 2 <= tasks.hash_fraction(t.question) < spec.eval_fraction
  # Over a whole prompt space (add with 2 digits: 10,000 prompts) the shares are ~10% / 10% / 80%.
  counts = {s: 0 for s in tasks.SPLITS}
  for a in range(100):
    for b in range(100):
      counts[tasks.split_of(f"Add {a} and {b}.", 0.2)] += 1
  assert 900 < counts["dev"] < 1100 and 900 < counts["eval"] < 1100
  # The demo's knobs hold >= 512 distinct test prompts (128 of each kind) and as many dev ones.
  for split in ("dev", "eval"):
    assert len({t.question for t in tasks.make_tasks(split, 512, 0)}) == 512


def test_difficulty_knobs_bound_the_prompts():
  spec = TaskSpec(kinds=("add", "sort", "upper"), digits=3, list_len=6, word_len=5)
  for t in tasks.make_tasks("train", 600, 0, spec):
    if t.kind == "add":
      a, b = map(int, re.findall(r"\d+", t.question))
      assert max(a, b) <= 999
    elif t.kind == "sort":
      assert 2 <= len(t.question.split(": ")[1].split()) <= 6
    else:
      assert 2 <= len(t.question.split(": ")[1]) <= 5
  big = [t for t in tasks.make_tasks("train", 300, 0, TaskSpec(kinds=("add",), digits=3))]
  assert max(int(t.answer) for t in big) > 99  # the knob really widens the range


def test_grade_is_exact_match_after_strip():
  t = Task("add", "Add 2 and 3.", "5")
  assert tasks.grade(t, "5") == 1.0
  assert tasks.grade(t, "  5\n") == 1.0
  assert tasks.grade(t, "5.") == 0.0
  assert tasks.grade(t, "The answer is 5") == 0.0
  assert tasks.grade(t, "") == 0.0


def test_comparisons_prefer_correct_and_bare_answers():
  ts = tasks.make_tasks("train", 400, 0)
  pairs = tasks.comparisons(ts, seed=0)
  assert pairs == tasks.comparisons(ts, seed=0)
  reasons = {p["reason"] for p in pairs}
  assert reasons == {"wrong", "rambling"}
  for t, p in zip(ts, pairs):
    assert p["prompt"] == t.messages
    assert tasks.grade(t, p["chosen"]) == 1.0
    assert tasks.grade(t, p["rejected"]) == 0.0
    assert p["rejected"].strip()
    if p["reason"] == "rambling":
      assert t.answer in p["rejected"]


def test_wrong_answers_are_plausible():
  rng = random.Random(0)
  for _ in range(20):
    w = tasks.wrong_answer(Task("add", "Add 20 and 21.", "41"), rng)
    assert w in {"42", "40", "4"} or (w[:2] == "41" and len(w) == 3)
    w = tasks.wrong_answer(Task("sort", "Sort: 3 1 2", "1 2 3"), rng)
    assert w in {"1 2", "2 1 3", "1 3 2"} or (w[:6] == "1 2 3 " and w[6:].isdigit())
    w = tasks.wrong_answer(Task("upper", "Uppercase: cat", "CAT"), rng)
    assert w in {"CA", "cAT", "CaT", "CAt"} or (w[:3] == "CAT" and len(w) == 4 and w.isupper())


def test_bad_knobs_and_too_small_space():
  with pytest.raises(ConfigError, match="tasks.digits"):
    TaskSpec(digits=0).validate()
  with pytest.raises(ConfigError, match="tasks.kinds: unknown kind 'mul'"):
    tasks.make_tasks("train", 1, 0, TaskSpec(kinds=("add", "mul")))
  with pytest.raises(DataError, match="distinct eval prompts"):
    tasks.make_tasks("eval", 500, 0, TaskSpec(kinds=("add",), digits=1))  # only 100 prompts exist
  with pytest.raises(DataError, match="distinct dev prompts"):
    tasks.make_tasks("dev", 20, 0, TaskSpec(kinds=("add",), digits=1))  # ~10 of the 100 are dev
  with pytest.raises(DataError, match="unknown split 'test'"):
    tasks.make_tasks("test", 1, 0)


def test_sft_rows_and_jsonl_roundtrip(tmp_path):
  ts = tasks.make_tasks("eval", 5, 0)
  convs = tasks.sft_conversations(ts)
  assert convs[0] == [
    {"role": "user", "content": ts[0].question},
    {"role": "assistant", "content": ts[0].answer},
  ]
  path = tmp_path / "sub" / "eval.jsonl"
  assert jsonl.write_jsonl(str(path), tasks.task_rows(ts)) == 5
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["messages"] for r in rows] == convs
  assert [r["answer"] for r in rows] == [t.answer for t in ts]
  assert not list(tmp_path.glob("sub/*.tmp*"))
  assert [row for _, row in jsonl.read_jsonl(str(path))] == rows
  path.write_text(path.read_text() + "\n{not json\n")
  with pytest.raises(DataError, match=r"eval.jsonl:7: not valid JSON"):
    list(jsonl.read_jsonl(str(path)))
