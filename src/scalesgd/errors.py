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


class WorkerFailedError(DistributedError):
    """A worker process died (a signal, a crash or an unexpected exit code); the job may restart from its last
    checkpoint (``--max-restarts``)."""


class CheckpointError(ScalesgdError):
    """A checkpoint that cannot be used or written: missing, damaged, of another format or another model."""


class StoppedError(ScalesgdError):
    """The run was asked to stop (SIGTERM, SIGINT, SIGHUP) and stopped after writing a checkpoint."""
