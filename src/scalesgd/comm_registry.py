"""Which communication strategies exist, by name, without importing torch (the command line checks names
before anything heavy is loaded).

A ``--comm`` name is a transport (how buffers are summed), optionally behind a codec (how the gradient part
is compressed first): ``allreduce``, ``ring``, ``ring-tcp``, ``ps``; ``qsgd`` (QSGD over the built-in
all-reduce) and ``qsgd+TRANSPORT`` (QSGD over another transport). Each name points at the class that
implements it (``module:Class``); what a strategy is (exact or lossy, the devices it serves, its options)
is declared on that class, and :mod:`scalesgd.comm` reads it from there.
"""

from __future__ import annotations

from scalesgd.errors import ConfigError

# name -> "module:Class". Imported on first use (scalesgd.tcp_comm only when ring-tcp is asked for).
TRANSPORTS: dict[str, str] = {
    "allreduce": "scalesgd.comm:BuiltinAllReduce",
    "ring": "scalesgd.comm:RingAllReduce",
    "ring-tcp": "scalesgd.tcp_comm:TcpRingAllReduce",
    "ps": "scalesgd.comm:ParameterServerAllReduce",
}
CODECS: dict[str, str] = {
    "qsgd": "scalesgd.comm:QSGDCodec",
}
DEFAULT_TRANSPORT = "allreduce"  # what a codec name alone runs over
SEPARATOR = "+"

# Every name --comm accepts: the transports, each codec alone, and each codec over every other transport.
COMM_NAMES: tuple[str, ...] = (*TRANSPORTS, *CODECS, *(f"{c}{SEPARATOR}{t}" for c in CODECS for t in TRANSPORTS
                                                      if t != DEFAULT_TRANSPORT))


# ``--comm auto`` (the trainer's default): the fastest exact strategy for the job's backend and device, decided
# when the job is up (:func:`resolve_comm`). On CPU (gloo) that is our ring over our own sockets: gloo's
# collectives pay a latency of about a millisecond for a gradient of any size on a small host, where ring-tcp's
# recursive doubling pays a few TCP round trips (``scalesgd allreduce-bench`` prints both, side by side).
# On GPUs (NCCL) the engine's all-reduce: ring-tcp moves CPU tensors only.
AUTO = "auto"
COMM_CHOICES: tuple[str, ...] = (AUTO, *COMM_NAMES)


def resolve_comm(name: str, *, backend: str, device_type: str, world_size: int) -> str:
    """The strategy ``--comm name`` runs: ``name`` itself, except that ``auto`` is ``ring-tcp`` for a job of
    several processes on CPU tensors over gloo, else ``allreduce`` (NCCL's, or nothing to reduce with one)."""
    if name != AUTO:
        return name
    return "ring-tcp" if backend == "gloo" and device_type == "cpu" and world_size > 1 else "allreduce"


def parse_comm_name(name: str) -> tuple[str | None, str]:
    """``(codec or None, transport)`` for a name in :data:`COMM_NAMES`; :class:`ConfigError` otherwise."""
    if name not in COMM_NAMES:
        raise ConfigError(f"unknown communication strategy {name!r}; choose one of {', '.join(COMM_NAMES)}")
    if name in TRANSPORTS:
        return None, name
    codec, _, transport = name.partition(SEPARATOR)
    return codec, transport or DEFAULT_TRANSPORT
