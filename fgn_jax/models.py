"""Flax trunks (shared layers) and the padded personal head.

The trunk is shared by all clients; during the shared phase every client
trains its own copy, so the trunk is vmapped over *per-client* kernels. XLA:CPU
turns a vmapped ``lax.conv`` with batched kernels into a grouped convolution,
which it runs slowly (DESIGN.md section 6), and its convolution gradients
(``jax.grad`` of ``lax.conv``) are slower still. Three implementations share
one parameter layout (``Conv.impl``):

* ``"auto"`` (the fastest on CPU, see benchmarks/README.md): a custom
  convolution whose forward pass, whenever the kernel is shared, runs once
  over the whole vmapped axis (a custom vmap rule folds it into the batch:
  the head phase, the measurement and the first shared step all use the
  broadcast trunk) as ``lax.conv`` or patches + one matmul, whichever is
  faster for the layer; patches + ``einsum`` when every client has its own
  kernel; its gradients are always patches + ``einsum`` (a batched matmul per
  client for the kernel, one matmul for the input when the kernel is shared);
* ``"im2col"``: shifted slices (patches) followed by one ``einsum`` in both
  directions; under vmap with per-client kernels that einsum becomes a
  batched matmul, with a shared kernel one big matmul;
* ``"lax"``: ``lax.conv_general_dilated`` (the reference in tests).

Patches are built with two index gathers rather than a concatenation of
slices: XLA:CPU's concatenate of many thin slices is several times slower.
Max pooling is a reshape + max rather than ``reduce_window`` (faster on CPU).

The kernel of the last shared layer (``W`` in DESIGN.md section 2) is the
kernel of the final ``Dense`` of the trunk, named ``"feature"``; see
:func:`last_shared_kernel_path`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_LAYER = "feature"
CONV_IMPLS = ("auto", "im2col", "lax")


def _window_index(size: int, window: int) -> np.ndarray:
    """``[out * window]`` input positions of every (output, tap) pair, output-major."""
    return (np.arange(size - window + 1)[:, None] + np.arange(window)[None]).reshape(-1)


def _im2col(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Valid-padding patches: ``[B, *S, C] -> [B, *(S - w + 1), prod(w) * C]``.

    Patch channel order is (window position, input channel), matching
    ``kernel.reshape(-1, out)`` of the ``[*window, in, out]`` layout. One
    gather per spatial axis (the static indices are in bounds).
    """
    spatial, c = x.shape[1:-1], x.shape[-1]
    out = [s - w + 1 for s, w in zip(spatial, window)]
    if len(window) == 1:
        p = jnp.take(x, _window_index(spatial[0], window[0]), axis=1, mode="clip")
        return p.reshape(x.shape[0], out[0], window[0] * c)
    p = jnp.take(x, _window_index(spatial[0], window[0]), axis=1, mode="clip")
    p = jnp.take(p, _window_index(spatial[1], window[1]), axis=2, mode="clip")
    p = p.reshape(x.shape[0], out[0], window[0], out[1], window[1], c)
    return p.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], out[0], out[1], window[0] * window[1] * c)


def _col2im(patches: jax.Array, spatial: Sequence[int], window: Sequence[int]) -> jax.Array:
    """Transpose of :func:`_im2col`: sums every patch entry back onto its input position.

    A sum of zero-padded shifted slices, which XLA fuses into one loop (the
    transpose of the gathers would be a scatter-add).
    """
    b, *out, k = patches.shape
    c = k // math.prod(window)
    p = patches.reshape(b, *out, *window, c)
    x = jnp.zeros((b, *spatial, c), patches.dtype)
    if len(window) == 1:
        for i in range(window[0]):
            x = x + jnp.pad(p[:, :, i], ((0, 0), (i, window[0] - 1 - i), (0, 0)))
        return x
    for i in range(window[0]):
        for j in range(window[1]):
            pad = ((0, 0), (i, window[0] - 1 - i), (j, window[1] - 1 - j), (0, 0))
            x = x + jnp.pad(p[:, :, :, i, j], pad)
    return x


def _lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    nd = kernel.ndim - 2
    dims = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1,) * nd, "VALID", dimension_numbers=dims)


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    patches = _im2col(x, kernel.shape[:-2])
    return jnp.einsum("...k,ko->...o", patches, kernel.reshape(-1, kernel.shape[-1]))


@jax.custom_batching.custom_vmap
def _auto_conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # Chosen per layer by measurement (benchmarks/README.md): XLA:CPU runs a
    # 2-D convolution on one thread, slower than patches + one (multi-
    # threaded) matmul once there are several input channels; 1-D
    # convolutions and single-channel inputs (few, thin patches that would
    # only add memory traffic) are faster as lax.conv.
    if kernel.ndim == 4 and kernel.shape[-2] > 1:
        return _im2col_conv(x, kernel)
    return _lax_conv(x, kernel)


