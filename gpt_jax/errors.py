"""Project exception types: every user-facing failure is one line that names its culprit."""


class GptJaxError(Exception):
  """Base class: the message is one line naming the key, file, tensor or stage at fault."""


class ConfigError(GptJaxError, ValueError):
  """A config key is unknown, of the wrong type, or out of range."""


class DataError(GptJaxError, ValueError):
  """A data source, file, shard, manifest or tokenizer is missing or malformed."""


class CheckpointError(GptJaxError):
  """A checkpoint is missing, corrupt, locked, or of another architecture."""


class TrainingError(GptJaxError, RuntimeError):
  """Training cannot go on (non-finite loss, preemption bookkeeping, ...)."""


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM outside a training step (a training loop saves first and raises Preempted)."""

  EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, what schedulers expect

  def __init__(self, signame: str = "SIGINT"):
    super().__init__(signame)
    self.signame = signame
    self.code = self.EXIT_CODES[signame]
