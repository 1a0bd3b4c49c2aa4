"""``scalesgd.fit``: the trainer of ``scalesgd train``, called from a script with your model and data.

How objects reach the workers: :func:`fit` spawns local worker processes (or, under torchrun, runs as the
rank torchrun made). Import strings (``"mypkg.models:make_model"``, ``"train.py:make_data"``) are resolved by
every worker itself, so they suit data of any size. Objects (a model instance or factory, tensors, a
``Dataset``, a loss function) are **pickled with the spawn payload**, once per worker: fine for small data
and models, and for a ``Dataset`` that reads from disk lazily (only its paths are pickled); for data that
is large in memory pass an import string instead. Classes and functions defined in your script travel by
reference, so the workers re-import the script: the call must sit under ``if __name__ == "__main__":``
and the script must be a file (not standard input); :func:`fit` says so when it is not.
"""

from __future__ import annotations

import multiprocessing
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from scalesgd.errors import ConfigError

_GUARD = re.compile(r"""^\s*if\s+__name__\s*==\s*['"]__main__['"]\s*:""", re.MULTILINE)
_GUARD_FIX = ('put the call under `if __name__ == "__main__":` in a script file (each local worker is a fresh '
              "process that imports your script; without the guard it would start training again)")


def _defined_in_main(*objects: Any) -> bool:
    for obj in objects:
        if obj is None or isinstance(obj, str):
            continue
        owner = obj if callable(obj) and not isinstance(obj, nn.Module) else type(obj)
        if getattr(owner, "__module__", None) == "__main__":
            return True
    return False


