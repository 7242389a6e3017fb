"""An lm-evaluation-harness model over gpt_jax's jitted scorer and sampler (optional: requirements-eval.txt).

Importing this module registers the model name "gpt_jax" with lm_eval's registry. The harness's CLI
with it registered:

  python -m gpt_jax.eval.lm_eval_adapter --model gpt_jax --model_args workdir=RUN[,mesh=-1:1:1] \\
      --batch_size 32 --tasks TASK --include_path DIR_OF_TASK_YAMLS

(the arguments are lm_eval's own; `lm_eval run` is assumed when no subcommand is given), or its
Python API:

  import lm_eval
  from lm_eval.tasks import TaskManager
  from gpt_jax.eval import lm_eval_adapter  # registers "gpt_jax"
  lm_eval.simple_evaluate(model="gpt_jax", model_args="workdir=RUN", tasks=["my_task"],
                          task_manager=TaskManager(include_path="tasks/"))

loglikelihood and loglikelihood_rolling run through the same code as `python -m gpt_jax eval`
(loglik.encode_pairs, loglik.Scorer), so both give the same numbers on the same task;
generate_until samples with sampling.Replier (greedy unless do_sample) and cuts each reply at the
first `until` string. The prompts are plain text (a finetuned run's chat template is token-level,
so lm_eval's --apply_chat_template is not offered). model_args: workdir (any run directory),
mesh (DATA:FSDP:TENSOR, default -1:1:1), seed, max_gen_toks (default 256), and batch_size (the
harness passes its own --batch_size).
"""

from __future__ import annotations

import dataclasses

from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from gpt_jax import placed, runs, sharding
from gpt_jax import tokenizers as tok_lib
from gpt_jax.eval import generate, loglik
from gpt_jax.eval import tasks as tasks_lib

NAME = "gpt_jax"


def mc_task_yaml(path: str, name: str, split: str = "test") -> str:
  """An lm_eval task config (YAML) for a gpt_jax multiple-choice JSONL file: the same contexts
  (solved examples first), choices, delimiter and metrics (acc, acc_norm) as `eval --tasks=mc:FILE`."""
  sep = tasks_lib.EXAMPLE_SEPARATOR.encode("unicode_escape").decode()
  return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {path}
test_split: {split}
output_type: multiple_choice
doc_to_text: "{{% for e in (examples or []) %}}{{{{e.context}}}}{tasks_lib.DELIMITER}{{{{e.choices[e.label]}}}}{sep}{{% endfor %}}{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "{tasks_lib.DELIMITER}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _int(value, default: int) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    return default  # lm_eval's batch_size "auto"


@dataclasses.dataclass
class _Prompts:
  """What Generator.replies reads of a task."""

  items: list
  max_new_tokens: int


class GptJaxLM(LM):
  """The model of a gpt_jax run directory (a stage's workdir, a checkpoint, or an import)."""

  def __init__(self, workdir: str, batch_size=32, mesh: str = "-1:1:1", seed=0, max_gen_toks=256, **_ignored):
    super().__init__()
    run = runs.open(str(workdir), "model_args workdir")
    self.run, self.tok = run, run.tokenizer()
    cfg = run.model_config()
    tok_lib.check_vocab(self.tok, cfg.vocab_size)
    from gpt_jax.eval.run import parse_mesh

    self.model = placed.Model.build(cfg, sharding.make_mesh(parse_mesh(str(mesh).replace(":", ","))))
    batch = _int(batch_size, 32)
    self.scorer = loglik.Scorer(self.model, batch=batch)
    self.generator = generate.Generator(self.model, self.tok, batch=batch)
    self.params = run.restore(self.model.abstract())
    self.seed, self.max_gen_toks = int(seed), int(max_gen_toks)

  @property
  def max_length(self) -> int:
    return int(self.model.cfg.max_seq_len)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    enc = loglik.encode_pairs(self.tok, [tuple(r.args[:2]) for r in requests])
    for (_, cont), r in zip(enc, requests):
      if not cont:
        raise ValueError(f"continuation {r.args[1]!r} adds no token after its context")
    return self.scorer.score(self.params, [(ctx + cont, len(cont)) for ctx, cont in enc])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    ids = self.tok.encode_batch([r.args[0] for r in requests])
    return self.scorer.rolling(self.params, ids, loglik.prefix_id(self.tok))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict = {}
    for i, r in enumerate(requests):
      context, kw = r.args[0], dict(r.args[1] or {})
      until = kw.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      n = int(kw.get("max_gen_toks", self.max_gen_toks))
      n = max(1, min(n, self.max_length - 1))
      temperature = float(kw.get("temperature", 0.0) or 0.0)
      sampled = bool(kw.get("do_sample", False)) and temperature > 0
      key = (n, temperature if sampled else None)
      q = tasks_lib.Question([{"role": "user", "content": context}], context, None, "lm_eval", until, "")
      groups.setdefault(key, []).append((i, q))
    out: list = [None] * len(requests)
    for (n, temperature), rows in groups.items():
      texts, _ = self.generator.replies(
        self.params,
        _Prompts([q for _, q in rows], n),
        chat=False,
        max_new_tokens=n,
        temperature=temperature,
        seed=self.seed,
      )
      for (i, _), (text,) in zip(rows, texts):
        out[i] = text
    return out


if __name__ != "__main__":  # run as a script, the canonical module registers it (below)
  import lm_eval.models  # noqa: F401 - lm_eval's own names first (get_model adds them only to an empty registry)

  if NAME not in model_registry:
    register_model(NAME)(GptJaxLM)

if __name__ == "__main__":
  from lm_eval.__main__ import cli_evaluate

  from gpt_jax.eval import lm_eval_adapter  # noqa: F401 - registers "gpt_jax"

  cli_evaluate()
