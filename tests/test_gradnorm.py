"""The GradNorm weight step against its closed form and hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import gradnorm


def closed_form_grad(p, g, ratios, alpha):
    big_g = p * g
    r = ratios / ratios.mean()
    target = big_g.mean() * r**alpha
    return np.sign(big_g - target) * g


@pytest.mark.parametrize("seed", range(5))
def test_autodiff_equals_closed_form(seed):
    rng = np.random.default_rng(seed)
    t = 2 + seed
    p = rng.uniform(0.1, 2.0, t).astype(np.float32)
    g = rng.uniform(0.1, 3.0, t).astype(np.float32)
    ratios = rng.uniform(0.2, 1.5, t).astype(np.float32)
    alpha = float(rng.uniform(0, 3))
    auto = jax.jit(jax.grad(gradnorm.gradnorm_loss))(p, g, ratios, alpha)
    np.testing.assert_allclose(auto, closed_form_grad(p, g, ratios, alpha), rtol=1e-6)


def test_hand_computed_three_tasks():
    # Round 0 records L(0) = [1, 2, 4], so all ratios are 1. p = 1, g = [1, 2, 3]:
    # G = [1, 2, 3], targets = mean G = 2, signs [-1, 0, +1] -> grad [-1, 0, 3].
    # lr 0.1: p = [1.1, 1.0, 0.7], sum 2.8 -> renormalised by 3 / 2.8.
    tx = gradnorm.gradnorm(alpha=1.0, learning_rate=0.1)
    state = tx.init(3)
    _, state = tx.update(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 2.0, 3.0]), state)
    np.testing.assert_allclose(state.initial_losses, [1.0, 2.0, 4.0])
    np.testing.assert_allclose(state.task_weights, np.array([1.1, 1.0, 0.7]) * 3 / 2.8, rtol=1e-6)

    # A later round: L = [0.5, 2, 2] -> ratios [0.5, 1, 0.5], mean 2/3,
    # r = [0.75, 1.5, 0.75]. alpha = 1, p = 1, g = [1, 2, 3]: G = [1, 2, 3],
    # mean 2, targets [1.5, 3, 1.5], signs [-1, -1, +1] -> grad [-1, -2, +3].
    # lr 0.1: p = [1.1, 1.2, 0.7], which already sums to 3.
    state = tx.init(3)._replace(
        initial_losses=jnp.array([1.0, 2.0, 4.0]), has_initial=jnp.ones(3, bool), count=jnp.array(1)
    )
    weights, state = tx.update(jnp.array([0.5, 2.0, 2.0]), jnp.array([1.0, 2.0, 3.0]), state)
    np.testing.assert_allclose(weights, [1.1, 1.2, 0.7], rtol=1e-6)
    assert int(state.count) == 2
    np.testing.assert_allclose(state.initial_losses, [1.0, 2.0, 4.0])  # L(0) is kept


def test_weights_positive_and_sum_to_num_tasks():
    rng = np.random.default_rng(0)
    tx = gradnorm.gradnorm(alpha=1.5, learning_rate=2.0, eps=1e-3)  # big steps hit the clamp
    state = tx.init(4)
    update = jax.jit(tx.update)
    for _ in range(50):
        losses = jnp.asarray(rng.uniform(0.1, 2.0, 4), jnp.float32)
        norms = jnp.asarray(rng.uniform(0.01, 5.0, 4), jnp.float32)
        weights, state = update(losses, norms, state)
        assert np.all(np.asarray(weights) > 0)
        np.testing.assert_allclose(np.sum(weights), 4.0, rtol=1e-5)
    assert np.min(weights) < 0.1  # the clamp was exercised, weights still positive


def test_alpha_zero_equal_norms_is_a_fixed_point():
    tx = gradnorm.gradnorm(alpha=0.0, learning_rate=0.5)
    state = tx.init(3)
    for losses in ([1.0, 2.0, 3.0], [0.3, 2.5, 0.1]):  # alpha = 0 ignores the losses
        weights, state = tx.update(jnp.array(losses), jnp.array([0.7, 0.7, 0.7]), state)
        np.testing.assert_array_equal(weights, [1.0, 1.0, 1.0])


def test_equal_loss_ratios_fixed_point_equalises_weighted_norms():
    # Equal ratios: every target is mean(G), so p_k g_k equal is a fixed
    # point: p = [1.5, 0.5] with g = [1, 3] gives G = [1.5, 1.5] exactly.
    tx = gradnorm.gradnorm(alpha=1.5, learning_rate=0.3)
    state = tx.init(2)._replace(task_weights=jnp.array([1.5, 0.5]))
    for _ in range(3):
        weights, state = tx.update(jnp.array([2.0, 5.0]), jnp.array([1.0, 3.0]), state)
        np.testing.assert_array_equal(weights, [1.5, 0.5])


def test_equal_loss_ratios_converge_to_inverse_norm_weights():
    g = jnp.array([0.5, 1.0, 2.0, 4.0])
    tx = gradnorm.gradnorm(alpha=1.0, learning_rate=0.01)
    state = tx.init(4)
    update = jax.jit(tx.update)
    for _ in range(2000):
        weights, state = update(jnp.array([1.0, 1.0, 1.0, 1.0]), g, state)
    expected = 4 * (1 / g) / jnp.sum(1 / g)
    np.testing.assert_allclose(weights, expected, atol=0.03)


def test_optax_weight_optimizer_is_used():
    import optax

    tx = gradnorm.gradnorm(alpha=1.0, weight_optimizer=optax.sgd(0.1, momentum=0.9))
    state = tx.init(2)
    w1, state = tx.update(jnp.array([1.0, 1.0]), jnp.array([1.0, 2.0]), state)
    w2, state = tx.update(jnp.array([1.0, 1.0]), jnp.array([1.0, 2.0]), state)
    # Momentum makes the second step larger than the first (same gradient sign).
    assert abs(w2[0] - w1[0]) > abs(w1[0] - 1.0)
