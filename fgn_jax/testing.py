"""Tree assertions for tests (one place, so swapping the backend is one file)."""

from __future__ import annotations

import jax
import numpy as np


def assert_trees_allclose(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts two pytrees have the same structure and close leaves."""
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"tree structures differ:\n{a_def}\n{e_def}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=f"leaf {i}")


def assert_trees_differ(a, b) -> None:
    """Asserts that at least one leaf differs."""
    same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not same, "trees are identical"
