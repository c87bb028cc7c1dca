"""Train-and-evaluate loop behind ``experiments/train.py``.

The entry point parses flags into an :class:`ExperimentConfig` and calls
:func:`train_and_evaluate`, which writes to the work directory:

* ``config.json``: every setting, the task names in order, the package version;
* ``metrics.jsonl``: one JSON object per round: ``round``, and per task (lists
  in task order) ``task_loss`` (L_k(t) measured in step 3 of the round),
  ``grad_norm`` (g_k, unweighted) and ``task_weight`` (the weights p^t used in
  that round's aggregation), ``participants`` (the clients whose update was
  used); rounds at the evaluation interval also carry
  ``test_loss`` and ``test_metric`` (held-out, after the round);
* ``participants.jsonl`` (``--log_participants``, with ``--clients_per_round``):
  per round the cohort's client ids (``sampled``) and those that reported;
* ``summary.json``: the final metrics and the wall time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, TextIO

import jax
import numpy as np

import fgn_jax
from fgn_jax import algorithms, checkpoint, models, optimizers, sampling, sharding, simulate
from fgn_jax import workdir as workdir_lib
from fgn_jax.data import loaders, partition, synthetic
from fgn_jax.data import pool as pool_lib

TRUNK_OF_DATASET = {"synthetic_mtfl": "mtfl", "synthetic_radcom": "radcom", "mtfl": "mtfl", "radcom_dynamic": "radcom"}
DATASETS = tuple(TRUNK_OF_DATASET)


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and what is wrong."""


