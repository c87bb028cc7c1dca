"""A sweep is one program that computes what each of its configurations computes alone."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fgn_jax import sharding, sweep, training
from tests.conftest import make_setup, run_alone, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = {"seed": [0, 1], "alpha": [0.5, 1.5]}
SMALL = dict(num_clients=3, tau_head=1, tau_shared=1)  # also test_multihost.py's; tau=1 compiles faster


def single_run(**overrides):
    """One configuration alone, through the single-run programs; rows as in metrics.jsonl."""
    state, rows = run_alone(make_setup(**SMALL, **overrides))
    return rows, np.asarray(rows[-1]["task_weight"])  # the weights applied in the last round


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_by_two_sweep_equals_four_single_runs_and_compiles_once(tmp_path):
    base = tiny_config(**SMALL)
    sim = dataclasses.replace(
        training.build_simulation(base, training.build_dataset(base)), mesh=sharding.make_mesh()
    )  # equal to the sweep's own Simulation, so it shares its trace count
    traces = sim.trace_count
    results = sweep.run_sweep(base, GRID, str(tmp_path), log=None)
    assert sim.trace_count == traces + 1  # one program for both chunks of all four runs

    assert [(r["alpha"], r["seed"]) for r in results] == [(0.5, 0), (0.5, 1), (1.5, 0), (1.5, 1)]
    for r in results:
        rows, final_weights = single_run(seed=r["seed"], alpha=r["alpha"])
        assert r["name"] == f"alpha{r['alpha']:g}_seed{r['seed']}"
        sweep_rows = read_jsonl(tmp_path / r["name"] / "metrics.jsonl")
        assert [x["round"] for x in sweep_rows] == [x["round"] for x in rows] == list(range(4))
        for a, b in zip(sweep_rows, rows):
            assert a.keys() == b.keys()
            for key in a.keys() - {"round"}:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=f"{r['name']} {key}")
        np.testing.assert_allclose(r["final_task_weight"], final_weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["final_test_metric"], rows[-1]["test_metric"], rtol=1e-5, atol=1e-6)
        assert json.load(open(tmp_path / r["name"] / "config.json"))["alpha"] == r["alpha"]
    # The grid's values matter: seeds change the losses, alphas the weights.
    assert results[0]["final_task_loss"] != results[1]["final_task_loss"]
    assert results[0]["final_task_weight"] != results[2]["final_task_weight"]

    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [row["name"] for row in table] == [r["name"] for r in results]
    assert float(table[3]["final_test_metric/anomaly"]) == pytest.approx(results[3]["final_test_metric"][2])
    with open(tmp_path / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "summary.json"))["num_configs"] == 4


def test_cli_parses_lists_and_refuses_bad_values(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", f"--workdir={tmp_path}", "--seeds=0,1", "--alphas=0.5,x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --alphas: could not convert string to float: 'x'" in proc.stderr


def test_grid_order_names_and_errors():
    base = tiny_config()
    configs = sweep.grid(base, {"alpha": [0.5, 1.5], "seed": [0, 1, 2], "client_lr": []})
    assert [(c.alpha, c.seed) for c in configs] == [(a, s) for a in (0.5, 1.5) for s in (0, 1, 2)]
    assert {c.client_lr for c in configs} == {base.client_lr}
    assert sweep.varied(configs) == ["alpha", "seed"]
    assert sweep.config_name(configs[4], sweep.varied(configs)) == "alpha1.5_seed1"
    with pytest.raises(training.ConfigError, match="cannot sweep"):
        sweep.grid(base, {"rounds": [1, 2]})
    with pytest.raises(training.ConfigError, match="--alpha"):
        sweep.grid(base, {"alpha": [-1.0]})
    with pytest.raises(training.ConfigError, match="vmap"):
        sweep.grid(tiny_config(client_execution="loop"), {"seed": [0, 1]})
