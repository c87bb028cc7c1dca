"""Runs a grid of seeds and float hyperparameters as one compiled program.

    python -m experiments.sweep --workdir=/tmp/fgn_sweep --dataset=synthetic_radcom \\
        --seeds=0,1,2 --alphas=0.5,1.0,1.5 --weight_lrs=0.01,0.05

Every train flag (python -m experiments.train --helpfull) sets the values
shared by the grid; the list flags below override --seed, --alpha,
--weight_lr, --client_lr and --server_lr. Writes one directory per
configuration (config.json, metrics.jsonl), results.csv/json (final metrics)
and sweep.png (loss and task-weight curves, mean and spread over seeds); see
fgn_jax/sweep.py. Re-running the same command on the same --workdir resumes
from the latest checkpoint (--checkpoint_every); a different sweep there is
refused unless --overwrite. Invalid flags print one line and exit with code 2;
a NaN/Inf with --on_divergence=stop exits with code 3 (--on_divergence=mask
freezes the diverged configurations instead and records them in results.csv).
"""

import sys

from absl import app, flags

from experiments import cli
from fgn_jax import sweep, training

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; re-running on it resumes the sweep.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a different sweep in --workdir.")
_ON_DIVERGENCE = flags.DEFINE_enum(
    "on_divergence",
    "stop",
    sweep.ON_DIVERGENCE,
    "A NaN/Inf in a configuration: stop the sweep (exit code 3), or mask the configuration (frozen at its last "
    "good state, recorded in results.csv) and go on.",
)
_LISTS = {
    "seed": flags.DEFINE_list("seeds", [], "Seeds (comma-separated); default: --seed."),
    "alpha": flags.DEFINE_list("alphas", [], "GradNorm alphas; default: --alpha."),
    "weight_lr": flags.DEFINE_list("weight_lrs", [], "Task-weight learning rates; default: --weight_lr."),
    "client_lr": flags.DEFINE_list("client_lrs", [], "Client learning rates; default: --client_lr."),
    "server_lr": flags.DEFINE_list("server_lrs", [], "Server learning rates; default: --server_lr."),
}
_SWEEP_DEVICES = flags.DEFINE_integer(
    "sweep_devices", 1, "Devices along the configuration axis; the client axis gets the rest of --num_devices."
)
_FLAGS = cli.define_config_flags()
_DISTRIBUTED = cli.define_distributed_flags()
_CACHE = cli.define_compilation_cache_flag()


def _values() -> dict[str, list]:
    values = {}
    for field, holder in _LISTS.items():
        parse = int if field == "seed" else float
        try:
            values[field] = [parse(v) for v in holder.value]
        except ValueError as e:
            raise training.ConfigError(f"--{holder.name}: {e}") from None
    return values


def main(argv):
    if len(argv) > 1:
        sys.exit(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.maybe_initialize_distributed(_DISTRIBUTED)  # before anything touches the devices
    cli.enable_compilation_cache(_CACHE.value)
    cli.run_or_exit(
        lambda: sweep.run_sweep(
            cli.config_from_flags(_FLAGS),
            _values(),
            _WORKDIR.value,
            _SWEEP_DEVICES.value,
            on_divergence=_ON_DIVERGENCE.value,
            overwrite=_OVERWRITE.value,
        )
    )


if __name__ == "__main__":
    app.run(main)
