"""PCGrad, projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman, Finn,
"Gradient Surgery for Multi-Task Learning", NeurIPS 2020), on the per-task updates.

For each present task ``i`` (all at once), in a random order of the other
present tasks ``j`` (one permutation per ``i``, drawn from the round's
weighting key), the running vector ``v_i`` (from ``D_i``) loses its component
along ``D_j`` when the two conflict:

    if <v_i, D_j> < 0:  v_i <- v_i - <v_i, D_j> / |D_j|^2 D_j,

and the update is ``sum_i v_i``. Every ``v_i`` stays in ``span{D_k}``, so we
track its coefficient vector ``a_i`` (``v_i = sum_k a_ik D_k``, from ``e_i``)
and need only the Gram matrix: ``<v_i, D_j> = (a_i^T G)_j``. The logged
coefficient is ``c_k = sum_i a_ik``, with ``sum_i v_i = sum_k c_k D_k``
(LibMTL's ``PCGrad`` returns the same ``batch_weight``; as Yu et al. and
unlike LibMTL we skip ``j = i``).

Normalisation: the server applies ``(1/|P|) sum_k w_k D_k`` (one client per
task), so with ``w = c`` PCGrad applies the *mean* of the projected vectors
``v_i``, as equal weighting (``w = 1``) applies the mean of the ``D_k``;
without conflicts ``c = 1`` and the two coincide. Removing a conflict adds a
positive multiple of ``D_j``, so ``c_k >= 1`` and the coefficients sum to at
least ``T``: ``c_k - 1`` is how much of ``D_k`` the projections added back.
Absent tasks get 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base, simplex


def pcgrad() -> base.Weighting:
    """PCGrad coefficients of this round's per-task updates."""

    def init(num_tasks: int) -> base.TaskCount:
        return base.TaskCount(jnp.asarray(num_tasks, jnp.int32))

    def weights(state, inputs: base.RoundInputs) -> jax.Array:
        t = inputs.present.shape[0]
        present = inputs.present
        gram = simplex.normalized_gram(inputs.gram, present)
        order = jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(inputs.key, t))  # [T, T]
        rows = jnp.arange(t)

        def step(pos, a):  # a: [T, T], row i = coefficients of v_i
            j = order[:, pos]  # [T]: the task each v_i is compared with at this position
            dot = jnp.take_along_axis(a @ gram, j[:, None], axis=1)[:, 0]  # <v_i, D_j>
            conflict = (dot < 0) & (j != rows) & present[j]
            coef = jnp.where(conflict, dot / (gram[j, j] + 1e-8), 0.0)
            return a - coef[:, None] * jax.nn.one_hot(j, t, dtype=a.dtype)

        start = jnp.where(present[:, None], jnp.eye(t, dtype=jnp.float32), 0.0)
        return jnp.sum(jax.lax.fori_loop(0, t, step, start), axis=0)

    def update(state, stats: base.TaskStats):
        return state

    return base.Weighting(init, weights, update, needs_task_updates=True)
