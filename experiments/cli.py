"""absl flags shared by the entry points (train, sweep).

* one flag per :class:`fgn_jax.training.ExperimentConfig` field, with the
  field's default (so a new config field is a new flag everywhere);
* the multi-host flags that join a ``jax.distributed`` run
  (docs/scaling.md);
* ``--compilation_cache_dir``: JAX's persistent compilation cache, on by
  default, so a second run of the same program loads its compiled chunks
  instead of compiling them again.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, NamedTuple

from absl import flags
import jax

from fgn_jax import sharding, training


def define_config_flags() -> dict[str, flags.FlagHolder]:
    """Defines a flag per ExperimentConfig field; returns the holders by name."""
    defaults = training.ExperimentConfig()
    holders = {}
    for field in dataclasses.fields(training.ExperimentConfig):
        default = getattr(defaults, field.name)
        define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
            type(default), flags.DEFINE_string
        )
        holders[field.name] = define(field.name, default, f"See fgn_jax.training.ExperimentConfig.{field.name}.")
    return holders


def run_or_exit(run: Callable[[], object]) -> None:
    """Runs an entry point's work; known failures print one line and exit.

    Exit codes: 2 for bad flags or inputs (``training.USER_ERRORS``), 3 for a
    divergence, 128 + N when stopped by signal N (after checkpointing).
    """
    try:
        run()
    except training.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except training.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except training.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)


def config_from_flags(holders: dict[str, flags.FlagHolder]) -> training.ExperimentConfig:
    return training.ExperimentConfig(**{name: holder.value for name, holder in holders.items()})


class DistributedFlags(NamedTuple):
    distributed: flags.FlagHolder
    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    local_device_ids: flags.FlagHolder


def define_distributed_flags() -> DistributedFlags:
    return DistributedFlags(
        distributed=flags.DEFINE_bool(
            "distributed",
            False,
            "Join a multi-process run, detecting the cluster (SLURM, Open MPI, TPU pod) when "
            "--coordinator_address is not given. Only process 0 writes files.",
        ),
        coordinator_address=flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0 in a multi-process run (implies --distributed)."
        ),
        num_processes=flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run."),
        process_id=flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes)."),
        local_device_ids=flags.DEFINE_list(
            "local_device_ids",
            [],
            "Local GPUs this process drives, e.g. 0,1,2,3 (default: JAX's choice; under SLURM that is one GPU "
            "per process, so one process per host needs them all).",
        ),
    )


def maybe_initialize_distributed(holders: DistributedFlags) -> None:
    """Calls :func:`fgn_jax.sharding.initialize_distributed` if the flags ask for it."""
    if holders.distributed.value or holders.coordinator_address.value:
        sharding.initialize_distributed(
            holders.coordinator_address.value,
            holders.num_processes.value,
            holders.process_id.value,
            [int(i) for i in holders.local_device_ids.value],
        )


# Outside any workdir: compiled programs are shared by every run of this user.
# The environment variable overrides the default (the tests set it to "" so
# that they never write into the user's cache).
DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "fgn_jax", "jax_cache")
COMPILATION_CACHE_ENV = "FGN_JAX_COMPILATION_CACHE_DIR"


def define_compilation_cache_flag() -> flags.FlagHolder:
    default = os.environ.get(COMPILATION_CACHE_ENV, DEFAULT_COMPILATION_CACHE_DIR)
    return flags.DEFINE_string(
        "compilation_cache_dir",
        default,
        f"JAX's persistent compilation cache (empty: off; default from ${COMPILATION_CACHE_ENV} if set).",
    )


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` (``~`` expanded); ``""`` leaves it off.

    Every program is cached, however small or quick to compile: the round
    chunk is the largest, but a run compiles dozens of small ones (init,
    evaluation, checkpoint helpers) whose compile times add up.
    """
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
