"""Each synthetic task is learnable: centralised training beats chance clearly.

One trunk with one head per task is trained on all tasks at once (every
synthetic example carries the labels of every task), then each task is
scored on held-out data against the best constant predictor.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgn_jax import models
from fgn_jax import tasks as tasks_lib
from fgn_jax.data import synthetic


def train_and_score(pool_fn, trunk, n_train, n_test, steps, seed=0):
    train, test = pool_fn(n_train, seed), pool_fn(n_test, seed + 1)
    table = train.tasks
    width = tasks_lib.max_outputs(table)
    task_arrays = tasks_lib.TaskArrays.for_clients(table, np.arange(len(table)))
    heads = models.Head(width)
    key = jax.random.key(seed)
    params = {
        "trunk": trunk.init(key, train.x[:1]),
        "heads": jax.vmap(lambda k: heads.init(k, jnp.zeros((1, trunk.features))))(jax.random.split(key, len(table))),
    }

    def targets(pool, idx):
        # [T, B, target_width]
        tw = tasks_lib.target_width(table)
        return np.stack([np.pad(pool.targets[t.name][idx], ((0, 0), (0, tw - t.target_width))) for t in table])

    def outputs(p, x):
        feats = trunk.apply(p["trunk"], x)
        return jax.vmap(heads.apply, in_axes=(0, None))(p["heads"], feats)  # [T, B, width]

    def task_losses(p, x, y):
        out = outputs(p, x)
        return jnp.mean(jax.vmap(tasks_lib.per_example_loss)(out, y, task_arrays), axis=1)

    # Each task's loss is scaled by that of the best constant predictor
    # (target variance for MSE, label entropy for cross-entropy), so the small
    # landmark MSE is not drowned by the cross-entropies.
    def constant_loss(t):
        v = train.targets[t.name]
        if t.kind == tasks_lib.REGRESSION:
            return float(v.var(axis=0).mean())
        freq = np.bincount(v[:, 0].astype(int)) / len(v)
        return float(-np.sum(freq[freq > 0] * np.log(freq[freq > 0])))

    scale = jnp.array([1.0 / constant_loss(t) for t in table])

    def loss(p, x, y):
        return jnp.sum(scale * task_losses(p, x, y))

    tx = optax.adam(2e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, opt, x, y):
        g = jax.grad(loss)(p, x, y)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, n_train, 64)
        params, opt = step(params, opt, train.x[idx], targets(train, idx))

    idx = np.arange(n_test)
    out = jax.jit(outputs)(params, test.x)
    y = targets(test, idx)
    scores = np.asarray(jax.vmap(tasks_lib.per_example_metric)(out, y, task_arrays)).mean(axis=1)
    baselines = []
    for k, t in enumerate(table):
        if t.kind == tasks_lib.CLASSIFICATION:
            baselines.append(np.bincount(test.targets[t.name][:, 0].astype(int)).max() / n_test)
        else:  # the mean landmarks of the training set, scored by the same metric
            const = np.zeros((n_test, width), np.float32)
            const[:, : t.num_outputs] = train.targets[t.name].mean(0)
            baselines.append(
                float(
                    np.mean(tasks_lib.per_example_metric(const, y[k], jax.tree.map(lambda a, k=k: a[k], task_arrays)))
                )
            )
    return table, scores, np.array(baselines)


def check(table, scores, baselines):
    for t, s, b in zip(table, scores, baselines):
        if t.metric == tasks_lib.ACCURACY:
            assert s > b + 0.1, f"{t.name}: accuracy {s:.3f} vs majority {b:.3f}"
        else:
            assert s < 0.7 * b, f"{t.name}: {t.metric} {s:.3f} vs mean predictor {b:.3f}"


@pytest.mark.slow
def test_synthetic_mtfl_tasks_are_learnable():
    check(*train_and_score(synthetic.mtfl_pool, models.MTFLTrunk(), 1500, 400, 400))


@pytest.mark.slow
def test_synthetic_radcom_tasks_are_learnable():
    check(*train_and_score(synthetic.radcom_pool, models.RadComTrunk(), 3000, 600, 400))
