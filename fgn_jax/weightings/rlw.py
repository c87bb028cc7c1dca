"""Random Loss Weighting (Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022; arXiv 2021).

Every round draws ``z ~ N(0, I_T)`` from the round's weighting key and
applies ``w = T softmax(z)`` (LibMTL's ``RLW`` without the factor ``T``,
which we add so that the weights sum to ``T`` like equal weights). No state
beyond the task count; the same seed gives the same draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base


def rlw() -> base.Weighting:
    """Random weights ``T softmax(z)``, ``z`` standard normal, drawn each round."""

    def init(num_tasks: int) -> base.TaskCount:
        return base.TaskCount(jnp.asarray(num_tasks, jnp.int32))

    def weights(state: base.TaskCount, inputs: base.RoundInputs) -> jax.Array:
        t = inputs.present.shape[0]
        return t * jax.nn.softmax(jax.random.normal(inputs.key, (t,), jnp.float32))

    def update(state: base.TaskCount, stats: base.TaskStats) -> base.TaskCount:
        return state

    return base.Weighting(init, weights, update)
