"""Train-and-evaluate loop behind ``experiments/train.py``.

The entry point parses flags into an :class:`ExperimentConfig` and calls
:func:`train_and_evaluate`, which writes to the work directory:

* ``config.json``: every setting, the task names in order, the package version;
* ``metrics.jsonl``: one JSON object per round: ``round``, and per task (lists
  in task order) ``task_loss`` (L_k(t) measured in step 3 of the round),
  ``grad_norm`` (g_k, unweighted) and ``task_weight`` (the coefficient of each
  task's aggregated update in that round, set by the ``--weighting`` method),
  ``task_loss_min`` / ``task_loss_max`` (the lowest and highest loss over the
  task's clients that reported), ``participation``, ``channel_gain`` and
  ``participants``; rounds at the evaluation interval also carry
  ``test_loss``, ``test_metric`` and ``test_metric_min`` / ``test_metric_max``
  (held-out, after the round; means and range over each task's clients);
* ``participants.jsonl`` (``--log_participants``, with ``--clients_per_round``):
  per round the cohort's client ids (``sampled``) and those that reported;
* ``summary.json``: the final metrics, each task's ``constant_baseline``
  (:func:`fgn_jax.baselines.constant_baseline`) and the wall time;
* ``curves.png`` and ``tensorboard/`` (:mod:`fgn_jax.curves`).

Round numbering: a row's ``round`` is the 0-based index of the round; the
progress lines count rounds done (``round 20/150`` follows the row of round
19). Everything the flags alone decide (the settings, the batch size against
the planned client sizes, the work directory) is checked before any data is
generated or anything is compiled; a finished run re-invoked returns its
summary at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, NamedTuple, TextIO

import jax
import numpy as np

import fgn_jax
from fgn_jax import aggregation as aggregation_lib
from fgn_jax import (
    algorithms,
    baselines,
    channel,
    checkpoint,
    curves,
    models,
    optimizers,
    sampling,
    sharding,
    simulate,
    weightings,
)
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
    # 1000: the held-out accuracy of a task's client then has a standard error of about 0.01 (at 200
    # it was 0.02-0.03, as large as the margins benchmarks/README.md "Defaults that learn" checks).
    test_examples_per_client: int = 1000
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
    # Task weighting ("": the algorithm's own, fedgradnorm -> gradnorm, fedrep -> equal); fgn_jax/weightings.
    weighting: str = ""
    dwa_temperature: float = 2.0  # --weighting=dwa: softmax temperature
    cagrad_c: float = 0.5  # --weighting=cagrad: radius of the ball around the mean update (times its norm)
    uncertainty_lr: float = 0.05  # --weighting=uncertainty: gradient step of the log-variances
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
    # Over-the-air aggregation (docs/hota.md): ideal (noiseless mean), ota (clients -> PS over a fading
    # channel) or hota (clients -> intermediate server of their cluster for E rounds -> multi-antenna PS).
    aggregation: str = "ideal"
    num_clusters: int = 2  # hota: clusters (clients split evenly; with --num_clients=0, num_clusters x tasks clients)
    cluster_rounds: int = 2  # hota: E intra-cluster rounds per global round
    fading: str = "rayleigh"  # none | rayleigh | rician
    rician_k: float = 3.0  # Rician K factor (linear)
    power_control: str = "tci"  # tci (truncated channel inversion) | phase (phase-only correction)
    truncation_q: float = 0.8  # tci: non-truncation probability q in (0, 1]
    snr_db: float = 10.0  # client -> receiver SNR per entry (dB; inf: no noise)
    ps_snr_db: float = 20.0  # hota: IS -> PS SNR per entry (dB; inf: no noise)
    ps_antennas: int = 16  # hota: M antennas at the PS
    path_loss_exponent: float = 2.0  # beta = distance^(-exponent)
    distance_range: str = "1,1"  # client distances drawn uniformly in [lo, hi] from --data_seed
    client_distances: str = ""  # explicit per-client distances, e.g. "1,1,3" (overrides --distance_range)
    channel_aware: bool = True  # ota/hota: GradNorm sees the channel gain (False: channel-unaware GradNorm)
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
        if self.weighting and self.weighting not in weightings.WEIGHTINGS:
            bad(
                "weighting",
                f"unknown weighting {self.weighting!r}; choose one of {', '.join(weightings.WEIGHTINGS)} "
                "(empty: the algorithm's own)",
            )
        if not self.dwa_temperature > 0:
            bad("dwa_temperature", f"must be > 0, got {self.dwa_temperature}")
        if not self.cagrad_c >= 0:
            bad("cagrad_c", f"must be >= 0, got {self.cagrad_c}")
        if not self.uncertainty_lr >= 0:
            bad("uncertainty_lr", f"must be >= 0, got {self.uncertainty_lr}")
        # Gram methods need each task's update at the server; over-the-air aggregation (a field
        # another change adds) sums the clients' signals in the channel and never delivers them.
        aggregation = getattr(self, "aggregation", "ideal")
        if self.weighting_name in weightings.NEEDS_TASK_UPDATES and aggregation != "ideal":
            bad(
                "weighting",
                f"{self.weighting_name!r} needs the per-task updates at the server, which over-the-air "
                f"aggregation (--aggregation={aggregation}) does not deliver; use --aggregation=ideal",
            )
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
        if self.algorithm in algorithms.REFERENCES and self.aggregation != "ideal":
            bad("aggregation", f"--algorithm={self.algorithm} aggregates nothing; use --aggregation=ideal")
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
            if self.aggregation == "hota":
                bad(
                    "clients_per_round",
                    "--aggregation=hota trains whole clusters; partial participation is not built for it",
                )
        self._validate_channel(bad)

    def _validate_channel(self, bad) -> None:
        if self.aggregation not in aggregation_lib.AGGREGATIONS:
            bad("aggregation", f"choose one of {', '.join(aggregation_lib.AGGREGATIONS)}, got {self.aggregation!r}")
        if self.fading not in channel.FADINGS:
            bad("fading", f"choose one of {', '.join(channel.FADINGS)}, got {self.fading!r}")
        if self.power_control not in channel.POWER_CONTROLS:
            bad("power_control", f"choose one of {', '.join(channel.POWER_CONTROLS)}, got {self.power_control!r}")
        for flag in ("snr_db", "ps_snr_db"):
            if not -math.inf < getattr(self, flag) <= math.inf:
                bad(flag, f"must be a number of dB or inf, got {getattr(self, flag)}")
        if not 0 < self.truncation_q <= 1:
            bad("truncation_q", f"must be in (0, 1], got {self.truncation_q}")
        if not 0 <= self.rician_k < math.inf:
            bad("rician_k", f"must be >= 0, got {self.rician_k}")
        if not 0 <= self.path_loss_exponent < math.inf:
            bad("path_loss_exponent", f"must be >= 0, got {self.path_loss_exponent}")
        for flag in ("num_clusters", "cluster_rounds", "ps_antennas"):
            if getattr(self, flag) < 1:
                bad(flag, f"must be at least 1, got {getattr(self, flag)}")
        parse_distance_range(self.distance_range)
        if self.aggregation == "ideal":
            return
        if self.client_execution != "vmap":
            bad("client_execution", f"--aggregation={self.aggregation} needs --client_execution=vmap")
        num_clients = len(client_task_map(self))
        if self.aggregation == "hota" and (self.num_clusters > num_clients or num_clients % self.num_clusters):
            bad("num_clusters", f"{num_clients} clients do not split evenly over {self.num_clusters} clusters")
        client_distances(self, num_clients)

    def channel_config(self) -> channel.ChannelConfig:
        """The static channel settings of ``--aggregation`` (one cluster, one round unless hota)."""
        hierarchical = self.aggregation == "hota"
        return channel.ChannelConfig(
            fading=self.fading,
            power_control=self.power_control,
            ps_antennas=self.ps_antennas,
            num_clusters=self.num_clusters if hierarchical else 1,
            cluster_rounds=self.cluster_rounds if hierarchical else 1,
            path_loss_exponent=self.path_loss_exponent,
            channel_aware=self.channel_aware,
        )

    @property
    def weighting_name(self) -> str:
        """The weighting this run uses (``--weighting``, or the algorithm's own)."""
        return self.weighting or algorithms.WEIGHTING_OF_ALGORITHM.get(self.algorithm, "")

    def hparams(self) -> algorithms.HParams:
        return algorithms.HParams.create(
            self.client_lr,
            self.server_lr,
            self.alpha,
            self.weight_lr,
            dwa_temperature=self.dwa_temperature,
            cagrad_c=self.cagrad_c,
            uncertainty_lr=self.uncertainty_lr,
            snr_db=self.snr_db,
            ps_snr_db=self.ps_snr_db,
            truncation_q=self.truncation_q,
            rician_k=self.rician_k,
        )


def parse_distance_range(spec: str) -> tuple[float, float]:
    """``"lo,hi"`` -> ``(lo, hi)`` with ``0 < lo <= hi``; ConfigError naming --distance_range otherwise."""
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"--distance_range: expected 'lo,hi', got {spec!r}") from None
    if not 0 < lo <= hi < math.inf:
        raise ConfigError(f"--distance_range: need 0 < lo <= hi, got {spec!r}")
    return lo, hi


