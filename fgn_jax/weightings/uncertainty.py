"""Uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018), at the server.

Each task has a learned log-variance ``s_k = log sigma_k^2``; the weighted
objective is (LibMTL's ``UW``, the regression form of the paper)

    J(s) = sum_k exp(-s_k) L_k / 2 + s_k / 2,

so task ``k``'s update is multiplied by ``w_k = exp(-s_k) / 2`` (the factor of
``L_k`` in ``J``). After each round the server takes one plain gradient step
on ``s`` from the round's task losses:

    dJ/ds_k = (1 - exp(-s_k) L_k) / 2,   s_k <- s_k - lr * dJ/ds_k,

whose fixed point is ``exp(-s_k) = 1 / L_k``: a task with a large loss gets
a small weight. Normalisation: LibMTL starts from ``s_k = -0.5`` (weight
0.82); we start from ``s_k = -log 2``, i.e. ``w_k = 1``, so round 0 applies
the same update as equal weights. The weights are not renormalised (the
method's own scale is part of it). Tasks absent from a round keep ``s_k``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base


class UncertaintyState(NamedTuple):
    log_variance: jax.Array  # [T] float32, s_k


def objective(log_variance: jax.Array, losses: jax.Array, present: jax.Array) -> jax.Array:
    """``J(s) = sum_k present_k (exp(-s_k) L_k / 2 + s_k / 2)``."""
    return jnp.sum(jnp.where(present, jnp.exp(-log_variance) * losses / 2 + log_variance / 2, 0.0))


def uncertainty(learning_rate) -> base.Weighting:
    """Kendall et al.'s weights ``exp(-s_k) / 2``, ``s`` learned by gradient descent of step ``learning_rate``."""

    def init(num_tasks: int) -> UncertaintyState:
        return UncertaintyState(jnp.full((num_tasks,), -math.log(2.0), jnp.float32))

    def weights(state: UncertaintyState, inputs: base.RoundInputs) -> jax.Array:
        return jnp.exp(-state.log_variance) / 2

    def update(state: UncertaintyState, stats: base.TaskStats) -> UncertaintyState:
        grad = jax.grad(objective)(state.log_variance, stats.loss, stats.present)  # 0 for absent tasks
        return UncertaintyState(state.log_variance - learning_rate * grad)

    return base.Weighting(init, weights, update)
