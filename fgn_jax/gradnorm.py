"""GradNorm task weighting (Chen et al., ICML 2018), as used by FedGradNorm.

FedGradNorm (Mortaheb, Vahapoglu, Ulukus 2022) runs this step at the parameter
server once per round, on the per-task losses ``L_k`` and the norms
``g_k = ||dL_k/dW||`` of the gradients of the *unweighted* losses with respect
to W, the kernel of the last shared layer. With task weights ``p``:

    G_k = p_k g_k,  Gbar = mean_k G_k
    r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))
    L_grad(p) = sum_k | G_k - stop_gradient(Gbar r_k^alpha) |

``p`` takes one step of a weight optimiser (an optax transformation, by
default plain gradient descent) on ``dL_grad/dp`` computed with ``jax.grad``,
is clamped to ``eps`` and renormalised to sum to ``T``. ``L_k(0)`` is the loss
of the first update (round 0).

Partial participation: a task absent from a round (``present[k]`` False: no
client of it reported) keeps its weight and is left out of that round's step:
``Gbar`` and the mean loss ratio are taken over the present tasks, and only
the present weights are renormalised (to ``T`` minus the absent weights). Its
``L_k(0)`` is the loss of the first round it is present in.

Since ``G_k`` is linear in ``p_k``, ``dL_grad/dp_k = sign(G_k - target_k) g_k``.
``jax.grad(jnp.abs)`` is ``+1`` at 0, which would push weights off an exact
fixed point; we write ``|x|`` as ``x * sign(stop_gradient(x))`` so that the
autodiff gradient is exactly the closed form with ``sign(0) = 0``.

The API follows optax: a factory closes over the hyperparameters and returns a
pair of pure functions ``init``/``update`` over a NamedTuple state.

Example::

    tx = gradnorm.gradnorm(alpha=1.5, learning_rate=0.05)
    state = tx.init(num_tasks=3)
    weights, state = tx.update(task_losses, task_grad_norms, state)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class GradNormState(NamedTuple):
    count: jax.Array  # [] int32, number of updates taken
    task_weights: jax.Array  # [T] float32, p (non-negative, sums to T)
    initial_losses: jax.Array  # [T] float32, L_k(0); zeros before the task's first update
    has_initial: jax.Array  # [T] bool, L_k(0) recorded (the task was present in an update)
    weight_opt_state: optax.OptState  # state of the optimiser of p


class GradNorm(NamedTuple):
    init: Callable[[int], GradNormState]
    update: Callable[[jax.Array, jax.Array, GradNormState], tuple[jax.Array, GradNormState]]


def _abs_with_zero_subgradient(x: jax.Array) -> jax.Array:
    return x * jnp.sign(jax.lax.stop_gradient(x))


def gradnorm_loss(
    weights: jax.Array,
    grad_norms: jax.Array,
    loss_ratios: jax.Array,
    alpha: jax.Array,
    present: jax.Array | None = None,
) -> jax.Array:
    """``L_grad(p)``: the gradient-norm loss of DESIGN.md section 2.

    Args:
      weights: ``[T]`` task weights p.
      grad_norms: ``[T]`` unweighted gradient norms g_k.
      loss_ratios: ``[T]`` ``L_k(t) / L_k(0)``.
      alpha: restoring-force strength (0 equalises the weighted norms).
      present: ``[T]`` bool, the tasks taking part (None: all); the others
        are left out of the means and the sum.

    Returns:
      The scalar loss; its gradient in ``weights`` is the GradNorm direction.
    """
    if present is None:
        present = jnp.ones(weights.shape, bool)
    n = jnp.maximum(jnp.sum(present), 1)
    g_weighted = jnp.where(present, weights * grad_norms, 0.0)
    ratios = jnp.where(present, loss_ratios, 1.0)
    g_mean = jnp.sum(g_weighted) / n
    r = ratios / (jnp.sum(jnp.where(present, ratios, 0.0)) / n)
    target = jax.lax.stop_gradient(g_mean * r**alpha)
    return jnp.sum(jnp.where(present, _abs_with_zero_subgradient(g_weighted - target), 0.0))


def gradnorm(
    alpha: float | jax.Array,
    learning_rate: float | jax.Array | None = None,
    weight_optimizer: optax.GradientTransformation | None = None,
    eps: float = 1e-3,
) -> GradNorm:
    """Builds the GradNorm weight step.

    Args:
      alpha: GradNorm's alpha (>= 0). A leaf, so a sweep can vmap over it.
      learning_rate: step size of plain gradient descent on p (ignored when
        ``weight_optimizer`` is given).
      weight_optimizer: any optax transformation for p, e.g. ``optax.adam``.
      eps: lower clamp of each weight before renormalisation (keeps p > 0).

    Returns:
      ``GradNorm(init, update)``; ``update(task_losses, task_grad_norms, state,
      present=None)`` returns the new weights and state. A task's first
      update (the first it is present in) records its loss as ``L_k(0)``.
    """
    if weight_optimizer is None:
        if learning_rate is None:
            raise ValueError("gradnorm needs learning_rate or weight_optimizer")
        weight_optimizer = optax.sgd(learning_rate)

    def init(num_tasks: int) -> GradNormState:
        weights = jnp.ones((num_tasks,), jnp.float32)
        return GradNormState(
            count=jnp.zeros((), jnp.int32),
            task_weights=weights,
            initial_losses=jnp.zeros((num_tasks,), jnp.float32),
            has_initial=jnp.zeros((num_tasks,), bool),
            weight_opt_state=weight_optimizer.init(weights),
        )

    def update(task_losses, task_grad_norms, state, present=None):
        num_tasks = state.task_weights.shape[0]
        present = jnp.ones((num_tasks,), bool) if present is None else jnp.asarray(present, bool)
        record = present & ~state.has_initial
        initial = jnp.where(record, task_losses, state.initial_losses)
        ratios = jnp.where(present, task_losses / jnp.where(present, initial, 1.0), 1.0)
        grad = jax.grad(gradnorm_loss)(state.task_weights, task_grad_norms, ratios, alpha, present)
        updates, opt_state = weight_optimizer.update(grad, state.weight_opt_state, state.task_weights)
        moved = jnp.maximum(optax.apply_updates(state.task_weights, updates), eps)
        # Absent tasks keep their weight; the present ones share what is left of T.
        kept = jnp.sum(jnp.where(present, 0.0, state.task_weights))
        weights = jnp.where(
            present, (num_tasks - kept) * moved / jnp.sum(jnp.where(present, moved, 0.0)), state.task_weights
        )
        any_present = jnp.any(present)
        weights = jnp.where(any_present, weights, state.task_weights)
        opt_state = jax.tree.map(lambda new, old: jnp.where(any_present, new, old), opt_state, state.weight_opt_state)
        count = state.count + any_present.astype(state.count.dtype)
        return weights, GradNormState(count, weights, initial, state.has_initial | present, opt_state)

    return GradNorm(init, update)
