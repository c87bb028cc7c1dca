"""Hyperparameter sweeps run as ONE compiled program (DESIGN.md section 3, last bullet).

A sweep is a grid over the seed and the float hyperparameters of
:class:`~fgn_jax.algorithms.HParams` (``alpha``, ``weight_lr``,
``client_lr``, ``server_lr``, the weightings' ``dwa_temperature``,
``cagrad_c``, ``uncertainty_lr`` and the channel's ``snr_db``, ``ps_snr_db``,
``truncation_q`` of over-the-air aggregation), everything else fixed. Several
weighting methods are several programs: :func:`run_weightings` runs one sweep
per method. Those hyperparameters
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

Divergence (``on_divergence``): round ``r`` of a configuration is good if
its ``task_loss``, ``grad_norm`` and ``task_weight`` and the state after it
are free of NaN/Inf; this is checked per configuration and round inside the
compiled chunk (:func:`chunk_program`), and a bad round is never applied.

* ``"stop"`` (default): the first bad round of any configuration stops the
  sweep (:class:`~fgn_jax.training.Diverged`, naming the configuration, the
  round, the task and the quantity); only rows of earlier rounds are written
  and the last good checkpoint is kept, as in a single run.
* ``"mask"``: the configuration is frozen at the state it began round ``r``
  with (its round counter stays at ``r``) and writes no more rows; the others
  go on exactly as without it. ``results`` record its ``diverged_round`` and
  the reason.

Checkpoint and resume (as a single run, :mod:`fgn_jax.workdir`): the whole
``[S]``-leading state is checkpointed every ``checkpoint_every`` rounds;
re-running the same sweep on its work directory resumes from the latest
checkpoint, truncating each ``metrics.jsonl`` to the rounds before it, so the
files end up identical to an uninterrupted sweep. Which configurations were
frozen is part of the checkpointed state (a round counter behind the others).
A work directory holding a different sweep (shared settings or grid) is
refused unless ``overwrite``.

Writes to the work directory:

* ``config.json``: the shared settings and the grid (compared on resume), the
  configuration names, ``on_divergence``;
* ``<name>/config.json`` and ``<name>/metrics.jsonl`` per configuration, the
  name listing its swept values (e.g. ``alpha0.5_seed0``), the rows exactly
  as in a single run's ``metrics.jsonl``;
* ``checkpoints/``: the sweep state (orbax, the last ``keep_checkpoints``);
* ``divergence.json`` (mask mode, once one diverged): per frozen
  configuration its round and message;
* ``results.json`` and ``results.csv``: the final metrics of each
  configuration, ``diverged_round`` and ``divergence`` (empty when fine);
* ``sweep.png``: per-task loss curves and task-weight trajectories, mean and
  min-max band over seeds, one line per setting of the other values (each
  with its own line style and marker, so coinciding curves stay visible;
  log axes only where the values span more than a factor of 10);
* ``summary.json``: the grid, the devices, diverged configurations, wall and
  first-chunk times.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from typing import Callable, Mapping, Sequence, TextIO
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import fgn_jax
from fgn_jax import algorithms, checkpoint, curves, sharding, simulate, training, weightings
from fgn_jax import workdir as workdir_lib

# ExperimentConfig fields a sweep may vary, in the order of the grid (the
# seed varies fastest, so the seeds of one setting are neighbours).
SWEPT = (
    "alpha",
    "weight_lr",
    "client_lr",
    "server_lr",
    "dwa_temperature",
    "cagrad_c",
    "uncertainty_lr",
    "snr_db",
    "ps_snr_db",
    "truncation_q",
    "seed",
)
# The list flag of each swept field (experiments/sweep.py), also the keys of the grid in config.json.
LIST_FLAGS = {
    "alpha": "alphas",
    "weight_lr": "weight_lrs",
    "client_lr": "client_lrs",
    "server_lr": "server_lrs",
    "dwa_temperature": "dwa_temperatures",
    "cagrad_c": "cagrad_cs",
    "uncertainty_lr": "uncertainty_lrs",
    "snr_db": "snr_dbs",
    "ps_snr_db": "ps_snr_dbs",
    "truncation_q": "truncation_qs",
    "seed": "seeds",
}
ON_DIVERGENCE = ("stop", "mask")
# Per-round quantities checked for NaN/Inf (with the state after the round).
QUANTITIES = ("task_loss", "grad_norm", "task_weight")
RESULT_FILES = ("results.json", "results.csv", "sweep.png")
DIVERGENCE = "divergence.json"  # on_divergence="mask": name -> {"round", "message"} of each frozen configuration


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
    """A configuration's directory name from its swept values, shell-friendly: ``alpha0.5_weight_lr0.02_seed0``.

    results.csv maps each name to its values (one column per swept field).
    """
    return "_".join(f"{name}{getattr(config, name):g}" for name in fields)


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


def _all_finite(tree, real: jax.Array | None = None) -> jax.Array:
    """True iff every float leaf of ``tree`` is free of NaN/Inf.

    With ``real`` (a ``[C]`` client mask), the leaves have a leading client
    axis and only the real clients' entries count (padding is never used).
    """
    flags = []
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            if real is None:
                flags.append(jnp.all(jnp.isfinite(x)))
            else:
                flags.append(jnp.all(jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) | ~real))
    return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def _masked_chunk(sim: simulate.Simulation, state: simulate.SimState, env, hparams, stop_round, start_round):
    """One configuration's chunk of rounds; a round that goes non-finite is not applied.

    Like :meth:`fgn_jax.simulate.Simulation.run_chunk`, but round ``r`` is
    *good* only if its metrics (``task_loss``, ``grad_norm``, ``task_weight``)
    and the state after it are all finite. The first bad round freezes the
    configuration: its state stays the one it began round ``r`` with (the
    state after round ``r - 1``, round counter ``r``), and later rounds of the
    chunk leave it alone. A configuration whose round counter is behind
    ``start_round`` (the rounds done by the sweep) was frozen in an earlier
    chunk and stays frozen, so a checkpointed state carries which
    configurations diverged, and at which round.

    Returns:
      ``(state, metrics)``; metrics stacked ``[chunk, ...]`` with ``round``,
      ``active`` (the round was good and applied) and ``diverged`` (the round
      was the configuration's first bad one; its metrics are the bad values).
    """
    simulate.trace_counts[sim] += 1  # counted like the single-run chunk: tests prove one compilation

    def body(carry, _):
        state, frozen = carry
        new, metrics = sim.round_step(state, env, hparams)
        finite = _all_finite(([metrics[k] for k in QUANTITIES], new.server)) & _all_finite(new.clients, real)
        ran = (state.server.round < stop_round) & ~frozen
        good = ran & finite
        keep = lambda a, b: jnp.where(good, a, b)  # noqa: E731
        out = simulate.SimState(
            server=jax.tree.map(keep, new.server, state.server),
            clients=jax.tree.map(keep, new.clients, state.clients),
            key=state.key,
        )
        metrics.update(round=state.server.round, active=good, diverged=ran & ~finite)
        return (out, frozen | (ran & ~finite)), metrics

    real = env.info.mask > 0
    frozen = state.server.round < start_round
    (state, _), metrics = jax.lax.scan(body, (state, frozen), None, length=sim.chunk)
    return state, metrics


@functools.lru_cache(maxsize=None)
def chunk_program(sim: simulate.Simulation) -> Callable:
    """The sweep's jitted round chunk: :func:`_masked_chunk` vmapped over configurations.

    Called as ``program(state, env, hparams, stop_round, start_round)`` with
    ``[S]``-leading state and hyperparameters; returns the new state (donating
    the old one) and metrics ``[S, chunk, ...]``, replicated. Shardings as in
    :func:`fgn_jax.simulate.programs` with ``sweep=True`` (the environment
    keeps the placement it was made with).
    """
    spmd = sharding.SWEEP_AXIS if sim.mesh is not None and sharding.SWEEP_AXIS in sim.mesh.axis_names else None
    run = jax.vmap(functools.partial(_masked_chunk, sim), in_axes=(0, None, 0, None, None), spmd_axis_name=spmd)
    if sim.mesh is None:
        return jax.jit(run, donate_argnums=0)
    per_run, everywhere = sharding.replicated(sim.mesh, 1), sharding.replicated(sim.mesh)
    state = simulate.SimState(server=per_run, clients=sharding.clients(sim.mesh, 1), key=per_run)
    return jax.jit(
        run,
        in_shardings=(state, None, per_run, everywhere, everywhere),
        out_shardings=(state, everywhere),
        donate_argnums=0,
    )


def sweep_settings(base: training.ExperimentConfig, configs: Sequence[training.ExperimentConfig]) -> dict:
    """The flags a sweep's ``config.json`` is compared on when its work directory is reused (before any data).

    The shared settings without the swept fields, which the grid lists under
    their list flags' names (e.g. ``alphas``). What follows from the data and
    the devices (task names, client and configuration slots) is compared after
    the data is built (:func:`fgn_jax.workdir.check_layout`).
    """
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in SWEPT}
    settings.update({LIST_FLAGS[f]: list(dict.fromkeys(getattr(c, f) for c in configs)) for f in SWEPT})
    return settings


def _remove_sweep_files(workdir: str) -> None:
    # --overwrite: the previous sweep's per-configuration directories and result files.
    try:
        with open(os.path.join(workdir, workdir_lib.CONFIG)) as f:
            names = json.load(f).get("configurations", [])
    except (OSError, ValueError, AttributeError):
        names = []
    for name in names:
        path = os.path.join(workdir, name)
        if name and os.path.isfile(os.path.join(path, workdir_lib.CONFIG)):
            shutil.rmtree(path)
    for name in (*RESULT_FILES, DIVERGENCE):
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))


def _bad_row(metrics, j: int) -> dict:
    # The metrics of a configuration's first bad round, as a metrics.jsonl row.
    return {"round": int(metrics["round"][j]), **{k: [float(v) for v in metrics[k][j]] for k in QUANTITIES}}


def run_sweep(
    base: training.ExperimentConfig,
    values: Mapping[str, Sequence],
    workdir: str,
    sweep_devices: int = 1,
    log: TextIO | None = sys.stdout,
    on_divergence: str = "stop",
    overwrite: bool = False,
    on_event: Callable[[str, int], None] | None = None,
) -> list[dict]:
    """Runs every configuration of the grid at once (or resumes) and writes the files above.

    Re-running the same sweep on the same ``workdir`` continues from the
    latest checkpoint; each ``metrics.jsonl`` is then identical to that of an
    uninterrupted sweep; a finished sweep re-invoked returns its
    ``results.json`` at once (no data, no compilation). A workdir holding a
    different sweep is refused unless ``overwrite``.

    Args:
      base: settings shared by all configurations (``num_devices`` included).
      values: the grid, see :func:`grid`.
      workdir: output directory (created if needed).
      sweep_devices: devices along the configuration axis (1: only the
        client axis is sharded).
      log: where progress lines go (None: silent). Only process 0 logs and
        writes files.
      on_divergence: what a NaN/Inf in a configuration's loss, gradient norm,
        task weight or state does: ``"stop"`` the sweep (raises
        :class:`~fgn_jax.training.Diverged`), or ``"mask"`` the configuration
        (frozen at its last good state; the others go on).
      overwrite: replace a different sweep in ``workdir``.
      on_event: test hook, called as ``on_event(name, rounds_done)`` after
        ``"metrics"`` are written and after a ``"checkpoint"`` is saved.

    Returns:
      One result dict per configuration (the rows of ``results.json``).

    Raises:
      training.ConfigError, workdir.WorkdirError: bad input.
      training.Diverged: ``on_divergence="stop"`` and a configuration
        diverged; rows of the good rounds are written, the last good
        checkpoint is kept.
      training.Interrupted: SIGINT/SIGTERM; the state was checkpointed first.
    """
    start = time.time()
    if on_divergence not in ON_DIVERGENCE:
        raise training.ConfigError(f"--on_divergence: choose one of {', '.join(ON_DIVERGENCE)}, got {on_divergence!r}")
    configs = grid(base, values)
    names = [config_name(c, varied(configs)) for c in configs]
    writer = jax.process_index() == 0
    say = lambda msg: print(msg, file=log, flush=True) if log is not None and writer else None  # noqa: E731

    def event(name, done):
        if on_event is not None:
            on_event(name, done)

    # Everything the flags alone decide is checked before any data exists or anything compiles.
    training.check_batch_size(base, training.planned_train_sizes(base))
    try:
        mesh = sharding.make_mesh(base.num_devices, sweep_devices)
    except ValueError as e:
        raise training.ConfigError(f"--sweep_devices: {e}") from None
    settings = sweep_settings(base, configs)
    if writer and overwrite:
        _remove_sweep_files(workdir)
    resuming = workdir_lib.prepare_on_writer(workdir, settings, overwrite)  # the same on every process
    if resuming:
        finished = _finished_results(workdir, base.rounds)
        # In stop mode a configuration masked in an earlier run stops the sweep (below, from its checkpoint).
        if finished is not None and not (on_divergence == "stop" and _has_masked(workdir)):
            say(
                f"{workdir} already holds this sweep, finished after {base.rounds} rounds "
                f"(results.json); nothing to do (a larger --rounds extends it)"
            )
            return finished

    dataset = training.build_dataset(base)
    task_names = dataset.task_names
    warning = training.check_batch_size(base, dataset.train.size)
    if warning:
        say(warning)
    sim = dataclasses.replace(training.build_simulation(base, dataset), mesh=mesh)
    env = sim.make_env(dataset)
    # Repeat the last configuration so the sweep axis splits over its devices.
    padded = configs + configs[-1:] * (-len(configs) % sweep_devices)
    # A checkpoint fits only the same shapes and, for imbalanced clients, the same slot order
    # (simulate.client_order); with the same flags these change only with the device count.
    slot_ids = [int(i) for i in sim.client_order(dataset)]
    layout = {
        "task_names": task_names,
        "client_slots": int(env.info.mask.shape[0]),
        "config_slots": len(padded),
        "client_order": None if slot_ids == list(range(len(slot_ids))) else slot_ids,
    }
    if resuming:
        workdir_lib.check_layout_on_writer(workdir, layout)
    settings = {**settings, **layout}
    if writer and not resuming:
        for name in (*RESULT_FILES, DIVERGENCE):
            if os.path.exists(os.path.join(workdir, name)):
                os.remove(os.path.join(workdir, name))
    if writer:  # rewritten on resume too: the files describe the sweep as it is now (e.g. --rounds)
        workdir_lib.write_json_atomic(
            os.path.join(workdir, workdir_lib.CONFIG),
            {**settings, "configurations": names, "on_divergence": on_divergence, "version": fgn_jax.__version__},
        )
        symbols = training.metric_symbols(dataset)
        for name, config in zip(names, configs):
            os.makedirs(os.path.join(workdir, name), exist_ok=True)
            settings_i = {
                **dataclasses.asdict(config),
                "task_names": task_names,
                "task_metrics": symbols,
                "sweep": name,
            }
            workdir_lib.write_json_atomic(os.path.join(workdir, name, workdir_lib.CONFIG), settings_i)

    keys, hparams = stacked_inputs(padded, mesh)
    progs = simulate.programs(sim, sweep=True)
    run_chunk = chunk_program(sim)
    say(f"sweep of {len(configs)} configurations ({', '.join(varied(configs))}) on {mesh.devices.size} devices")
    say(f"compiling (the first {base.log_every} rounds include it) ...")
    state = progs.init(keys, env, hparams)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS), keep=base.keep_checkpoints)
    with contextlib.closing(ckpt):
        restored = ckpt.restore_latest(state, say) if resuming else None
        done = 0
        # Configurations frozen by on_divergence="mask": index -> (round, message).
        diverged: dict[int, tuple[int, str]] = {}
        if restored is not None:
            state, done = restored
            say(f"resuming from the checkpoint at round {done}")
            diverged = _restored_divergence(workdir, names, _fetch(state.server.round, mesh), done)
            for i, (r, _) in sorted(diverged.items()):
                say(f"configuration {names[i]} stays frozen at its state before round {r} (diverged, masked)")
        # Only process 0 writes; the others read what it has (a shared file system), for the results.
        metrics_of = workdir_lib.reset_metrics if writer else workdir_lib.read_metrics
        rows = [metrics_of(os.path.join(workdir, n), done) for n in names]

        def stop_for(i, problem, kept_round):
            kept = (
                "no checkpoint was saved yet"
                if kept_round is None
                else f"the last good checkpoint (round {kept_round}) is kept in {ckpt.directory}"
            )
            return training.Diverged(f"configuration {names[i]} diverged at {problem}; {kept}")

        if on_divergence == "stop" and diverged:
            i = min(diverged, key=lambda i: (diverged[i][0], i))
            raise stop_for(i, f"{diverged[i][1]} (masked in an earlier run)", max(ckpt.steps(), default=None))

        last_checkpoint, first_chunk_s = done, None
        with training._StopRequest() as stop:  # noqa: SLF001 - the single run's SIGINT/SIGTERM handling
            while done < base.rounds:
                t0 = time.time()
                state, metrics = run_chunk(state, env, hparams, np.int32(base.rounds), np.int32(done))
                metrics = jax.device_get(metrics)
                if first_chunk_s is None:
                    first_chunk_s = time.time() - t0
                    first = min(sim.chunk, base.rounds - done)
                    say(f"first {first} rounds done in {first_chunk_s:.1f} s (compilation included)")
                    rate_start, rate_start_round = time.time(), min(done + sim.chunk, base.rounds)
                chunk_rows, new = [], {}
                for i in range(len(configs)):
                    mine = jax.tree.map(lambda a: a[i], metrics)  # noqa: B023
                    chunk_rows.append(simulate.metrics_rows(mine))
                    bad = np.flatnonzero(mine["diverged"])
                    if bad.size:
                        row = _bad_row(mine, bad[0])
                        found = training.first_nonfinite([row], task_names)
                        state_only = "the state after the round has a NaN/Inf (its metrics are finite)"
                        new[i] = found or (row["round"], f"round {row['round']}: {state_only}")
                if new and on_divergence == "stop":
                    i = min(new, key=lambda i: (new[i][0], i))
                    if writer:
                        for name, r in zip(names, chunk_rows):
                            workdir_lib.append_metrics(
                                os.path.join(workdir, name), [x for x in r if x["round"] < new[i][0]]
                            )
                    raise stop_for(i, new[i][1], max(ckpt.steps(), default=None))
                done = min(done + sim.chunk, base.rounds)
                for i, (r, problem) in new.items():
                    say(f"configuration {names[i]} diverged at {problem}; masked: frozen at its state before round {r}")
                diverged.update(new)
                if new and writer:  # before the rows and the checkpoint that depend on it
                    workdir_lib.write_json_atomic(
                        os.path.join(workdir, DIVERGENCE),
                        {names[i]: {"round": r, "message": m} for i, (r, m) in sorted(diverged.items())},
                    )
                if done % base.eval_every == 0 or done == base.rounds:
                    evaluation = jax.device_get(progs.evaluate(state, env, hparams))
                    for i, r in enumerate(chunk_rows):
                        if r and r[-1]["round"] == done - 1:  # not a configuration frozen before the chunk's end
                            r[-1].update({k: [float(v) for v in evaluation[k][i]] for k in evaluation})
                for i, name in enumerate(names):
                    rows[i].extend(chunk_rows[i])
                    if writer:
                        workdir_lib.append_metrics(os.path.join(workdir, name), chunk_rows[i])
                event("metrics", done)
                # Chunks end every log_every rounds: checkpoint at the first chunk end past each multiple.
                due = done // base.checkpoint_every > last_checkpoint // base.checkpoint_every
                if due or done == base.rounds or stop.signum is not None:
                    last_checkpoint = done
                    ckpt.save(done, state)
                    event("checkpoint", done)
                losses = [r[-1]["task_loss"] for i, r in enumerate(rows) if r and i not in diverged]
                mean = f"{np.mean(losses):.4f}" if losses else "-"
                msg = f"round {done}/{base.rounds}"
                if done > rate_start_round:
                    rate = (done - rate_start_round) / max(time.time() - rate_start, 1e-9)
                    msg += f" | {rate:.2f} rounds/s, ETA {training.format_duration((base.rounds - done) / rate)}"
                msg += f" | mean task loss over configurations {mean}"
                say(msg + (f" ({len(diverged)} diverged, masked)" if diverged else ""))
                if stop.signum is not None and done < base.rounds:
                    raise training.Interrupted(
                        f"stopped by signal {stop.signum} after round {done}; checkpoint saved, "
                        "re-run the same command to resume",
                        stop.signum,
                    )

    results = []
    for i, (name, config) in enumerate(zip(names, configs)):
        evals = [r for r in rows[i] if "test_metric" in r]
        results.append(
            {
                "name": name,
                **{field: getattr(config, field) for field in SWEPT},
                "diverged_round": diverged[i][0] if i in diverged else None,
                "divergence": diverged[i][1] if i in diverged else None,
                "final_task_loss": rows[i][-1]["task_loss"] if rows[i] else None,
                # The weights applied in the configuration's last (good) round.
                "final_task_weight": rows[i][-1]["task_weight"] if rows[i] else None,
                "final_test_loss": evals[-1]["test_loss"] if evals else None,
                "final_test_metric": evals[-1]["test_metric"] if evals else None,
            }
        )
    summary = {
        "num_configs": len(configs),
        "grid": {field: sorted({getattr(c, field) for c in configs}) for field in SWEPT},
        "task_names": task_names,
        "devices": [str(d) for d in mesh.devices.flat],
        "mesh": dict(mesh.shape),
        "rounds": done,
        "on_divergence": on_divergence,
        "diverged": {names[i]: r for i, (r, _) in sorted(diverged.items())},
        "resumed_from_round": restored[1] if restored is not None else None,
        "wall_time_s": time.time() - start,
        "first_chunk_s": first_chunk_s,
    }
    if writer:
        workdir_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
        _write_csv(os.path.join(workdir, "results.csv"), results, task_names)
        workdir_lib.write_json_atomic(os.path.join(workdir, workdir_lib.SUMMARY), summary)
        method = f" ({base.weighting})" if base.weighting else ""
        plot(
            configs, rows, task_names, os.path.join(workdir, "sweep.png"), f"{base.algorithm}{method} on {base.dataset}"
        )
    if diverged:
        say(f"{len(diverged)} of {len(configs)} configurations diverged (masked): {', '.join(summary['diverged'])}")
    say(f"done in {summary['wall_time_s']:.1f} s; results in {os.path.join(workdir, 'results.csv')}")
    return results


def _finished_results(workdir: str, rounds: int) -> list[dict] | None:
    """``results.json`` of a sweep in ``workdir`` that has done at least ``rounds`` rounds, else None.

    Process 0 decides from its ``summary.json`` (written after results.json)
    and every process follows; each returns the results it can read (a
    process without the shared file system gets an empty list).
    """
    if workdir_lib.finished_on_writer(workdir, rounds) is None:
        return None
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return []
    return results if isinstance(results, list) else []


def _has_masked(workdir: str) -> bool:
    """Whether ``divergence.json`` in ``workdir`` names a configuration frozen by ``on_divergence="mask"``."""
    try:
        with open(os.path.join(workdir, DIVERGENCE)) as f:
            return bool(json.load(f))
    except (OSError, ValueError):
        return False


def _restored_divergence(workdir: str, names: Sequence[str], rounds, done: int) -> dict[int, tuple[int, str]]:
    # A configuration whose round counter is behind the checkpoint's round was frozen at that round.
    try:
        with open(os.path.join(workdir, DIVERGENCE)) as f:
            messages = {k: v["message"] for k, v in json.load(f).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        messages = {}
    diverged = {}
    for i, name in enumerate(names):
        r = int(rounds[i])
        if r < done:
            diverged[i] = (r, messages.get(name, f"round {r}: a NaN/Inf (details lost)"))
    return diverged


def _write_csv(path, results, task_names, leading: Sequence[str] = ()):
    # ``leading``: extra per-result columns before the others (run_weightings: "weighting").
    per_task = ("final_task_loss", "final_task_weight", "final_test_loss", "final_test_metric")
    header = [*leading, "name", *SWEPT, "diverged_round", "divergence"]
    header += [f"{key}/{task}" for key in per_task for task in task_names]
    blank = [""] * len(task_names)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for r in results:
            fields = [r["diverged_round"], r["divergence"]]
            out.writerow(
                [
                    *(r[k] for k in leading),
                    r["name"],
                    *(r[k] for k in SWEPT),
                    *("" if v is None else v for v in fields),
                    *(v for key in per_task for v in (blank if r[key] is None else r[key])),
                ]
            )


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
    methods = len({c.weighting_name for c in configs}) > 1  # run_weightings: one group per method and setting
    for i, config in enumerate(configs):
        label = config_name(config, setting_fields)
        if methods:
            label = ",".join(filter(None, [config.weighting_name, label]))
        groups.setdefault(label or "all", []).append(i)
    t = len(task_names)
    fig, axes = plt.subplots(2, t, figsize=(3.2 * t, 6), squeeze=False, sharex=True)
    plotted: dict[tuple[int, int], list[np.ndarray]] = {}
    for g, (label, members) in enumerate(groups.items()):
        color = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")(g % 20)
        # Each setting its own dash and marker: where curves coincide, all of them stay visible.
        style = curves.line_style(g, len(groups))
        # A diverged (masked) configuration's rows stop early: it leaves the mean and band there.
        rounds = max(([r["round"] for r in rows[i]] for i in members), key=len)
        for row_index, key in enumerate(("task_loss", "task_weight")):
            values = np.full((len(members), len(rounds), t), np.nan)  # [seeds, rounds, T]
            for m, i in enumerate(members):
                if rows[i]:
                    values[m, : len(rows[i])] = [r[key] for r in rows[i]]
            with warnings.catch_warnings():  # all-NaN columns (no configuration left) plot as gaps
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
            for k in range(t):
                ax = axes[row_index, k]
                every = max(1, len(rounds) // 12)  # about a dozen markers per curve
                label_k = label if k == 0 and row_index == 0 else None
                ax.plot(rounds, mean[:, k], color=color, label=label_k, markevery=every, **style)
                if len(members) > 1:
                    # Hatched, unfilled bands: overlapping bands of coinciding settings do not blend into one.
                    ax.fill_between(
                        rounds, low[:, k], high[:, k], facecolor="none", edgecolor=color, hatch="///", linewidth=0
                    )
                plotted.setdefault((row_index, k), []).append(np.concatenate([low[:, k], high[:, k]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (row_index, k), values in plotted.items():
            curves.scale_axis(axes[row_index, k], np.concatenate(values))
    for k, name in enumerate(task_names):
        axes[0, k].set_title(name)
        axes[1, k].set_xlabel("round (0-based)")
    axes[0, 0].set_ylabel("task loss L_k(t)")
    axes[1, 0].set_ylabel("task weight p_k")
    seeds = max(len(m) for m in groups.values())
    fig.suptitle(f"{title}: mean over {seeds} seed(s), band = min-max" if seeds > 1 else title)
    fig.legend(loc="lower center", ncol=min(len(groups), 4), fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.04 * math.ceil(len(groups) / 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_weightings(
    base: training.ExperimentConfig,
    methods: Sequence[str],
    values: Mapping[str, Sequence],
    workdir: str,
    log: TextIO | None = sys.stdout,
    **kwargs,
) -> list[dict]:
    """Runs the same grid for several weighting methods (``experiments.sweep --weightings=...``).

    Each method is one sweep (one compiled program) in ``workdir/<method>``,
    exactly as :func:`run_sweep` with ``--weighting=<method>`` writes it (and
    resumes it). ``workdir`` then gets the combined ``results.json`` and
    ``results.csv`` (a leading ``weighting`` column) and ``weightings.png``
    (the curves of every method, mean and band over seeds).

    Args:
      base: settings shared by all runs (its ``weighting`` is replaced).
      methods: weighting names (:data:`fgn_jax.weightings.WEIGHTINGS`).
      values: the grid, see :func:`grid`.
      workdir: output directory.
      log: where progress lines go (None: silent).
      **kwargs: passed to :func:`run_sweep` (``sweep_devices``,
        ``on_divergence``, ``overwrite``, ``on_event``).

    Returns:
      Every method's result rows, each with its ``weighting``.

    Raises:
      As :func:`run_sweep`; ``--weightings`` with an unknown or no name.
    """
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in weightings.WEIGHTINGS]
    if unknown or not methods:
        problem = f"unknown weighting {unknown[0]!r}" if unknown else "no method given"
        raise training.ConfigError(f"--weightings: {problem}; choose from {', '.join(weightings.WEIGHTINGS)}")
    results, configs, rows = [], [], []
    task_names = None
    for method in methods:
        config = dataclasses.replace(base, weighting=method)
        if log is not None and jax.process_index() == 0:
            print(f"weighting {method}:", file=log, flush=True)
        sub = os.path.join(workdir, method)
        mine = run_sweep(config, values, sub, log=log, **kwargs)
        results += [{"weighting": method, **r} for r in mine]
        configs += grid(config, values)
        rows += [workdir_lib.read_metrics(os.path.join(sub, r["name"])) for r in mine]
        with open(os.path.join(sub, workdir_lib.CONFIG)) as f:
            task_names = json.load(f)["task_names"]
    if jax.process_index() == 0:
        workdir_lib.write_json_atomic(os.path.join(workdir, "results.json"), results)
        _write_csv(os.path.join(workdir, "results.csv"), results, task_names, leading=("weighting",))
        plot(configs, rows, task_names, os.path.join(workdir, "weightings.png"), f"{base.algorithm} on {base.dataset}")
    return results
