"""Optax optimisers selected by name (for flags)."""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "momentum", "adam")


def make(name: str, learning_rate) -> optax.GradientTransformation:
    """``sgd`` (plain), ``momentum`` (SGD, momentum 0.9) or ``adam``.

    ``learning_rate`` may be a traced scalar, so the same program serves a
    vmapped sweep over learning rates.
    """
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
