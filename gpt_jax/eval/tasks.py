"""What `eval --tasks` names: the syntax, and the task files read and checked line by line up front.

  --tasks=ITEM[,ITEM...]      ITEM = KIND[:ARG][:KEY=VALUE]...

  embedded[:add+sort]         the embedded graded tasks (data/tasks.py): held-out prompts of the run's task
                              space (its `tasks` section; the defaults for a pretrained run or an import),
                              answered greedily, graded by exact match. ARG picks kinds ('+'-joined).
                              Options: n (prompts, default 512), max_new_tokens (default 16).
  mc:FILE.jsonl               multiple choice by log-likelihood. Options: limit, baseline (the accuracy of
                              chance, default the mean of 1 / number of choices).
  gen:FILE.jsonl              generative, graded by exact match. Options: limit, max_new_tokens,
                              grader (exact | number: the final number, GSM8K style).
  bpb:FILE|SOURCE             bits per byte and loss over documents: a text file, glob or directory (format
                              from the extension: .jsonl, .parquet, else text), or the name of a source of
                              the run's data config (its held-out documents; a bare name is the source
                              before a file of that name, ./NAME the file). Options: limit (documents),
                              field (the JSONL key / Parquet column, default text), split (eval | train |
                              all; a SOURCE's default eval, a file's all).

Every item also takes name=LABEL (default: the file's stem, or the kind). A colon that is not
followed by KEY= belongs to the path. Items are separated by commas, so a path must not hold one.

Task files (JSONL, one object a line; blank lines skipped):

  mc   {"context": str, "choices": [str, ...], "label": int, "examples"?: [{"context", "choices", "label"}]}
       choice i is scored as the continuation " " + choices[i] of the context; solved examples come
       first, each as context + " " + choices[label], separated by blank lines ("\\n\\n").
  gen  {"prompt": str, "answer": str, "examples"?: [{"prompt", "answer"}], "until"?: [str]}  or
       {"messages": [{role, content}, ...], "answer"?: str}  (a trailing assistant turn is the answer)
       a finetuned model answers in the chat template (examples as earlier turns); a base model
       continues the text (examples as prompt + " " + answer, separated by blank lines) and its reply
       is cut at the first of `until` (default: a blank line).

Everything is read and checked here, before a model is built: a bad line is a DataError naming
file:line and what was expected.
"""

from __future__ import annotations

import dataclasses
import decimal
import glob
import os
import re

from gpt_jax.data import jsonl
from gpt_jax.data import sources as sources_lib
from gpt_jax.data import tasks as tasks_lib
from gpt_jax.errors import ConfigError, DataError

KINDS = ("embedded", "mc", "gen", "bpb")
GRADERS = ("exact", "number")
SPLITS = ("eval", "train", "all")
DEFAULT_EMBEDDED_N = 512
DEFAULT_EMBEDDED_NEW_TOKENS = 16  # as SFT and PPO measure held-out accuracy
DELIMITER = " "  # between a context and its continuation (lm-eval's target_delimiter)
EXAMPLE_SEPARATOR = "\n\n"  # between solved examples and the question (lm-eval's fewshot_delimiter)
BASE_UNTIL = ("\n\n",)  # where a base model's reply ends unless a line says otherwise

_INT = ("int", lambda v: int(v) >= 1, ">= 1")
_OPTIONS = {
  "embedded": {"name": ("str",), "n": _INT, "max_new_tokens": _INT},
  "mc": {"name": ("str",), "limit": _INT, "baseline": ("float", lambda v: 0 <= float(v) < 1, "in [0, 1)")},
  "gen": {"name": ("str",), "limit": _INT, "max_new_tokens": _INT, "grader": ("choice", GRADERS)},
  "bpb": {"name": ("str",), "limit": _INT, "field": ("str",), "split": ("choice", SPLITS)},
}
_OPTION = re.compile(r"^([a-z_]+)=(.*)$", re.S)
SYNTAX = "embedded[:KINDS], mc:FILE, gen:FILE or bpb:FILE|SOURCE, each with optional :KEY=VALUE"


@dataclasses.dataclass(frozen=True)
class Spec:
  """One item of --tasks."""

  kind: str
  arg: str
  name: str
  options: dict
  item: str  # the item as written, for messages

  def option(self, key: str, default=None):
    return self.options.get(key, default)


