"""Checkpoint and resume, divergence, signals and work-directory safety."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgn_jax import checkpoint, simulate, training, workdir
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = tiny_config(rounds=6, log_every=1, eval_every=2, checkpoint_every=2, keep_checkpoints=2)

# Runs CONFIG in a child process that SIGKILLs itself at a given event.
KILLER = """
import json, os, signal, sys
from fgn_jax import training
config = training.ExperimentConfig(**json.loads(sys.argv[1]))
event, at = sys.argv[3], int(sys.argv[4])
def on_event(name, done):
    if name == event and done == at:
        os.kill(os.getpid(), signal.SIGKILL)
training.train_and_evaluate(config, sys.argv[2], log=None, on_event=on_event)
"""


def run_child(config, path, event, at):
    args = [json.dumps(dataclasses.asdict(config)), str(path), event, str(at)]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def metrics_text(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return f.read()


def final_state(path, config):
    dataset = training.build_dataset(config)
    sim = training.build_simulation(config, dataset)
    template = sim.init(jax.random.key(0), simulate.make_env(dataset), config.hparams())
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"))
    state, step = ckpt.restore_latest(template)
    ckpt.close()
    return state, step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("uninterrupted")
    training.train_and_evaluate(CONFIG, str(path), log=None)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "event,at,torn",
    [
        ("metrics", 3, False),  # between checkpoints: rows of round 2 must be recomputed
        ("metrics", 4, True),  # rows written, checkpoint not yet; plus a line torn mid-write
        ("checkpoint", 4, False),  # right after a checkpoint
    ],
)
def test_sigkill_then_resume_is_identical(reference, tmp_path, event, at, torn):
    run_child(CONFIG, tmp_path, event, at)
    if torn:
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write('{"round": 4, "task_lo')
    summary = training.train_and_evaluate(CONFIG, str(tmp_path), log=None)
    assert summary["resumed_from_round"] == (4 if event == "checkpoint" else 2)
    assert metrics_text(tmp_path) == metrics_text(reference)
    got, step = final_state(tmp_path, CONFIG)
    want, _ = final_state(reference, CONFIG)
    assert step == 6
    for a, b in zip(jax.tree.leaves(got.server), jax.tree.leaves(want.server)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got.clients), jax.tree.leaves(want.clients)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(reference, tmp_path):
    run_child(CONFIG, tmp_path, "checkpoint", 4)
    newest = tmp_path / "checkpoints" / "4"
    for root, _, files in os.walk(newest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    lines = []

    class Log:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    summary = training.train_and_evaluate(CONFIG, str(tmp_path), log=Log())
    text = "".join(lines)
    assert "checkpoint at round 4 is unreadable" in text
    assert "resuming from the checkpoint at round 2" in text
    assert summary["resumed_from_round"] == 2
    assert metrics_text(tmp_path) == metrics_text(reference)
    assert os.listdir(tmp_path / "corrupt_checkpoints")  # moved aside, not deleted


def test_configuration_change_is_refused(reference, tmp_path):
    before = metrics_text(reference)
    with pytest.raises(workdir.WorkdirError, match=r"--alpha \(1\.5 -> 0\.5\)"):
        training.train_and_evaluate(dataclasses.replace(CONFIG, alpha=0.5), str(reference), log=None)
    assert metrics_text(reference) == before  # nothing touched
    # --overwrite replaces it.
    (tmp_path / "notes.txt").write_text("mine")
    training.train_and_evaluate(CONFIG, str(tmp_path), log=None)
    training.train_and_evaluate(
        dataclasses.replace(CONFIG, alpha=0.5, rounds=2), str(tmp_path), log=None, overwrite=True
    )
    assert json.load(open(tmp_path / "config.json"))["alpha"] == 0.5
    assert len(metrics_text(tmp_path).splitlines()) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"  # the user's own files are kept


def test_run_files_without_config_are_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(workdir.WorkdirError, match="no config.json"):
        training.train_and_evaluate(CONFIG, str(tmp_path), log=None)
    assert (tmp_path / "metrics.jsonl").read_text() == "precious\n"


def test_divergence_stops_with_message_and_keeps_checkpoint(tmp_path):
    # A client learning rate that blows up after a couple of rounds.
    config = dataclasses.replace(CONFIG, rounds=12, client_lr=0.5)
    with pytest.raises(
        training.Diverged, match=r"diverged at round (\d+): (task_loss|grad_norm|task_weight) of task"
    ) as e:
        training.train_and_evaluate(config, str(tmp_path), log=None)
    bad_round = int(e.value.args[0].split("round ")[1].split(":")[0])
    assert bad_round >= 2 and f"last good checkpoint (round {bad_round // 2 * 2})" in str(e.value)
    rows = workdir.read_metrics(str(tmp_path))
    assert [r["round"] for r in rows] == list(range(bad_round))  # only the good rounds were written
    state, step = final_state(tmp_path, config)
    assert step == bad_round // 2 * 2
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.server.trunk))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(reference, tmp_path):
    code = KILLER.replace("os.kill(os.getpid(), signal.SIGKILL)", "os.kill(os.getpid(), signal.SIGTERM)")
    code = code.replace(
        "training.train_and_evaluate(config, sys.argv[2], log=None, on_event=on_event)",
        "try:\n    training.train_and_evaluate(config, sys.argv[2], log=None, on_event=on_event)\n"
        "except training.Interrupted as e:\n    print(e); sys.exit(128 + e.signum)",
    )
    args = [json.dumps(dataclasses.asdict(CONFIG)), str(tmp_path), "metrics", "3"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by signal" in proc.stdout and "Traceback" not in proc.stderr
    summary = training.train_and_evaluate(CONFIG, str(tmp_path), log=None)
    assert summary["resumed_from_round"] == 3  # the chunk finished and was checkpointed
    assert metrics_text(tmp_path) == metrics_text(reference)
