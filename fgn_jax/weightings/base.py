"""The task-weighting seam: one interface every weighting method implements.

A weighting method decides, once per round, the coefficient ``w_k`` that
multiplies task ``k``'s aggregated trunk update; the server then applies

    delta = (1/C) sum_c m_c w_{k(c)} delta_c

(m_c: 1 for a client whose update is used, 0 otherwise). A method is a
factory over its hyperparameters (floats may be traced, so a sweep can vmap
over them) returning a :class:`Weighting` of pure functions over a
NamedTuple state, in the style of optax and :mod:`fgn_jax.gradnorm`:

* ``init(num_tasks) -> state``;
* ``weights(state, inputs) -> [T]``: this round's coefficients, from the
  state, the round's key and (only for ``needs_task_updates`` methods) the
  Gram matrix of this round's per-task aggregated updates;
* ``update(state, stats) -> state``: the state after the round, from this
  round's per-task statistics and the weights that were applied.

Methods that do not need this round's task updates ("causal" methods:
equal, gradnorm, dwa, rlw, uncertainty) compute their weights before the
clients transmit, which is what over-the-air aggregation needs (the weight
multiplies a client's update before it is sent); methods that do (mgda,
pcgrad, cagrad, imtl) need the per-task updates at the server, which only
the ideal aggregation delivers.

Example::

    w = weighting.weights(state, RoundInputs(key, present, gram=None))
    ...aggregate with w...
    state = weighting.update(state, TaskStats(loss, grad_norm, present, gain, w))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fgn_jax.types import PRNGKey


class RoundInputs(NamedTuple):
    """What a method may look at when it sets this round's weights."""

    key: PRNGKey  # this round's weighting key (random methods)
    present: jax.Array  # [T] bool: the task has at least one client whose update is used this round
    gram: jax.Array | None  # [T, T] D D^T of the per-task mean trunk updates D_k (needs_task_updates only)


class TaskStats(NamedTuple):
    """This round's per-task statistics, for the state update after the round."""

    loss: jax.Array  # [T] L_k(t): mean over the task's used clients of the loss measured before the shared phase
    grad_norm: jax.Array  # [T] g_k = ||dL_k/dW||, unweighted
    present: jax.Array  # [T] bool, as in RoundInputs
    channel_gain: jax.Array  # [T] effective gain of the task's updates on the way to the server (1: ideal)
    weight: jax.Array  # [T] the weights applied this round


class TaskCount(NamedTuple):
    """The state of a method without memory: only the task count (a leaf, so it checkpoints)."""

    num_tasks: jax.Array  # [] int32


class Weighting(NamedTuple):
    init: Callable[[int], Any]
    weights: Callable[[Any, RoundInputs], jax.Array]
    update: Callable[[Any, TaskStats], Any]
    needs_task_updates: bool = False


def task_gram(task_updates) -> jax.Array:
    """``[T, T]`` Gram matrix ``D D^T`` of per-task updates (a pytree of ``[T, ...]`` leaves)."""
    flat = [jnp.reshape(x, (x.shape[0], -1)) for x in jax.tree.leaves(task_updates)]
    return sum(f @ f.T for f in flat)


def num_present(present: jax.Array) -> jax.Array:
    """``[]`` float32: how many tasks are present (the scale of the Gram methods' coefficients).

    With one client per task the server's update is ``(1/|P|) sum_k w_k D_k``
    over the present tasks P, so coefficients ``w = |P| lambda`` apply exactly
    ``sum_k lambda_k D_k``; with all tasks present ``|P| = T``.
    """
    return jnp.sum(present.astype(jnp.float32))
