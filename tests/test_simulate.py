"""The vectorised round: equivalences, determinism, padding, compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import algorithms, simulate, testing, training
from tests.conftest import make_setup


def run(setup, state, rounds):
    rows = []
    while int(state.server.round) < rounds:
        state, m = setup.sim.run_chunk(state, setup.env, setup.hparams, rounds)
        rows += simulate.metrics_rows(m)
    return state, rows


def test_vmap_equals_python_loop_over_clients():
    setup = make_setup(num_clients=4)
    state, rows = run(setup, setup.init(), 2)

    # An explicit Python loop over clients of the same client function.
    alg = setup.sim.algorithm(setup.hparams)
    client_update, server_update = jax.jit(alg.client_update), jax.jit(alg.server_update)
    ref = setup.init()
    for r in range(2):
        keys = simulate._client_keys(ref.key, r, setup.env.info.client_id)
        clients, outs = [], []
        for c in range(4):
            pick = lambda t: jax.tree.map(lambda a: a[c], t)  # noqa: B023
            cs, out = client_update(ref.server.trunk, pick(ref.clients), pick(setup.env.info), setup.env.data, keys[c])
            clients.append(cs)
            outs.append(out)
        stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        server, metrics = server_update(ref.server, stack(outs), setup.env.info, simulate._server_key(ref.key, r))
        np.testing.assert_allclose(rows[r]["task_loss"], metrics["task_loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(rows[r]["grad_norm"], metrics["grad_norm"], rtol=1e-4, atol=1e-6)
        ref = simulate.SimState(server=server, clients=stack(clients), key=ref.key)
    testing.assert_trees_allclose(state.server.trunk, ref.server.trunk, rtol=1e-4, atol=1e-5)
    testing.assert_trees_allclose(state.clients.head, ref.clients.head, rtol=1e-4, atol=1e-5)


def test_loop_execution_mode_matches_vmap():
    vm = make_setup(num_clients=3, client_execution="vmap")
    lp = make_setup(num_clients=3, client_execution="loop")
    s1, r1 = run(vm, vm.init(), 3)
    s2, r2 = run(lp, lp.init(), 3)
    assert [r["round"] for r in r1] == [r["round"] for r in r2] == [0, 1, 2]
    for a, b in zip(r1, r2):
        np.testing.assert_allclose(a["task_loss"], b["task_loss"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["task_weight"], b["task_weight"], rtol=1e-4, atol=1e-6)
    testing.assert_trees_allclose(s1.server.trunk, s2.server.trunk, rtol=1e-4, atol=1e-5)


def test_client_groups_match_one_vmap():
    # Groups of 2 clients (lax.map) over 5 clients: two full groups and a
    # remainder of one, against all 5 in one vmap.
    whole = make_setup(num_clients=5, client_batch=5)
    grouped = make_setup(num_clients=5, client_batch=2)
    assert (whole.sim.client_batch, grouped.sim.client_batch) == (5, 2)
    s1, r1 = run(whole, whole.init(), 3)
    s2, r2 = run(grouped, grouped.init(), 3)
    for a, b in zip(r1, r2):
        for key in ("task_loss", "grad_norm", "task_weight"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)
    testing.assert_trees_allclose(s1.server.trunk, s2.server.trunk, rtol=1e-5, atol=1e-6)
    testing.assert_trees_allclose(s1.clients, s2.clients, rtol=1e-5, atol=1e-6)


def test_automatic_client_batch_is_about_256_examples():
    assert training.auto_client_batch(64) == 4 and training.auto_client_batch(32) == 8
    assert training.auto_client_batch(1000) == 1
    assert make_setup(batch_size=16).sim.client_batch == 16  # --client_batch=0: automatic


def test_fedrep_is_fedgradnorm_with_zero_weight_lr():
    rep = make_setup(algorithm="fedrep", weight_lr=0.3)
    gn = make_setup(algorithm="fedgradnorm", weight_lr=0.0)
    gn_moving = make_setup(algorithm="fedgradnorm", weight_lr=0.3)
    s_rep, r_rep = run(rep, rep.init(), 4)
    s_gn, r_gn = run(gn, gn.init(), 4)
    s_mv, r_mv = run(gn_moving, gn_moving.init(), 4)
    for a, b in zip(r_rep, r_gn):
        assert a["task_weight"] == [1.0, 1.0, 1.0]
        np.testing.assert_allclose(a["task_loss"], b["task_loss"], rtol=1e-6)
        assert a["task_weight"] == b["task_weight"]
    testing.assert_trees_allclose(s_rep.server.trunk, s_gn.server.trunk, rtol=1e-6, atol=0)
    # ... and the comparison has teeth: a positive weight lr moves the weights.
    assert r_mv[-1]["task_weight"] != [1.0, 1.0, 1.0]


def test_same_seed_same_metrics_different_seed_different():
    a = make_setup(seed=3)
    _, ra = run(a, a.init(), 3)
    b = make_setup(seed=3)
    _, rb = run(b, b.init(), 3)
    c = make_setup(seed=4)
    _, rc = run(c, c.init(), 3)
    assert ra == rb
    assert ra != rc


def test_second_chunk_does_not_recompile():
    setup = make_setup(log_every=3, eval_every=3)  # a chunk length no other test compiles
    state = setup.init()
    assert setup.sim.trace_count == 0
    state, _ = setup.sim.run_chunk(state, setup.env, setup.hparams, 9)
    assert setup.sim.trace_count == 1
    # New hyperparameter values are arguments, not constants: no retrace either.
    other = dataclasses.replace(setup.hparams, client_lr=jnp.float32(0.01), alpha=jnp.float32(0.5))
    state, _ = setup.sim.run_chunk(state, setup.env, other, 9)
    state, m = setup.sim.run_chunk(state, setup.env, setup.hparams, 9)
    assert setup.sim.trace_count == 1
    assert int(state.server.round) == 9


def test_stop_round_inside_a_chunk():
    setup = make_setup(log_every=4, eval_every=4)
    state, m = setup.sim.run_chunk(setup.init(), setup.env, setup.hparams, 3)
    rows = simulate.metrics_rows(m)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert int(state.server.round) == 3


def test_padded_clients_change_nothing():
    setup = make_setup(num_clients=3)
    padded_env = simulate.make_env(setup.dataset, num_clients=5)
    assert padded_env.info.mask.tolist() == [1, 1, 1, 0, 0]
    s1, r1 = run(setup, setup.init(), 2)
    padded = dataclasses.replace(setup, env=padded_env)
    s2, r2 = run(padded, padded.init(), 2)
    for a, b in zip(r1, r2):
        np.testing.assert_allclose(a["task_loss"], b["task_loss"], rtol=1e-5)
        np.testing.assert_allclose(a["task_weight"], b["task_weight"], rtol=1e-5)
    testing.assert_trees_allclose(s1.server.trunk, s2.server.trunk, rtol=1e-5, atol=1e-6)
    testing.assert_trees_allclose(s1.clients.head, jax.tree.map(lambda a: a[:3], s2.clients.head), rtol=1e-5, atol=1e-6)


def test_server_update_hand_computed():
    # Two tasks, three clients: clients 0 and 2 do task 0, client 1 task 1.
    setup = make_setup(client_tasks="0,1,2")
    alg = setup.sim.algorithm(algorithms.HParams.create(0.1, 0.5, 1.0, 0.0))
    server = alg.init_server(jax.random.key(0))
    server = server.replace(weighting=server.weighting._replace(task_weights=jnp.array([2.0, 0.5, 0.5])))
    deltas = jax.tree.map(
        lambda t: jnp.stack([jnp.ones_like(t), 2 * jnp.ones_like(t), -4 * jnp.ones_like(t)]), server.trunk
    )
    out = algorithms.ClientOutput(delta=deltas, loss=jnp.array([1.0, 2.0, 3.0]), grad_norm=jnp.array([4.0, 5.0, 6.0]))
    info = dataclasses.replace(setup.env.info, task_index=jnp.array([0, 1, 0]))
    new, metrics = alg.server_update(server, out, info, jax.random.key(1))
    # delta = (2*1 + 0.5*2 + 2*(-4)) / 3 = -5/3; server SGD lr 0.5 -> theta - 5/6.
    testing.assert_trees_allclose(new.trunk, jax.tree.map(lambda t: t - 5.0 / 6.0, server.trunk), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["task_loss"], [2.0, 2.0, 0.0])  # task 2 has no client here
    np.testing.assert_allclose(metrics["grad_norm"], [5.0, 5.0, 0.0])
    np.testing.assert_allclose(metrics["task_weight"], [2.0, 0.5, 0.5])


@pytest.mark.parametrize("algorithm", algorithms.ALGORITHMS)
def test_round_outputs_are_finite_and_shaped(algorithm):
    setup = make_setup(algorithm=algorithm, num_clients=3)
    state, rows = run(setup, setup.init(), 2)
    for row in rows:
        for key in ("task_loss", "grad_norm", "task_weight"):
            assert len(row[key]) == 3 and np.all(np.isfinite(row[key]))
        np.testing.assert_allclose(sum(row["task_weight"]), 3.0, rtol=1e-5)
    ev = setup.sim.evaluate(state, setup.env, setup.hparams)
    assert ev["test_metric"].shape == (3,)
    assert np.all((np.asarray(ev["test_metric"]) >= 0) & (np.asarray(ev["test_metric"]) <= 1))
