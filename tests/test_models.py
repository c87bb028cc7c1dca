"""The im2col convolution and reshape pooling against XLA's own ops."""

import flax.linen as nn
import jax
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
