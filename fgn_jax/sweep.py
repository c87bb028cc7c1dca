"""Hyperparameter sweeps run as ONE compiled program (DESIGN.md section 3, last bullet).

A sweep is a grid over the seed and the float hyperparameters of
:class:`~fgn_jax.algorithms.HParams` (``alpha``, ``weight_lr``,
``client_lr``, ``server_lr``), everything else fixed. Those hyperparameters
are pytree leaves, not compile-time constants, so the simulation is vmapped
over a leading configuration axis ``[S]`` of the state, the keys (one per
seed) and the hyperparameters (:func:`fgn_jax.simulate.programs` with
``sweep=True``): S runs advance in lock step inside one XLA program. The data
depends on ``data_seed`` only, so all configurations share one environment.
Every configuration computes exactly what a single run of it computes (same
keys, same per-client randomness); only float summation order may differ.

On a mesh, the client axis is sharded as in a single run and the
configuration axis may be sharded too (``sweep_devices``; the grid is padded
with repeats of its last configuration to split evenly, and the repeats are
dropped).

Writes to the work directory:

* ``<name>/config.json`` and ``<name>/metrics.jsonl`` per configuration, the
  name listing its swept values (e.g. ``alpha=0.5,seed=0``), the rows exactly
  as in a single run's ``metrics.jsonl``;
* ``results.json`` and ``results.csv``: the final metrics of each configuration;
* ``sweep.png``: per-task loss curves and task-weight trajectories, mean and
  min-max band over seeds, one line per setting of the other values;
* ``summary.json``: the grid, the devices, wall and first-chunk times.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Mapping, Sequence, TextIO

import jax
import numpy as np

from fgn_jax import algorithms, sharding, simulate, training

# ExperimentConfig fields a sweep may vary, in the order of the grid (the
# seed varies fastest, so the seeds of one setting are neighbours).
SWEPT = ("alpha", "weight_lr", "client_lr", "server_lr", "seed")


def grid(base: training.ExperimentConfig, values: Mapping[str, Sequence]) -> list[training.ExperimentConfig]:
    """The configurations of a grid, in :data:`SWEPT` order.

    Args:
      base: the settings shared by every configuration.
      values: field name (one of :data:`SWEPT`) -> values; fields not given
        (or given an empty list) keep the value of ``base``.

    Returns:
      One validated config per point of the grid.

    Raises:
      training.ConfigError: an unknown field or an invalid value.
    """
    unknown = set(values) - set(SWEPT)
    if unknown:
        raise training.ConfigError(f"cannot sweep {', '.join(sorted(unknown))}; sweepable: {', '.join(SWEPT)}")
    axes = [list(values.get(name) or [getattr(base, name)]) for name in SWEPT]
    configs = [dataclasses.replace(base, **dict(zip(SWEPT, point))) for point in itertools.product(*axes)]
    for config in configs:
        config.validate()
    if base.client_execution != "vmap":
        raise training.ConfigError("--client_execution: a sweep is vmapped; use --client_execution=vmap")
    return configs


def varied(configs: Sequence[training.ExperimentConfig]) -> list[str]:
    """Swept fields that take more than one value (the seed always counts)."""
    return [name for name in SWEPT if name == "seed" or len({getattr(c, name) for c in configs}) > 1]


def config_name(config: training.ExperimentConfig, fields: Sequence[str]) -> str:
    return ",".join(f"{name}={getattr(config, name):g}" for name in fields)


def _fetch(tree, mesh):
    # Gathers (possibly sweep-sharded, multi-process) arrays to every process.
    if mesh is not None:
        tree = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(tree)
    return jax.device_get(tree)


def stacked_inputs(
    configs: Sequence[training.ExperimentConfig], mesh: jax.sharding.Mesh | None
) -> tuple[jax.Array, algorithms.HParams]:
    """The sweep program's per-configuration inputs.

    Args:
      configs: the configurations, in sweep order.
      mesh: the simulation's mesh (None: default placement).

    Returns:
      ``(keys, hparams)``: ``keys[s] = jax.random.key(configs[s].seed)`` and
      HParams with ``[S]`` leaves, replicated over the client axis (split over
      the sweep axis if the mesh has one).
    """
    hparams = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *[c.hparams() for c in configs])
    seeds = np.asarray([c.seed for c in configs], np.int32)
    out = None if mesh is None else sharding.replicated(mesh, 1)
    return jax.jit(lambda s, h: (jax.vmap(jax.random.key)(s), h), out_shardings=out)(seeds, hparams)


def run_sweep(
    base: training.ExperimentConfig,
    values: Mapping[str, Sequence],
    workdir: str,
    sweep_devices: int = 1,
    log: TextIO | None = sys.stdout,
) -> list[dict]:
    """Runs every configuration of the grid at once and writes the files above.

    Args:
      base: settings shared by all configurations (``num_devices`` included).
      values: the grid, see :func:`grid`.
      workdir: output directory (created if needed; files are replaced).
      sweep_devices: devices along the configuration axis (1: only the
        client axis is sharded).
      log: where progress lines go (None: silent). Only process 0 logs and
        writes files.

    Returns:
      One result dict per configuration (the rows of ``results.json``).
    """
    start = time.time()
    configs = grid(base, values)
    names = [config_name(c, varied(configs)) for c in configs]
    writer = jax.process_index() == 0
    say = lambda msg: print(msg, file=log, flush=True) if log is not None and writer else None  # noqa: E731

    dataset = training.build_dataset(base)
    task_names = dataset.task_names
    try:
        mesh = sharding.make_mesh(base.num_devices, sweep_devices)
    except ValueError as e:
        raise training.ConfigError(f"--sweep_devices: {e}") from None
    sim = dataclasses.replace(training.build_simulation(base, dataset), mesh=mesh)
    env = sim.make_env(dataset)
    # Repeat the last configuration so the sweep axis splits over its devices.
    padded = configs + configs[-1:] * (-len(configs) % sweep_devices)
    keys, hparams = stacked_inputs(padded, mesh)
    progs = simulate.programs(sim, sweep=True)
    state = progs.init(keys, env, hparams)
    say(f"sweep of {len(configs)} configurations ({', '.join(varied(configs))}) on {mesh.devices.size} devices")

    if writer:
        for name, config in zip(names, configs):
            os.makedirs(os.path.join(workdir, name), exist_ok=True)
            settings = {**dataclasses.asdict(config), "task_names": task_names, "sweep": name}
            _write_json(os.path.join(workdir, name, "config.json"), settings)
            open(os.path.join(workdir, name, "metrics.jsonl"), "w").close()

    rows: list[list[dict]] = [[] for _ in configs]
    done, first_chunk_s = 0, None
    stop = np.int32(base.rounds)
    while done < base.rounds:
        t0 = time.time()
        state, metrics = progs.run_chunk(state, env, hparams, stop)
        metrics = jax.device_get(metrics)
        done = min(done + sim.chunk, base.rounds)
        evaluation = None
        if done % base.eval_every == 0 or done == base.rounds:
            evaluation = jax.device_get(progs.evaluate(state, env, hparams))
        first_chunk_s = first_chunk_s or time.time() - t0
        for i, name in enumerate(names):
            chunk_rows = simulate.metrics_rows(jax.tree.map(lambda a: a[i], metrics))  # noqa: B023
            if evaluation is not None:
                chunk_rows[-1].update({k: [float(v) for v in evaluation[k][i]] for k in evaluation})
            rows[i].extend(chunk_rows)
            if writer:
                with open(os.path.join(workdir, name, "metrics.jsonl"), "a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in chunk_rows)
        losses = np.array([r[-1]["task_loss"] for r in rows])
        say(f"round {done}/{base.rounds}: mean task loss over configurations {np.nanmean(losses):.4f}")

    final_weights = _fetch(state.server.gradnorm.task_weights, mesh)
    results = []
    for i, (name, config) in enumerate(zip(names, configs)):
        evals = [r for r in rows[i] if "test_metric" in r]
        results.append(
            {
                "name": name,
                **{field: getattr(config, field) for field in SWEPT},
                "final_task_loss": rows[i][-1]["task_loss"],
                "final_task_weight": [float(v) for v in final_weights[i]],
                "final_test_loss": evals[-1]["test_loss"],
                "final_test_metric": evals[-1]["test_metric"],
            }
        )
    summary = {
        "num_configs": len(configs),
        "grid": {field: sorted({getattr(c, field) for c in configs}) for field in SWEPT},
        "task_names": task_names,
        "devices": [str(d) for d in mesh.devices.flat],
        "mesh": dict(mesh.shape),
        "wall_time_s": time.time() - start,
        "first_chunk_s": first_chunk_s,
    }
    if writer:
        _write_json(os.path.join(workdir, "results.json"), results)
        _write_csv(os.path.join(workdir, "results.csv"), results, task_names)
        _write_json(os.path.join(workdir, "summary.json"), summary)
        plot(configs, rows, task_names, os.path.join(workdir, "sweep.png"), title=f"{base.algorithm} on {base.dataset}")
    say(f"done in {summary['wall_time_s']:.1f} s; results in {os.path.join(workdir, 'results.csv')}")
    return results


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_csv(path, results, task_names):
    per_task = ("final_task_loss", "final_task_weight", "final_test_loss", "final_test_metric")
    header = ["name", *SWEPT, *(f"{key}/{task}" for key in per_task for task in task_names)]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for r in results:
            out.writerow([r["name"], *(r[k] for k in SWEPT), *(v for key in per_task for v in r[key])])


def plot(
    configs: Sequence[training.ExperimentConfig],
    rows: Sequence[Sequence[dict]],
    task_names: Sequence[str],
    path: str,
    title: str = "",
) -> None:
    """Saves per-task loss and task-weight curves (mean, min-max band over seeds) as a PNG.

    Args:
      configs: the sweep's configurations.
      rows: per configuration, its per-round metric rows.
      task_names: task names, in task order.
      path: output ``.png``.
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    groups: dict[str, list[int]] = {}
    setting_fields = [f for f in varied(configs) if f != "seed"]
    for i, config in enumerate(configs):
        groups.setdefault(config_name(config, setting_fields) or "all", []).append(i)
    t = len(task_names)
    fig, axes = plt.subplots(2, t, figsize=(3.2 * t, 6), squeeze=False, sharex=True)
    for g, (label, members) in enumerate(groups.items()):
        color = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")(g % 20)
        rounds = [r["round"] for r in rows[members[0]]]
        for row_index, key in enumerate(("task_loss", "task_weight")):
            values = np.array([[r[key] for r in rows[i]] for i in members])  # [seeds, rounds, T]
            for k in range(t):
                ax = axes[row_index, k]
                ax.plot(rounds, values[..., k].mean(0), color=color, label=label if k == 0 and row_index == 0 else None)
                if len(members) > 1:
                    ax.fill_between(rounds, values[..., k].min(0), values[..., k].max(0), color=color, alpha=0.2)
    for k, name in enumerate(task_names):
        axes[0, k].set_title(name)
        axes[0, k].set_yscale("log")
        axes[1, k].set_xlabel("round")
    axes[0, 0].set_ylabel("task loss L_k(t)")
    axes[1, 0].set_ylabel("task weight p_k")
    seeds = max(len(m) for m in groups.values())
    fig.suptitle(f"{title}: mean over {seeds} seed(s), band = min-max" if seeds > 1 else title)
    fig.legend(loc="lower center", ncol=min(len(groups), 4), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.04 * math.ceil(len(groups) / 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
