"""The reference points: local-only training and centralised training (``--algorithm=local|centralized``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fgn_jax import algorithms, simulate, testing
from fgn_jax import tasks as tasks_lib
from tests.conftest import make_setup, run_alone


def pick(tree, c):
    return jax.tree.map(lambda a: a[c], tree)


def test_local_clients_never_see_each_other():
    setup = make_setup(algorithm="local", num_clients=3, rounds=4)
    state, rows = run_alone(setup)
    init = setup.init()
    # Nothing is aggregated: the server trunk stays the initial one, each client's own trunk moved.
    testing.assert_trees_allclose(state.server.trunk, init.server.trunk, rtol=0, atol=0)
    testing.assert_trees_differ(jax.tree.map(lambda a: a[0], state.clients.trunk), init.server.trunk)
    assert all(r["task_weight"] == [1.0, 1.0, 1.0] for r in rows)

    # Replace client 2's examples: clients 0 and 1 end exactly where they did, client 2 does not.
    lo, n = int(setup.env.info.train_offset[2]), int(setup.env.info.train_size[2])
    data = setup.env.data.replace(train_x=setup.env.data.train_x.at[lo : lo + n].multiply(-1.0))
    other = dataclasses.replace(setup, env=setup.env.replace(data=data))
    state2, _ = run_alone(other)
    for c in (0, 1):
        testing.assert_trees_allclose(pick(state2.clients, c), pick(state.clients, c), rtol=0, atol=0)
    testing.assert_trees_differ(pick(state2.clients.trunk, 2), pick(state.clients.trunk, 2))


def test_local_evaluates_each_client_with_its_own_trunk():
    setup = make_setup(algorithm="local", num_clients=3, rounds=2)
    state, _ = run_alone(setup)
    got = setup.sim.evaluate(state, setup.env, setup.hparams)
    alg = setup.sim.algorithm(setup.hparams)
    for c in range(3):
        want = algorithms.evaluate_client(
            alg,
            pick(state.clients.trunk, c),
            pick(state.clients.head, c),
            pick(setup.env.info, c),
            setup.env.data,
            setup.sim.max_test_size,
        )
        np.testing.assert_allclose(got["test_metric"][c], want[1], rtol=1e-5)


def test_centralized_round_equals_joint_sgd_written_out():
    # tau_head + tau_shared = 2 joint steps per round; SGD so the reference is a plain formula:
    # trunk -= lr * mean_c dL_c/dtrunk, head_c -= lr * dL_c/dhead_c, every client on its own minibatch.
    setup = make_setup(algorithm="centralized", num_clients=3, tau_head=1, tau_shared=1, client_optimizer="sgd")
    lr, c_num = setup.config.client_lr, 3
    state = setup.init()
    new, metrics = setup.sim.run_chunk(setup.init(), setup.env, setup.hparams, 1)
    alg = setup.sim.algorithm(setup.hparams)
    info, data = setup.env.info, setup.env.data
    keys = simulate._client_keys(state.key, 0, info.client_id)
    trunk, heads = state.server.trunk, [pick(state.clients.head, c) for c in range(c_num)]
    first_losses = []
    for step in range(2):
        grads_t, grads_h, losses = [], [], []
        for c in range(c_num):
            k = jax.random.split(keys[c], 2)[step]
            idx = info.train_offset[c] + jax.random.randint(k, (setup.config.batch_size,), 0, info.train_size[c])
            x, y = data.train_x[idx], data.train_y[idx]
            task = pick(info.task, c)

            def loss(t, h):
                out = alg.head_model.apply(h, alg.trunk_model.apply(t, x))  # noqa: B023
                return jnp.mean(tasks_lib.per_example_loss(out, y, task))  # noqa: B023

            value, (gt, gh) = jax.value_and_grad(loss, argnums=(0, 1))(trunk, heads[c])
            grads_t.append(gt), grads_h.append(gh), losses.append(value)
        if step == 0:
            first_losses = losses
        mean_grad = jax.tree.map(lambda *g: sum(g) / c_num, *grads_t)
        trunk = jax.tree.map(lambda p, g: p - lr * g, trunk, mean_grad)
        heads = [jax.tree.map(lambda p, g: p - lr * g, h, gh) for h, gh in zip(heads, grads_h)]
    testing.assert_trees_allclose(new.server.trunk, trunk, rtol=1e-4, atol=1e-6)
    for c in range(c_num):
        testing.assert_trees_allclose(pick(new.clients.head, c), heads[c], rtol=1e-4, atol=1e-6)
    # One client per task here: the round's task losses are the clients' losses at the first step.
    np.testing.assert_allclose(metrics["task_loss"][0], first_losses, rtol=1e-5)
    np.testing.assert_array_equal(metrics["task_weight"][0], 1.0)