def client_distances(config: ExperimentConfig, num_clients: int) -> np.ndarray:
    """``[C]`` distance of each client to its receiver: ``--client_distances``, or uniform in ``--distance_range``.

    Drawn host-side from ``--data_seed`` (a stream of its own), so they are
    data: the same for every seed of a sweep and on every process.
    """
    if config.client_distances:
        try:
            d = np.asarray([float(v) for v in config.client_distances.split(",")], np.float32)
        except ValueError as e:
            raise ConfigError(f"--client_distances: {e}") from None
        if len(d) != num_clients:
            raise ConfigError(f"--client_distances: {len(d)} distances for {num_clients} clients")
        if not np.all((d > 0) & np.isfinite(d)):
            raise ConfigError(f"--client_distances: distances must be finite and > 0, got {config.client_distances}")
        return d
    lo, hi = parse_distance_range(config.distance_range)
    rng = np.random.default_rng([config.data_seed, 0xD157])
    return rng.uniform(lo, hi, num_clients).astype(np.float32)


# Examples per vmapped group of clients with --client_batch=0: the group's
# activations then fit the CPU caches far better than all clients at once
# (1.7x faster rounds for the MTFL trunk, 32 clients x batch 64, on a 2-core
# CPU; benchmarks/README.md).
GROUP_EXAMPLES = 256


