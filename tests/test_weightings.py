"""The task-weighting family (fgn_jax/weightings): each method against numbers computed
independently (numpy, by hand), batching, and tiny training runs through the shared round."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import aggregation, algorithms, sweep, testing, training, weightings
from fgn_jax.weightings import base, cagrad, dwa, imtl, mgda, pcgrad, simplex, uncertainty
from tests.conftest import make_setup, run_alone, tiny_config
from tests.test_train import run_cli

HP = algorithms.HParams.create(0.1, 1.0, 1.5, 0.05, dwa_temperature=2.0, cagrad_c=0.5, uncertainty_lr=0.1)


def inputs(d, present=None, key=0):
    """RoundInputs for per-task updates ``d`` ([T, dim] numpy)."""
    d = jnp.asarray(d, jnp.float32)
    present = jnp.ones(d.shape[0], bool) if present is None else jnp.asarray(present)
    return base.RoundInputs(jax.random.key(key), present, base.task_gram(d))


def stats(loss, present=None, weight=None):
    loss = jnp.asarray(loss, jnp.float32)
    ones = jnp.ones_like(loss)
    present = jnp.ones(loss.shape, bool) if present is None else jnp.asarray(present)
    return base.TaskStats(loss, ones, present, ones, ones if weight is None else weight)


def test_registry_lists_every_method_and_flags_the_gram_ones():
    assert set(weightings.WEIGHTINGS) == {
        "equal",
        "gradnorm",
        "uncertainty",
        "dwa",
        "rlw",
        "mgda",
        "pcgrad",
        "cagrad",
        "imtl",
    }
    for name in weightings.WEIGHTINGS:
        assert weightings.make(name, HP).needs_task_updates == (name in weightings.NEEDS_TASK_UPDATES), name


@pytest.mark.parametrize(
    "g1,g2",
    [([1.0, 0.0, 0.0], [0.2, 1.0, 0.0]), ([3.0, 1.0, -1.0], [-1.0, 0.5, 2.0]), ([0.1, 0.1, 0.0], [2.0, -1.0, 0.5])],
)
def test_mgda_two_task_closed_form(g1, g2):
    g1, g2 = np.array(g1), np.array(g2)
    lam = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    w = mgda.mgda().weights(None, inputs(np.stack([g1, g2])))
    np.testing.assert_allclose(w, [2 * lam, 2 * (1 - lam)], rtol=1e-5, atol=1e-6)


def test_mgda_three_tasks_is_the_min_norm_point_and_skips_absent_tasks():
    d = np.array([[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5], [-0.6, -0.4, 1.0, 0.0]])
    w = np.asarray(mgda.mgda().weights(None, inputs(d)))
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-6)
    assert np.all(w >= 0)
    # No point of a fine grid over the simplex has a smaller norm.
    grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 201) for b in np.linspace(0, 1, 201) if a + b <= 1])
    best = np.min(np.sum((grid @ d) ** 2, axis=1))
    assert np.sum((w / 3 @ d) ** 2) <= best + 1e-6
    # Task 2 absent (its update is zero): the two-task closed form on tasks 0 and 1, weight 0 for task 2.
    d_absent = d.copy()
    d_absent[2] = 0
    w = mgda.mgda().weights(None, inputs(d_absent, present=[True, True, False]))
    g1, g2 = d[0], d[1]
    lam = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    np.testing.assert_allclose(w, [2 * lam, 2 * (1 - lam), 0.0], rtol=1e-5, atol=1e-6)


def test_pcgrad_projects_two_conflicting_vectors_by_hand():
    # g1.g2 = -1: v1 = g1 + g2/2 = (0.5, 0.5), v2 = g2 + g1 = (0, 1); v1 + v2 = 2 g1 + 1.5 g2.
    w = pcgrad.pcgrad().weights(None, inputs([[1.0, 0.0], [-1.0, 1.0]]))
    np.testing.assert_allclose(w, [2.0, 1.5], rtol=1e-5)
    # No conflict: nothing is projected, equal weights.
    w = pcgrad.pcgrad().weights(None, inputs([[1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-6)


def test_pcgrad_coefficients_reproduce_the_projected_sum():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(4, 6))
    key = jax.random.key(3)
    # Reference on the vectors themselves, with the permutations PCGrad draws from the key.
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(key, 4)))
    total = np.zeros(6)
    for i in range(4):
        v = d[i].copy()
        for j in orders[i]:
            if j != i and v @ d[j] < 0:
                v -= (v @ d[j]) / (d[j] @ d[j]) * d[j]
        total += v
    w = np.asarray(pcgrad.pcgrad().weights(None, base.RoundInputs(key, jnp.ones(4, bool), base.task_gram(d))))
    np.testing.assert_allclose(w @ d, total, rtol=1e-4, atol=1e-5)
    assert np.all(w >= 1 - 1e-6)


def test_dwa_softmax_of_loss_ratios():
    tx = dwa.dwa(2.0)
    state = tx.init(3)
    losses = [[1.0, 2.0, 3.0], [0.5, 1.8, 3.3], [0.4, 1.0, 3.0]]
    seen = []
    for loss in losses:
        seen.append(np.asarray(tx.weights(state, inputs(np.eye(3)))))
        state = tx.update(state, stats(loss))
    seen.append(np.asarray(tx.weights(state, inputs(np.eye(3)))))
    np.testing.assert_array_equal(seen[0], [1, 1, 1])
    np.testing.assert_array_equal(seen[1], [1, 1, 1])
    for t in (2, 3):
        r = np.array(losses[t - 1]) / np.array(losses[t - 2])
        expected = 3 * np.exp(r / 2) / np.sum(np.exp(r / 2))
        np.testing.assert_allclose(seen[t], expected, rtol=1e-6)


def test_uncertainty_gradient_step_by_hand():
    lr = 0.3
    tx = uncertainty.uncertainty(lr)
    state = tx.init(3)
    np.testing.assert_allclose(tx.weights(state, None), [1.0, 1.0, 1.0], rtol=1e-6)  # s = -log 2
    loss = np.array([0.5, 2.0, 4.0])
    state = tx.update(state, stats(loss, present=[True, True, False]))
    s0 = -math.log(2.0)
    grad = (1 - np.exp(-s0) * loss) / 2  # d/ds [exp(-s) L / 2 + s / 2]
    expected = np.array([s0 - lr * grad[0], s0 - lr * grad[1], s0])  # absent task 2 keeps s
    np.testing.assert_allclose(state.log_variance, expected, rtol=1e-6)
    np.testing.assert_allclose(tx.weights(state, None), np.exp(-expected) / 2, rtol=1e-6)
    # At the fixed point exp(-s) = 1/L the step is zero.
    fixed = uncertainty.UncertaintyState(jnp.log(jnp.asarray(loss, jnp.float32)))
    np.testing.assert_allclose(tx.update(fixed, stats(loss)).log_variance, np.log(loss), rtol=1e-6)


def test_imtl_gives_equal_projections_onto_the_unit_updates():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(3, 5)) * np.array([[1.0], [0.1], [3.0]])
    w = np.asarray(imtl.imtl().weights(None, inputs(d)))
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)
    combined = w @ d
    projections = d @ combined / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
    # LibMTL's closed form: alpha = g_1 U^T (D U^T)^-1, alpha_1 = 1 - sum.
    u = d / np.linalg.norm(d, axis=1, keepdims=True)
    dd, uu = d[:1] - d[1:], u[:1] - u[1:]
    alpha = d[0] @ uu.T @ np.linalg.inv(dd @ uu.T)
    np.testing.assert_allclose(w / 3, np.concatenate([[1 - alpha.sum()], alpha]), rtol=1e-4, atol=1e-5)
    # An absent task gets 0 and the other two still project equally.
    d[1] = 0
    w = np.asarray(imtl.imtl().weights(None, inputs(d, present=[True, False, True])))
    assert w[1] == 0 and abs(w.sum() - 2) < 1e-5
    projections = d[[0, 2]] @ (w @ d) / np.linalg.norm(d[[0, 2]], axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-4)


def test_cagrad_maximises_the_worst_case_improvement():
    rng = np.random.default_rng(2)
    d = np.array([[1.0, 0.2, 0.0, 0.0], [-0.7, 1.0, 0.1, 0.0], [0.0, -0.5, 0.3, 0.2]])
    c = 0.5
    w = np.asarray(cagrad.cagrad(c).weights(None, inputs(d)))
    direction = (1 + c**2) * (w / 3) @ d  # undo the 1 + c^2 rescale: d = g0 + lambda g_w
    g0 = d.mean(axis=0)
    radius = c * np.linalg.norm(g0)
    np.testing.assert_allclose(np.linalg.norm(direction - g0), radius, rtol=1e-4)  # on the ball's boundary
    worst = np.min(d @ direction)
    # No other point of the ball improves the worst task more.
    z = rng.normal(size=(20000, 4))
    candidates = g0 + radius * z / np.linalg.norm(z, axis=1, keepdims=True)
    assert worst >= np.max(np.min(candidates @ d.T, axis=1)) - 1e-5
    assert worst > np.min(d @ g0)  # and it beats the plain mean here (the tasks conflict)
    # c = 0 is equal weighting.
    np.testing.assert_allclose(cagrad.cagrad(0.0).weights(None, inputs(d)), [1, 1, 1], rtol=1e-5)


def test_cagrad_dual_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    d = np.array([[1.0, 0.2, 0.0, 0.0], [-0.7, 1.0, 0.1, 0.0], [0.0, -0.5, 0.3, 0.2]])
    gram = d @ d.T
    b = np.ones(3) / 3
    c = 0.5 * np.sqrt(b @ gram @ b)  # LibMTL's objective, in float64 numpy
    res = scipy_optimize.minimize(
        lambda x: x @ gram @ b + c * np.sqrt(x @ gram @ x + 1e-8),
        b,
        bounds=[(0, 1)] * 3,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
    )
    ours = simplex.minimize(
        lambda v: cagrad.dual_objective(v, jnp.asarray(gram, jnp.float32), jnp.asarray(b, jnp.float32), 0.5),
        jnp.ones(3, bool),
    )
    np.testing.assert_allclose(ours, res.x, atol=2e-3)


def test_simplex_projection_against_sorting_by_hand():
    np.testing.assert_allclose(simplex.project(jnp.array([0.5, 0.5, 0.5]), jnp.ones(3, bool)), [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(simplex.project(jnp.array([2.0, 0.0, -1.0]), jnp.ones(3, bool)), [1, 0, 0], atol=1e-7)
    # (0.8, 0.6) -> subtract 0.2 each: (0.6, 0.4); the absent task is 0 whatever its value.
    out = simplex.project(jnp.array([0.8, 5.0, 0.6]), jnp.array([True, False, True]))
    np.testing.assert_allclose(out, [0.6, 0.0, 0.4], rtol=1e-6)


@pytest.mark.parametrize("name", weightings.WEIGHTINGS)
def test_vmap_over_configurations_equals_unbatched_calls(name):
    rng = np.random.default_rng(4)
    s = 3
    hps = [
        algorithms.HParams.create(0.1, 1.0, a, lr, dwa_temperature=t, cagrad_c=c, uncertainty_lr=u)
        for a, lr, t, c, u in [(0.5, 0.01, 1.0, 0.2, 0.05), (1.5, 0.1, 2.0, 0.5, 0.2), (2.0, 0.05, 4.0, 0.9, 0.5)]
    ]
    d = rng.normal(size=(s, 3, 5))
    losses = rng.uniform(0.5, 2.0, size=(s, 3, 3))  # [config, round, task]
    keys = jax.random.split(jax.random.key(5), s)

    def run(hp, d, losses, key):
        tx = weightings.make(name, hp)
        state = tx.init(3)
        out = []
        for r in range(3):  # three rounds, so stateful methods move (dwa needs two)
            w = tx.weights(state, base.RoundInputs(jax.random.fold_in(key, r), jnp.ones(3, bool), base.task_gram(d)))
            state = tx.update(state, stats(losses[r], weight=w))
            out.append(w)
        return jnp.stack(out)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *hps)
    batched = jax.jit(jax.vmap(run))(stacked, jnp.asarray(d, jnp.float32), jnp.asarray(losses, jnp.float32), keys)
    for i in range(s):
        one = run(hps[i], jnp.asarray(d[i], jnp.float32), jnp.asarray(losses[i], jnp.float32), keys[i])
        np.testing.assert_allclose(batched[i], one, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(batched))


@pytest.mark.parametrize("name", weightings.WEIGHTINGS)
def test_tiny_training_run_with_each_method(name):
    setup = make_setup(weighting=name, rounds=4, log_every=2, eval_every=2)
    state, rows = run_alone(setup)
    assert setup.sim.trace_count == 1  # two chunks, one compilation
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    weights = np.array([r["task_weight"] for r in rows])
    assert np.all(np.isfinite(weights)) and np.all(np.isfinite([r["task_loss"] for r in rows]))
    if name in weightings.SUM_TO_T:
        np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)
    if name in ("mgda", "imtl", "pcgrad", "cagrad", "rlw"):
        assert not np.allclose(weights, 1.0)  # the method did something
    assert int(state.server.round) == 4


def test_build_simulation_passes_the_weighting_through():
    dataset = training.build_dataset(tiny_config())
    for algorithm, weighting, expected in [
        ("fedrep", "", "equal"),
        ("fedgradnorm", "", "gradnorm"),
        ("fedrep", "dwa", "dwa"),
    ]:
        sim = training.build_simulation(tiny_config(algorithm=algorithm, weighting=weighting), dataset)
        assert sim.config.weighting_name == expected


@pytest.mark.slow
def test_weighting_flag_overrides_the_algorithm():
    # fedrep with --weighting=gradnorm is fedgradnorm; the default path is unchanged.
    _, ours = run_alone(make_setup(algorithm="fedrep", weighting="gradnorm", rounds=2, log_every=2, eval_every=2))
    _, theirs = run_alone(make_setup(algorithm="fedgradnorm", rounds=2, log_every=2, eval_every=2))
    assert ours == theirs


def test_mgda_server_update_applies_the_min_norm_combination():
    # Three clients, one per task; client 2 did not report, so task 2 is absent: MGDA combines tasks 0 and 1.
    setup = make_setup(weighting="mgda")
    alg = setup.sim.algorithm(algorithms.HParams.create(0.1, 0.5, 1.0, 0.0))
    server = alg.init_server(jax.random.key(0))
    leaves, treedef = jax.tree.flatten(server.trunk)
    rng = np.random.default_rng(6)
    per_client = [[rng.normal(size=x.shape).astype(np.float32) for x in leaves] for _ in range(3)]
    deltas = jax.tree.unflatten(treedef, [jnp.stack([c[i] for c in per_client]) for i in range(len(leaves))])
    out = algorithms.ClientOutput(deltas, jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, 1.0, 1.0]))
    info = dataclasses.replace(setup.env.info, mask=jnp.array([1.0, 1.0, 0.0]))
    new, metrics = alg.server_update(server, out, info, jax.random.key(1))
    g1, g2 = (np.concatenate([x.ravel() for x in c]) for c in per_client[:2])
    lam = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
    np.testing.assert_allclose(metrics["task_weight"], [2 * lam, 2 * (1 - lam), 0.0], rtol=1e-4, atol=1e-6)
    # theta + server_lr * (lam g1 + (1 - lam) g2), leaf by leaf.
    expected = [x + 0.5 * (lam * a + (1 - lam) * b) for x, a, b in zip(leaves, per_client[0], per_client[1])]
    testing.assert_trees_allclose(new.trunk, jax.tree.unflatten(treedef, expected), rtol=1e-4, atol=1e-5)


def test_gram_methods_refuse_aggregations_without_per_task_updates(monkeypatch):
    monkeypatch.setitem(aggregation.AGGREGATIONS, "ota", aggregation.ideal)
    with pytest.raises(ValueError, match="needs the per-task updates"):
        algorithms.AlgorithmConfig(weighting="mgda", aggregation="ota")
    algorithms.AlgorithmConfig(weighting="dwa", aggregation="ota")  # causal methods are fine

    # The flag check, for a config with an --aggregation field (added by the over-the-air change).
    @dataclasses.dataclass(frozen=True)
    class OverTheAir(training.ExperimentConfig):
        aggregation: str = "ota"

    with pytest.raises(training.ConfigError, match=r"^--weighting: 'imtl' needs the per-task updates"):
        OverTheAir(weighting="imtl").validate()
    OverTheAir(weighting="rlw").validate()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(weighting="bogus"), "--weighting: unknown weighting 'bogus'; choose one of equal, gradnorm,"),
        (dict(dwa_temperature=0.0), "--dwa_temperature: must be > 0"),
        (dict(cagrad_c=-1.0), "--cagrad_c: must be >= 0"),
        (dict(uncertainty_lr=-0.1), "--uncertainty_lr: must be >= 0"),
    ],
)
def test_invalid_weighting_settings_name_the_flag(overrides, message):
    with pytest.raises(training.ConfigError) as e:
        dataclasses.replace(training.ExperimentConfig(), **overrides).validate()
    assert str(e.value).startswith(message)


def test_cli_bogus_weighting_exits_2_with_one_line(tmp_path):
    proc = run_cli(f"--workdir={tmp_path / 'w'}", "--weighting=bogus")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and lines[0].startswith("error: --weighting: unknown weighting 'bogus'"), proc.stderr
    for name in weightings.WEIGHTINGS:
        assert name in lines[0]
    assert not (tmp_path / "w").exists()


def test_sweep_grids_the_weighting_hyperparameters():
    configs = sweep.grid(tiny_config(weighting="dwa"), {"dwa_temperature": [1.0, 4.0], "cagrad_c": [], "seed": [0]})
    assert [c.dwa_temperature for c in configs] == [1.0, 4.0]
    assert sweep.config_name(configs[1], sweep.varied(configs)) == "dwa_temperature4_seed0"
    keys, hparams = sweep.stacked_inputs(configs, None)
    np.testing.assert_array_equal(hparams.dwa_temperature, [1.0, 4.0])
    np.testing.assert_array_equal(hparams.cagrad_c, [0.5, 0.5])
    assert sweep.LIST_FLAGS["dwa_temperature"] == "dwa_temperatures" and sweep.LIST_FLAGS["cagrad_c"] == "cagrad_cs"
    with pytest.raises(training.ConfigError, match="--dwa_temperature"):
        sweep.grid(tiny_config(), {"dwa_temperature": [0.0]})
    with pytest.raises(training.ConfigError, match=r"^--weightings: unknown weighting 'nope'; choose from equal,"):
        sweep.run_weightings(tiny_config(), ["equal", "nope"], {}, "/nonexistent", log=None)


@pytest.mark.slow
def test_run_weightings_runs_each_method_as_its_own_sweep(tmp_path):
    base = tiny_config(num_clients=3, tau_head=1, tau_shared=1)
    results = sweep.run_weightings(base, ["equal", "dwa", "equal"], {"seed": [0, 1]}, str(tmp_path), log=None)
    assert [(r["weighting"], r["seed"]) for r in results] == [("equal", 0), ("equal", 1), ("dwa", 0), ("dwa", 1)]
    for r in results:
        rows = [json.loads(line) for line in open(tmp_path / r["weighting"] / r["name"] / "metrics.jsonl")]
        assert [x["round"] for x in rows] == [0, 1, 2, 3]
        assert r["final_task_weight"] == rows[-1]["task_weight"]
        assert json.load(open(tmp_path / r["weighting"] / r["name"] / "config.json"))["weighting"] == r["weighting"]
    np.testing.assert_array_equal(results[0]["final_task_weight"], [1, 1, 1])
    # DWA's round-3 weights come from the losses of rounds 1 and 2: not all 1, sum 3.
    assert not np.allclose(results[2]["final_task_weight"], 1.0)
    np.testing.assert_allclose(sum(results[2]["final_task_weight"]), 3.0, rtol=1e-5)
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(row["weighting"], row["name"]) for row in table] == [(r["weighting"], r["name"]) for r in results]
    with open(tmp_path / "weightings.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_cli_refuses_unknown_weightings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", f"--workdir={tmp_path / 'w'}", "--weightings=equal,bogus"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert lines == ["error: --weightings: unknown weighting 'bogus'; choose from " + ", ".join(weightings.WEIGHTINGS)]
    assert not (tmp_path / "w").exists()
