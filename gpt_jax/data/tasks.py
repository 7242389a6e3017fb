"""Embedded graded tasks: generated prompts with verifiable answers, for SFT, reward modeling and PPO.

Four kinds, short enough for a ~1-2M parameter model to learn in a few hundred CPU steps:

  add      "Add 23 and 48."    -> "71"        (knob: digits, the largest operand has that many)
  reverse  "Reverse: c a f"    -> "f a c"     (knob: list_len, 2..list_len letters)
  sort     "Sort: 4 1 3"       -> "1 3 4"     (knob: list_len, 2..list_len digits)
  upper    "Uppercase: cat"    -> "CAT"       (knob: word_len, 2..word_len letters)

The split of a prompt is decided by a hash of its text alone (not by the seed), so a held-out prompt
never appears in training whatever the seeds of the two calls. The held-out `eval_fraction` of the
prompt space is cut in two halves: "dev" (hash in [0, eval_fraction/2)), for choosing settings, and
"eval" (hash in [eval_fraction/2, eval_fraction)), the test prompts every stage reports on; "train"
is the rest. The three never share a prompt. `grade` is exact match after
whitespace strip. `comparisons` derives preference pairs from the same tasks: the correct answer
beats a plausible wrong one (off by one, two elements swapped, one element too few or too many), and among correct answers
the bare one beats the same answer wrapped in filler ("rambling").
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections.abc import Iterable, Sequence

from gpt_jax.config import Key
from gpt_jax.errors import ConfigError, DataError

KINDS = ("add", "reverse", "sort", "upper")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Filler around a correct answer: what a "rambling" response looks like to the reward model.
_RAMBLE = (
  ("The answer is {a}.", ""),
  ("Sure! {a}", ""),
  ("{a}", " I hope this helps."),
  ("Let me think. It is {a}", ", I believe."),
  ("Okay, so: {a}", " Done!"),
)


# The `tasks` section of every stage that uses the embedded tasks (SFT, reward modeling, the RL
# stages). kinds/digits/list_len/word_len/eval_fraction define the task space, which all stages of one
# recipe share; seed and the counts say what each stage draws from it.
SCHEMA = {
  "kinds": Key(",".join(KINDS)),  # comma-separated, some of KINDS
  "digits": Key(2, "[1, 9]"),  # add: operands up to this many digits
  "list_len": Key(4, "[2, 26]"),  # reverse / sort: lists of 2..list_len items
  "word_len": Key(4, "[2, 26]"),  # upper: words of 2..word_len letters
  "eval_fraction": Key(0.2, "(0, 1)"),  # share of the prompt space held out (by hash of the prompt)
  "seed": Key(0, ">= 0"),
  "train": Key(20_000, ">= 1"),  # training tasks drawn
  "eval": Key(500, ">= 1"),  # held-out tasks drawn
}
SPACE_KEYS = ("kinds", "digits", "list_len", "word_len", "eval_fraction")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The task space; `eval_fraction` of it (by hash of the prompt) is held out."""

  kinds: tuple[str, ...] = KINDS
  digits: int = 2
  list_len: int = 4
  word_len: int = 4
  eval_fraction: float = 0.2

  def validate(self) -> TaskSpec:
    """Raises ConfigError naming the first bad knob (as `tasks.<knob>`)."""
    unknown = [k for k in self.kinds if k not in KINDS]
    if not self.kinds or unknown:
      got = repr(unknown[0]) if unknown else "(none given)"
      raise ConfigError(f"tasks.kinds: unknown kind {got}; expected some of {KINDS}")
    for key, lo, hi in (("digits", 1, 9), ("list_len", 2, 26), ("word_len", 2, 26)):
      v = getattr(self, key)
      if not lo <= int(v) <= hi:
        raise ConfigError(f"tasks.{key}: must be in [{lo}, {hi}], got {v}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ConfigError(f"tasks.eval_fraction: must be in (0, 1), got {self.eval_fraction}")
    return self


def spec_from_config(section) -> TaskSpec:
  """The TaskSpec of a `tasks` config section (ConfigError names the key as `tasks.<knob>`)."""
  kinds = tuple(k.strip() for k in str(section["kinds"]).split(",") if k.strip())
  return TaskSpec(
    kinds,
    int(section["digits"]),
    int(section["list_len"]),
    int(section["word_len"]),
    float(section["eval_fraction"]),
  ).validate()


def check_data_section(section, name: str) -> None:
  """The keys of a stage section whose data default to the embedded tasks (cfg.sft, cfg.rm): data_path
  and eval_path are files that exist, and eval_path comes with a data_path. Errors name `<name>.<key>`."""
  for key in ("data_path", "eval_path"):
    if section[key] and not os.path.isfile(section[key]):
      raise DataError(f"{name}.{key}: file {section[key]} does not exist")
  if section.eval_path and not section.data_path:
    raise ConfigError(
      f"{name}.eval_path: given without {name}.data_path (the embedded tasks bring their own eval split)"
    )


@dataclasses.dataclass(frozen=True)
class Task:
  """One graded prompt: `question` is the user turn, `answer` the exact reference reply."""

  kind: str
  question: str
  answer: str

  @property
  def messages(self) -> list[dict]:
    """The prompt as chat messages (a single user turn)."""
    return [{"role": "user", "content": self.question}]

  def conversation(self, reply: str | None = None) -> list[dict]:
    """The prompt followed by an assistant turn (the reference answer unless `reply` is given)."""
    return [*self.messages, {"role": "assistant", "content": self.answer if reply is None else reply}]


def hash_fraction(text: str) -> float:
  """A stable number in [0, 1) from the text's sha1 (the same on every machine and Python)."""
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


SPLITS = ("train", "dev", "eval")


def split_of(question: str, eval_fraction: float) -> str:
  """'dev', 'eval' or 'train': the split that owns this prompt text. The held-out share
  `eval_fraction` (by hash) is halved: its lower half is 'dev' (for tuning), its upper half 'eval'
  (the test prompts that results are reported on)."""
  h = hash_fraction(question)
  if h < eval_fraction / 2:
    return "dev"
  return "eval" if h < eval_fraction else "train"


def _one(kind: str, rng: random.Random, spec: TaskSpec) -> Task:
  if kind == "add":
    hi = 10**spec.digits - 1
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return Task(kind, f"Add {a} and {b}.", str(a + b))
  n = rng.randint(2, spec.word_len if kind == "upper" else spec.list_len)
  if kind == "reverse":
    items = [rng.choice(_LETTERS) for _ in range(n)]
    return Task(kind, "Reverse: " + " ".join(items), " ".join(reversed(items)))
  if kind == "sort":
    items = [str(rng.randint(0, 9)) for _ in range(n)]
    return Task(kind, "Sort: " + " ".join(items), " ".join(sorted(items)))
  word = "".join(rng.choice(_LETTERS) for _ in range(n))
  return Task(kind, f"Uppercase: {word}", word.upper())


def make_tasks(split: str, n: int, seed: int, spec: TaskSpec = TaskSpec()) -> list[Task]:
  """Returns n tasks of `split` ('train' | 'dev' | 'eval'), deterministic in (split, n, seed, spec).

  Kinds cycle in spec.kinds order. Train tasks may repeat (a small prompt space is sampled with
  replacement); dev and eval tasks are distinct, and DataError says so when the held-out space is
  too small.
  """
  if split not in SPLITS:
    raise DataError(f"tasks: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
  spec.validate()
  rng = random.Random(f"{seed}:{split}")
  out, seen = [], set()
  # Generous: ten times the draws a split needs on average (a dev / eval draw succeeds with
  # probability eval_fraction / 2, ~1 in 10 by default).
  share = (1.0 - spec.eval_fraction) if split == "train" else spec.eval_fraction / 2
  attempts, budget = 0, int(10 / share) * max(n, 1) + 1000
  while len(out) < n:
    attempts += 1
    if attempts > budget:
      raise DataError(
        f"tasks: found only {len(out)} distinct {split} prompts of {n} wanted; "
        "raise tasks.digits / tasks.list_len / tasks.word_len or ask for fewer"
      )
    task = _one(spec.kinds[len(out) % len(spec.kinds)], rng, spec)
    if split_of(task.question, spec.eval_fraction) != split:
      continue
    if split != "train":
      if task.question in seen:
        continue
      seen.add(task.question)
    out.append(task)
  return out


def grade_text(answer: str, response: str) -> float:
  """1.0 when the response equals the answer after stripping surrounding whitespace, else 0.0."""
  return 1.0 if response.strip() == answer.strip() else 0.0


def grade(task: Task, response_text: str) -> float:
  """The gold score of a response: exact match with the reference answer (see grade_text)."""
  return grade_text(task.answer, response_text)


def sft_conversations(tasks: Iterable[Task]) -> list[list[dict]]:
  """Returns one [user, assistant] conversation per task, the assistant turn the reference answer."""
  return [t.conversation() for t in tasks]


def wrong_answer(task: Task, rng: random.Random) -> str:
  """A plausible wrong answer: off by one, two elements swapped, one element too few or too many;
  never equal to the answer."""
  a = task.answer
  if task.kind == "add":
    options = [
      str(int(a) + 1),
      str(int(a) - 1) if int(a) > 0 else str(int(a) + 2),
      a[:-1] or str(int(a) + 10),
      a + str(rng.randrange(10)),  # one digit too many
    ]
  elif task.kind in ("reverse", "sort"):
    items = a.split(" ")
    extra = rng.choice(_LETTERS) if task.kind == "reverse" else str(rng.randrange(10))
    options = [" ".join(items[:-1]), " ".join([*items, extra])]  # one element too few / too many
    for i in range(len(items) - 1):
      if items[i] != items[i + 1]:
        swapped = items[:i] + [items[i + 1], items[i]] + items[i + 2 :]
        options.append(" ".join(swapped))
    if task.kind == "reverse":
      options.append(" ".join(reversed(items)))  # echoing the input order is a classic slip
  else:
    i = rng.randrange(len(a))
    options = [a[:-1], a[:i] + a[i].lower() + a[i + 1 :], a + rng.choice(_LETTERS).upper()]
  options = [o for o in options if o.strip() and o.strip() != a]
  return rng.choice(options) if options else a + " " + a


def rambling_answer(task: Task, rng: random.Random) -> str:
  """The correct answer wrapped in filler (graded 0: the grader wants the bare answer)."""
  head, tail = rng.choice(_RAMBLE)
  return head.format(a=task.answer) + tail


def comparisons(tasks: Sequence[Task], seed: int, rambling_fraction: float = 0.25) -> list[dict]:
  """Returns one preference pair per task: {"prompt": messages, "chosen", "rejected", "kind", "reason"}.

  reason 'wrong': chosen is the answer, rejected a plausible wrong one; reason 'rambling' (about
  rambling_fraction of the pairs): chosen is the bare answer, rejected the answer in filler.
  """
  rng = random.Random(f"comparisons:{seed}")
  out = []
  for t in tasks:
    if rng.random() < rambling_fraction:
      reason, rejected = "rambling", rambling_answer(t, rng)
    else:
      reason, rejected = "wrong", wrong_answer(t, rng)
    out.append(
      {"prompt": t.messages, "chosen": t.answer, "rejected": rejected, "kind": t.kind, "reason": reason}
    )
  return out


def task_rows(tasks: Iterable[Task]) -> list[dict]:
  """JSONL rows {"messages", "kind", "answer"}: the conversation format plus what the grader needs."""
  return [{"messages": t.conversation(), "kind": t.kind, "answer": t.answer} for t in tasks]
