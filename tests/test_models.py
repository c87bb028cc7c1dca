"""The convolution implementations, the fused pool + bias + ReLU and reshape pooling against XLA's own ops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import models


@pytest.mark.parametrize("trunk,shape", [(models.MTFLTrunk, (3, 40, 40, 1)), (models.RadComTrunk, (3, 128, 2))])
def test_im2col_trunk_equals_lax_conv_trunk(trunk, shape):
    x = jax.random.normal(jax.random.key(0), shape)
    params = trunk().init(jax.random.key(1), x)
    a = trunk(conv_impl="im2col").apply(params, x)
    b = trunk(conv_impl="lax").apply(params, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_vmapped_per_client_kernels_equal_lax_conv():
    conv = models.Conv(6, (3, 3))
    x = jax.random.normal(jax.random.key(0), (4, 2, 9, 9, 5))  # 4 clients
    keys = jax.random.split(jax.random.key(1), 4)
    params = jax.vmap(lambda k: conv.init(k, x[0]))(keys)
    a = jax.vmap(conv.apply)(params, x)
    b = jax.vmap(models.Conv(6, (3, 3), impl="lax").apply)(params, x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (2, 11, 4)])
def test_reshape_max_pool_equals_reduce_window(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    window = (2,) * (len(shape) - 2)
    np.testing.assert_array_equal(models.max_pool(x), nn.max_pool(x, window, strides=window, padding="VALID"))


def test_last_shared_kernel_is_the_feature_dense():
    params = models.MTFLTrunk().init(jax.random.key(0), np.zeros((1, 40, 40, 1), np.float32))
    w = models.get_last_shared_kernel(params)
    assert w.shape == (320, 256)
    replaced = models.set_last_shared_kernel(params, w * 0)
    assert float(abs(models.get_last_shared_kernel(replaced)).sum()) == 0
    assert float(abs(models.get_last_shared_kernel(params)).sum()) > 0  # original untouched


def _reference_trunk(params, x, pools):
    """The trunk as first written: ``max_pool(relu(lax.conv(x) + bias))`` per layer."""
    p = params["params"]
    for i, pool in enumerate(pools):
        layer = p[f"conv{i}"]
        dims = ("NWC", "WIO", "NWC") if x.ndim == 3 else ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, layer["kernel"], (1,) * (x.ndim - 2), "VALID", dimension_numbers=dims)
        x = nn.relu(y + layer["bias"])
        if pool:
            x = models.max_pool(x)
    x = x.reshape(x.shape[0], -1)
    return nn.relu(x @ p["feature"]["kernel"] + p["feature"]["bias"])


@pytest.mark.parametrize(
    "trunk,shape,pools",
    [(models.MTFLTrunk, (3, 40, 40, 1), [1, 1, 1, 0]), (models.RadComTrunk, (3, 128, 2), [1, 1, 1])],
)
def test_auto_trunk_gradients_match_reference_shared_and_per_client(trunk, shape, pools):
    # The default "auto" convolution inside the pool-first blocks against the
    # original layer order on lax.conv. Four clients; "shared": one trunk for
    # all (the broadcast theta), "per-client": a trunk each.
    x = jax.random.normal(jax.random.key(0), (4, *shape))
    noisy = lambda p, k: jax.tree.map(lambda a: a + 0.05 * jax.random.normal(k, a.shape), p)  # noqa: E731
    params = noisy(trunk().init(jax.random.key(1), x[0]), jax.random.key(2))  # nonzero biases
    per_client = jax.vmap(lambda k: noisy(params, k))(jax.random.split(jax.random.key(3), 4))
    model = trunk(conv_impl="auto")
    loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))  # noqa: E731
    ref = lambda p, x: jnp.sum(jnp.sin(_reference_trunk(p, x, pools)))  # noqa: E731
    grad = lambda f: jax.grad(f, argnums=(0, 1))  # noqa: E731
    for args, axes in [((params, x), (None, 0)), ((per_client, x), (0, 0))]:
        got = jax.jit(jax.vmap(grad(loss), in_axes=axes))(*args)
        want = jax.jit(jax.vmap(grad(ref), in_axes=axes))(*args)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * float(jnp.abs(b).max()))


def test_auto_conv_under_nested_vmap_equals_lax_conv():
    # A sweep (outer vmap over trunks) of clients (inner vmap, shared kernel).
    x = jax.random.normal(jax.random.key(0), (4, 2, 9, 9, 5))
    kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 5, 6))
    conv = lambda impl: lambda x, k: jnp.sum(jnp.sin(models.convolve(x, k, impl)))  # noqa: E731
    nested = lambda impl: jax.vmap(jax.vmap(jax.grad(conv(impl), (0, 1)), (0, None)), (None, 0))  # noqa: E731
    for a, b in zip(jax.jit(nested("auto"))(x, kernels), jax.jit(nested("lax"))(x, kernels)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (2, 7, 5, 3), (2, 11, 3)])
def test_pool_bias_relu_gradient_equals_autodiff_with_ties(shape):
    y = jax.random.normal(jax.random.key(0), shape)
    y = y.at[0].set(0.0)  # whole windows of ties; the positive bias keeps them alive through the ReLU
    bias = jnp.array([0.5, -0.5, 0.1])
    weights = jax.random.normal(jax.random.key(1), models.max_pool(y).shape)
    fused = lambda y, b: jnp.sum(weights * models.pool_bias_relu(y, b, 2))  # noqa: E731
    plain = lambda y, b: jnp.sum(weights * nn.relu(models.max_pool(y) + b))  # noqa: E731
    np.testing.assert_allclose(fused(y, bias), plain(y, bias), rtol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(y, bias), jax.grad(plain, (0, 1))(y, bias)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
