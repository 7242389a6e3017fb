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