class FlagDoc(NamedTuple):
    """The command-line help of one :class:`ExperimentConfig` field (experiments/cli.py reads it).

    Attributes:
      group: one of :data:`FLAG_GROUPS`, the heading ``--help`` lists the flag under.
      help: one line: meaning, unit, allowed values.
      choices: the allowed strings of a choice flag (it becomes an enum flag), or None.
    """

    group: str
    help: str
    choices: tuple[str, ...] | None = None


FLAG_GROUPS = ("data", "model and algorithm", "federation", "output", "performance")

# One line per ExperimentConfig field. A field missing here still gets a flag
# (with a generic help, under "other"); add its line when adding the field.
FLAG_DOCS = {
    # data
    "dataset": FlagDoc(
        "data", "Data: synthetic_* are generated in memory; mtfl and radcom_dynamic read --data_dir.", DATASETS
    ),
    "data_dir": FlagDoc(
        "data", "Real datasets: the folder with MTFL.zip or RadComDynamic.hdf5 (README: real datasets)."
    ),
    "build_dir": FlagDoc(
        "data", "Real datasets: where the TFDS build goes (empty: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
    ),
    "anomaly_snr_db": FlagDoc("data", "RadCom: the derived anomaly task's positive class is SNR >= this, in dB."),
    "examples_per_client": FlagDoc(
        "data", "Training examples per client (the mean over clients under --imbalance); real data caps the total."
    ),
    "test_examples_per_client": FlagDoc("data", "Held-out examples per client, for test_loss / test_metric."),
    "imbalance": FlagDoc("data", "Power-law exponent of the clients' train sizes, >= 0 (0: equal sizes)."),
    "client_sizes": FlagDoc("data", "Explicit train sizes, one per client, e.g. 500,200,100 (overrides --imbalance)."),
    "dirichlet_beta": FlagDoc(
        "data", "Label skew of classification clients: Dirichlet(beta) class mixes, > 0 (0: IID)."
    ),
    "overlap": FlagDoc(
        "data",
        "none: every client holds different examples; across_tasks: clients of different tasks may share.",
        partition.OVERLAPS,
    ),
    "data_seed": FlagDoc("data", "Seed of data generation and partitioning (independent of --seed)."),
    # model and algorithm
    "algorithm": FlagDoc(
        "model and algorithm",
        "fedgradnorm: GradNorm task weights; fedrep: equal weights; local / centralized: reference points.",
        algorithms.ALGORITHMS,
    ),
    "tau_head": FlagDoc("model and algorithm", "Head optimiser steps per client per round (>= 1)."),
    "tau_shared": FlagDoc("model and algorithm", "Shared-trunk optimiser steps per client per round (>= 1)."),
    "batch_size": FlagDoc(
        "model and algorithm", "Examples per minibatch step, drawn with replacement; at most the largest client's data."
    ),
    "client_optimizer": FlagDoc("model and algorithm", "Client optimiser (heads and trunk).", optimizers.OPTIMIZERS),
    "client_lr": FlagDoc("model and algorithm", "Client learning rate, > 0."),
    "server_optimizer": FlagDoc(
        "model and algorithm", "Server optimiser applied to the aggregated update.", optimizers.OPTIMIZERS
    ),
    "server_lr": FlagDoc("model and algorithm", "Server learning rate, > 0 (1 with sgd: theta += aggregated update)."),
    "alpha": FlagDoc("model and algorithm", "GradNorm asymmetry alpha >= 0 (larger: pull slow tasks harder)."),
    "weight_lr": FlagDoc("model and algorithm", "Learning rate of the task weights (GradNorm gradient step), >= 0."),
    "weight_eps": FlagDoc("model and algorithm", "Floor of each task weight before renormalising to sum T, in (0, 1)."),
    "seed": FlagDoc("model and algorithm", "Seed of initialisation and minibatch sampling."),
    "standardize_targets": FlagDoc(
        "model and algorithm", "Regression clients predict targets standardised by their own train mean/std."
    ),
    "weighting": FlagDoc(
        "model and algorithm",
        f"Task weighting: {', '.join(weightings.WEIGHTINGS)} (empty: the algorithm's own; README: task weightings).",
    ),
    "dwa_temperature": FlagDoc("model and algorithm", "DWA softmax temperature, > 0."),
    "cagrad_c": FlagDoc("model and algorithm", "CAGrad ball radius c, >= 0."),
    "uncertainty_lr": FlagDoc("model and algorithm", "Uncertainty weighting: step size of the log-variances, >= 0."),
    # federation
    "rounds": FlagDoc("federation", "Communication rounds to run; a larger value on a finished --workdir extends it."),
    "num_clients": FlagDoc("federation", "Clients, tasks assigned round-robin (0: one client per task)."),
    "client_tasks": FlagDoc("federation", "Explicit client->task indices, e.g. 0,1,2,2 (overrides --num_clients)."),
    "aggregation": FlagDoc(
        "federation",
        "ideal: noiseless mean; ota: clients -> PS over the air; hota: clients -> IS -> PS (docs/hota.md).",
        tuple(aggregation_lib.AGGREGATIONS),
    ),
    "num_clusters": FlagDoc("federation", "hota: clusters (intermediate servers); clients split evenly over them."),
    "cluster_rounds": FlagDoc("federation", "hota: intra-cluster rounds E per global round, >= 1."),
    "fading": FlagDoc("federation", "ota/hota: small-scale fading of the client uplink.", channel.FADINGS),
    "rician_k": FlagDoc("federation", "Rician K factor (linear, >= 0) for --fading=rician."),
    "power_control": FlagDoc(
        "federation", "ota/hota: tci (truncated channel inversion) or phase (phase-only).", channel.POWER_CONTROLS
    ),
    "truncation_q": FlagDoc("federation", "tci: non-truncation probability q in (0, 1]."),
    "snr_db": FlagDoc("federation", "Client -> receiver SNR per entry, in dB ('inf': noiseless)."),
    "ps_snr_db": FlagDoc("federation", "hota: IS -> PS SNR per entry, in dB ('inf': noiseless)."),
    "ps_antennas": FlagDoc("federation", "hota: PS receive antennas M (blind combining), >= 1."),
    "path_loss_exponent": FlagDoc("federation", "Path loss beta = distance^-exponent (0: no path loss)."),
    "distance_range": FlagDoc("federation", "Client distances drawn uniformly in lo,hi from --data_seed."),
    "client_distances": FlagDoc(
        "federation", "Explicit per-client distances, e.g. 1,1,3 (overrides --distance_range)."
    ),
    "clients_per_round": FlagDoc("federation", "Partial participation: clients sampled per round K (0: all)."),
    "client_sampling": FlagDoc(
        "federation",
        "uniform, or stratified (each task a share of the cohort proportional to its clients).",
        sampling.SAMPLINGS,
    ),
    "dropout_prob": FlagDoc("federation", "Probability in [0, 1) that a sampled client fails to report."),
    "log_participants": FlagDoc(
        "output", "With --clients_per_round: write the cohort of every round to participants.jsonl."
    ),
    "channel_aware": FlagDoc("federation", "ota/hota: GradNorm sees the channel gain (false: channel-unaware)."),
    # output
    "log_every": FlagDoc("output", "Rounds per progress line and per metrics.jsonl write (one compiled chunk)."),
    "eval_every": FlagDoc("output", "Rounds between held-out evaluations; a multiple of --log_every."),
    "checkpoint_every": FlagDoc("output", "Rounds between checkpoints (at the first chunk end past each multiple)."),
    "keep_checkpoints": FlagDoc("output", "Checkpoints kept on disk (the newest ones), >= 1."),
    # performance
    "client_execution": FlagDoc(
        "performance",
        "vmap: all clients in one vectorised program; loop: one client at a time.",
        simulate.CLIENT_EXECUTIONS,
    ),
    "client_batch": FlagDoc(
        "performance", f"Clients vmapped at once per device (0: automatic, about {GROUP_EXAMPLES} examples a group)."
    ),
    "conv_impl": FlagDoc("performance", "Convolution: auto (fastest on CPU), im2col or lax.", models.CONV_IMPLS),
    "num_devices": FlagDoc("performance", "Devices the client axis is sharded over (0: all, over all processes)."),
}


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
        # hota by default: every cluster hosts every task, client (c, i) of cluster c has task i.
        default = len(names) * (config.num_clusters if config.aggregation == "hota" else 1)
        return partition.round_robin_tasks(config.num_clients or default, len(names))
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
    dataset = partition.partition(
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
    return dataclasses.replace(dataset, client_distance=client_distances(config, c))


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
        weighting=config.weighting,
        aggregation=config.aggregation,
        channel=config.channel_config(),
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


def auto_client_batch(batch_size: int) -> int:
    """Clients per vmapped group for ``--client_batch=0``: about :data:`GROUP_EXAMPLES` examples."""
    return max(1, GROUP_EXAMPLES // batch_size)


def planned_train_sizes(config: ExperimentConfig) -> np.ndarray:
    """The clients' train sizes the flags ask for, before any data exists (real data may cap them lower)."""
    c = len(client_task_map(config))
    if config.client_sizes:
        try:
            return partition.parse_sizes(config.client_sizes, c)
        except ValueError as e:
            raise ConfigError(f"--client_sizes: {e}") from None
    try:
        return partition.power_law_sizes(config.examples_per_client * c, c, config.imbalance)
    except ValueError as e:
        raise ConfigError(f"--imbalance: {e}") from None


def check_batch_size(config: ExperimentConfig, train_sizes: np.ndarray) -> str | None:
    """Refuses a batch larger than every client's data; warns when larger than some.

    Minibatches are drawn with replacement inside a client's own examples
    (algorithms.sample_batch), so a batch larger than a small client's data
    is valid (it repeats examples) and is kept as asked: clamping it would
    change every other client's batch too. A batch larger than *every*
    client's data can only be a mistake (and costs time for nothing).

    Returns:
      A warning line if some clients hold fewer examples than a batch, else None.

    Raises:
      ConfigError: ``--batch_size`` exceeds the largest client's train data.
    """
    largest, smallest = int(np.max(train_sizes)), int(np.min(train_sizes))
    if config.batch_size > largest:
        raise ConfigError(
            f"--batch_size: {config.batch_size} is larger than every client's training data "
            f"(the largest client has {largest} examples); use at most {largest}"
        )
    if config.batch_size > smallest:
        few = int(np.sum(np.asarray(train_sizes) < config.batch_size))
        return (
            f"warning: --batch_size={config.batch_size} is larger than the training data of {few} client(s) "
            f"(smallest: {smallest} examples); their minibatches repeat examples (drawn with replacement)"
        )
    return None


def metric_symbols(dataset: pool_lib.FederatedDataset) -> list[str]:
    """Per task, its held-out metric with its direction, e.g. ``"acc↑"`` or ``"NME↓"``."""
    return [baselines.SYMBOL.get(t.metric, t.metric) for t in dataset.tasks]


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``2 h 10 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_line(done: int, rounds: int, row: dict, task_names, symbols, rate: float | None = None) -> str:
    """``round 20/150 | 3.1 rounds/s, ETA 42 s | landmarks loss 0.52 w 1.20 NME↓ 0.108 | gender ...``.

    ``done`` counts rounds done; ``row`` is the metrics.jsonl row of the last
    of them (its ``round`` is ``done - 1``). Per task: training loss, task
    weight and, on evaluation rounds, the held-out metric with its direction.
    """
    head = f"round {done}/{rounds}"
    if rate is not None and rate > 0:
        head += f" | {rate:.2f} rounds/s, ETA {format_duration((rounds - done) / rate)}"
    parts = [head]
    for k, name in enumerate(task_names):
        part = f"{name} loss {row['task_loss'][k]:.3f} w {row['task_weight'][k]:.2f}"
        if "test_metric" in row:
            part += f" {symbols[k]} {row['test_metric'][k]:.3f}"
        parts.append(part)
    return " | ".join(parts)


def final_line(summary: dict, symbols) -> str:
    """Each task's final held-out metric beside the constant predictor's (:mod:`fgn_jax.baselines`)."""
    parts = []
    for k, name in enumerate(summary["task_names"]):
        base = summary["constant_baseline"][k]
        part = f"{name} {symbols[k]} {summary['final_test_metric'][k]:.3f}"
        parts.append(part + ("" if math.isnan(base) else f" (constant {base:.3f})"))
    return "held-out after the last round (constant predictor in brackets): " + " | ".join(parts)


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
    refused unless ``overwrite``. A run that already holds ``config.rounds``
    rounds (its summary.json says so) is not run again: its summary is
    returned; a larger ``rounds`` extends it (config.json is rewritten).

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
    is_writer = jax.process_index() == 0

    def say(msg):
        if log is not None and is_writer:
            print(msg, file=log, flush=True)

    def event(name, done):
        if on_event is not None:
            on_event(name, done)

    # Everything the flags alone decide is checked before any data exists or anything compiles.
    check_batch_size(config, planned_train_sizes(config))
    resuming = workdir_lib.prepare_on_writer(workdir, dataclasses.asdict(config), overwrite)
    if resuming:
        finished = workdir_lib.finished_on_writer(workdir, config.rounds)
        if finished is not None:
            say(
                f"{workdir} already holds this run, finished after {finished.get('rounds')} rounds "
                f"(summary.json); nothing to do (a larger --rounds extends it)"
            )
            return finished

    dataset = build_dataset(config)
    warning = check_batch_size(config, dataset.train.size)  # the sizes real data allowed
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
    task_names = dataset.task_names
    symbols = metric_symbols(dataset)
    # Client slots (real + masked padding) and, for imbalanced clients, which
    # client sits in which slot (simulate.make_env) depend on the device
    # count; a checkpoint only fits the same ones, so a change is refused up front.
    slot_ids = [int(i) for i in sim.client_order(dataset)]
    layout = {
        "task_names": task_names,
        "client_slots": len(slot_ids),
        "client_order": None if slot_ids == list(range(len(slot_ids))) else slot_ids,  # None: client order
    }
    if resuming:
        workdir_lib.check_layout_on_writer(workdir, layout)
    if is_writer:  # rewritten on resume too: config.json describes the run as it is now (e.g. --rounds)
        workdir_lib.write_json_atomic(
            os.path.join(workdir, workdir_lib.CONFIG),
            {
                **dataclasses.asdict(config),
                **layout,
                "task_metrics": symbols,
                "client_task": [int(k) for k in dataset.client_task],
                "train_sizes": [int(s) for s in dataset.train.size],
                "test_sizes": [int(s) for s in dataset.test.size],
                "train_labels": _histograms(dataset.train, dataset),
                "test_labels": _histograms(dataset.test, dataset),
                "version": fgn_jax.__version__,
                "jax_version": jax.__version__,
                "devices": [str(d) for d in jax.devices()],
            },
        )

    method = f" (weighting {config.weighting})" if config.weighting else ""
    say(f"{config.algorithm}{method} on {config.dataset}: {dataset.num_clients} clients, tasks {', '.join(task_names)}")
    say(partition.client_table(dataset))
    if warning:
        say(warning)
    env = sim.make_env(dataset)
    hparams = config.hparams()
    say(f"compiling (the first {config.log_every} rounds include it) ...")
    state = sim.init(jax.random.key(config.seed), env, hparams)

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS), keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(state, say) if resuming else None
    if restored is not None:
        state, done = restored
        say(f"resuming from the checkpoint at round {done}")
    else:
        done = 0
    rows = workdir_lib.reset_metrics(workdir, done) if is_writer else []
    board = (
        curves.TensorBoard(os.path.join(workdir, workdir_lib.TENSORBOARD), task_names, purge_step=done or None)
        if is_writer
        else None
    )
    log_participants = is_writer and config.log_participants and config.clients_per_round > 0
    if log_participants:
        workdir_lib.reset_metrics(workdir, done, workdir_lib.PARTICIPANTS)
    last_checkpoint = done
    checkpoint_s = []
    compile_s = None
    # Rounds per second exclude the first chunk (it includes compilation).
    rate_start = rate_start_round = None
    with _StopRequest() as stop, contextlib.ExitStack() as closing:
        if board is not None:
            closing.callback(board.close)
        while done < config.rounds:
            t0 = time.time()
            state, chunk_metrics = sim.run_chunk(state, env, hparams, config.rounds)
            chunk_rows = simulate.metrics_rows(chunk_metrics)
            first_chunk = compile_s is None
            if first_chunk:
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
            previous, done = done, int(state.server.round)
            if done % config.eval_every == 0 or done == config.rounds:
                ev = jax.device_get(sim.evaluate(state, env, hparams))
                chunk_rows[-1].update({k: [float(v) for v in ev[k]] for k in ev})
            if first_chunk:
                say(f"first {done - previous} rounds done in {time.time() - t0:.1f} s (compilation included)")
            if is_writer:
                workdir_lib.append_metrics(workdir, chunk_rows)
                board.write(chunk_rows)
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
            rate = None
            if rate_start is None:
                rate_start, rate_start_round = time.time(), done
            elif done > rate_start_round:
                rate = (done - rate_start_round) / max(time.time() - rate_start, 1e-9)
            line = progress_line(done, config.rounds, chunk_rows[-1], task_names, symbols, rate)
            if config.aggregation != "ideal":
                line += " | participation " + " ".join(f"{v:.2f}" for v in chunk_rows[-1]["participation"])
            say(line)
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
        "task_metrics": symbols,
        "final_task_loss": rows[-1]["task_loss"] if rows else None,
        # The weights applied in the last round (every weighting method has them).
        "final_task_weight": rows[-1]["task_weight"] if rows else None,
        **({"final_test_loss": evals[-1]["test_loss"], "final_test_metric": evals[-1]["test_metric"]} if evals else {}),
        # The held-out metric of the best input-independent predictor, per task (fgn_jax.baselines).
        "constant_baseline": baselines.constant_baseline(dataset),
        "first_task_loss": rows[0]["task_loss"] if rows else None,
        # Per task, means over the rounds (1 under ideal aggregation).
        "mean_participation": np.mean([r["participation"] for r in rows], axis=0).tolist() if rows else None,
        "mean_channel_gain": np.mean([r["channel_gain"] for r in rows], axis=0).tolist() if rows else None,
        "wall_time_s": time.time() - start,
        "first_chunk_s": compile_s,
        "checkpoint_s": max(checkpoint_s) if checkpoint_s else None,
        "resumed_from_round": restored[1] if restored is not None else None,
    }
    if is_writer:
        workdir_lib.write_json_atomic(os.path.join(workdir, workdir_lib.SUMMARY), summary)
        if rows:
            run = curves.Run(config.algorithm, task_names, symbols, rows)
            curves.plot([run], os.path.join(workdir, workdir_lib.CURVES), f"{config.algorithm} on {config.dataset}")
    if evals:
        say(final_line(summary, symbols))
    say(f"done in {summary['wall_time_s']:.1f} s; summary, curves.png and tensorboard/ in {workdir}")
    return summary


def _histograms(split: pool_lib.Split, dataset: pool_lib.FederatedDataset) -> list[list[int] | None]:
    # Per client, the label counts of its task (None for regression): the full client table for config.json.
    hists = partition.label_histograms(split, dataset.tasks, dataset.client_task)
    return [None if h is None else [int(v) for v in h] for h in hists]
