"""Dynamic Weight Average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019), with rounds in place of epochs.

The weights of round ``t`` come from the task losses logged in rounds
``t-1`` and ``t-2`` (``task_loss`` in metrics.jsonl):

    r_k = L_k(t-1) / L_k(t-2),   w_k = T softmax_k(r_k / temperature),

and ``w = 1`` in rounds 0 and 1 (as LibMTL's ``DWA``). A task that descends
slowly (ratio near or above 1) gets more weight. The weights sum to ``T``.

Partial participation: each task keeps its two most recent losses from the
rounds it was present in; a task seen fewer than twice has ratio 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fgn_jax.weightings import base


class DWAState(NamedTuple):
    round: jax.Array  # [] int32, rounds completed
    last_loss: jax.Array  # [T] float32, L_k of the task's latest round present
    previous_loss: jax.Array  # [T] float32, L_k of the round present before that
    seen: jax.Array  # [T] int32, rounds the task was present in


def dwa_weights(last_loss: jax.Array, previous_loss: jax.Array, temperature) -> jax.Array:
    """``T softmax((last / previous) / temperature)``."""
    ratio = last_loss / previous_loss
    return last_loss.shape[0] * jax.nn.softmax(ratio / temperature)


def dwa(temperature) -> base.Weighting:
    """DWA with softmax ``temperature`` (Liu et al. use 2)."""

    def init(num_tasks: int) -> DWAState:
        zeros = jnp.zeros((num_tasks,), jnp.float32)
        return DWAState(jnp.zeros((), jnp.int32), zeros, zeros, jnp.zeros((num_tasks,), jnp.int32))

    def weights(state: DWAState, inputs: base.RoundInputs) -> jax.Array:
        known = state.seen >= 2
        last = jnp.where(known, state.last_loss, 1.0)
        previous = jnp.where(known & (state.previous_loss != 0), state.previous_loss, 1.0)
        return jnp.where(state.round >= 2, dwa_weights(last, previous, temperature), 1.0)

    def update(state: DWAState, stats: base.TaskStats) -> DWAState:
        p = stats.present
        return DWAState(
            round=state.round + 1,
            last_loss=jnp.where(p, stats.loss, state.last_loss),
            previous_loss=jnp.where(p, state.last_loss, state.previous_loss),
            seen=state.seen + p.astype(jnp.int32),
        )

    return base.Weighting(init, weights, update)
