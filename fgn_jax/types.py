"""Type aliases shared across the package."""

from typing import Any

import jax

PyTree = Any
Params = Any  # a Flax parameter tree
PRNGKey = jax.Array
Metrics = dict[str, jax.Array]
