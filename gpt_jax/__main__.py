"""`python -m gpt_jax COMMAND --config=FILE.py:PRESET [--config.KEY=VALUE ...] --workdir=DIR`.

The config syntax is ml_collections' (a `get_config(arg)` per experiment file, dotted overrides of
a locked config); parsing is done here so that every bad flag, key or value is reported as one line
naming it, with exit status 2, before anything is built or compiled.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpt_jax.errors import GptJaxError

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str, *, config: bool = True, workdir: bool = True, args=()):
  """Registers a command; `args` are extra (flag, kwargs) pairs for argparse."""

  def register(fn):
    COMMANDS[name] = (fn, help, config, workdir, args)
    return fn

  return register


@command("pretrain", "pretrain a model on the tokenized source mixture")
def _pretrain(cfg, workdir, args):
  from gpt_jax.stages import pretrain

  pretrain.run(cfg, workdir)


@command("sft", "supervised finetuning of a pretrained checkpoint on conversations")
def _sft(cfg, workdir, args):
  from gpt_jax.stages import sft

  sft.run(cfg, workdir)


@command("rm", "train a reward model on pairwise comparisons")
def _rm(cfg, workdir, args):
  from gpt_jax.stages import rm

  rm.run(cfg, workdir)


@command("ppo", "reinforcement learning of the SFT policy against the reward model")
def _ppo(cfg, workdir, args):
  from gpt_jax.stages import ppo

  ppo.run(cfg, workdir)


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
  from gpt_jax.stages import rm

  rm.score_cli(workdir, prompt=args.prompt, response=args.response, pairs_file=args.pairs_file)


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


@command("describe", "print the hyperparameter table of a config", workdir=False)
def _describe(cfg, workdir, args):
  from gpt_jax import describe

  print(describe.table(cfg, name=args.config))


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
  from gpt_jax.trainer import Preempted

  try:
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
  return 0


if __name__ == "__main__":
  sys.exit(main())
