"""`python -m gpt_jax COMMAND --config=FILE.py:PRESET [--config.KEY=VALUE ...] --workdir=DIR`.

The config syntax is ml_collections' (a `get_config(arg)` per experiment file, dotted overrides of
a locked config); parsing is done here so that every bad flag, key or value is reported as one line
naming it, with exit status 2, before anything is built or compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

from gpt_jax.errors import GptJaxError, Interrupted

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str, *, config: bool = True, workdir: bool = True, args=()):
  """Registers a command; `args` are extra (flag, kwargs) pairs for argparse."""

  def register(fn):
    COMMANDS[name] = (fn, help, config, workdir, args)
    return fn

  return register


def _stage_command(name: str, help: str):
  def run(cfg, workdir, args):
    from gpt_jax import stages

    stages.module(name).run(cfg, workdir)

  command(name, help)(run)


_stage_command("pretrain", "pretrain a model on the tokenized source mixture")
_stage_command("sft", "supervised finetuning of a pretrained run on conversations")
_stage_command("rm", "train a reward model on pairwise comparisons")
_stage_command("dpo", "direct preference optimization of the SFT policy on comparisons (DPO)")
_stage_command("ppo", "reinforcement learning of the SFT policy against the reward model (PPO)")
_stage_command("grpo", "reinforcement learning of the SFT policy with group-relative advantages (GRPO)")


@command(
  "pipeline",
  "the whole recipe: pretrain, sft, rm, ppo, and the report",
  args=[("--force", dict(action="store_true", help="accept a workdir made by a different config"))],
)
def _pipeline(cfg, workdir, args):
  from gpt_jax.stages import pipeline

  timings = pipeline.run(cfg, workdir, force=args.force)
  print("stage seconds: " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))
  print(f"report: {workdir}/report.md")


_SAMPLE_ARGS = [
  ("--prompt", dict(default=None, help="answer this once and exit (default: interactive)")),
  ("--system", dict(default="", help="system message for finetuned models")),
  ("--temperature", dict(type=float, default=0.8)),
  ("--top_k", dict(type=int, default=0)),
  ("--top_p", dict(type=float, default=0.95)),
  ("--max_new_tokens", dict(type=int, default=64)),
  ("--seed", dict(type=int, default=0)),
]


@command(
  "chat",
  "talk to a checkpoint (base models continue text; finetuned ones answer)",
  config=False,
  args=_SAMPLE_ARGS,
)
def _chat(cfg, workdir, args):
  from gpt_jax import chat

  chat.run(
    workdir,
    prompt=args.prompt,
    system=args.system,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    max_new_tokens=args.max_new_tokens,
    seed=args.seed,
  )


@command(
  "score",
  "print the reward of prompt/response pairs from a reward-model workdir",
  config=False,
  args=[
    ("--prompt", dict(default=None)),
    ("--response", dict(default=None)),
    ("--pairs_file", dict(default=None, help="JSONL of {prompt, response}")),
  ],
)
def _score(cfg, workdir, args):
  from gpt_jax import rewards

  rewards.score_cli(workdir, prompt=args.prompt, response=args.response, pairs_file=args.pairs_file)


@command(
  "eval",
  "evaluate a run on benchmarks: bits per byte, multiple choice, generative tasks (docs/eval.md)",
  config=False,
  args=[
    (
      "--tasks",
      dict(required=True, help="e.g. embedded,mc:arc.jsonl,gen:gsm8k.jsonl:grader=number,bpb:wiki.txt"),
    ),
    ("--out", dict(default=None, help="where to write the results (default: <workdir>/eval.json)")),
    ("--batch", dict(type=int, default=32, help="rows per scoring or sampling call")),
    ("--max_new_tokens", dict(type=int, default=64, help="reply length of generative tasks")),
    ("--samples", dict(type=int, default=0, help="sampled replies per prompt for pass@1 and pass@N")),
    ("--temperature", dict(type=float, default=1.0, help="temperature of the sampled replies")),
    ("--seed", dict(type=int, default=0)),
    ("--mesh", dict(default="-1,1,1", help="DATA,FSDP,TENSOR sizes of the device mesh")),
    ("--chat", dict(default="auto", help="auto (finetuned runs use the chat template) | yes | no")),
  ],
)
def _eval(cfg, workdir, args):
  from gpt_jax.eval import run

  run.evaluate_run(
    workdir,
    args.tasks,
    out=args.out,
    batch=args.batch,
    max_new_tokens=args.max_new_tokens,
    samples=args.samples,
    temperature=args.temperature,
    seed=args.seed,
    mesh=args.mesh,
    chat=args.chat,
  )


@command(
  "import-hf",
  "turn a Hugging Face GPT-2 / LLaMA model directory into a gpt_jax checkpoint",
  config=False,
  workdir=False,
  args=[("--hf_dir", dict(required=True)), ("--out", dict(required=True))],
)
def _import_hf(cfg, workdir, args):
  from gpt_jax.interop import cli

  cli.cmd_import(hf_dir=args.hf_dir, out_dir=args.out)


@command(
  "export-hf",
  "write a gpt_jax checkpoint as a Hugging Face model directory",
  config=False,
  args=[("--out", dict(required=True))],
)
def _export_hf(cfg, workdir, args):
  from gpt_jax.interop import cli

  cli.cmd_export(workdir=workdir, out_dir=args.out)


@command(
  "describe",
  "print the hyperparameter table of a config and the compute it implies",
  workdir=False,
  args=[
    ("--devices", dict(type=int, default=1, help="number of devices for the time estimate")),
    ("--device", dict(default="a100", help="a100, h100, h200, tpu-v5p, ... or a peak FLOP/s such as 312e12")),
    ("--mfu", dict(type=float, default=0.4, help="model FLOPs utilization assumed (0, 1]")),
  ],
)
def _describe(cfg, workdir, args):
  from gpt_jax import config as config_lib
  from gpt_jax import describe, stages

  pipeline = cfg.get("stage") == "pipeline"
  parts = {n: cfg[n] for n in stages.ORDER if n in cfg} if pipeline else {"": cfg}
  tables = []
  for section, part in parts.items():  # every key typed and bounded first, as a run checks it
    try:
      config_lib.check(part, stages.module(str(part.get("stage"))).SCHEMA)
    except GptJaxError as e:
      raise type(e)(f"{section}.{e}" if section else str(e)) from None
    if "steps" in part.train:  # the RL stages count iterations of sampled replies, not tokens
      tables.append(
        describe.table(
          part,
          name=f"{args.config} [{section}]" if section else args.config,
          devices=args.devices,
          device=args.device,
          mfu=args.mfu,
        )
      )
  if not tables:
    raise _ArgError(
      f"--config: stage {cfg.get('stage')!r} trains on sampled replies; describe a pretrain, sft or rm config"
    )
  print("\n\n".join(tables))


def build_parser(name: str) -> argparse.ArgumentParser:
  fn, help_text, config, workdir, extra = COMMANDS[name]
  p = argparse.ArgumentParser(prog=f"python -m gpt_jax {name}", description=help_text)
  if config:
    p.add_argument("--config", required=True, help="experiment config, FILE.py:PRESET")
  if workdir:
    p.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and data artifacts")
    from gpt_jax import distributed

    distributed.add_flags(p)  # multi-process jobs: --coordinator_address, --num_processes, --process_id
  for flag, kwargs in extra:
    p.add_argument(flag, **kwargs)
  return p


class _ArgError(GptJaxError):
  pass


def parse(argv: list[str]):
  """Returns (command name, parsed args, config or None)."""
  from gpt_jax import config as config_lib

  if not argv or argv[0] not in COMMANDS:
    raise _ArgError(f"unknown command {argv[0]!r}" if argv else "missing command")
  name = argv[0]
  parser = build_parser(name)
  parser.error = lambda message: (_ for _ in ()).throw(_ArgError(message))  # one line, no usage dump
  args, rest = parser.parse_known_args(argv[1:])
  overrides = []
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      raise _ArgError(f"unrecognized argument {item!r} (overrides look like --config.train.steps=10)")
    overrides.append(item[len("--config.") :])
  cfg = config_lib.load(args.config, overrides) if getattr(args, "config", None) else None
  return name, args, cfg


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorstore"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not argv or argv[0] in ("-h", "--help"):
    print("usage: python -m gpt_jax COMMAND --config=FILE.py:PRESET [--config.KEY=VALUE ...] --workdir=DIR\n")
    for name, (_, help_text, *_rest) in COMMANDS.items():
      print(f"  {name:<10} {help_text}")
    return 0 if argv else 2
  from gpt_jax.loop import Preempted

  try:
    with _interrupts():
      name, args, cfg = parse(argv)
      if getattr(args, "workdir", None) and hasattr(args, "coordinator_address"):
        from gpt_jax import distributed

        distributed.initialize_from_args(args)
      COMMANDS[name][0](cfg, getattr(args, "workdir", None), args)
  except GptJaxError as e:
    print(f"gpt_jax: error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"gpt_jax: {e.message}", file=sys.stderr)
    return int(e.code)
  except KeyboardInterrupt as e:  # outside a training step (where the loop saves and raises Preempted)
    e = e if isinstance(e, Interrupted) else Interrupted("SIGINT")
    print(
      f"gpt_jax: interrupted ({e.signame}) outside a training step; nothing was saved since the newest "
      "checkpoint (rerun the same command to go on)",
      file=sys.stderr,
    )
    return e.code
  return 0


@contextlib.contextmanager
def _interrupts():
  """Within: SIGINT and SIGTERM raise Interrupted, so that both end a command alike, in one line and
  through every `finally` (a training loop replaces this with its own save-then-exit handler)."""

  def handle(signum, frame):
    raise Interrupted(signal.Signals(signum).name)

  old = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      old[sig] = signal.signal(sig, handle)
  try:
    yield
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)


if __name__ == "__main__":
  sys.exit(main())
