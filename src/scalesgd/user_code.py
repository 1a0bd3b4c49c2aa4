"""Your own model, data and loss, named by import strings (``MODULE:FUNCTION``).

``MODULE`` is a dotted module path (``mypkg.models``) or the path of a ``.py`` file (``examples/own.py``);
``FUNCTION`` is a top-level name in it. The trainer stores the strings in the run's config, and every process
that needs the model or data (each worker, ``predict --from-run``, ``diversity --checkpoint``) calls the
functions itself, so nothing large crosses a pipe and a run can be rebuilt from its directory.

The three functions:

* model: ``make_model(*, input_shape=..., num_outputs=..., width=..., ...) -> nn.Module``; it receives only
  the keywords its signature names (all of them if it takes ``**kwargs``).
* data: ``make_data() -> (train, test)``, each a map-style :class:`torch.utils.data.Dataset` of
  ``(input, target)`` pairs (or dicts) or a tuple of tensors ``(x, y)``.
* loss: ``loss(output, target) -> (B,)`` per-example losses. The trainer sums them and divides by the global
  batch, so the gradient is that of the mean loss over the global batch, however it is sharded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from scalesgd.errors import ConfigError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# How a run records a model/data/loss handed over as a Python object (scalesgd.fit): not rebuildable.
OBJECT_PREFIX = "object:"
# Built-in data set specs that take a path after the colon ("idx:/data/mnist"); never import strings.
_PATH_SPECS = ("idx", "cifar10")


def is_import_string(spec: str | None) -> bool:
    """Whether ``spec`` names ``MODULE:FUNCTION`` (a dotted module or a ``.py`` path, then a Python name)."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    module, _, name = spec.rpartition(":")
    if module in _PATH_SPECS or not _IDENTIFIER.match(name):
        return False
    return module.endswith(".py") or bool(_DOTTED.match(module))


def _module_from_file(path_text: str, spec: str, option: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{option} {spec}: file {path_text} does not exist; give the path of a .py file "
                          "(relative to the current directory) or a dotted module name")
    # A stable module name per file, so every process that loads the file (and pickle) agrees on it.
    name = f"scalesgd_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{option} {spec}: cannot load {path_text} as Python source; the file must end in .py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def resolve(spec: str, *, option: str) -> Callable[..., Any]:
    """The function ``spec`` (``MODULE:FUNCTION``) names.

    Args:
        spec: the import string.
        option: the option it came from, for the error line (``--model``, ``--dataset``, ``--loss``).
    Raises:
        ConfigError: not an import string, the module or file is missing, or it has no such callable.
    """
    if not is_import_string(spec):
        raise ConfigError(f"{option} {spec!r} is not an import string; write MODULE:FUNCTION, e.g. "
                          "mypkg.models:make_model or path/to/file.py:make_model")
    module_name, _, name = spec.rpartition(":")
    if module_name.endswith(".py"):
        module = _module_from_file(module_name, spec, option)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or module_name
            raise ConfigError(f"{option} {spec}: module {missing!r} not found; check the spelling, install it, "
                              "or give the path of a .py file instead") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{option} {spec}: {module_name} has no function {name!r}; define it there or fix the name")
    if not callable(fn):
        raise ConfigError(f"{option} {spec}: {module_name}.{name} is a {type(fn).__name__}, not a function")
    return fn