def _cast(spec_item: str, kind: str, key: str, value: str):
  known = _OPTIONS[kind]
  if key not in known:
    raise ConfigError(
      f"--tasks: {spec_item!r}: unknown option {key!r} for {kind} tasks; known: {', '.join(sorted(known))}"
    )
  rule = known[key]
  try:
    if rule[0] == "int":
      out = int(value)
    elif rule[0] == "float":
      out = float(value)
    else:
      out = value
  except ValueError:
    raise ConfigError(
      f"--tasks: {spec_item!r}: {key}={value!r} is not {'an integer' if rule[0] == 'int' else 'a number'}"
    ) from None
  if rule[0] == "choice" and out not in rule[1]:
    raise ConfigError(f"--tasks: {spec_item!r}: {key}={value!r}; expected one of {', '.join(rule[1])}")
  if rule[0] in ("int", "float") and not rule[1](out):
    raise ConfigError(f"--tasks: {spec_item!r}: {key}={value!r}; expected {rule[2]}")
  if rule[0] == "str" and not out:
    raise ConfigError(f"--tasks: {spec_item!r}: {key} is empty")
  return out


def parse(text: str) -> list[Spec]:
  """The items of a --tasks string; ConfigError naming the item for an unknown kind, a missing file
  argument, an unknown or bad option, or two tasks of one name. Checks the syntax only."""
  items = [s.strip() for s in str(text).split(",")]
  if not any(items):
    raise ConfigError(f"--tasks: no task given; expected a comma-separated list of {SYNTAX}")
  out, names = [], set()
  for item in items:
    if not item:
      raise ConfigError(f"--tasks: {text!r} has an empty item (two commas in a row?)")
    kind, _, rest = item.partition(":")
    if kind not in KINDS:
      raise ConfigError(f"--tasks: unknown task {item!r}; expected {SYNTAX}")
    arg_parts, options = [], {}
    for part in rest.split(":") if rest else []:
      m = _OPTION.match(part)
      if m:
        options[m.group(1)] = _cast(item, kind, m.group(1), m.group(2))
      else:
        arg_parts.append(part)
    arg = ":".join(arg_parts)
    if kind != "embedded" and not arg:
      raise ConfigError(f"--tasks: {item!r}: {kind} needs a file (e.g. {kind}:data/{kind}.jsonl)")
    if kind == "embedded" and arg:
      kinds = [k for k in arg.split("+")]
      bad = [k for k in kinds if k not in tasks_lib.KINDS]
      if bad:
        raise ConfigError(
          f"--tasks: {item!r}: unknown embedded kind {bad[0]!r}; expected some of {'+'.join(tasks_lib.KINDS)}"
        )
    name = options.pop("name", None) or _default_name(kind, arg)
    if name in names:
      raise ConfigError(f"--tasks: two tasks are named {name!r}; give one of them :name=LABEL")
    names.add(name)
    out.append(Spec(kind, arg, name, options, item))
  return out


def _default_name(kind: str, arg: str) -> str:
  if kind == "embedded":
    return "embedded" if not arg else f"embedded_{'_'.join(arg.split('+'))}"
  if kind == "bpb" and not _is_path(arg):
    return f"bpb_{arg}"
  stem = os.path.basename(arg.rstrip("/*")) or arg
  for ext in (".jsonl", ".json", ".parquet", ".txt", ".md"):
    if stem.endswith(ext):
      stem = stem[: -len(ext)]
  return stem if kind != "bpb" else f"bpb_{stem}"


def _is_path(arg: str) -> bool:
  """Whether `arg` is written as a path (a separator, an extension, a glob, ~): never a source name."""
  return glob.has_magic(arg) or os.sep in arg or "." in arg or arg.startswith("~")


# --- loaded tasks -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
  """One multiple-choice question: the full context (examples first) and the choices."""

  context: str
  choices: list[str]
  label: int
  where: str


@dataclasses.dataclass
class Question:
  """One generative prompt. `messages` is the chat form, `text` the plain-text form of the same prompt."""

  messages: list[dict]
  text: str
  answer: str | None
  kind: str
  until: tuple[str, ...] | None  # where a reply ends (None: a base model's BASE_UNTIL, a chat model's turn)
  where: str


@dataclasses.dataclass
class Task:
  spec: Spec
  kind: str  # mc | gen | bpb
  items: list  # Choice | Question | str (bpb documents)
  grader: str = "exact"
  max_new_tokens: int | None = None
  baseline: float | None = None  # mc: the accuracy of chance

  @property
  def name(self) -> str:
    return self.spec.name


def _where(spec: Spec, where: str) -> str:
  return f"{spec.kind}:{where}"


def _check_str(row: dict, key: str, where: str, *, empty_ok: bool = True) -> str:
  v = row.get(key)
  if not isinstance(v, str) or (not empty_ok and not v.strip()):
    got = "missing" if key not in row else f"{type(v).__name__} {v!r}"[:80]
    raise DataError(f"{where}: {key!r} must be a{' non-empty' if not empty_ok else ''} string, got {got}")
  return v


