"""The project's error types. The CLI turns these into one line on stderr and a non-zero exit."""

import re
import signal


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
    """The run was asked to stop (SIGTERM, SIGINT, SIGHUP) and stopped after writing a checkpoint.

    Not a failure: the CLI prints the message (the step, the checkpoint, how to resume) as a stop and exits
    with 128 + the signal's number, as a process ended by that signal is reported by the shell.

    Args:
        message: one line; when ``signum`` is not given, the signal is read from a "stopped by SIGxxx" in it
            (the message is all that crosses from a worker process).
        signum: the signal's number, if known.
    """

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        if signum is None:
            found = re.search(r"stopped by (?:a second )?(SIG[A-Z]+)", message)
            signum = int(getattr(signal, found.group(1))) if found and hasattr(signal, found.group(1)) else None
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (SIGTERM's when unknown)."""
        return 128 + int(self.signum or signal.SIGTERM)
