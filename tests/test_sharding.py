"""Clients sharded over 8 fake CPU devices give the results of one device (full and partial participation).

XLA_FLAGS must be set before JAX starts and the rest of the suite uses one
device, so the 8-device side runs in a subprocess (:func:`worker`, started
once per module and overlapped with the in-process 1-device references).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from fgn_jax import sharding, simulate, sweep, testing, training
from tests import test_hostlocal as hostlocal
from tests.conftest import make_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(num_clients=8, tau_head=1, tau_shared=1)  # tau=1 compiles faster; the sharding is the same
ROUNDS = 4  # two chunks of log_every=2


def populations():
    """C=8 clients (a multiple of 8 devices), C=3 (padded to 8 with masked clients), C=16 imbalanced.

    The 3 clients are the first 3 of the 8-client dataset with its example
    arrays left whole, so on the mesh both populations have the same shapes
    and share one compilation. The 16 imbalanced clients (sizes ~ 1/(c+1))
    run 2 per device, in a balancing slot order (``pool.slot_order``) that
    is not the client order.
    """
    setup = make_setup(**SETTINGS)
    ds = setup.dataset
    first3 = lambda split: dataclasses.replace(split, offset=split.offset[:3], size=split.size[:3])  # noqa: E731
    three = dataclasses.replace(ds, client_task=ds.client_task[:3], train=first3(ds.train), test=first3(ds.test))
    imbalanced = make_setup(**{**SETTINGS, "num_clients": 16, "imbalance": 1.0}).dataset
    return setup, {8: ds, 3: three, 16: imbalanced}


# Partial participation on the mesh: 16 clients, 2 slots per device, a cohort of 8 (one per device's block),
# a quarter of the sampled clients failing to report.
COHORT = dict(num_clients=16, clients_per_round=8, dropout_prob=0.25)


def run(sim, env, hparams, state):
    rows = []
    while int(state.server.round) < ROUNDS:
        state, m = sim.run_chunk(state, env, hparams, ROUNDS)
        rows += simulate.metrics_rows(m)
    return state, rows, {k: np.asarray(v).tolist() for k, v in sim.evaluate(state, env, hparams).items()}


def run_cohorts(sim, env, hparams, state):
    """``ROUNDS`` rounds of partial participation: state, metrics rows, cohort ids and used masks ``[R, K]``."""
    rows, ids, used = [], [], []
    while int(state.server.round) < ROUNDS:
        state, m = sim.run_chunk(state, env, hparams, ROUNDS)
        rows += simulate.metrics_rows(m)
        ids.append(np.asarray(m["cohort_ids"]))
        used.append(np.asarray(m["cohort_used"]))
    return state, rows, np.concatenate(ids), np.concatenate(used)


def specs(tree) -> list[str]:
    return sorted({str(a.sharding.spec) for a in jax.tree.leaves(tree)})


def collectives(hlo: str) -> list[str]:
    """The kinds of cross-device operations in compiled HLO text."""
    ops = r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|collective-broadcast)"
    return sorted(set(re.findall(ops + r"(?:-start)?\(", hlo)))


def worker(out_dir: str) -> None:
    """The sharded side: each population on a mesh of all 8 devices."""
    setup, datasets = populations()
    sim = dataclasses.replace(setup.sim, mesh=sharding.make_mesh())
    result = {"devices": jax.device_count()}
    for c, dataset in datasets.items():
        env = sim.make_env(dataset)
        hostlocal.save_shards(env, os.path.join(out_dir, f"{c}_blocks.npz"))
        state = sim.init(jax.random.key(setup.config.seed), env, setup.hparams)
        traces = sim.trace_count
        state, m = sim.run_chunk(state, env, setup.hparams, ROUNDS)
        traces_after_first = sim.trace_count
        state, rows, ev = run(sim, env, setup.hparams, state)
        result[str(c)] = {
            "rows": simulate.metrics_rows(m) + rows,
            "eval": ev,
            "new_traces": [traces_after_first - traces, sim.trace_count - traces_after_first],
            "slots": int(env.info.mask.shape[0]),
            "client_id": np.asarray(env.info.client_id).tolist(),
            "specs": {"clients": specs(state.clients), "server": specs(state.server), "env": specs(env)},
        }
        if c == 8:  # the compiled programs' collectives (from the compilation cache)
            stop = jnp.asarray(ROUNDS, jnp.int32)
            progs = simulate.programs(sim)
            hlo = {
                "run_chunk": progs.run_chunk.lower(state, env, setup.hparams, stop),
                "evaluate": progs.evaluate.lower(state, env, setup.hparams),
            }
            result["collectives"] = {k: collectives(v.compile().as_text()) for k, v in hlo.items()}
        # Heads in client order (slot s holds client client_id[s]), padding dropped.
        in_order = np.argsort(np.asarray(env.info.client_id))[:c]
        final = {
            "trunk": state.server.trunk,
            "head": jax.tree.map(lambda a, i=in_order: np.asarray(a)[i], state.clients.head),
        }
        np.savez(os.path.join(out_dir, f"{c}.npz"), *jax.device_get(jax.tree.leaves(final)))
    # Partial participation: each device samples from and updates its own block.
    cohort_setup = make_setup(**{**SETTINGS, **COHORT})
    sim = dataclasses.replace(cohort_setup.sim, mesh=sharding.make_mesh())
    env = sim.make_env(cohort_setup.dataset)
    state = sim.init(jax.random.key(cohort_setup.config.seed), env, cohort_setup.hparams)
    state, rows, ids, used = run_cohorts(sim, env, cohort_setup.hparams, state)
    ev = sim.evaluate(state, env, cohort_setup.hparams)
    result["cohort"] = {
        "rows": rows,
        "cohort_ids": ids.tolist(),
        "cohort_used": used.tolist(),
        "client_id": np.asarray(env.info.client_id).tolist(),
        "eval": {k: np.asarray(v).tolist() for k, v in ev.items()},
    }
    final = {"trunk": state.server.trunk, "head": state.clients.head}
    np.savez(os.path.join(out_dir, "cohort.npz"), *jax.device_get(jax.tree.leaves(final)))
    # A sweep of 2 configurations over 2 devices x clients over 4: the layout
    # its programs give the state and metrics (abstractly: nothing compiles).
    sweep_sim = dataclasses.replace(setup.sim, mesh=sharding.make_mesh(0, sweep_devices=2))
    env = sweep_sim.make_env(datasets[8])
    keys, hparams = sweep.stacked_inputs([setup.config, dataclasses.replace(setup.config, seed=1)], sweep_sim.mesh)
    progs = simulate.programs(sweep_sim, sweep=True)
    state = jax.eval_shape(progs.init, keys, env, hparams)
    new_state, metrics = jax.eval_shape(progs.run_chunk, state, env, hparams, ROUNDS)
    result["sweep_specs"] = {
        "clients": specs(new_state.clients),
        "server": specs(new_state.server),
        "hparams": specs(hparams),
        "metrics": specs(metrics),
    }
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Starts the 8-device worker; yields a function that waits for its results."""
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    code = "import sys; from tests.test_sharding import worker; worker(sys.argv[1])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def wait():
        log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, log.decode()[-3000:]
        with open(out / "result.json") as f:
            return json.load(f), out

    yield wait
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def unsharded():
    """The in-process references: each population on one device.

    The 3 clients are padded to 8 slots here too, so they share the
    8 clients' compilation; test_simulate.py shows padding changes nothing.
    """
    setup, datasets = populations()
    out = {}
    for c, dataset in datasets.items():
        env = simulate.make_env(dataset, num_clients=max(c, 8))
        out[c] = run(
            setup.sim, env, setup.hparams, setup.sim.init(jax.random.key(setup.config.seed), env, setup.hparams)
        )
    return out


