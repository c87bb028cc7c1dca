"""IMTL-G, the gradient half of impartial multi-task learning (Liu, Li, Kuang, Xue, Chen,
Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021).

The combined update ``d = sum_k alpha_k D_k`` with ``sum_k alpha_k = 1`` has
equal projections onto every present task's unit update ``u_k = D_k/|D_k|``:

    <d, u_k> = <d, u_j>   for all present k, j.

IMTL-G solves this in closed form from ``D`` (LibMTL's ``IMTL``); here it is
a ``(T+1) x (T+1)`` linear system over ``alpha`` and the common projection
``s``, built from ``M = G diag(1/|D_k|)`` (``M_ik = <D_i, u_k>``):

    sum_i alpha_i M_ik - s = 0  (k present),   sum_i alpha_i = 1,
    alpha_k = 0  (k absent).

``alpha`` may be negative (IMTL-G's weights are not constrained to the
simplex). Coefficients: ``w = |P| alpha`` (``|P|``: present tasks, ``T`` when
all are): they sum to ``T`` and, with one client per task, the server applies
``sum_k alpha_k D_k``. IMTL-L (the learned loss scales) is not included. No
state; a round without present tasks gives ``w = 1`` (nothing to combine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base, simplex


def imtl_alpha(gram: jax.Array, present: jax.Array) -> jax.Array:
    """``[T]`` IMTL-G's ``alpha`` (sums to 1 over the present tasks, 0 elsewhere) from the Gram matrix."""
    t = present.shape[0]
    norms = jnp.sqrt(jnp.where(present, jnp.diag(gram), 1.0))
    m = gram / norms[None, :]  # M_ik = <D_i, u_k>
    # Row k (present): (M^T alpha)_k - s = 0; absent: alpha_k = 0. Last row: sum of alpha = 1.
    top = jnp.where(present[:, None], m.T, jnp.eye(t))
    top = jnp.concatenate([top, jnp.where(present, -1.0, 0.0)[:, None]], axis=1)
    any_present = jnp.any(present)
    last = jnp.concatenate([present.astype(jnp.float32), jnp.where(any_present, 0.0, 1.0)[None]])
    system = jnp.concatenate([top, last[None, :]], axis=0)
    rhs = jnp.zeros((t + 1,), jnp.float32).at[t].set(1.0)
    return jnp.linalg.solve(system, rhs)[:t]


def imtl() -> base.Weighting:
    """IMTL-G coefficients of this round's per-task updates."""

    def init(num_tasks: int) -> base.TaskCount:
        return base.TaskCount(jnp.asarray(num_tasks, jnp.int32))

    def weights(state, inputs: base.RoundInputs) -> jax.Array:
        present = inputs.present
        alpha = imtl_alpha(simplex.normalized_gram(inputs.gram, present), present)
        return jnp.where(jnp.any(present), base.num_present(present) * alpha, 1.0)

    def update(state, stats: base.TaskStats):
        return state

    return base.Weighting(init, weights, update, needs_task_updates=True)
