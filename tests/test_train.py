"""End-to-end runs of the experiment and its flag validation."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fgn_jax import training
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["synthetic_mtfl", "synthetic_radcom"])
def test_experiment_writes_files_and_training_loss_goes_down(dataset, tmp_path):
    config = tiny_config(
        dataset=dataset,
        rounds=12,
        log_every=4,
        eval_every=12,
        examples_per_client=96,
        client_lr=0.1,
        batch_size=16,
    )
    summary = training.train_and_evaluate(config, str(tmp_path), log=None)
    cfg = json.load(open(tmp_path / "config.json"))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    num_tasks = len(cfg["task_names"])
    assert cfg["dataset"] == dataset and cfg["version"] and cfg["rounds"] == 12
    assert [r["round"] for r in rows] == list(range(12))
    assert all(len(r["task_loss"]) == num_tasks for r in rows)
    assert "test_metric" in rows[-1] and "test_metric" not in rows[0]
    assert summary["final_task_loss"] == rows[-1]["task_loss"]
    assert json.load(open(tmp_path / "summary.json"))["rounds"] == 12
    # Loss relative to round 0, averaged over tasks and the last 3 rounds.
    first = np.array(rows[0]["task_loss"])
    last = np.mean([r["task_loss"] for r in rows[-3:]], axis=0)
    assert np.mean(last / first) < 0.97


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "flag,expected",
    [
        ("--rounds=-1", "--rounds: must be at least 1"),
        ("--alpha=-0.5", "--alpha: must be >= 0"),
        ("--dataset=cifar", "--dataset=cifar: value should be one of <synthetic_mtfl|"),
        ("--num_clients=3", "--num_clients: num_clients=3 is less than the number of tasks (5)"),
        ("--client_tasks=0,1,9", "--client_tasks: task index 9 out of range"),
        ("--eval_every=15", "--eval_every: must be a multiple of --log_every=10"),
    ],
)
def test_invalid_flags_exit_2_with_one_line(flag, expected, tmp_path):
    proc = run_cli(f"--workdir={tmp_path / 'w'}", flag)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert lines == [f"error: {expected}" + lines[0][len(f"error: {expected}") :]], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written


def test_more_clients_than_examples_is_refused():
    config = tiny_config(num_clients=6, examples_per_client=1, test_examples_per_client=1, dataset="synthetic_radcom")
    config.validate()
    dataset = training.build_dataset(config)  # 1 example each is enough
    assert list(dataset.train.size) == [1] * 6
    with pytest.raises(training.ConfigError, match="--batch_size"):
        tiny_config(batch_size=0).validate()


@pytest.mark.slow
def test_cli_runs(tmp_path):
    proc = run_cli(
        f"--workdir={tmp_path}",
        "--dataset=synthetic_radcom",
        "--rounds=2",
        "--log_every=2",
        "--eval_every=2",
        "--examples_per_client=32",
        "--test_examples_per_client=8",
        "--batch_size=8",
        "--tau_head=1",
        "--tau_shared=1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "round 2/2" in proc.stdout
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


@pytest.mark.parametrize("flagfile", sorted(os.listdir(os.path.join(REPO, "experiments", "flags"))))
def test_flagfiles_name_valid_settings(flagfile):
    fields = {f.name: f for f in dataclasses.fields(training.ExperimentConfig)}
    values = {}
    with open(os.path.join(REPO, "experiments", "flags", flagfile)) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, value = line[2:].split("=", 1)
            assert name in fields, f"{flagfile}: unknown flag --{name}"
            default = getattr(training.ExperimentConfig(), name)
            values[name] = type(default)(value)
    config = training.ExperimentConfig(**{"data_dir": "/somewhere", **values})
    config.validate()
