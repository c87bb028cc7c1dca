"""GradNorm (Chen et al., ICML 2018) as FedGradNorm's weighting (Mortaheb, Vahapoglu, Ulukus 2022).

Wraps :func:`fgn_jax.gradnorm.gradnorm`: the weights applied in round ``t``
are ``p^t`` from the state; after the round one GradNorm step on the task
losses and the gradient norms *after the channel*, ``channel_gain * g``
(HOTA-FedGradNorm's channel-aware step; the gain is 1 under ideal
aggregation), gives ``p^{t+1}``. Tasks without a used client this round keep
their weight and are left out of the step.
"""

from __future__ import annotations

import jax

from fgn_jax import gradnorm as gradnorm_lib
from fgn_jax.weightings import base


def gradnorm(alpha, learning_rate, eps: float = 1e-3) -> base.Weighting:
    """GradNorm weights with restoring force ``alpha`` and plain gradient descent of step ``learning_rate``."""
    tx = gradnorm_lib.gradnorm(alpha, learning_rate, eps=eps)

    def weights(state: gradnorm_lib.GradNormState, inputs: base.RoundInputs) -> jax.Array:
        return state.task_weights

    def update(state: gradnorm_lib.GradNormState, stats: base.TaskStats) -> gradnorm_lib.GradNormState:
        _, state = tx.update(stats.loss, stats.channel_gain * stats.grad_norm, state, present=stats.present)
        return state

    return base.Weighting(tx.init, weights, update)