def _keywords_taken(params: Any) -> set[str] | None:
    """The names a signature's ``params`` take by keyword; None when it takes ``**kwargs`` (any name)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                       inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def call_with_accepted(fn: Callable[..., Any], *, what: str = "the function", **kwargs: Any) -> Any:
    """``fn(**k)`` with only the keywords ``fn``'s signature accepts (all of them if it takes ``**kwargs``).

    Raises:
        ConfigError: ``fn`` requires an argument that is not offered (or offered as None), named.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call as is
        return fn(**kwargs)
    params = sig.parameters
    names = _keywords_taken(params)
    if names is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                    inspect.Parameter.VAR_KEYWORD):
            if name not in kwargs:
                offered = ", ".join(kwargs) or "no arguments"
                raise ConfigError(f"{what} requires argument {name!r}, which the trainer does not give (it calls it "
                                  f"with {offered}); give {name!r} a default or remove it")
            if kwargs[name] is None:
                hint = (": the data set does not say how many classes; give the training set a `num_outputs` "
                        "attribute (or `classes`), or give the argument a default") if name == "num_outputs" else (
                        ": the examples are not single tensors; give the argument a default")
                raise ConfigError(f"{what} requires {name!r}, which is unknown here{hint}")
    return fn(**kwargs)


def build_user_model(factory: Callable[..., Any] | nn.Module, *, what: str, seed: int,
                     **kwargs: Any) -> nn.Module:
    """Call a model factory (seeding torch's RNG with ``seed`` first, as :func:`scalesgd.models.build_model`
    does) with the keywords it accepts, and check that it returns an ``nn.Module``.

    Raises:
        ConfigError: the factory returned something else.
    """
    torch.manual_seed(seed)
    model = call_with_accepted(factory, what=what, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module; return the model "
                          "instance")
    return model


