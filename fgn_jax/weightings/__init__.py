"""Task weightings behind one seam (:mod:`fgn_jax.weightings.base`), selected by name.

Adding a method is writing one module with a factory returning a
:class:`~fgn_jax.weightings.base.Weighting` and one entry in
:data:`REGISTRY`: a function ``(hparams, eps) -> Weighting`` that picks the
method's float hyperparameters out of :class:`fgn_jax.algorithms.HParams`
(sweep leaves).
"""

from __future__ import annotations

from typing import Callable

from fgn_jax.weightings import base, cagrad, dwa, equal, gradnorm, imtl, mgda, pcgrad, rlw, uncertainty

REGISTRY: dict[str, Callable[..., base.Weighting]] = {
    "equal": lambda hp, eps: equal.equal(),
    "gradnorm": lambda hp, eps: gradnorm.gradnorm(hp.alpha, hp.weight_lr, eps=eps),
    "uncertainty": lambda hp, eps: uncertainty.uncertainty(hp.uncertainty_lr),
    "dwa": lambda hp, eps: dwa.dwa(hp.dwa_temperature),
    "rlw": lambda hp, eps: rlw.rlw(),
    "mgda": lambda hp, eps: mgda.mgda(),
    "pcgrad": lambda hp, eps: pcgrad.pcgrad(),
    "cagrad": lambda hp, eps: cagrad.cagrad(hp.cagrad_c),
    "imtl": lambda hp, eps: imtl.imtl(),
}
WEIGHTINGS = tuple(REGISTRY)
# Methods that set a round's weights from that round's per-task updates (Weighting.needs_task_updates):
# they need the ideal aggregation, which delivers the updates of each task to the server.
NEEDS_TASK_UPDATES = frozenset({"mgda", "pcgrad", "cagrad", "imtl"})
# Methods whose weights are a convex combination scaled to sum to T (task_weight sums to T).
SUM_TO_T = frozenset({"equal", "gradnorm", "dwa", "rlw", "mgda", "imtl"})


def make(name: str, hparams, eps: float = 1e-3) -> base.Weighting:
    """The weighting ``name`` with its hyperparameters taken from ``hparams``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    return REGISTRY[name](hparams, eps)
