"""Equal task weights (FedRep, Collins et al., ICML 2021): ``w ≡ 1``, no state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base


class EqualState(NamedTuple):
    num_tasks: jax.Array  # [] int32 (a leaf, so the state is a valid pytree with a shape to checkpoint)


def equal() -> base.Weighting:
    """Every task's update counts once: ``w_k = 1``."""

    def init(num_tasks: int) -> EqualState:
        return EqualState(jnp.asarray(num_tasks, jnp.int32))

    def weights(state, inputs: base.RoundInputs) -> jax.Array:
        return jnp.ones(inputs.present.shape, jnp.float32)

    def update(state, stats: base.TaskStats) -> EqualState:
        return state

    return base.Weighting(init, weights, update)