def check_main_module(*objects: Any) -> None:
    """Refuse, before any process starts, a call that local worker processes could not serve.

    Raises:
        ConfigError: we are a worker process importing the script (the script has no ``__main__`` guard);
            the script has no guard; or objects defined in ``__main__`` come from standard input / ``-c``.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__name__", "__main__") == "__mp_main__" or multiprocessing.current_process().name != "MainProcess":
        raise ConfigError(f"scalesgd.fit was called while a worker process imported your script: {_GUARD_FIX}")
    path = getattr(main, "__file__", None)
    if path is None or path == "<stdin>" or not Path(path).is_file():
        if _defined_in_main(*objects):
            raise ConfigError("scalesgd.fit got objects defined in a script read from standard input (or -c); the "
                              "worker processes cannot import them: save the script to a file, run it as "
                              "`python script.py`, and " + _GUARD_FIX.replace("put", "put", 1))
        return
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return
    if not _GUARD.search(source):
        raise ConfigError(f"scalesgd.fit in {path}, which has no `if __name__ == \"__main__\":` block: {_GUARD_FIX}")


def import_string_of(obj: Any) -> str | None:
    """The ``MODULE:FUNCTION`` that names ``obj`` when it is a top-level function or class of an importable
    module (or of a ``.py`` file loaded by path), so that the run records a string it can be rebuilt from and
    the workers import it themselves; None for anything defined in ``__main__``, nested or anonymous."""
    from scalesgd.user_code import resolve

    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or module in ("__main__", "__mp_main__") or not name.isidentifier():
        return None
    path = getattr(sys.modules.get(module), "__file__", None)
    spec = f"{path}:{name}" if module.startswith("scalesgd_user_") and path else f"{module}:{name}"
    try:
        return spec if resolve(spec, option="fit") is obj else None
    except ConfigError:
        return None


def _label(obj: Any) -> str:
    from scalesgd.user_code import OBJECT_PREFIX

    owner = obj if callable(obj) and not isinstance(obj, nn.Module) else type(obj)
    return OBJECT_PREFIX + getattr(owner, "__qualname__", type(obj).__name__)


def fit(model: Any, train_data: Any, *, eval_data: Any = None, loss: Any = None, workers: int = 2,
        **options: Any) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` with the trainer of ``scalesgd train``; returns its summary.

    Args:
        model: an import string ``MODULE:FUNCTION``, a factory (called with the keywords it accepts of
            ``input_shape``, ``num_outputs`` and the model options such as ``width``, after seeding torch with
            ``seed``; a top-level function of an importable module is recorded as its import string, so the
            run can be rebuilt), or an ``nn.Module`` instance (its weights are the start on every worker).
        train_data: an import string of a data function returning ``(train, test)`` (then ``eval_data`` must
            be None), a tuple of tensors ``(x, y)``, or a map-style ``torch.utils.data.Dataset``
            (:mod:`scalesgd.data.user` says what examples may be).
        eval_data: the same kinds as ``train_data`` for the test metrics; None evaluates on ``train_data``
            (the ``test_*`` metrics are then training-set metrics).
        loss: per-example loss ``(output, target) -> (B,)``, an import string or a function; None: cross-entropy
            for integer targets, ½‖out − y‖² otherwise. The trainer sums it and divides by the global batch.
        workers: local worker processes (ignored under torchrun).
        options: any ``scalesgd train`` option as a keyword (``global_batch_size=64``, ``lr=0.1``, ``steps=100``,
            ``run_dir="runs/x"``, …), validated by :class:`scalesgd.config.RunConfig`.
    Returns:
        The run summary (as ``summary.json``; ``run_dir`` names the run directory).
    Raises:
        ConfigError: an unknown option, a bad value, a call without a ``__main__`` guard, or objects of the
            wrong type; DataError: data that cannot be used (an ``IterableDataset``, say).
    """
    from scalesgd.config import FIELDS, RunConfig, check_against_data
    from scalesgd.data.user import from_user
    from scalesgd.distributed import torchrun_rendezvous
    from scalesgd.run import train
    from scalesgd.user_code import OBJECT_PREFIX

    unknown = [k for k in options if k not in FIELDS or k in ("extra", "model", "dataset", "loss", "workers")]
    if unknown:
        k = unknown[0]
        if k in ("model", "dataset", "loss", "workers"):
            raise ConfigError(f"scalesgd.fit: pass {k} as fit's own argument, not as an option")
        close = [f for f in FIELDS if f.startswith(k[:4])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"scalesgd.fit: unknown option {k!r}{hint}; options are the `scalesgd train` options with "
                          "'-' written '_'")
    if torchrun_rendezvous() is None and workers > 1:
        check_main_module(model, train_data, eval_data, loss)
    values: dict[str, Any] = dict(options, workers=workers)
    model_obj: nn.Module | None = None
    factory: Callable | None = None
    if isinstance(model, str):
        values["model"] = model
    elif isinstance(model, nn.Module):
        model_obj, values["model"] = model, _label(model)
    elif callable(model) and import_string_of(model):  # rebuildable: recorded, and resolved by each worker
        values["model"] = import_string_of(model)
    elif callable(model):
        factory, values["model"] = model, _label(model)
    else:
        raise ConfigError(f"scalesgd.fit: model is a {type(model).__name__}; give an nn.Module, a function "
                          "returning one, or an import string MODULE:FUNCTION")
    loss_obj: Callable | None = None
    if isinstance(loss, str):
        values["loss"] = loss
    elif loss is not None and import_string_of(loss):
        values["loss"] = import_string_of(loss)
    elif loss is not None:
        if not callable(loss):
            raise ConfigError(f"scalesgd.fit: loss is a {type(loss).__name__}; give a function (output, target) -> "
                              "(B,) losses or an import string")
        loss_obj, values["loss"] = loss, _label(loss)
    ds = None
    if isinstance(train_data, str):
        if eval_data is not None:
            raise ConfigError("scalesgd.fit: with train_data an import string, its function returns (train, test); "
                              "leave eval_data out")
        values["dataset"] = train_data
    else:
        ds = from_user(train_data, train_data if eval_data is None else eval_data, name=OBJECT_PREFIX + "data")
        values["dataset"] = ds.name
    try:
        cfg = RunConfig(**values)
    except TypeError as e:
        raise ConfigError(f"scalesgd.fit: invalid option value ({e})") from None
    if ds is not None:
        check_against_data(cfg, ds.n_train)
    if model_obj is not None:
        model_obj = _copy_module(model_obj)
    return train(cfg, ds, model=model_obj, model_factory=factory, loss=loss_obj)


def _copy_module(model: nn.Module) -> nn.Module:
    """A private copy (the trainer re-lays the parameters out onto one flat vector)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model)