def _check_choices(row: dict, where: str) -> tuple[list[str], int]:
  choices = row.get("choices")
  if not isinstance(choices, list) or not choices:
    got = "missing" if "choices" not in row else repr(choices)[:80]
    raise DataError(f"{where}: 'choices' must be a non-empty list of strings, got {got}")
  for i, c in enumerate(choices):
    if not isinstance(c, str) or not c.strip():
      raise DataError(f"{where}: choice {i} must be a non-empty string, got {c!r}"[:200])
  if "label" not in row:
    raise DataError(
      f"{where}: 'label' is missing; expected the index of the right choice (0..{len(choices) - 1})"
    )
  label = row["label"]
  if isinstance(label, bool) or not isinstance(label, int):
    raise DataError(f"{where}: 'label' must be an integer index, got {label!r}"[:200])
  if not 0 <= label < len(choices):
    raise DataError(
      f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})"
    )
  return choices, label


def _rows(spec: Spec, path: str):
  if not os.path.isfile(path):
    raise DataError(f"--tasks: {spec.item!r}: file {path} does not exist")
  n = 0
  limit = spec.option("limit")
  for where, row in jsonl.read_jsonl(path):
    where = _where(spec, where)
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if limit is not None and n >= limit:
      return
    n += 1
    yield where, row
  if not n:
    raise DataError(f"--tasks: {spec.item!r}: {path} holds no examples")


def _examples(row: dict, where: str) -> list:
  ex = row.get("examples", None)
  if ex is None:
    return []
  if not isinstance(ex, list):
    raise DataError(f"{where}: 'examples' must be a list of solved examples, got {type(ex).__name__}")
  return ex


def load_mc(spec: Spec) -> Task:
  items = []
  for where, row in _rows(spec, os.path.expanduser(spec.arg)):
    context = _check_str(row, "context", where)
    choices, label = _check_choices(row, where)
    shots = []
    for j, e in enumerate(_examples(row, where)):
      w = f"{where}: example {j}"
      if not isinstance(e, dict):
        raise DataError(f"{w}: expected {{'context', 'choices', 'label'}}, got {type(e).__name__}")
      c, lab = _check_choices(e, w)
      shots.append(_check_str(e, "context", w) + DELIMITER + c[lab])
    items.append(Choice(EXAMPLE_SEPARATOR.join([*shots, context]), choices, label, where))
  baseline = spec.option("baseline")
  if baseline is None:
    baseline = sum(1.0 / len(c.choices) for c in items) / len(items)
  return Task(spec, "mc", items, baseline=float(baseline))


def _until(row: dict, where: str) -> tuple[str, ...] | None:
  if "until" not in row:
    return None
  u = row["until"]
  if isinstance(u, str):
    u = [u]
  if not isinstance(u, list) or not all(isinstance(s, str) and s for s in u):
    raise DataError(f"{where}: 'until' must be a list of non-empty strings, got {row['until']!r}"[:200])
  return tuple(u)


def load_gen(spec: Spec) -> Task:
  items = []
  for where, row in _rows(spec, os.path.expanduser(spec.arg)):
    until = _until(row, where)
    if "messages" in row:
      msgs = row["messages"]
      if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
      answer = row.get("answer")
      if msgs[-1].get("role") == "assistant":
        answer = answer if answer is not None else msgs[-1].get("content")
        msgs = msgs[:-1]
      for i, m in enumerate(msgs):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
          raise DataError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}")
      if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: the prompt has no user turn")
      text = "\n".join(m["content"] for m in msgs if m["role"] != "system")
    else:
      prompt = _check_str(row, "prompt", where, empty_ok=False)
      answer = row.get("answer")
      msgs, shots = [], []
      for j, e in enumerate(_examples(row, where)):
        w = f"{where}: example {j}"
        if not isinstance(e, dict):
          raise DataError(f"{w}: expected {{'prompt', 'answer'}}, got {type(e).__name__}")
        p, a = _check_str(e, "prompt", w, empty_ok=False), _check_str(e, "answer", w, empty_ok=False)
        msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        shots.append(p + DELIMITER + a)
      msgs.append({"role": "user", "content": prompt})
      text = EXAMPLE_SEPARATOR.join([*shots, prompt])
    if answer is None or not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
      raise DataError(f"{where}: 'answer' must be a string (the reference reply), got {answer!r}"[:200])
    items.append(Question(msgs, text, str(answer), "gen", until, where))
  grader = spec.option("grader", "exact")
  if grader == "number":
    for q in items:
      if final_number(q.answer) is None:
        raise DataError(f"{q.where}: grader=number but the answer {q.answer!r} holds no number"[:200])
  return Task(spec, "gen", items, grader=grader, max_new_tokens=spec.option("max_new_tokens"))


