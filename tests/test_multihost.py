"""Two processes x two CPU devices (jax.distributed over gloo) give the single-process metrics.

Each process also writes the shards of the example arrays it holds (a wrapper
around ``experiments.train`` records what ``Simulation.make_env`` placed):
each process must hold exactly its own clients' examples.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from fgn_jax import training
from tests import test_hostlocal as hostlocal
from tests.conftest import TINY, tiny_config
from tests.test_sweep import SMALL, single_run

# experiments.train, recording this process's shards of the example arrays to argv[1].
TRAIN = """
import sys
from absl import app
from experiments import train
from fgn_jax import simulate
from tests import test_hostlocal

make_env = simulate.Simulation.make_env

def recording_make_env(self, dataset):
    env = make_env(self, dataset)
    test_hostlocal.save_shards(env, sys.argv[1])
    return env

simulate.Simulation.make_env = recording_make_env
app.run(train.main, argv=[sys.argv[0], *sys.argv[2:]])
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SMALL: 3 clients, padded to 4 slots (process 1's second device holds a
# masked one), the settings of test_sweep.py whose single-run compilation the
# reference shares.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one_process(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    settings = {**TINY, **SMALL}
    flags = [f"--{k}={v}" for k, v in settings.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAIN, str(tmp_path / f"blocks{i}.npz"), f"--workdir={tmp_path / 'multi'}", *flags]
            + [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        # The single-process reference runs meanwhile (one CPU device, no mesh).
        single_rows, final_weights = single_run()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "round 4/4" in outs[0][0] and "round" not in outs[1][0]  # only process 0 logs

    written = json.load(open(tmp_path / "multi" / "config.json"))
    assert len(written["devices"]) == 4 and written["num_clients"] == SMALL["num_clients"]
    multi_rows = read_jsonl(tmp_path / "multi" / "metrics.jsonl")
    assert [r["round"] for r in multi_rows] == [r["round"] for r in single_rows] == list(range(4))
    for a, b in zip(multi_rows, single_rows):
        assert a.keys() == b.keys()
        for key in a.keys() - {"round"}:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)
    summary = json.load(open(tmp_path / "multi" / "summary.json"))
    np.testing.assert_allclose(summary["final_task_weight"], final_weights, rtol=1e-5, atol=1e-5)

    # Host-local examples: 4 slots over 4 devices, process p holding blocks 2p and 2p + 1
    # (process 0 clients 0 and 1, process 1 client 2 and a padding slot), nothing else.
    dataset = training.build_dataset(tiny_config(**SMALL))
    for field in hostlocal.FIELDS:
        split = dataset.train if field.startswith("train") else dataset.test
        clients = []
        for i in range(2):
            held = hostlocal.check_blocks(hostlocal.load_shards(tmp_path / f"blocks{i}.npz"), split, field)
            assert {b: process for b, (process, _) in held.items()} == {2 * i: i, 2 * i + 1: i}, field
            clients += [c for _, own in held.values() for c in own]
        assert sorted(clients) == [0, 1, 2]
