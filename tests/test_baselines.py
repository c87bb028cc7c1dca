"""Constant-predictor baselines and standardised regression targets."""

import jax
import jax.numpy as jnp
import numpy as np

from fgn_jax import baselines
from fgn_jax import tasks as tasks_lib
from fgn_jax.data import pool as pool_lib

REG = tasks_lib.TaskSpec("pts", tasks_lib.REGRESSION, 4, tasks_lib.NME)
CLS = tasks_lib.TaskSpec("cls", tasks_lib.CLASSIFICATION, 3, tasks_lib.ACCURACY)
TABLE = (REG, CLS)


def split(ys):
    sizes = np.array([len(y) for y in ys], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    y = np.concatenate(ys).astype(np.float32)
    return pool_lib.Split(x=np.zeros((len(y), 1), np.float32), y=y, offset=offsets, size=sizes)


def dataset():
    # Client 0 (pts): landmarks [x0, x1, y0, y1]; client 1 and 2 (cls): labels in column 0.
    train_pts = np.array([[0.2, 0.6, 0.5, 0.5], [0.4, 0.8, 0.5, 0.5]])  # mean [0.3, 0.7, 0.5, 0.5]
    test_pts = np.array([[0.3, 0.7, 0.5, 0.5], [0.3, 0.9, 0.5, 0.5]])
    pad = lambda a: np.pad(a, ((0, 0), (0, 4 - a.shape[1])))  # noqa: E731
    train = [train_pts, pad(np.array([[1.0], [1.0], [2.0]])), pad(np.array([[0.0], [2.0], [2.0]]))]
    test = [test_pts, pad(np.array([[1.0], [0.0], [1.0], [1.0]])), pad(np.array([[2.0], [1.0]]))]
    return pool_lib.FederatedDataset("toy", TABLE, np.array([0, 1, 1], np.int32), split(train), split(test))


def test_constant_baseline_hand_computed():
    # pts: the mean predictor [0.3, 0.7, 0.5, 0.5]; test point errors / inter-ocular distance:
    #   example 0: errors 0, 0, iod 0.4 -> 0;  example 1: errors 0, 0.2, iod 0.6 -> (0.2 / 2) / 0.6.
    # cls: client 1 majority 1 -> test acc 3/4; client 2 majority 2 -> test acc 1/2; mean 0.625.
    got = baselines.constant_baseline(dataset())
    np.testing.assert_allclose(got, [(0.0 + 0.1 / 0.6) / 2, 0.625], rtol=1e-6)


def test_margin_and_threshold():
    assert baselines.margin(tasks_lib.ACCURACY, 0.8, 0.5) == 0.8 - 0.5
    assert baselines.margin(tasks_lib.NME, 0.1, 0.4) == 0.25
    assert baselines.beats(tasks_lib.ACCURACY, 0.63, 0.5) and not baselines.beats(tasks_lib.ACCURACY, 0.61, 0.5)
    assert baselines.beats(tasks_lib.NME, 0.2, 0.4) and not baselines.beats(tasks_lib.NME, 0.25, 0.4)


def test_standardised_targets_keep_metrics_in_data_units():
    rng = np.random.default_rng(0)
    y = rng.normal(0.5, 0.05, (64, 4)).astype(np.float32)
    shift, scale = tasks_lib.target_standardization(TABLE, np.array([0, 1]), [y, np.zeros((3, 4))])
    np.testing.assert_allclose(shift[0], y.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale[0], y.std(0), rtol=1e-6)
    np.testing.assert_array_equal(shift[1], 0.0)  # classification: untouched
    np.testing.assert_array_equal(scale[1], 1.0)
    std = jax.tree.map(lambda a: a[0], tasks_lib.TaskArrays.for_clients(TABLE, np.array([0]), shift[:1], scale[:1]))
    raw = jax.tree.map(lambda a: a[0], tasks_lib.TaskArrays.for_clients(TABLE, np.array([0])))
    pred = rng.normal(0.5, 0.05, (64, 4)).astype(np.float32)
    # The standardised head outputs (pred - shift) / scale: the same prediction in data units.
    out_std = jnp.asarray((pred - shift[0]) / scale[0])
    np.testing.assert_allclose(
        tasks_lib.per_example_metric(out_std, y, std),
        tasks_lib.per_example_metric(jnp.asarray(pred), y, raw),
        rtol=1e-4,
    )
    # The mean predictor (output 0 when standardised) has loss 1 per output, the scale of a cross-entropy.
    loss = tasks_lib.per_example_loss(jnp.zeros((64, 4)), y, std)
    np.testing.assert_allclose(float(jnp.mean(loss)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        tasks_lib.per_example_loss(out_std, y, std),
        np.mean(((pred - y) / scale[0]) ** 2, axis=1),
        rtol=1e-4,
    )