def load_embedded(spec: Spec, space: tasks_lib.TaskSpec, seed: int) -> Task:
  """The run's held-out embedded prompts: the first n of make_tasks("eval", ..., seed), the prompts an
  SFT run with this seed holds out (and the RL stages measure gold on)."""
  if spec.arg:
    space = dataclasses.replace(space, kinds=tuple(spec.arg.split("+"))).validate()
  n = int(spec.option("n", DEFAULT_EMBEDDED_N))
  try:
    held = tasks_lib.make_tasks("eval", n, seed, space)
  except DataError as e:
    raise DataError(f"--tasks: {spec.item!r}: {e} (or ask for fewer with :n=...)") from None
  items = [
    Question(t.messages, t.question, t.answer, t.kind, ("\n",), f"embedded:{i}") for i, t in enumerate(held)
  ]
  new = spec.option("max_new_tokens", DEFAULT_EMBEDDED_NEW_TOKENS)
  return Task(spec, "gen", items, grader="exact", max_new_tokens=new)


def _bpb_source(spec: Spec, data_cfg: dict | None):
  """(Source, split) of a bpb item: a file / glob / directory, or a source of the run's data config."""
  arg, field = spec.arg, spec.option("field", "text")
  sources_cfg = (data_cfg or {}).get("sources") or {}
  # A bare word names the run's source before a file of that name in the working directory (the
  # repository's docs/ folder must not stand in for the source 'docs'); ./NAME is the file.
  if _is_path(arg) or (arg not in sources_cfg and os.path.exists(arg)):
    p = os.path.expanduser(arg)
    fmt = "jsonl" if p.endswith((".jsonl", ".json")) else "parquet" if p.endswith(".parquet") else "text"
    src = sources_lib.Source(name=spec.name, paths=(p,), format=fmt, weight=1.0, text_field=field)
    return src, spec.option("split", "all"), None
  if arg not in sources_cfg:
    known = ", ".join(sorted(sources_cfg)) or "none: the run has no data config"
    raise DataError(
      f"--tasks: {spec.item!r}: {arg!r} is neither a file nor a source of the run's data config ({known})"
    )
  parsed = {s.name: s for s in sources_lib.parse_sources(sources_cfg, data_cfg.get("on_bad_utf8", "error"))}
  src = parsed[arg]
  if "field" in spec.options:
    src = dataclasses.replace(src, text_field=field)
  return src, spec.option("split", "eval"), float(data_cfg.get("eval_fraction", 0.05))


def load_bpb(spec: Spec, data_cfg: dict | None) -> Task:
  src, split, eval_fraction = _bpb_source(spec, data_cfg)
  if split != "all" and eval_fraction is None:
    raise ConfigError(f"--tasks: {spec.item!r}: split={split} needs a source of the run's data config")
  try:
    files = sources_lib.resolve_files(src)
    docs = []
    limit = spec.option("limit")
    for doc in sources_lib.iter_documents(src, files):
      if split != "all" and (sources_lib.doc_hash_fraction(doc) < eval_fraction) != (split == "eval"):
        continue
      docs.append(doc)
      if limit is not None and len(docs) >= limit:
        break
  except DataError as e:
    raise DataError(f"--tasks: {spec.item!r}: {e}") from None
  if not docs:
    raise DataError(f"--tasks: {spec.item!r}: no documents (split={split})")
  return Task(spec, "bpb", docs)


def load(specs: list[Spec], *, space: tasks_lib.TaskSpec, seed: int, data_cfg: dict | None) -> list[Task]:
  """Every task read and checked (DataError naming file:line for the first bad line)."""
  out = []
  for s in specs:
    if s.kind == "embedded":
      out.append(load_embedded(s, space, seed))
    elif s.kind == "mc":
      out.append(load_mc(s))
    elif s.kind == "gen":
      out.append(load_gen(s))
    else:
      out.append(load_bpb(s, data_cfg))
  return out


def task_space(config: dict) -> tuple[tasks_lib.TaskSpec, int]:
  """(task space, seed) of a run's config: its `tasks` section over the defaults."""
  section = {k: v.default for k, v in tasks_lib.SCHEMA.items()}
  section.update((config or {}).get("tasks") or {})
  return tasks_lib.spec_from_config(section), int(section["seed"])


# --- grading a generated reply ---------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> str | None:
  """The number a GSM8K-style answer ends with, normalised ("1,234.50" -> "1234.5"), or None."""
  text = str(text)
  if "####" in text:
    text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    found = found[:1]
  else:
    found = _NUMBER.findall(text)[-1:]
  if not found:
    return None
  try:
    d = decimal.Decimal(found[0].replace(",", "").rstrip("."))
  except decimal.InvalidOperation:
    return None
  d = d.normalize()
  return format(d, "f") if d != 0 else "0"


def grade(grader: str, answer: str, reply: str) -> float:
  if grader == "number":
    got = final_number(reply)
    return 1.0 if got is not None and got == final_number(answer) else 0.0
  return tasks_lib.grade_text(answer, reply)