class PerExampleLoss:
    """A user's loss ``(output, target) -> (B,)`` with its shape checked at every call.

    ``reduction="sum"`` returns Σᵢ ℓᵢ (what :func:`scalesgd.step.train_step` backpropagates, divided by the
    global batch), ``"none"`` the (B,) losses. Picklable when ``fn`` is (a top-level function).
    """

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], *, what: str, reduction: str = "sum"):
        self.fn, self.what, self.reduction = fn, what, reduction

    def with_reduction(self, reduction: str) -> "PerExampleLoss":
        return PerExampleLoss(self.fn, what=self.what, reduction=reduction)

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        losses = self.fn(output, target)
        b = batch_length(target)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (b,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(f"{self.what} returned shape {shape} for a batch of {b}; it must return the "
                              f"per-example losses, shape ({b},) (no mean or sum: the trainer sums and divides "
                              "by the global batch)")
        return losses.sum() if self.reduction == "sum" else losses


def batch_length(batch: Any) -> int:
    """Examples in a batch: the first axis of a tensor, or of the first tensor in a dict/tuple."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return batch_length(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return batch_length(batch[0])
    raise ConfigError(f"cannot tell the batch size of a {type(batch).__name__}; batches must be tensors, or "
                      "dicts/tuples of tensors")


def loss_for(spec: str | None, task: str, reduction: str = "sum", *,
             fn: Callable | None = None) -> Callable[[Any, Any], torch.Tensor]:
    """The run's loss: a user's (object ``fn`` or import string ``spec``), else the task's built-in one.

    Built-in: cross-entropy for integer targets (classification), ½‖out − y‖² otherwise
    (:func:`scalesgd.models.loss_function`).
    """
    if fn is not None:
        return PerExampleLoss(fn, what="the loss function", reduction=reduction)
    if spec and spec.startswith(OBJECT_PREFIX):
        raise ConfigError(f"the run's loss was a Python object ({spec}) handed to scalesgd.fit; it cannot be rebuilt "
                          "from the run directory. Give fit an import string (MODULE:FUNCTION) instead")
    if spec:
        return PerExampleLoss(resolve(spec, option="--loss"), what=f"--loss {spec}", reduction=reduction)
    from scalesgd.models import loss_function

    return loss_function(task, reduction)


def canonical(spec: str | None) -> str | None:
    """``spec`` with a ``.py`` path made absolute (so the run can be rebuilt from any directory); anything
    else unchanged."""
    if not is_import_string(spec):
        return spec
    module, _, name = spec.rpartition(":")
    if not module.endswith(".py"):
        return spec
    return f"{Path(module).expanduser().resolve()}:{name}"


def short_name(spec: str) -> str:
    """A name fit for a directory: ``pkg.mod:make_net`` → ``mod.make_net``, ``path/own.py:f`` → ``own.f``;
    built-in names as they are (``idx:/data`` → ``idx``)."""
    if spec.startswith(OBJECT_PREFIX):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", spec[len(OBJECT_PREFIX):]) or "object"
    if not is_import_string(spec):
        return spec.split(":")[0]
    module, _, name = spec.rpartition(":")
    stem = Path(module).stem if module.endswith(".py") else module.rpartition(".")[2]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{stem}.{name}")


def model_options(cfg: Any) -> dict[str, Any]:
    """The model options a user's factory may take: the shape and outputs always, ``width`` when set, and
    ``depth``/``dropout``/``norm`` when they differ from the trainer's defaults (so the factory's own
    defaults hold otherwise)."""
    from scalesgd.config import FIELDS

    opts: dict[str, Any] = {}
    if cfg.width is not None:
        opts["width"] = cfg.width
    for name in ("depth", "dropout", "norm"):
        if getattr(cfg, name) != FIELDS[name].default:
            opts[name] = getattr(cfg, name)
    return opts


def check_model_options_taken(fn: Callable[..., Any], options: dict[str, Any], *, what: str) -> None:
    """Refuse model options the user set that ``fn`` does not take: :func:`call_with_accepted` would drop them,
    and the run would train without the ``--dropout`` (say) it was asked for.

    Args:
        fn: the model factory.
        options: what :func:`model_options` offers it (only options set away from the trainer's defaults).
        what: how the factory is named in the message.
    Raises:
        ConfigError: ``fn`` takes neither one of ``options`` by name nor ``**kwargs``; the first such option named.
    """
    try:
        named = _keywords_taken(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # no signature to read: call_with_accepted passes everything
        return
    if named is None:  # **kwargs: every option reaches it
        return
    for name in options:
        if name not in named:
            flag = f"--{name.replace('_', '-')}"
            raise ConfigError(f"{what} takes no {name!r} argument, so {flag} {options[name]} would be ignored; add "
                              f"{name!r} to its signature (and use it) or drop {flag}")


def build_run_model(cfg: Any, *, input_shape: Any, num_outputs: int | None,
                    factory: Callable[..., Any] | None = None) -> nn.Module:
    """The model a run's config names, initialised from ``cfg.seed``: a factory object (``scalesgd.fit``), an
    import string, or a built-in name (:func:`scalesgd.models.build_model`).

    Raises:
        ConfigError: the model cannot be found or built, or the factory returns no ``nn.Module``.
    """
    from scalesgd.models import build_model

    if factory is None and cfg.model.startswith(OBJECT_PREFIX):
        raise ConfigError(f"the run's model was a Python object ({cfg.model}) handed to scalesgd.fit; it cannot be "
                          "rebuilt from the run directory. Give fit an import string (MODULE:FUNCTION) to make the "
                          "run rebuildable")
    if factory is not None or is_import_string(cfg.model):
        fn = factory if factory is not None else resolve(cfg.model, option="--model")
        what = f"--model {cfg.model}" if factory is None else "the model factory"
        options = model_options(cfg)
        check_model_options_taken(fn, options, what=what)
        kwargs = {"input_shape": tuple(input_shape) if input_shape is not None else None,
                  "num_outputs": num_outputs, **options}
        return build_user_model(fn, what=what, seed=cfg.seed, **kwargs)
    if input_shape is None or num_outputs is None:
        raise ConfigError(f"model {cfg.model!r} needs tensor inputs and a known number of outputs; this data set "
                          "gives dict examples or no num_outputs: use your own model (--model MODULE:FUNCTION)")
    try:
        return build_model(cfg.model, input_shape=input_shape, num_outputs=num_outputs, seed=cfg.seed,
                           width=cfg.width, depth=cfg.depth, dropout=cfg.dropout, norm=cfg.norm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
