"""Task weightings behind one seam (:mod:`fgn_jax.weightings.base`), selected by name.

Adding a method is writing one module with a factory returning a
:class:`~fgn_jax.weightings.base.Weighting` and one entry in
:data:`REGISTRY`: a function ``(hparams, eps) -> Weighting`` that picks the
method's float hyperparameters out of :class:`fgn_jax.algorithms.HParams`
(sweep leaves).
"""

from __future__ import annotations

from typing import Callable

from fgn_jax.weightings import base, equal, gradnorm

REGISTRY: dict[str, Callable[..., base.Weighting]] = {
    "equal": lambda hp, eps: equal.equal(),
    "gradnorm": lambda hp, eps: gradnorm.gradnorm(hp.alpha, hp.weight_lr, eps=eps),
}
WEIGHTINGS = tuple(REGISTRY)


def make(name: str, hparams, eps: float = 1e-3) -> base.Weighting:
    """The weighting ``name`` with its hyperparameters taken from ``hparams``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    return REGISTRY[name](hparams, eps)
