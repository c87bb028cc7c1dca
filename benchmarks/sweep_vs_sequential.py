"""Wall time of a sweep as one compiled program against its runs one after another.

Issue #4 ("whole sweeps as one compiled program"). The grid is 4 seeds x 4
GradNorm alphas = 16 configurations of the same small RadCom setup, timed:

* ``sequential``: the 16 single runs one after another in one process,
  through the single-run programs (compiled once and reused: the seed and the
  hyperparameters are arguments, not constants), fetching metrics after every
  chunk like the train loop does;
* ``sweep``: the same 16 runs vmapped over a configuration axis, one program
  (:func:`fgn_jax.simulate.programs` with ``sweep=True``), metrics fetched the
  same way;
* on 1 and on 2 CPU devices (each device count in its own subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``): on 2 devices the
  clients are sharded over both, and the sweep is also timed with its
  configuration axis sharded instead (``sweep_devices=2``);
* ``16 CLI processes (est.)``: what a shell loop over ``python -m
  experiments.train`` costs, each process paying start-up and compilation:
  16 x the measured wall time of one such process (1 device).

Times include compilation; ``compile_s`` (first chunk, minus a steady chunk)
is also reported. Each measurement prints one JSON line; the last lines are a
table. Other processes on the machine skew the numbers: the load average is
recorded before and after.

Run: ``python -m benchmarks.sweep_vs_sequential --rounds=20 --out=/tmp/sweep_bench.jsonl``
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SEEDS = (0, 1, 2, 3)
ALPHAS = (0.5, 1.0, 1.5, 2.0)


def _settings(args) -> dict:
    return dict(
        dataset="synthetic_radcom",
        num_clients=args.num_clients,
        examples_per_client=128,
        test_examples_per_client=32,
        batch_size=args.batch_size,
        tau_head=2,
        tau_shared=2,
        rounds=args.rounds,
        log_every=args.log_every,
        eval_every=args.rounds,
    )


def _base_config(args):
    from fgn_jax import training

    return training.ExperimentConfig(**_settings(args))


def time_cli_processes(args) -> dict:
    """16 x the wall time of one ``python -m experiments.train`` process with the same settings."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}"]
        cmd += [f"--{k}={v}" for k, v in _settings(args).items()]
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        start = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        one = time.perf_counter() - start
    n = len(SEEDS) * len(ALPHAS)
    return {"mode": f"{n} CLI processes (est.)", "total_s": n * one, "compile_s": float("nan"), "devices": 1}


def _setup(args, sweep_devices=1):
    import jax

    from fgn_jax import sharding, training

    base = _base_config(args)
    dataset = training.build_dataset(base)
    mesh = sharding.make_mesh(0, sweep_devices)
    sim = dataclasses.replace(training.build_simulation(base, dataset), mesh=mesh)
    configs = [dataclasses.replace(base, seed=s, alpha=a) for a in ALPHAS for s in SEEDS]
    return jax, base, sim, sim.make_env(dataset), configs


def _run_chunks(jax, run_chunk, state, env, hparams, rounds, chunk):
    """Runs all rounds; returns (state, [seconds per chunk])."""
    times = []
    for _ in range(-(-rounds // chunk)):
        t0 = time.perf_counter()
        state, metrics = run_chunk(state, env, hparams, rounds)
        jax.device_get(metrics)  # as the train loop does after every chunk
        times.append(time.perf_counter() - t0)
    return state, times


def time_sequential(args) -> dict:
    jax, base, sim, env, configs = _setup(args)
    start = time.perf_counter()
    chunk_times = []
    for config in configs:
        hparams = config.hparams()
        state = sim.init(jax.random.key(config.seed), env, hparams)
        state, times = _run_chunks(jax, sim.run_chunk, state, env, hparams, base.rounds, sim.chunk)
        jax.block_until_ready(sim.evaluate(state, env, hparams))
        chunk_times += times
    total = time.perf_counter() - start
    return {"mode": "sequential", "total_s": total, "compile_s": chunk_times[0] - min(chunk_times)}


def time_sweep(args, sweep_devices=1) -> dict:
    import numpy as np

    from fgn_jax import simulate, sweep

    jax, base, sim, env, configs = _setup(args, sweep_devices)
    start = time.perf_counter()
    keys, hparams = sweep.stacked_inputs(configs, sim.mesh)
    progs = simulate.programs(sim, sweep=True)
    state = progs.init(keys, env, hparams)
    stop = np.int32(base.rounds)
    state, times = _run_chunks(jax, progs.run_chunk, state, env, hparams, stop, sim.chunk)
    jax.block_until_ready(progs.evaluate(state, env, hparams))
    total = time.perf_counter() - start
    mode = "sweep" if sweep_devices == 1 else f"sweep (configs over {sweep_devices} devices)"
    return {"mode": mode, "total_s": total, "compile_s": times[0] - min(times)}


def child(args) -> None:
    import jax

    results = [time_sequential(args), time_sweep(args)]
    if jax.device_count() > 1:
        results.append(time_sweep(args, sweep_devices=jax.device_count()))
    for r in results:
        r.update(devices=jax.device_count(), configs=len(SEEDS) * len(ALPHAS), rounds=args.rounds)
        print(json.dumps(r), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--num_clients", type=int, default=4, help="a multiple of every device count")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--devices", default="1,2", help="CPU device counts to time")
    parser.add_argument("--out", default="", help="also append the JSON lines here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    header = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "loadavg_before": os.getloadavg(),
    }
    lines = []
    for n in [int(d) for d in args.devices.split(",")]:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-m", "benchmarks.sweep_vs_sequential", "--child", *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if 1 in [int(d) for d in args.devices.split(",")]:
        lines.append(time_cli_processes(args))
    header["loadavg_after"] = os.getloadavg()
    print(json.dumps(header))
    for line in lines:
        print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in [header, *lines])
    sequential = {r["devices"]: r["total_s"] for r in lines if r["mode"] == "sequential"}
    print(f"\n{'devices':>7}  {'mode':<36} {'total s':>8} {'compile s':>9} {'vs sequential':>13}")
    for r in lines:
        ratio = sequential[r["devices"]] / r["total_s"]
        print(f"{r['devices']:>7}  {r['mode']:<36} {r['total_s']:>8.1f} {r['compile_s']:>9.1f} {ratio:>12.2f}x")


if __name__ == "__main__":
    main()
