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
    initial_losses: jax.Array  # [T] float32, L_k(0); zeros before the first update
    weight_opt_state: optax.OptState  # state of the optimiser of p


class GradNorm(NamedTuple):
    init: Callable[[int], GradNormState]
    update: Callable[[jax.Array, jax.Array, GradNormState], tuple[jax.Array, GradNormState]]


def _abs_with_zero_subgradient(x: jax.Array) -> jax.Array:
    return x * jnp.sign(jax.lax.stop_gradient(x))


def gradnorm_loss(weights: jax.Array, grad_norms: jax.Array, loss_ratios: jax.Array, alpha: jax.Array) -> jax.Array:
    """``L_grad(p)``: the gradient-norm loss of DESIGN.md section 2.

    Args:
      weights: ``[T]`` task weights p.
      grad_norms: ``[T]`` unweighted gradient norms g_k.
      loss_ratios: ``[T]`` ``L_k(t) / L_k(0)``.
      alpha: restoring-force strength (0 equalises the weighted norms).

    Returns:
      The scalar loss; its gradient in ``weights`` is the GradNorm direction.
    """
    g_weighted = weights * grad_norms
    g_mean = jnp.mean(g_weighted)
    r = loss_ratios / jnp.mean(loss_ratios)
    target = jax.lax.stop_gradient(g_mean * r**alpha)
    return jnp.sum(_abs_with_zero_subgradient(g_weighted - target))


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
      ``GradNorm(init, update)``; ``update(task_losses, task_grad_norms, state)``
      returns the new weights and state. On the first update it records
      ``task_losses`` as ``L(0)``.
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
            weight_opt_state=weight_optimizer.init(weights),
        )

    def update(task_losses, task_grad_norms, state):
        num_tasks = state.task_weights.shape[0]
        initial = jnp.where(state.count == 0, task_losses, state.initial_losses)
        ratios = task_losses / initial
        grad = jax.grad(gradnorm_loss)(state.task_weights, task_grad_norms, ratios, alpha)
        updates, opt_state = weight_optimizer.update(grad, state.weight_opt_state, state.task_weights)
        weights = optax.apply_updates(state.task_weights, updates)
        weights = jnp.maximum(weights, eps)
        weights = num_tasks * weights / jnp.sum(weights)
        return weights, GradNormState(state.count + 1, weights, initial, opt_state)

    return GradNorm(init, update)