@_auto_conv_forward.def_vmap
def _auto_conv_forward_vmap(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    if not kernel_batched:
        # One kernel for the whole vmapped axis (the broadcast trunk): fold
        # the axis into the batch and run one dense convolution.
        y = _auto_conv_forward(x.reshape(-1, *x.shape[2:]), kernel)
        return y.reshape(axis_size, x.shape[1], *y.shape[1:]), True
    # A kernel per member: patches + a batched matmul (a vmapped lax.conv
    # would become a grouped convolution). Plain jnp ops, so an outer vmap
    # (a sweep) batches them as usual.
    return jax.vmap(_im2col_conv)(x, kernel), True


@jax.custom_vjp
def auto_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Valid, stride-1 convolution ``[B, *S, Cin] x [*w, Cin, Cout]`` (the ``"auto"`` impl).

    Same values as ``lax.conv_general_dilated``; see the module docstring for
    how it picks its kernels under vmap. Differentiable once (reverse mode).
    """
    return _auto_conv_forward(x, kernel)


def _auto_conv_fwd(x, kernel):
    return _auto_conv_forward(x, kernel), (x, kernel)


def _im2col_input_grad(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    window, cout = kernel.shape[:-2], kernel.shape[-1]
    spatial = [s + w - 1 for s, w in zip(dy.shape[1:-1], window)]
    dpatches = jnp.einsum("...o,ko->...k", dy, kernel.reshape(-1, cout))
    return _col2im(dpatches, spatial, window)


def _auto_conv_bwd(res, dy):
    # Patches + matmuls in both directions: XLA:CPU runs the gradients of
    # lax.conv far slower (the kernel gradient especially; the transposed
    # convolution for the input gradient was slower too, measured in
    # benchmarks/README.md). Under vmap the kernel gradient is a batched
    # matmul per member; with a shared kernel the input gradient is one
    # matmul over all members.
    x, kernel = res
    window, cout = kernel.shape[:-2], kernel.shape[-1]
    patches = _im2col(x, window)
    k = patches.shape[-1]
    dk = jnp.einsum("mk,mo->ko", patches.reshape(-1, k), dy.reshape(-1, cout))
    return _im2col_input_grad(dy, kernel), dk.reshape(kernel.shape)


auto_conv.defvjp(_auto_conv_fwd, _auto_conv_bwd)


class Conv(nn.Module):
    """Valid-padding convolution with stride 1, NHWC (2-D) or NWC (1-D).

    The kernel has the usual ``[*window, in, out]`` layout either way, so both
    implementations share parameters.
    """

    features: int
    window: Sequence[int]
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, x.shape[-1])
        return convolve(x, kernel, self.impl) + bias


def _conv_params(module: nn.Module, cin: int) -> tuple[jax.Array, jax.Array]:
    """``kernel [*window, cin, features]`` (LeCun normal) and ``bias [features]`` (zeros) of a conv module."""
    shape = (*tuple(module.window), cin, module.features)
    kernel = module.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
    return kernel, module.param("bias", nn.initializers.zeros, (module.features,), jnp.float32)


def convolve(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """Valid, stride-1 convolution without bias by one of :data:`CONV_IMPLS`."""
    if impl == "auto":
        return auto_conv(x, kernel)
    if impl == "im2col":
        return _im2col_conv(x, kernel)
    if impl == "lax":
        return _lax_conv(x, kernel)
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {CONV_IMPLS}")


class ConvBlock(nn.Module):
    """``max_pool(relu(conv(x) + bias))``, computed as ``relu(max_pool(conv(x)) + bias)``.

    Both orders give the same values (max commutes with a per-channel shift and
    with ReLU); pooling first does the bias and ReLU on a quarter of the
    activations, and :func:`pool_bias_relu` gives the pair one fused backward
    pass. Parameters are those of :class:`Conv` (``kernel``, ``bias``).
    ``pool=1``: no pooling, ``relu(conv(x) + bias)``.
    """

    features: int
    window: Sequence[int]
    impl: str = "auto"
    pool: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, x.shape[-1])
        y = convolve(x, kernel, self.impl)
        if self.pool == 1:
            return nn.relu(y + bias)
        return pool_bias_relu(y, bias, self.pool)


def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """Non-overlapping max pooling by reshape + max (floor of odd sizes)."""
    spatial = x.shape[1:-1]
    crop = [s - s % size for s in spatial]
    if len(spatial) == 1:
        x = x[:, : crop[0]]
        return x.reshape(x.shape[0], crop[0] // size, size, x.shape[-1]).max(axis=2)
    x = x[:, : crop[0], : crop[1]]
    b, h, w, c = x.shape
    return x.reshape(b, h // size, size, w // size, size, c).max(axis=(2, 4))


def _windows(y: jax.Array, size: int) -> jax.Array:
    """Cropped pooling windows: ``[B, S1 // size, size, (S2 // size, size,) C]``."""
    b, *spatial, c = y.shape
    crop = [s - s % size for s in spatial]
    y = y[(slice(None), *(slice(0, n) for n in crop))]
    shape = [b]
    for n in crop:
        shape += [n // size, size]
    return y.reshape(*shape, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pool_bias_relu(y: jax.Array, bias: jax.Array, size: int) -> jax.Array:
    """``relu(max_pool(y, size) + bias)`` with a one-pass backward.

    The gradient equals ``jax.grad`` of the plain composition, ties in a window
    included (split evenly, as the gradient of ``max`` does); it is one
    elementwise pass over ``y`` instead of the several that XLA:CPU makes of
    the generic max-reduction gradient.
    """
    return nn.relu(max_pool(y, size) + bias)


def _pool_bias_relu_fwd(y, bias, size):
    pooled = max_pool(y, size)
    return nn.relu(pooled + bias), (y, pooled, bias)


def _pool_bias_relu_bwd(size, res, dout):
    y, pooled, bias = res
    dz = jnp.where(pooled + bias > 0, dout, 0.0)
    dbias = jnp.sum(dz, axis=tuple(range(dz.ndim - 1)))
    windows = _windows(y, size)
    # Insert the window axes after every pooled spatial axis.
    expand = (slice(None), *[a for _ in range(y.ndim - 2) for a in (slice(None), None)], slice(None))
    hit = windows == pooled[expand]
    share = dz[expand] / jnp.sum(hit, axis=tuple(range(2, y.ndim * 2 - 2, 2)), keepdims=True)
    dy = jnp.where(hit, share, 0.0).reshape(y.shape[0], *[n - n % size for n in y.shape[1:-1]], y.shape[-1])
    # Rows/columns cropped by the floor pooling get no gradient.
    dy = jnp.pad(dy, [(0, 0), *[(0, n % size) for n in y.shape[1:-1]], (0, 0)])
    return dy, dbias


pool_bias_relu.defvjp(_pool_bias_relu_fwd, _pool_bias_relu_bwd)


class MTFLTrunk(nn.Module):
    """TCDCN-style trunk for 40x40 grayscale faces (Zhang et al., ECCV 2014).

    conv 5x5x20, pool, conv 3x3x48, pool, conv 3x3x64, pool, conv 2x2x80,
    dense 256 (the shared feature). ReLU activations (TCDCN used tanh).
    """

    features: int = 256
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (ch, k, pool) in enumerate([(20, 5, 2), (48, 3, 2), (64, 3, 2), (80, 2, 1)]):
            x = ConvBlock(ch, (k, k), self.conv_impl, pool, name=f"conv{i}")(x)
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, name=FEATURE_LAYER)(x))


class RadComTrunk(nn.Module):
    """Small 1-D CNN for 128-sample I/Q bursts (input ``[B, 128, 2]``).

    conv 7x32, pool, conv 5x64, pool, conv 3x64, pool, dense 128 (the shared
    feature).
    """

    features: int = 128
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (ch, k) in enumerate([(32, 7), (64, 5), (64, 3)]):
            x = ConvBlock(ch, (k,), self.conv_impl, name=f"conv{i}")(x)
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, name=FEATURE_LAYER)(x))


