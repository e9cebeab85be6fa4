"""Errors caused by the user's input (config, data, files), reported as one line by the CLI."""


class UserError(ValueError):
  """Bad input; the message names the problem and what to do instead."""


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss); the message says what to change."""
