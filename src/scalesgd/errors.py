"""The project's error types. The CLI turns these into one line on stderr and a non-zero exit."""


class ScalesgdError(Exception):
    """A problem with the user's input or environment; the message says what was wrong and how to fix it."""


class ConfigError(ScalesgdError, ValueError):
    """An invalid option or combination of options."""


class DataError(ScalesgdError):
    """A data set that cannot be found, read or parsed."""


class DivergedError(ScalesgdError):
    """Training produced a non-finite loss."""


class DistributedError(ScalesgdError):
    """The process group could not be formed or a worker failed."""
