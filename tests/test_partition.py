"""Tests of federated partitioning: sizes, disjointness, Dirichlet skew, held-out splits, the table."""

from __future__ import annotations

import numpy as np
import pytest

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import partition
from fgn_jax.data import pool as pool_lib

TASKS = (
    tasks_lib.TaskSpec("coords", tasks_lib.REGRESSION, 2, tasks_lib.MSE),
    tasks_lib.TaskSpec("colour", tasks_lib.CLASSIFICATION, 4, tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("flag", tasks_lib.CLASSIFICATION, 2, tasks_lib.ACCURACY),
)


def make_pool(n: int, first_index: int = 0, seed: int = 0) -> pool_lib.ExamplePool:
    """x holds the example's own index (plus ``first_index``), so splits can be traced back."""
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    return pool_lib.ExamplePool(
        x=(first_index + idx).astype(np.float32)[:, None],
        targets={
            "coords": rng.normal(size=(n, 2)).astype(np.float32),
            "colour": (idx % 4).astype(np.float32)[:, None],
            "flag": (idx % 2).astype(np.float32)[:, None],
        },
        tasks=TASKS,
    )


def client_indices(split: pool_lib.Split, first_index: int = 0) -> list[np.ndarray]:
    return [split.client(c)[0][:, 0].astype(np.int64) - first_index for c in range(len(split.size))]


def max_share(hists) -> float:
    return float(np.mean([h.max() / h.sum() for h in hists if h is not None]))


def test_default_partition_is_the_original_iid_draw():
    train, test = make_pool(300), make_pool(100)
    client_task = partition.round_robin_tasks(6, 3)
    sizes, test_sizes = [50, 40, 30, 30, 20, 10], [10] * 6
    ds = partition.partition("toy", train, test, client_task, sizes, test_sizes, seed=7)

    rng = np.random.default_rng(7)
    train_idx = partition.iid_indices(300, sizes, rng)
    test_idx = partition.iid_indices(100, test_sizes, rng)
    np.testing.assert_array_equal(ds.train.x, pool_lib.stack_split(train, train_idx, client_task).x)
    np.testing.assert_array_equal(ds.test.y, pool_lib.stack_split(test, test_idx, client_task).y)


@pytest.mark.parametrize("beta", [None, 0.1, 10.0])
def test_sizes_and_disjoint_clients(beta):
    client_task = partition.round_robin_tasks(6, 3)
    sizes, test_sizes = [80, 60, 50, 40, 30, 20], [20, 15, 10, 10, 5, 5]
    ds = partition.partition("toy", make_pool(400), make_pool(100), client_task, sizes, test_sizes, 0, beta=beta)
    np.testing.assert_array_equal(ds.train.size, sizes)
    np.testing.assert_array_equal(ds.test.size, test_sizes)
    for split, total in ((ds.train, sum(sizes)), (ds.test, sum(test_sizes))):
        assert len(np.unique(np.concatenate(client_indices(split)))) == total  # no example twice


def test_dirichlet_fills_exhausted_classes():
    # 8 clients take the whole pool of 400 (100 per class): skewed wishes must be met by others.
    client_task = np.ones(8, np.int32)
    idx = partition.skewed_indices(
        make_pool(400),
        client_task,
        [50] * 8,
        partition.label_proportions(make_pool(400), client_task, 0.05, np.random.default_rng(0)),
        np.random.default_rng(1),
    )
    assert [len(i) for i in idx] == [50] * 8
    np.testing.assert_array_equal(np.sort(np.concatenate(idx)), np.arange(400))


def test_low_beta_concentrates_labels():
    client_task = np.ones(20, np.int32)  # all "colour" (4 balanced classes)
    shares = {}
    for beta in (0.05, None, 1000.0):
        ds = partition.partition(
            "toy", make_pool(4000), make_pool(1000), client_task, [40] * 20, [20] * 20, 3, beta=beta
        )
        shares[beta] = max_share(partition.label_histograms(ds.train, TASKS, client_task))
    assert shares[0.05] > 0.8
    assert shares[None] < 0.45 and shares[1000.0] < 0.45


def test_held_out_examples_follow_the_clients_proportions():
    client_task = np.ones(20, np.int32)
    ds = partition.partition("toy", make_pool(4000), make_pool(2000), client_task, [60] * 20, [30] * 20, 5, beta=0.1)
    train_h = partition.label_histograms(ds.train, TASKS, client_task)
    test_h = partition.label_histograms(ds.test, TASKS, client_task)
    skewed = [c for c in range(20) if train_h[c].max() > 0.6 * 60]
    assert len(skewed) >= 10
    agree = [np.argmax(train_h[c]) == np.argmax(test_h[c]) for c in skewed]
    assert np.mean(agree) >= 0.8


def test_label_proportions_per_task_kind():
    client_task = np.array([0, 1, 2], np.int32)
    props = partition.label_proportions(make_pool(10), client_task, 0.5, np.random.default_rng(0))
    assert props[0] is None  # regression: IID
    assert props[1].shape == (4,) and props[2].shape == (2,)
    assert np.isclose(props[1].sum(), 1.0) and np.isclose(props[2].sum(), 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        partition.label_proportions(make_pool(10), client_task, 0.0, np.random.default_rng(0))


def test_overlap_across_tasks():
    client_task = partition.round_robin_tasks(6, 3)
    sizes = [300] * 6  # 1800 examples from a pool of 800: only possible when tasks share
    with pytest.raises(ValueError):
        partition.partition("toy", make_pool(800), make_pool(60), client_task, sizes, [10] * 6, 0)
    ds = partition.partition(
        "toy",
        make_pool(800),
        make_pool(60),
        client_task,
        sizes,
        [10] * 6,
        0,
        overlap="across_tasks",
        beta=1.0,
    )
    idx = client_indices(ds.train)
    for k in range(3):
        same_task = [idx[c] for c in range(6) if client_task[c] == k]
        assert len(np.intersect1d(same_task[0], same_task[1])) == 0
    assert len(np.intersect1d(idx[0], idx[1])) > 0  # different tasks share examples
    with pytest.raises(ValueError, match="overlap must be one of"):
        partition.partition("toy", make_pool(80), make_pool(60), client_task, [5] * 6, [5] * 6, 0, overlap="all")


@pytest.mark.parametrize("beta", [None, 0.3])
def test_same_seed_same_partition(beta):
    args = ("toy", make_pool(500), make_pool(100), partition.round_robin_tasks(6, 3), [40] * 6, [10] * 6)
    a = partition.partition(*args, 11, beta=beta)
    b = partition.partition(*args, 11, beta=beta)
    c = partition.partition(*args, 12, beta=beta)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert not np.array_equal(a.train.x, c.train.x)


def test_parse_sizes():
    np.testing.assert_array_equal(partition.parse_sizes("500,200,100", 3), [500, 200, 100])
    np.testing.assert_array_equal(partition.parse_sizes(" 64 ", 4), [64] * 4)
    for bad in ("500,-1,100", "500,x,100", "500,0,100", "", "1.5,2,3"):
        with pytest.raises(ValueError, match="positive integers"):
            partition.parse_sizes(bad, 3)
    with pytest.raises(ValueError, match="2 client sizes given for 3 clients"):
        partition.parse_sizes("5,6", 3)


def test_holdout_split_from_each_clients_own_examples():
    client_task = partition.round_robin_tasks(3, 3)
    ds = partition.partition(
        "toy",
        make_pool(200, first_index=1000),
        None,
        client_task,
        [40, 21, 3],
        None,
        0,
        holdout_fraction=0.25,
    )
    np.testing.assert_array_equal(ds.test.size, [10, 5, 1])
    np.testing.assert_array_equal(ds.train.size, [30, 16, 2])
    train_idx, test_idx = client_indices(ds.train, 1000), client_indices(ds.test, 1000)
    for c in range(3):
        assert len(np.intersect1d(train_idx[c], test_idx[c])) == 0
        assert test_idx[c].min() >= 0  # held-out examples come from the train pool
    with pytest.raises(ValueError, match="too few"):
        partition.holdout_split([np.arange(1)], 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="test pool"):
        partition.partition("toy", make_pool(50), None, client_task, [5] * 3, None, 0)


def test_client_table_lists_sizes_and_histograms():
    train = make_pool(8)
    client_task = np.array([0, 1, 2], np.int32)
    # Client 1 (colour, label i % 4) gets examples 0, 1, 5 -> classes 0, 1, 1;
    # client 2 (flag, label i % 2) gets 2, 4 -> classes 0, 0.
    split = pool_lib.stack_split(train, [np.array([3, 6]), np.array([0, 1, 5]), np.array([2, 4])], client_task)
    test = pool_lib.stack_split(train, [np.array([7]), np.array([3]), np.array([7])], client_task)
    ds = pool_lib.FederatedDataset("toy", TASKS, client_task, split, test)
    lines = partition.client_table(ds).splitlines()
    assert lines[0].split() == ["client", "task", "train", "test", "train", "labels", "test", "labels"]
    assert lines[1].split() == ["0", "coords", "2", "1", "-", "-"]
    assert lines[2].split() == ["1", "colour", "3", "1", "1", "2", "0", "0", "0", "0", "0", "1"]
    assert lines[3].split() == ["2", "flag", "2", "1", "2", "0", "0", "1"]
    assert lines[4].split() == ["total", "7", "3"]