# Errors caused by the user's flags or files: the entry point prints their
# one-line message and exits with code 2 instead of showing a traceback.
USER_ERRORS = (ConfigError, loaders.DataError, workdir_lib.WorkdirError)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one run (flag names match the fields)."""

    dataset: str = "synthetic_mtfl"
    data_dir: str = ""  # real datasets: the raw files (README: real datasets)
    build_dir: str = ""  # real datasets: where the TFDS build goes ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
    anomaly_snr_db: int = 10  # RadCom: the derived anomaly task is SNR >= this (dB)
    algorithm: str = "fedgradnorm"
    rounds: int = 300
    num_clients: int = 0  # 0: one client per task
    client_tasks: str = ""  # explicit client->task map, e.g. "0,1,2,2"
    examples_per_client: int = 2000
    test_examples_per_client: int = 200
    imbalance: float = 0.0  # power-law exponent of client train sizes (0: balanced)
    client_sizes: str = ""  # explicit train sizes, e.g. "500,200,100" (overrides imbalance)
    dirichlet_beta: float = 0.0  # Dirichlet(beta) label skew of classification clients (0: IID)
    overlap: str = "none"  # "across_tasks": clients of different tasks may share examples
    tau_head: int = 2
    tau_shared: int = 2
    batch_size: int = 32
    client_optimizer: str = "adam"
    client_lr: float = 1e-3
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    alpha: float = 1.5
    weight_lr: float = 0.05
    weight_eps: float = 1e-3
    seed: int = 0
    data_seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50  # rounds between checkpoints (taken at the first chunk end past each multiple)
    keep_checkpoints: int = 3
    client_execution: str = "vmap"
    # Clients updated at once per device (vmapped); groups run one after another.
    # 0: automatic, groups of about GROUP_EXAMPLES examples (auto_client_batch).
    client_batch: int = 0
    conv_impl: str = "auto"
    # Regression clients predict targets standardised with their own training mean/std (fgn_jax/tasks.py).
    standardize_targets: bool = True
    num_devices: int = 0  # devices the client axis is sharded over (0: all, over all processes)
    # Partial participation (fgn_jax/sampling.py): K clients per round (0: all), how they are drawn,
    # the probability that a sampled client fails to report, and participants.jsonl with the cohorts.
    clients_per_round: int = 0
    client_sampling: str = "uniform"
    dropout_prob: float = 0.0
    log_participants: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid flag."""

        def bad(flag, msg):
            raise ConfigError(f"--{flag}: {msg}")

        if self.dataset not in DATASETS:
            bad("dataset", f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.dataset in ("mtfl", "radcom_dynamic") and not self.data_dir:
            bad("data_dir", f"dataset {self.dataset!r} needs --data_dir (see README: real datasets)")
        if self.algorithm not in algorithms.ALGORITHMS:
            bad("algorithm", f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(algorithms.ALGORITHMS)}")
        for flag in (
            "rounds",
            "examples_per_client",
            "test_examples_per_client",
            "batch_size",
            "log_every",
            "eval_every",
        ):
            if getattr(self, flag) < 1:
                bad(flag, f"must be at least 1, got {getattr(self, flag)}")
        for flag in ("tau_head", "tau_shared"):
            if getattr(self, flag) < 1:
                bad(flag, f"must be at least 1, got {getattr(self, flag)}")
        if self.num_clients < 0:
            bad("num_clients", f"must be >= 0 (0 means one client per task), got {self.num_clients}")
        for flag in ("client_optimizer", "server_optimizer"):
            if getattr(self, flag) not in optimizers.OPTIMIZERS:
                bad(
                    flag, f"unknown optimizer {getattr(self, flag)!r}; choose one of {', '.join(optimizers.OPTIMIZERS)}"
                )
        for flag in ("client_lr", "server_lr"):
            if not getattr(self, flag) > 0:
                bad(flag, f"must be > 0, got {getattr(self, flag)}")
        if not self.alpha >= 0:
            bad("alpha", f"must be >= 0, got {self.alpha}")
        if not self.weight_lr >= 0:
            bad("weight_lr", f"must be >= 0, got {self.weight_lr}")
        if not 0 < self.weight_eps < 1:
            bad("weight_eps", f"must be in (0, 1), got {self.weight_eps}")
        if not self.imbalance >= 0:
            bad("imbalance", f"must be >= 0, got {self.imbalance}")
        if not self.dirichlet_beta >= 0:
            bad("dirichlet_beta", f"must be >= 0 (0 means IID), got {self.dirichlet_beta}")
        if self.overlap not in partition.OVERLAPS:
            bad("overlap", f"choose one of {', '.join(partition.OVERLAPS)}, got {self.overlap!r}")
        if self.checkpoint_every < 1:
            bad("checkpoint_every", f"must be at least 1, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")
        if self.eval_every % self.log_every:
            bad("eval_every", f"must be a multiple of --log_every={self.log_every}, got {self.eval_every}")
        if self.client_execution not in simulate.CLIENT_EXECUTIONS:
            bad("client_execution", f"choose one of {', '.join(simulate.CLIENT_EXECUTIONS)}")
        if self.algorithm == "centralized" and self.client_execution != "vmap":
            bad("client_execution", "--algorithm=centralized trains all clients' data jointly; use vmap")
        if self.client_batch < 0:
            bad("client_batch", f"must be >= 0 (0 means automatic), got {self.client_batch}")
        if self.conv_impl not in models.CONV_IMPLS:
            bad("conv_impl", f"choose one of {', '.join(models.CONV_IMPLS)}, got {self.conv_impl!r}")
        if not 0 <= self.num_devices <= jax.device_count():
            bad("num_devices", f"must be in [0, {jax.device_count()}] (0 means every device), got {self.num_devices}")
        if jax.process_count() > 1 and self.num_devices not in (0, jax.device_count()):
            bad("num_devices", f"a multi-process run uses all {jax.device_count()} devices; pass 0")
        if self.num_devices > 1 and self.client_execution != "vmap":
            bad("num_devices", "sharding the clients over devices needs --client_execution=vmap")
        if self.client_sampling not in sampling.SAMPLINGS:
            bad("client_sampling", f"choose one of {', '.join(sampling.SAMPLINGS)}, got {self.client_sampling!r}")
        if not 0 <= self.dropout_prob < 1:
            bad("dropout_prob", f"must be in [0, 1), got {self.dropout_prob}")
        if self.clients_per_round < 0:
            bad("clients_per_round", f"must be >= 0 (0 means every client), got {self.clients_per_round}")
        if self.clients_per_round:
            num_clients = len(client_task_map(self))
            if self.clients_per_round > num_clients:
                bad("clients_per_round", f"{self.clients_per_round} is more than the {num_clients} clients")
            if self.algorithm == "centralized":
                bad("clients_per_round", "--algorithm=centralized trains on every client's data jointly; use 0")

    def hparams(self) -> algorithms.HParams:
        return algorithms.HParams.create(self.client_lr, self.server_lr, self.alpha, self.weight_lr)


def _load_pools(config: ExperimentConfig, num_train: int, num_test: int):
    if config.dataset in synthetic.POOLS:
        make = synthetic.POOLS[config.dataset]
        if config.dataset == "synthetic_radcom":
            make = functools.partial(make, anomaly_snr_db=config.anomaly_snr_db)
        # Independent seeds for the train and test pools.
        return make(num_train, config.data_seed * 2), make(num_test, config.data_seed * 2 + 1)
    options = {"anomaly_snr_db": config.anomaly_snr_db} if config.dataset == "radcom_dynamic" else {}
    return loaders.load_pools(config.dataset, config.data_dir, build_dir=config.build_dir or None, **options)


def task_table(config: ExperimentConfig):
    """The dataset's task table (TaskSpecs in task order), without loading data."""
    if config.dataset in ("synthetic_mtfl", "mtfl"):
        return synthetic.MTFL_TASKS
    return synthetic.RADCOM_TASKS


def client_task_map(config: ExperimentConfig) -> np.ndarray:
    names = [t.name for t in task_table(config)]
    try:
        if config.client_tasks:
            return partition.parse_client_tasks(config.client_tasks, names)
        return partition.round_robin_tasks(config.num_clients or len(names), len(names))
    except ValueError as e:
        flag = "client_tasks" if config.client_tasks else "num_clients"
        raise ConfigError(f"--{flag}: {e}") from None


def build_dataset(config: ExperimentConfig) -> pool_lib.FederatedDataset:
    """Generates or loads the pools and partitions them over the clients.

    Each client gets ``examples_per_client`` training examples on average
    (``--imbalance`` or ``--client_sizes`` skew that) and
    ``test_examples_per_client`` held-out ones. Real datasets cap the totals
    at what the dataset has; with ``--overlap=across_tasks`` the cap applies
    per task, so one client per task can use every image of MTFL.
    """
    client_task = client_task_map(config)
    c = len(client_task)
    train_sizes = None
    if config.client_sizes:
        try:
            train_sizes = partition.parse_sizes(config.client_sizes, c)
        except ValueError as e:
            raise ConfigError(f"--client_sizes: {e}") from None
    total_train = int(train_sizes.sum()) if train_sizes is not None else config.examples_per_client * c
    total_test = config.test_examples_per_client * c
    train_pool, test_pool = _load_pools(config, total_train, total_test)
    # Clients that may share examples only compete with clients of their own task.
    sharing = np.bincount(client_task).max() if config.overlap == partition.OVERLAP_ACROSS_TASKS else c
    avail_train, avail_test = len(train_pool) * c // sharing, len(test_pool) * c // sharing
    if total_train > avail_train and train_sizes is not None:
        raise ConfigError(
            f"--client_sizes: clients need {total_train} train examples, the dataset has {len(train_pool)}"
        )
    total_train, total_test = min(total_train, avail_train), min(total_test, avail_test)
    if total_train < c or total_test < c:
        raise ConfigError(
            f"--num_clients: {c} clients need at least one example each, but the dataset has "
            f"{len(train_pool)} train / {len(test_pool)} test examples"
        )
    if train_sizes is None:
        try:
            train_sizes = partition.power_law_sizes(total_train, c, config.imbalance)
        except ValueError as e:
            raise ConfigError(f"--imbalance: {e}") from None
    test_sizes = partition.power_law_sizes(total_test, c, 0.0)
    return partition.partition(
        config.dataset,
        train_pool,
        test_pool,
        client_task,
        train_sizes,
        test_sizes,
        config.data_seed,
        beta=config.dirichlet_beta or None,
        overlap=config.overlap,
    )


def build_simulation(config: ExperimentConfig, dataset: pool_lib.FederatedDataset) -> simulate.Simulation:
    alg_config = algorithms.AlgorithmConfig(
        algorithm=config.algorithm,
        trunk=TRUNK_OF_DATASET[config.dataset],
        conv_impl=config.conv_impl,
        max_outputs=max(t.num_outputs for t in dataset.tasks),
        num_tasks=dataset.num_tasks,
        tau_head=config.tau_head,
        tau_shared=config.tau_shared,
        batch_size=config.batch_size,
        client_optimizer=config.client_optimizer,
        server_optimizer=config.server_optimizer,
        weight_eps=config.weight_eps,
    )
    return simulate.Simulation(
        config=alg_config,
        input_shape=tuple(dataset.train.x.shape[1:]),
        max_test_size=int(dataset.test.size.max()),
        chunk=config.log_every,
        client_execution=config.client_execution,
        client_batch=config.client_batch or auto_client_batch(config.batch_size),
        standardize_targets=config.standardize_targets,
        clients_per_round=config.clients_per_round,
        client_sampling=config.client_sampling,
        dropout_prob=config.dropout_prob,
    )


# Examples per vmapped group of clients with --client_batch=0: the group's
# activations then fit the CPU caches far better than all clients at once
# (1.7x faster rounds for the MTFL trunk, 32 clients x batch 64, on a 2-core
# CPU; benchmarks/README.md).
GROUP_EXAMPLES = 256


def auto_client_batch(batch_size: int) -> int:
    """Clients per vmapped group for ``--client_batch=0``: about :data:`GROUP_EXAMPLES` examples."""
    return max(1, GROUP_EXAMPLES // batch_size)


def _fmt(values) -> str:
    return "[" + " ".join(f"{v:.3f}" for v in values) + "]"


class Diverged(RuntimeError):
    """A loss, gradient norm or task weight became NaN or Inf."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; the run stopped after checkpointing."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def first_nonfinite(rows: list[dict], task_names: list[str]) -> tuple[int, str] | None:
    """The first NaN/Inf in the rows, if any: its round and a description (round, task, quantity)."""
    for row in rows:
        for quantity in ("task_loss", "grad_norm", "task_weight"):
            for name, value in zip(task_names, row[quantity]):
                if not math.isfinite(value):
                    return row["round"], f"round {row['round']}: {quantity} of task {name!r} is {value}"
    return None


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to stop after the current chunk."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            signal.default_int_handler(signum, frame)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(
    config: ExperimentConfig,
    workdir: str,
    log: TextIO | None = sys.stdout,
    overwrite: bool = False,
    on_event: Callable[[str, int], None] | None = None,
) -> dict:
    """Runs one experiment, or resumes it, and writes its files to ``workdir``.

    Re-running the same command on the same ``workdir`` continues from the
    latest checkpoint; the resulting ``metrics.jsonl`` is identical to that of
    an uninterrupted run. A workdir holding a run with other settings is
    refused unless ``overwrite``.

    Args:
      config: the settings (validated here).
      workdir: output directory (created if needed).
      log: where progress lines go (None: silent).
      overwrite: replace a different run in ``workdir``.
      on_event: test hook, called as ``on_event(name, rounds_done)`` after
        ``"metrics"`` are written and after a ``"checkpoint"`` is saved.

    Returns:
      The summary dict (also written to ``summary.json``).

    Raises:
      ConfigError, loaders.DataError, workdir_lib.WorkdirError: bad input.
      Diverged: a NaN/Inf appeared (the last good checkpoint is kept).
      Interrupted: SIGINT/SIGTERM; the state was checkpointed first.
    """
    config.validate()
    start = time.time()
    dataset = build_dataset(config)
    # The client axis is sharded over a device mesh (padded with masked
    # clients to split evenly); "loop" runs one client at a time, unsharded.
    mesh = sharding.make_mesh(config.num_devices) if config.client_execution == "vmap" else None
    blocks = sharding.axis_size(mesh, sharding.CLIENT_AXIS)
    if config.clients_per_round % blocks:
        # Each device draws its share of the cohort from its own clients (fgn_jax/sampling.py).
        raise ConfigError(
            f"--clients_per_round: {config.clients_per_round} does not split over the {blocks} devices of the "
            "client axis; use a multiple of them or --num_devices"
        )
    sim = dataclasses.replace(build_simulation(config, dataset), mesh=mesh)
    env = sim.make_env(dataset)
    hparams = config.hparams()
    state = sim.init(jax.random.key(config.seed), env, hparams)

    task_names = dataset.task_names
    # Client slots (real + masked padding) and, for imbalanced clients, which
    # client sits in which slot (simulate.make_env) depend on the device
    # count; a checkpoint only fits the same ones, so a change is refused up front.
    slot_ids = [int(i) for i in sim.client_order(dataset)]
    settings = {
        **dataclasses.asdict(config),
        "task_names": task_names,
        "client_slots": len(slot_ids),
        "client_order": None if slot_ids == list(range(len(slot_ids))) else slot_ids,  # None: client order
    }
    is_writer = jax.process_index() == 0
    resuming = workdir_lib.prepare_on_writer(workdir, settings, overwrite)
    if is_writer and not resuming:
        workdir_lib.write_json_atomic(
            os.path.join(workdir, workdir_lib.CONFIG),
            {
                **settings,
                "client_task": [int(k) for k in dataset.client_task],
                "train_sizes": [int(s) for s in dataset.train.size],
                "test_sizes": [int(s) for s in dataset.test.size],
                "version": fgn_jax.__version__,
                "jax_version": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
            },
        )

    def say(msg):
        if log is not None and is_writer:
            print(msg, file=log, flush=True)

    def event(name, done):
        if on_event is not None:
            on_event(name, done)

    say(f"{config.algorithm} on {config.dataset}: {dataset.num_clients} clients, tasks {', '.join(task_names)}")
    say(partition.client_table(dataset))

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS), keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(state, say) if resuming else None
    if restored is not None:
        state, done = restored
        say(f"resuming from the checkpoint at round {done}")
    else:
        done = 0
    rows = workdir_lib.reset_metrics(workdir, done) if is_writer else []
    log_participants = is_writer and config.log_participants and config.clients_per_round > 0
    if log_participants:
        workdir_lib.reset_metrics(workdir, done, workdir_lib.PARTICIPANTS)
    last_checkpoint = done
    checkpoint_s = []
    compile_s = None
    loop_start, loop_start_round = time.time(), done
    with _StopRequest() as stop:
        while done < config.rounds:
            t0 = time.time()
            state, chunk_metrics = sim.run_chunk(state, env, hparams, config.rounds)
            chunk_rows = simulate.metrics_rows(chunk_metrics)
            if compile_s is None:
                compile_s = time.time() - t0
            problem = first_nonfinite(chunk_rows, task_names)
            if problem is not None:
                bad_round, problem = problem
                good = [r for r in chunk_rows if r["round"] < bad_round]
                if is_writer:
                    workdir_lib.append_metrics(workdir, good)
                if log_participants:
                    cohorts = [r for r in simulate.participants_rows(chunk_metrics) if r["round"] < bad_round]
                    workdir_lib.append_metrics(workdir, cohorts, workdir_lib.PARTICIPANTS)
                last_good = max(ckpt.steps(), default=None)
                kept = (
                    "no checkpoint was saved yet"
                    if last_good is None
                    else (f"the last good checkpoint (round {last_good}) is kept in {ckpt.directory}")
                )
                ckpt.close()
                raise Diverged(f"diverged at {problem}; {kept}")
            done = int(state.server.round)
            if done % config.eval_every == 0 or done == config.rounds:
                ev = jax.device_get(sim.evaluate(state, env, hparams))
                chunk_rows[-1].update({k: [float(v) for v in ev[k]] for k in ev})
            if is_writer:
                workdir_lib.append_metrics(workdir, chunk_rows)
            if log_participants:
                workdir_lib.append_metrics(workdir, simulate.participants_rows(chunk_metrics), workdir_lib.PARTICIPANTS)
            rows.extend(chunk_rows)
            event("metrics", done)
            # Chunks end every log_every rounds: checkpoint at the first chunk end past each multiple.
            due = done // config.checkpoint_every > last_checkpoint // config.checkpoint_every
            if due or done == config.rounds or stop.signum is not None:
                last_checkpoint = done
                checkpoint_s.append(ckpt.save(done, state))
                event("checkpoint", done)
            rate = (done - loop_start_round) / max(time.time() - loop_start, 1e-9)
            last = chunk_rows[-1]
            msg = f"round {done}/{config.rounds} ({rate:.2f} rounds/s) loss {_fmt(last['task_loss'])}"
            msg += f" weights {_fmt(last['task_weight'])}"
            if "test_metric" in last:
                msg += f" test metric {_fmt(last['test_metric'])}"
            say(msg)
            if stop.signum is not None and done < config.rounds:
                ckpt.close()
                raise Interrupted(
                    f"stopped by signal {stop.signum} after round {done}; checkpoint saved, "
                    "re-run the same command to resume",
                    stop.signum,
                )
    ckpt.close()

    evals = [r for r in rows if "test_metric" in r]
    summary = {
        "rounds": done,
        "task_names": task_names,
        "final_task_loss": rows[-1]["task_loss"] if rows else None,
        # The weights applied in the last round (every weighting method has them).
        "final_task_weight": rows[-1]["task_weight"] if rows else None,
        **({"final_test_loss": evals[-1]["test_loss"], "final_test_metric": evals[-1]["test_metric"]} if evals else {}),
        "first_task_loss": rows[0]["task_loss"] if rows else None,
        "wall_time_s": time.time() - start,
        "first_chunk_s": compile_s,
        "checkpoint_s": max(checkpoint_s) if checkpoint_s else None,
        "resumed_from_round": restored[1] if restored is not None else None,
    }
    if is_writer:
        workdir_lib.write_json_atomic(os.path.join(workdir, workdir_lib.SUMMARY), summary)
    say(f"done in {summary['wall_time_s']:.1f} s; summary in {os.path.join(workdir, workdir_lib.SUMMARY)}")
    return summary
