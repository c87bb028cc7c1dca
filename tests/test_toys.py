"""The two toy benchmarks at toy size, and the shared-code pieces they need.

* benchmarks/convex_toy.py: the simulator's round equals the closed-form
  affine map (numpy, float64), FedRep contracts linearly at no worse than the
  predicted spectral radius, the fit's rate is in (0, 1) with R^2 > 0.95;
* benchmarks/gradnorm_toy.py: equal weights stay exactly 1, GradNorm's sum to
  T, the results' keys and shapes;
* models.MLPTrunk / LinearTrunk keep the last-shared-kernel convention;
  AlgorithmConfig's ``sampling="cycle"`` and ``tau_head=0``.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, convex_toy, gradnorm_toy
from fgn_jax import algorithms, models
from fgn_jax import tasks as tasks_lib


def test_linear_trunk_is_x_times_w_and_w_is_the_last_shared_kernel():
    trunk = models.TRUNKS["linear"](features=3)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    params = trunk.init(jax.random.key(1), x)
    w = models.get_last_shared_kernel(params)
    assert w.shape == (4, 3)
    np.testing.assert_allclose(trunk.apply(params, x), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6)
    doubled = models.set_last_shared_kernel(params, 2 * w)
    np.testing.assert_allclose(trunk.apply(doubled, x), 2 * np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-6)


def test_mlp_trunk_has_four_relu_layers_and_its_last_kernel_is_w():
    trunk = models.TRUNKS["mlp"](features=6)
    x = jax.random.normal(jax.random.key(0), (3, 2, 5))  # flattened to 10 inputs
    params = trunk.init(jax.random.key(1), x)
    layers = params["params"]
    assert sorted(layers) == ["dense0", "dense1", "dense2", models.FEATURE_LAYER]
    assert models.get_last_shared_kernel(params).shape == (6, 6)
    h = np.asarray(x).reshape(3, -1)
    for name in ["dense0", "dense1", "dense2", models.FEATURE_LAYER]:
        h = np.maximum(h @ np.asarray(layers[name]["kernel"]) + np.asarray(layers[name]["bias"]), 0.0)
    np.testing.assert_allclose(trunk.apply(params, x), h, rtol=1e-5, atol=1e-6)


def test_cycle_sampling_takes_the_clients_examples_in_order():
    x = jnp.arange(10.0)[:, None]
    # Client range [3, 7): 4 examples; a batch of 6 wraps around.
    bx, _ = algorithms._sample(jax.random.key(0), x, x, 3, 4, 6, "cycle")
    np.testing.assert_array_equal(np.asarray(bx)[:, 0], [3, 4, 5, 6, 3, 4])
    with pytest.raises(ValueError, match="sampling"):
        algorithms.AlgorithmConfig(sampling="shuffle")
    with pytest.raises(ValueError, match="tau_head"):
        algorithms.AlgorithmConfig(tau_head=-1)


def test_tau_head_zero_keeps_the_head():
    config = algorithms.AlgorithmConfig(
        algorithm="fedrep", trunk="linear", trunk_width=2, max_outputs=1, num_tasks=1, tau_head=0, batch_size=4
    )
    alg = algorithms.build(config, algorithms.HParams.create(0.5, 1.0, 1.5, 0.05), (3,))
    server, client = alg.init_server(jax.random.key(0)), alg.init_client(jax.random.key(1))
    spec = tasks_lib.TaskSpec("t", tasks_lib.REGRESSION, 1, tasks_lib.MSE)
    task = jax.tree.map(lambda a: a[0], tasks_lib.TaskArrays.for_clients([spec], [0]))
    info = algorithms.ClientInfo(
        *(jnp.int32(v) for v in (0, 0)), task, *(jnp.int32(v) for v in (0, 4, 0, 4)), 1.0, jnp.float32(1.0)
    )
    data = algorithms.DeviceData(*(jax.random.normal(jax.random.key(k), s) for k, s in enumerate([(4, 3), (4, 1)] * 2)))
    new_client, out = alg.client_update(server.trunk, client, info, data, jax.random.key(2))
    jax.tree.map(np.testing.assert_array_equal, new_client.head, client.head)
    assert float(jnp.abs(out.delta["params"]["feature"]["kernel"]).max()) > 0  # the trunk did move


CONVEX_TOY = [
    "--rounds=200",
    "--seeds=2",
    "--tasks=3",
    "--input_dim=4",
    "--features=2",
    "--outputs=1",
    "--examples_per_client=12",
    "--weight_lr=0.01",
]


def test_convex_toy(tmp_path):
    results = convex_toy.main([*CONVEX_TOY, f"--out={tmp_path}"])
    on_disk = json.load(open(os.path.join(tmp_path, "results.json")))
    assert os.path.exists(os.path.join(tmp_path, "convex_toy.png"))
    for method in ("fedgradnorm", "fedrep"):
        assert {"rate", "r2"} <= set(on_disk[method])
        for seed in results[method]["seeds"]:
            # The simulator's first round is the closed-form affine map (float32 vs float64).
            assert seed["one_round_relative_error"] < 1e-4
            # tau_shared=1: the round's fixed point is the weighted least-squares minimiser.
            assert seed["fixed_point_vs_minimiser"] < 1e-8
            assert seed["strong_convexity"] > 0
    rep = on_disk["fedrep"]
    assert 0 < rep["rate"] < 1 and rep["r2"] > 0.95
    gn = on_disk["fedgradnorm"]
    assert gn["rate"] is None or 0 < gn["rate"] < 1
    curves = common.read_jsonl(os.path.join(tmp_path, "curves.jsonl"))
    for seed in results["fedrep"]["seeds"]:
        # Fixed weights, tau_shared=1: M is symmetric, so ||theta_t - theta*|| <= rho^t ||theta_0 - theta*||
        # (up to float32 round-off, ~1e-6 of theta).
        dist = np.array([r["dist"] for r in curves if r["method"] == "fedrep" and r["seed"] == seed["seed"]])
        bound = seed["predicted_rate"] ** np.arange(len(dist)) * dist[0]
        assert np.all(dist <= bound * (1 + 1e-4) + 1e-5)
    for r in curves:
        if r["method"] == "fedgradnorm":
            assert sum(r["task_weight"]) == pytest.approx(3, abs=1e-4)
        else:
            assert r["task_weight"] == [1.0, 1.0, 1.0]


def test_convex_toy_rejects_an_unidentifiable_trunk(tmp_path):
    with pytest.raises(SystemExit, match="--features"):
        convex_toy.main(["--tasks=2", "--outputs=1", "--features=3", f"--out={tmp_path}"])


def test_gradnorm_toy(tmp_path):
    args = [
        "--rounds=6",
        "--log_every=3",
        "--seeds=1",
        "--tasks=3",
        "--clients_per_task=2",
        "--input_dim=8",
        "--output_dim=4",
        "--width=8",
        "--examples_per_client=24",
        "--test_examples_per_client=8",
        "--batch_size=8",
        "--extra_alphas=",
        "--weight_lr=0.05",
        f"--out={tmp_path}",
    ]
    results = gradnorm_toy.main(args)
    on_disk = json.load(open(os.path.join(tmp_path, "results.json")))
    assert os.path.exists(os.path.join(tmp_path, "gradnorm_toy.png"))
    np.testing.assert_allclose(on_disk["sigmas"], [1.0, 10.0, 100.0])
    for method in ("equal", "gradnorm"):
        assert {"task_weight", "normalized_test_error"} <= set(on_disk[method])
        assert len(on_disk[method]["task_weight"]) == 3
        err = np.asarray(on_disk[method]["normalized_test_error"])
        assert err.shape == (3,) and np.all(np.isfinite(err)) and np.all(err > 0)
    assert on_disk["gradnorm"]["alpha"] == pytest.approx(0.12)
    assert on_disk["gradnorm"]["task_weight"] == results["gradnorm_alpha_0.12"]["task_weight"]
    assert on_disk["equal"]["task_weight"] == [1.0, 1.0, 1.0]
    assert on_disk["equal"]["spearman_weight_sigma"] is None  # constant weights have no rank order
    assert gradnorm_toy.spearman(np.array([3.0, 2.0, 1.0]), np.array([1.0, 10.0, 100.0])) == pytest.approx(-1.0)
    curves = common.read_jsonl(os.path.join(tmp_path, "curves.jsonl"))
    assert {r["round"] for r in curves} == set(range(6))
    for r in curves:
        if r["method"] == "equal":
            assert r["task_weight"] == [1.0, 1.0, 1.0]
        else:
            assert sum(r["task_weight"]) == pytest.approx(3, abs=1e-4)
    # GradNorm moved the weights away from 1 by the last round.
    assert max(abs(w - 1) for w in on_disk["gradnorm"]["task_weight"]) > 1e-3
    # Both methods start from the same state: identical round-0 losses.
    first = {r["method"]: r["task_loss"] for r in curves if r["round"] == 0}
    np.testing.assert_allclose(first["equal"], first["gradnorm_alpha_0.12"], rtol=1e-6)