class Head(nn.Module):
    """Personal linear head, padded to the widest task (``max_outputs``)."""

    max_outputs: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(self.max_outputs, name="out")(features)


class MLPTrunk(nn.Module):
    """Fully connected ReLU trunk: ``depth`` dense layers of width ``features``.

    GradNorm's toy (Chen et al., ICML 2018, section 4) uses a 4-layer ReLU
    network of width 100 as the shared trunk. Inputs of any shape are
    flattened. The last layer is the shared feature (``W``), named
    :data:`FEATURE_LAYER` like every trunk's. ``conv_impl`` is accepted for a
    uniform constructor and ignored.
    """

    features: int = 100
    depth: int = 4
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth - 1):
            x = nn.relu(nn.Dense(self.features, name=f"dense{i}")(x))
        return nn.relu(nn.Dense(self.features, name=FEATURE_LAYER)(x))


class LinearTrunk(nn.Module):
    """One bias-free dense layer, no activation: ``features = x W`` (inputs flattened).

    With frozen heads (``tau_head=0``) and the squared error, every client's
    loss is a quadratic in ``W``: the convex toy of benchmarks/convex_toy.py,
    where the optimum is known in closed form. No bias keeps the parameters
    one matrix, which is also the last shared kernel.
    """

    features: int = 4
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, use_bias=False, name=FEATURE_LAYER)(x.reshape(x.shape[0], -1))


TRUNKS = {"mtfl": MTFLTrunk, "radcom": RadComTrunk, "mlp": MLPTrunk, "linear": LinearTrunk}


def last_shared_kernel_path() -> tuple[str, ...]:
    """Path of W, the kernel of the last shared layer, inside trunk params."""
    return ("params", FEATURE_LAYER, "kernel")


def get_last_shared_kernel(trunk_params) -> jax.Array:
    node = trunk_params
    for k in last_shared_kernel_path():
        node = node[k]
    return node


def set_last_shared_kernel(trunk_params, kernel: jax.Array):
    """Returns a copy of ``trunk_params`` with W replaced (params are dicts)."""
    path = last_shared_kernel_path()

    def rebuild(node, depth):
        if depth == len(path):
            return kernel
        out = dict(node)
        out[path[depth]] = rebuild(node[path[depth]], depth + 1)
        return out

    return rebuild(trunk_params, 0)
