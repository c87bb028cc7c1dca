"""The experiment on miniature real-format MTFL and RadComDynamic files."""

import json
import os
import subprocess
import sys

import pytest

from fgn_jax import training
from tests import data_fixtures
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mtfl_builds_and_trains(tmp_path):
    data_fixtures.write_mtfl(str(tmp_path / "MTFL"), num_train=30, num_test=10)
    before = data_fixtures.tree_digest(str(tmp_path / "MTFL"))
    config = tiny_config(
        dataset="mtfl",
        data_dir=str(tmp_path / "MTFL"),
        build_dir=str(tmp_path / "tfds"),
        overlap="across_tasks",
        examples_per_client=30,
        test_examples_per_client=10,
        rounds=2,
    )
    summary = training.train_and_evaluate(config, str(tmp_path / "run"), log=None)
    cfg = json.load(open(tmp_path / "run" / "config.json"))
    assert cfg["task_names"] == ["landmarks", "gender", "smile", "glasses", "pose"]
    assert cfg["train_sizes"] == [30] * 5  # every client uses all 30 images, with its own task's labels
    assert len(summary["final_test_metric"]) == 5
    assert data_fixtures.tree_digest(str(tmp_path / "MTFL")) == before


@pytest.mark.slow
def test_radcom_builds_and_trains(tmp_path):
    data_fixtures.write_radcom(str(tmp_path / "raw" / "RadComDynamic.hdf5"), per_snr=2)
    config = tiny_config(
        dataset="radcom_dynamic",
        data_dir=str(tmp_path / "raw"),
        build_dir=str(tmp_path / "tfds"),
        examples_per_client=16,
        test_examples_per_client=4,
        rounds=2,
    )
    summary = training.train_and_evaluate(config, str(tmp_path / "run"), log=None)
    assert json.load(open(tmp_path / "run" / "config.json"))["task_names"] == ["modulation", "signal", "anomaly"]
    assert summary["rounds"] == 2


def test_bad_real_data_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "raw" / "RadComDynamic.hdf5"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not an HDF5 file")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            f"--workdir={tmp_path / 'run'}",
            "--dataset=radcom_dynamic",
            f"--data_dir={bad.parent}",
            f"--build_dir={tmp_path / 'tfds'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RadComDynamic.hdf5" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert bad.read_bytes() == b"this is not an HDF5 file"
