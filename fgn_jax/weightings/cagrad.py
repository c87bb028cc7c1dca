"""CAGrad, conflict-averse gradient descent (Liu, Liu, Jin, Stone, Liu, "Conflict-Averse
Gradient Descent for Multi-task Learning", NeurIPS 2021), on the per-task updates.

With ``g_0`` the mean of the present tasks' updates ``D_k``, CAGrad takes
the direction that maximises the worst task's improvement in a ball around
``g_0``:

    max_d min_k <D_k, d>   subject to   |d - g_0| <= c |g_0|.

Its dual is a problem over the simplex, posed on the Gram matrix
``G = D D^T`` alone (LibMTL's ``CAGrad``):

    w* = argmin_{w in simplex} w^T G b + c |g_0| sqrt(w^T G w),   b = uniform,

solved here by projected gradient descent with a fixed iteration count
(:func:`fgn_jax.weightings.simplex.minimize`). The direction is
``d = g_0 + (c |g_0| / |g_w|) g_w`` with ``g_w = sum_k w*_k D_k``, divided by
``1 + c^2`` (LibMTL's default ``rescale=1``), i.e. ``d = sum_k beta_k D_k``
with ``beta = (b + (c |g_0| / |g_w|) w*) / (1 + c^2)``.

Logged coefficients: ``w = |P| beta`` (``|P|``: present tasks, ``T`` when all
are), the coefficients the server's plain sum ``(1/|P|) sum_k w_k D_k`` (one
client per task) needs to apply ``d``; ``c = 0`` gives ``w = 1``, equal
weighting. They sum to ``T (1 + c |g_0| / |g_w|) / (1 + c^2)``, not ``T``:
CAGrad changes the length of the step as well as its direction. Absent tasks
get 0. No state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base, simplex

ITERATIONS = 200  # projected-gradient steps on the dual (static)


def dual_objective(w: jax.Array, gram: jax.Array, b: jax.Array, c) -> jax.Array:
    """``w^T G b + c |g_0| sqrt(w^T G w)`` with ``|g_0| = sqrt(b^T G b)`` (CAGrad's dual)."""
    g0_norm = jnp.sqrt(b @ gram @ b + 1e-8)
    return w @ gram @ b + c * g0_norm * jnp.sqrt(w @ gram @ w + 1e-8)


def cagrad(c, iterations: int = ITERATIONS) -> base.Weighting:
    """CAGrad coefficients with ball radius ``c`` (times ``|g_0|``; Liu et al. use 0.5)."""

    def init(num_tasks: int) -> base.TaskCount:
        return base.TaskCount(jnp.asarray(num_tasks, jnp.int32))

    def weights(state, inputs: base.RoundInputs) -> jax.Array:
        present = inputs.present
        gram = simplex.normalized_gram(inputs.gram, present)
        b = simplex.uniform(present)
        w = simplex.minimize(lambda v: dual_objective(v, gram, b, c), present, iterations)
        g0_norm = jnp.sqrt(b @ gram @ b + 1e-8)
        gw_norm = jnp.sqrt(w @ gram @ w + 1e-8)
        beta = (b + c * g0_norm / gw_norm * w) / (1.0 + c**2)
        return base.num_present(present) * beta

    def update(state, stats: base.TaskStats):
        return state

    return base.Weighting(init, weights, update, needs_task_updates=True)
