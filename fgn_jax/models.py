"""Flax trunks (shared layers) and the padded personal head.

The trunk is shared by all clients; during the shared phase every client
trains its own copy, so the trunk is vmapped over *per-client* kernels. XLA:CPU
turns a vmapped ``lax.conv`` with batched kernels into a grouped convolution,
which it runs slowly (DESIGN.md section 6). Our convolutions are therefore
written as shifted slices (im2col) followed by one ``einsum``: under vmap with
per-client kernels that einsum becomes a batched matmul, and with a shared
kernel it becomes one big matmul. ``conv_impl="lax"`` switches back to
``lax.conv_general_dilated`` (used in tests as the reference).

Max pooling is a reshape + max rather than ``reduce_window`` (faster on CPU).

The kernel of the last shared layer (``W`` in DESIGN.md section 2) is the
kernel of the final ``Dense`` of the trunk, named ``"feature"``; see
:func:`last_shared_kernel_path`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_LAYER = "feature"


def _im2col(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """Valid-padding patches: ``[B, *S, C] -> [B, *(S - w + 1), prod(w) * C]``."""
    spatial = x.shape[1:-1]
    out = [s - w + 1 for s, w in zip(spatial, window)]
    slices = []
    if len(window) == 1:
        for i in range(window[0]):
            slices.append(x[:, i : i + out[0], :])
    else:
        for i in range(window[0]):
            for j in range(window[1]):
                slices.append(x[:, i : i + out[0], j : j + out[1], :])
    return jnp.concatenate(slices, axis=-1)


class Conv(nn.Module):
    """Valid-padding convolution with stride 1, NHWC (2-D) or NWC (1-D).

    The kernel has the usual ``[*window, in, out]`` layout either way, so both
    implementations share parameters.
    """

    features: int
    window: Sequence[int]
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        window = tuple(self.window)
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*window, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if self.impl == "im2col":
            # Patch channel order is (window position, input channel), matching
            # kernel.reshape(-1, out) of the [*window, in, out] layout.
            patches = _im2col(x, window)
            y = jnp.einsum("...k,ko->...o", patches, kernel.reshape(-1, self.features))
        elif self.impl == "lax":
            dims = ("NWC", "WIO", "NWC") if len(window) == 1 else ("NHWC", "HWIO", "NHWC")
            y = jax.lax.conv_general_dilated(x, kernel, (1,) * len(window), "VALID", dimension_numbers=dims)
        else:
            raise ValueError(f"unknown conv impl {self.impl!r}")
        return y + bias


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


class MTFLTrunk(nn.Module):
    """TCDCN-style trunk for 40x40 grayscale faces (Zhang et al., ECCV 2014).

    conv 5x5x20, pool, conv 3x3x48, pool, conv 3x3x64, pool, conv 2x2x80,
    dense 256 (the shared feature). ReLU activations (TCDCN used tanh).
    """

    features: int = 256
    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (ch, k, pool) in enumerate([(20, 5, True), (48, 3, True), (64, 3, True), (80, 2, False)]):
            x = nn.relu(Conv(ch, (k, k), self.conv_impl, name=f"conv{i}")(x))
            if pool:
                x = max_pool(x)
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, name=FEATURE_LAYER)(x))


class RadComTrunk(nn.Module):
    """Small 1-D CNN for 128-sample I/Q bursts (input ``[B, 128, 2]``).

    conv 7x32, pool, conv 5x64, pool, conv 3x64, pool, dense 128 (the shared
    feature).
    """

    features: int = 128
    conv_impl: str = "im2col"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (ch, k) in enumerate([(32, 7), (64, 5), (64, 3)]):
            x = max_pool(nn.relu(Conv(ch, (k,), self.conv_impl, name=f"conv{i}")(x)))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(self.features, name=FEATURE_LAYER)(x))


class Head(nn.Module):
    """Personal linear head, padded to the widest task (``max_outputs``)."""

    max_outputs: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        return nn.Dense(self.max_outputs, name="out")(features)


TRUNKS = {"mtfl": MTFLTrunk, "radcom": RadComTrunk}


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
