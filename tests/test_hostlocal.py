"""Each device holds exactly its own clients' examples (issue #4: host-local data).

The example arrays are laid out in per-device blocks
(:func:`fgn_jax.data.pool.block_layout`). The helpers here check a device's
shard against the dataset's rows, independently of the layout code: they are
used by the 8-device worker of ``tests/test_sharding.py`` and the two-process
run of ``tests/test_multihost.py``.
"""

import numpy as np
import pytest

from fgn_jax import simulate
from fgn_jax.data import pool as pool_lib
from tests.conftest import make_setup

FIELDS = ("train_x", "train_y", "test_x", "test_y")


def save_shards(env: simulate.Env, path: str) -> None:
    """Writes this process's shards of the example arrays and client ids: ``{field}:{first row}:{process}`` -> rows."""
    out = {}
    leaves = {"client_id": env.info.client_id, **{f: getattr(env.data, f) for f in FIELDS}}
    for field, leaf in leaves.items():
        for shard in leaf.addressable_shards:
            start = shard.index[0].start or 0
            out[f"{field}:{start}:{shard.device.process_index}"] = np.asarray(shard.data)
    np.savez(path, **out)


def load_shards(path) -> dict[str, dict[int, tuple[int, np.ndarray]]]:
    """``field -> first row -> (process, rows)`` from :func:`save_shards` files."""
    out: dict[str, dict[int, tuple[int, np.ndarray]]] = {f: {} for f in ("client_id", *FIELDS)}
    with np.load(path) as f:
        for name in f.files:
            field, start, process = name.split(":")
            out[field][int(start)] = (int(process), f[name])
    return out


def _rows(a: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in a}


def check_blocks(shards: dict[str, dict[int, tuple[int, np.ndarray]]], split: pool_lib.Split, field: str):
    """Asserts that every shard holds exactly its device's clients' rows, then zeros, and no other client's row.

    Args:
      shards: :func:`load_shards`' result (the example arrays' and client ids' shards).
      split: the dataset split the array comes from.
      field: ``"train_x"``, ``"test_y"``, ...

    Returns:
      ``{block index: (process, real clients of the block)}``.
    """
    ids = {start // len(a): a for start, (_, a) in shards["client_id"].items()}
    column = 0 if field.endswith("_x") else 1
    seen = {}
    for start, (process, got) in shards[field].items():
        assert start % len(got) == 0
        b = start // len(got)
        own = [int(c) for c in ids[b] if c < len(split.size)]  # the clients in the device's slots
        want = [split.client(c)[column] for c in own]
        want = np.concatenate(want) if want else got[:0]
        n = len(want)
        np.testing.assert_array_equal(got[:n], want, err_msg=f"{field} block {b}")
        assert not np.any(got[n:]), f"{field} block {b}: padding rows are not zero"
        if column == 0:  # (targets repeat across clients: class labels; inputs do not)
            # No input of another client, nor of an example no client of this population owns.
            own_rows = np.zeros(len(split.x), bool)
            for c in own:
                own_rows[split.offset[c] : split.offset[c] + split.size[c]] = True
            others = _rows(split.x[~own_rows]) - _rows(want)
            assert not (_rows(got) & others), f"{field} block {b} holds another client's example"
        seen[b] = (process, own)
    return seen


def test_block_layout_by_hand():
    # Clients of 3, 2 and 4 examples in 4 slots over 2 blocks: block 0 = clients 0, 1
    # (5 rows); block 1 = client 2 (4 rows) + a padding slot, padded to 5 rows.
    assert pool_lib.slot_order(np.array([3, 2, 4]), num_slots=4, num_blocks=2).tolist() == [0, 1, 2, 3]
    layout = pool_lib.block_layout(np.array([0, 3, 5, 0]), np.array([3, 2, 4, 0]), num_blocks=2)
    assert layout.block_size == 5
    assert layout.offset.tolist() == [0, 3, 0, 4]
    a = np.arange(1, 10)[:, None] * np.ones((1, 2))
    np.testing.assert_array_equal(layout.block(a, 0)[:, 0], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(layout.block(a, 1)[:, 0], [6, 7, 8, 9, 0])
    np.testing.assert_array_equal(layout.rows(a, 3, 7)[:, 0], [4, 5, 6, 7])  # across a block boundary
    with pytest.raises(ValueError, match="do not split"):
        pool_lib.block_layout(np.array([0, 3, 5]), np.array([3, 2, 4]), num_blocks=2)


def test_imbalanced_clients_are_spread_over_the_devices():
    # In order, block 0 would hold 100 + 50 examples and block 1 only 4 + 3.
    sizes = np.array([100, 50, 4, 3])
    assert pool_lib.slot_order(sizes, num_slots=4, num_blocks=2).tolist() == [0, 3, 1, 2]
    # 5 clients in 6 slots over 3 blocks (in order the largest block would be 90 + 80).
    order = pool_lib.slot_order(np.array([90, 80, 70, 5, 5]), num_slots=6, num_blocks=3)
    assert order.tolist() == [0, 5, 1, 4, 2, 3]
    # Balanced clients keep their order.
    assert pool_lib.slot_order(np.full(8, 7), num_slots=8, num_blocks=4).tolist() == list(range(8))


def test_one_device_is_one_block_of_the_dataset():
    """Without a mesh the layout degenerates: the dataset's arrays and offsets, masked padding after them."""
    setup = make_setup(num_clients=3)
    ds = setup.dataset
    env = simulate.make_env(ds, num_clients=5)
    assert env.info.client_id.tolist() == list(range(5))
    for field in FIELDS:
        split = ds.train if field.startswith("train") else ds.test
        np.testing.assert_array_equal(getattr(env.data, field), getattr(split, field[-1]))
    assert env.info.train_offset.tolist() == ds.train.offset.tolist() + [0, 0]
    assert env.info.test_offset.tolist() == ds.test.offset.tolist() + [0, 0]
    shards = {f: {0: (0, np.asarray(getattr(env.data, f)))} for f in FIELDS}
    shards["client_id"] = {0: (0, np.asarray(env.info.client_id))}
    for field in FIELDS:
        split = ds.train if field.startswith("train") else ds.test
        assert check_blocks(shards, split, field) == {0: (0, [0, 1, 2])}