@pytest.mark.parametrize("num_clients", [8, 3, 16])
def test_eight_devices_match_one(sharded, unsharded, num_clients):
    state, rows, ev = unsharded[num_clients]
    result, out = sharded()
    assert result["devices"] == 8
    got = result[str(num_clients)]
    assert got["slots"] == max(num_clients, 8)
    # Balanced clients keep their slots; the imbalanced ones are spread over the devices.
    assert (got["client_id"] == list(range(got["slots"]))) == (num_clients != 16)
    assert [r["round"] for r in got["rows"]] == [r["round"] for r in rows] == list(range(ROUNDS))
    for a, b in zip(got["rows"], rows):
        for key in ("task_loss", "grad_norm", "task_weight"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for key in ("test_loss", "test_metric"):
        np.testing.assert_allclose(got["eval"][key], ev[key], rtol=1e-5, atol=1e-5, err_msg=key)
    final = {"trunk": state.server.trunk, "head": jax.tree.map(lambda a: a[:num_clients], state.clients.head)}
    with np.load(out / f"{num_clients}.npz") as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    testing.assert_trees_allclose(leaves, jax.tree.leaves(final), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_clients", [8, 3, 16])
def test_each_device_holds_only_its_clients_examples(sharded, num_clients):
    """Device d's shard of each example array: the rows of its client slots, then zeros; nothing else."""
    _, out = sharded()
    _, datasets = populations()
    ds = datasets[num_clients]
    shards = hostlocal.load_shards(out / f"{num_clients}_blocks.npz")
    for field in hostlocal.FIELDS:
        split = ds.train if field.startswith("train") else ds.test
        held = hostlocal.check_blocks(shards, split, field)
        assert sorted(held) == list(range(8))
        assert sorted(c for _, own in held.values() for c in own) == list(range(num_clients))


def test_state_is_created_sharded_and_chunks_do_not_recompile(sharded):
    result, _ = sharded()
    clients, everywhere = str(P(sharding.CLIENT_AXIS)), str(P())
    for c in ("8", "3", "16"):
        got = result[c]
        # Every leaf of the environment, example blocks included, is split over the devices.
        assert got["specs"] == {"clients": [clients], "server": [everywhere], "env": [clients]}
    # One compilation serves every chunk of both populations (same padded shapes).
    assert result["8"]["new_traces"] == [1, 0]
    assert result["3"]["new_traces"] == [0, 0]
    assert result["16"]["new_traces"] == [1, 0]  # other shapes


def test_each_device_reads_only_its_own_block(sharded):
    """No all-gather of the example blocks: the only collective is the server's all-reduce over clients."""
    result, _ = sharded()
    assert result["collectives"] == {"run_chunk": ["all-reduce"], "evaluate": ["all-reduce"]}


def test_sweep_axis_can_be_sharded_too(sharded):
    result, _ = sharded()
    assert result["sweep_specs"] == {
        "clients": [str(P(sharding.SWEEP_AXIS, sharding.CLIENT_AXIS))],
        "server": [str(P(sharding.SWEEP_AXIS))],
        "hparams": [str(P(sharding.SWEEP_AXIS))],
        "metrics": [str(P())],  # replicated, so every process can read them
    }


def test_mesh_and_padding_rules():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == (sharding.CLIENT_AXIS,)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert sharding.padded_num_clients(3, None) == 3
    assert sharding.padded_num_clients(3, mesh) == 3  # one device here
    with pytest.raises(ValueError, match="devices are available"):
        sharding.make_mesh(jax.device_count() + 1)
    with pytest.raises(training.ConfigError, match="--num_devices"):
        training.ExperimentConfig(num_devices=jax.device_count() + 1).validate()
    with pytest.raises(ValueError, match="vmap"):
        dataclasses.replace(make_setup().sim, client_execution="loop", mesh=mesh)


@dataclasses.dataclass(frozen=True)
class _ReplayedCohorts(simulate.Simulation):
    """One device, every round's cohort given (slots = client ids: 16 balanced clients keep their slots)."""

    cohorts: tuple = ()  # ((ids per round), (used per round)), as nested tuples (hashable)

    def _sample(self, key, round_index, info):
        ids, used = (jnp.asarray(a) for a in self.cohorts)
        return ids[round_index].astype(jnp.int32), used[round_index].astype(jnp.float32)


def test_cohorts_on_eight_devices_match_one_device_with_the_same_cohorts(sharded):
    """Sharded sampling draws within each device's block; gather, update and scatter equal one device's."""
    result, out = sharded()
    got = result["cohort"]
    assert got["client_id"] == list(range(16))  # balanced: slot s holds client s, 2 per device
    ids, used = np.array(got["cohort_ids"]), np.array(got["cohort_used"])
    assert ids.shape == used.shape == (ROUNDS, 8)
    # Device d's cohort member is one of its own two clients, and the cohorts change between rounds.
    np.testing.assert_array_equal(ids // 2, np.broadcast_to(np.arange(8), ids.shape))
    assert len({tuple(r) for r in ids}) > 1
    assert 0 < used.sum() < used.size  # some sampled clients dropped out
    for row, u, i in zip(got["rows"], used, ids):
        tasks = np.asarray(make_setup(**{**SETTINGS, **COHORT}).dataset.client_task)[i[u]]
        assert row["participants"] == np.bincount(tasks, minlength=len(row["participants"])).tolist()
    # The same cohorts replayed on one device give the same round, metrics and final state.
    setup = make_setup(**{**SETTINGS, **COHORT})
    fields = {f.name: getattr(setup.sim, f.name) for f in dataclasses.fields(setup.sim) if f.init}
    sim = _ReplayedCohorts(**fields, cohorts=(tuple(map(tuple, ids.tolist())), tuple(map(tuple, used.tolist()))))
    state = sim.init(jax.random.key(setup.config.seed), setup.env, setup.hparams)
    state, rows, replayed, _ = run_cohorts(sim, setup.env, setup.hparams, state)
    np.testing.assert_array_equal(replayed, ids)
    for a, b in zip(got["rows"], rows):
        assert a["participants"] == b["participants"]
        for key in ("task_loss", "grad_norm", "task_weight"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    ev = sim.evaluate(state, setup.env, setup.hparams)
    for key in ("test_loss", "test_metric"):
        np.testing.assert_allclose(got["eval"][key], np.asarray(ev[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    with np.load(out / "cohort.npz") as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    final = {"trunk": state.server.trunk, "head": state.clients.head}
    testing.assert_trees_allclose(leaves, jax.tree.leaves(final), rtol=1e-4, atol=1e-5)
