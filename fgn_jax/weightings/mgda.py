"""MGDA, the multiple-gradient descent algorithm (Sener & Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018), federated as in FedMGDA+ (Hu, Wang,
Zheng, Hu, "Federated Learning Meets Multi-objective Optimization", IEEE TNSE 2022).

The server combines the per-task mean trunk updates ``D_k`` (this round's)
with the min-norm point of their convex hull:

    lambda = argmin_{lambda in simplex} || sum_k lambda_k D_k ||^2,

a direction that does not decrease any task's first-order improvement
(every ``<D_k, d> >= |d|^2``). ``lambda`` is found from the Gram matrix
``D D^T`` alone by Frank-Wolfe with exact line search
(:func:`fgn_jax.weightings.simplex.min_norm`; LibMTL's ``MGDA`` with
``mgda_gn='none'``, no gradient normalisation). Coefficients:
``w = |P| lambda`` (``|P|``: present tasks; ``T`` when all are), so the
weights sum to ``T`` and, with one client per task, the server applies
``sum_k lambda_k D_k``. Absent tasks get 0. No state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base, simplex

ITERATIONS = 100  # Frank-Wolfe steps (static; exact for two tasks after one)


def mgda(iterations: int = ITERATIONS) -> base.Weighting:
    """Min-norm (MGDA) weights of this round's per-task updates."""

    def init(num_tasks: int) -> base.TaskCount:
        return base.TaskCount(jnp.asarray(num_tasks, jnp.int32))

    def weights(state, inputs: base.RoundInputs) -> jax.Array:
        gram = simplex.normalized_gram(inputs.gram, inputs.present)
        return base.num_present(inputs.present) * simplex.min_norm(gram, inputs.present, iterations)

    def update(state, stats: base.TaskStats):
        return state

    return base.Weighting(init, weights, update, needs_task_updates=True)
