"""scalesgd: synchronous data-parallel minibatch SGD on torch.distributed, with gradient diversity.

Public API (imported lazily, so ``scalesgd --help`` does not pay for torch):

* :func:`per_example_sq_norms` — ‖∇ℓᵢ‖² for every example of a batch, from one ordinary backward.
* :func:`gradient_diversity` — Δ, M2, ‖Σᵢgᵢ‖², n and the batch bound n·Δ of a batch or a data loader.
* :func:`train` — run a :class:`RunConfig`.
* :func:`fit` — train your own model on your own data from a script (:mod:`scalesgd.fitting`).
* :class:`AdaptiveBatch` — noise-scale estimate, adaptive global batch and lr rule inside your own DDP loop
  (the rest of that is in :mod:`scalesgd.ddp`).
"""

__version__ = "0.1.0"

_LAZY = {
    "per_example_sq_norms": "scalesgd.ghost_norms",
    "gradient_diversity": "scalesgd.diversity",
    "GhostNormTap": "scalesgd.ghost_norms",
    "train": "scalesgd.run",
    "fit": "scalesgd.fitting",
    "RunConfig": "scalesgd.config",
    "AdaptiveBatch": "scalesgd.ddp",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scalesgd' has no attribute {name!r}")
