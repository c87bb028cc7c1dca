"""Helpers shared by the throughput and convergence benchmarks.

Random federated datasets of the right shapes (built as fgn_jax's own
:class:`~fgn_jax.data.pool.FederatedDataset`), a description of the machine
and its load (the 2-core CI machines are shared, so every number is recorded
with the load it was measured under), the float32 matmul peak, peak memory and
JSON-lines output.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import partition, synthetic
from fgn_jax.data import pool as pool_lib

# Shape of one example and the task table of each trunk's dataset.
INPUT_SHAPES = {"mtfl": (40, 40, 1), "radcom": (128, 2)}
TASK_TABLES = {"mtfl": synthetic.MTFL_TASKS, "radcom": synthetic.RADCOM_TASKS}


def random_dataset(
    kind: str, num_clients: int, examples_per_client: int, test_examples_per_client: int = 8, seed: int = 0
) -> pool_lib.FederatedDataset:
    """Gaussian inputs and random valid targets for ``num_clients`` clients.

    Clients take the tasks of ``kind``'s table round-robin (as
    ``--num_clients`` does in experiments/train.py), every client gets
    ``examples_per_client`` training examples. Generating a learnable
    synthetic pool for 4096 clients would dominate a throughput run and is not
    needed to time it.
    """
    tasks = TASK_TABLES[kind]
    shape = INPUT_SHAPES[kind]
    rng = np.random.default_rng(seed)
    client_task = partition.round_robin_tasks(num_clients, len(tasks))
    width = tasks_lib.target_width(tasks)

    def split(n: int) -> pool_lib.Split:
        x = rng.standard_normal((num_clients * n, *shape), dtype=np.float32)
        y = np.zeros((num_clients * n, width), np.float32)
        for k, task in enumerate(tasks):
            rows = np.repeat(client_task == k, n)
            if task.kind == tasks_lib.REGRESSION:
                y[rows, : task.num_outputs] = rng.random((int(rows.sum()), task.num_outputs), dtype=np.float32)
            else:
                y[rows, 0] = rng.integers(0, task.num_outputs, int(rows.sum()))
        offsets = np.arange(num_clients, dtype=np.int32) * n
        return pool_lib.Split(x=x, y=y, offset=offsets, size=np.full(num_clients, n, np.int32))

    name = f"random_{kind}"
    return pool_lib.FederatedDataset(
        name, tuple(tasks), client_task.astype(np.int32), split(examples_per_client), split(test_examples_per_client)
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """1-minute load average (runnable processes; above the core count means contention)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def machine_info() -> dict:
    """Where and under what load the numbers were measured."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_1min": load_average(),
        "jax_version": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    try:
        import torch  # optional

        info["torch_version"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch_version"] = None
    return info


def machine_record(argv) -> dict:
    """The ``machine`` record of a results file: :func:`machine_info` and the command's arguments."""
    return {"record": "machine", **machine_info(), "argv": list(argv) if argv is not None else sys.argv[1:]}


def machine_line(machine: dict) -> str:
    """One line for the terminal: CPU, cores, load, jax version."""
    return f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_1min']}, jax {machine['jax_version']}"


def start_results(path: str, argv) -> dict:
    """Starts the results file ``path`` afresh with its ``machine`` record, prints the machine; returns the record."""
    machine = machine_record(argv)
    open(path, "w").close()
    append_jsonl(path, [machine])
    print(machine_line(machine))
    return machine


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 ``jnp.dot`` rate on ``n x n`` matrices, in GFLOP/s (the practical peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_gib() -> float:
    """High-water resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPU/TPU; not CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
