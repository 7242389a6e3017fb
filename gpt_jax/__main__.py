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
    overrides.append(item[len("--config."):])
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
