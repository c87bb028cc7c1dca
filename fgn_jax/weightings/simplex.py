"""Small solvers over the probability simplex, shared by the Gram-matrix weightings.

Every problem here is posed on the ``[T, T]`` Gram matrix ``G = D D^T`` of
the per-task updates, restricted to the *present* tasks (``present[k]``:
the task has a used client this round; an absent task's ``D_k`` is zero and
gets coefficient 0). The solvers run a fixed number of iterations inside
``lax.fori_loop`` (static shapes, no Python loop over tasks), so they jit
once and vmap over a sweep.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# A stand-in for "minus infinity" that keeps sort and cumsum finite.
_FAR = 1e9


def normalized_gram(gram: jax.Array, present: jax.Array) -> jax.Array:
    """``G`` divided by the mean squared norm of the present tasks' updates.

    MGDA's, IMTL's and CAGrad's coefficients do not change when ``G`` is
    scaled, and the updates are small (``|D_k|^2`` is often 1e-6), so the
    solvers work on a matrix with unit mean diagonal. Absent rows and
    columns are zeroed.
    """
    both = present[:, None] & present[None, :]
    gram = jnp.where(both, gram, 0.0)
    scale = jnp.sum(jnp.where(present, jnp.diag(gram), 0.0)) / jnp.maximum(jnp.sum(present), 1)
    return gram / jnp.where(scale > 0, scale, 1.0)


def uniform(present: jax.Array) -> jax.Array:
    """``[T]``: ``1 / |present|`` on the present tasks, 0 elsewhere."""
    p = present.astype(jnp.float32)
    return p / jnp.maximum(jnp.sum(p), 1.0)


def project(y: jax.Array, present: jax.Array) -> jax.Array:
    """Euclidean projection of ``y`` onto the simplex of the present tasks (absent entries: 0).

    The sort-based algorithm of Held, Wolfe and Crowder (1974) / Duchi et al.
    (2008): ``x = max(y - theta, 0)`` with the threshold ``theta`` found from
    the sorted values.
    """
    y = jnp.where(present, y, -_FAR)
    u = jnp.sort(y)[::-1]
    css = jnp.cumsum(u)
    j = jnp.arange(1, y.shape[0] + 1, dtype=y.dtype)
    support = (u - (css - 1.0) / j > 0) & (u > -_FAR / 2)
    rho = jnp.maximum(jnp.sum(support), 1)
    theta = (css[rho - 1] - 1.0) / rho
    return jnp.where(present, jnp.maximum(y - theta, 0.0), 0.0)


def min_norm(gram: jax.Array, present: jax.Array, iters: int = 100) -> jax.Array:
    """``argmin_{lambda in simplex} lambda^T G lambda``: the min-norm point of the hull of the ``D_k``.

    Frank-Wolfe with exact line search, as in Sener & Koltun (2018, Algorithm
    2): from the uniform point, move towards the vertex ``e_i`` with the
    smallest ``(G lambda)_i``; the best step on the segment has a closed form.
    With two tasks the first step already lands on the exact minimiser.

    Args:
      gram: ``[T, T]`` Gram matrix (absent rows/columns ignored).
      present: ``[T]`` bool.
      iters: Frank-Wolfe iterations (static).

    Returns:
      ``[T]`` lambda >= 0, summing to 1 over the present tasks, 0 elsewhere.
    """

    def step(_, lam):
        g_lam = gram @ lam
        i = jnp.argmin(jnp.where(present, g_lam, jnp.inf))
        uu, uv, vv = lam @ g_lam, g_lam[i], gram[i, i]
        denom = uu - 2.0 * uv + vv
        gamma = jnp.where(denom > 1e-12, jnp.clip((uu - uv) / jnp.where(denom > 1e-12, denom, 1.0), 0.0, 1.0), 0.0)
        return (1.0 - gamma) * lam + gamma * jax.nn.one_hot(i, lam.shape[0], dtype=lam.dtype)

    return jax.lax.fori_loop(0, iters, step, uniform(present))


def minimize(
    objective: Callable[[jax.Array], jax.Array], present: jax.Array, iters: int = 200, step: float = 0.5
) -> jax.Array:
    """Minimises a convex ``objective`` over the simplex of the present tasks.

    Projected gradient descent with an adaptive step and a fixed iteration
    count: a step that lowers the objective is taken and the step grows by
    1.2; one that does not is refused and the step halves. Monotone, so the
    result is never worse than the uniform start.

    Args:
      objective: ``[T] -> []``, differentiable.
      present: ``[T]`` bool.
      iters: iterations (static).
      step: initial step size (the problems here have unit-scale Gram matrices).

    Returns:
      ``[T]`` weights on the simplex of the present tasks.
    """
    value_and_grad = jax.value_and_grad(objective)

    def body(_, carry):
        w, value, grad, eta = carry
        cand = project(w - eta * grad, present)
        cand_value, cand_grad = value_and_grad(cand)
        better = cand_value < value
        keep = lambda new, old: jnp.where(better, new, old)  # noqa: E731
        return keep(cand, w), keep(cand_value, value), keep(cand_grad, grad), jnp.where(better, eta * 1.2, eta * 0.5)

    w0 = uniform(present)
    v0, g0 = value_and_grad(w0)
    w, _, _, _ = jax.lax.fori_loop(0, iters, body, (w0, v0, g0, jnp.asarray(step, jnp.float32)))
    return w
