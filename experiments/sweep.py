"""Runs a grid of seeds and float hyperparameters as one compiled program.

    python -m experiments.sweep --workdir=/tmp/fgn_sweep --dataset=synthetic_radcom \\
        --seeds=0,1,2 --alphas=0.5,1.0,1.5 --weight_lrs=0.01,0.05

Every train flag (python -m experiments.train --help) sets the values
shared by the grid; the list flags below override --seed, --alpha,
--weight_lr, --client_lr, --server_lr, --dwa_temperature, --cagrad_c,
--uncertainty_lr and, for --aggregation=ota|hota, the channel's --snr_db,
--ps_snr_db and --truncation_q (e.g. --snr_dbs=-10,0,10,20,inf runs the
whole SNR curve as one program). Writes one directory per
configuration (named by its swept values, e.g. alpha0.5_seed0: config.json,
metrics.jsonl), results.csv/json (final metrics; the name -> values mapping)
and sweep.png (loss and task-weight curves, mean and spread over seeds); see
fgn_jax/sweep.py. Re-running the same command on the same --workdir resumes
from the latest checkpoint (--checkpoint_every); a different sweep there is
refused unless --overwrite. Invalid flags print one line and exit with code 2;
a NaN/Inf with --on_divergence=stop exits with code 3 (--on_divergence=mask
freezes the diverged configurations instead and records them in results.csv).

Several task weightings in one invocation, one compiled sweep per method in
--workdir/<method>, with combined results.csv/json and weightings.png:

    python -m experiments.sweep --workdir=/tmp/fgn_methods --weightings=equal,gradnorm,dwa --seeds=0,1,2
"""

from absl import app, flags

from experiments import cli
from fgn_jax import sweep, training

_WORKDIR = cli.define_workdir("Output directory; re-running on it resumes the sweep.")
_OVERWRITE = cli.grouped("output", flags.DEFINE_bool("overwrite", False, "Replace a different sweep in --workdir."))
_ON_DIVERGENCE = cli.grouped(
    "sweep",
    flags.DEFINE_enum(
        "on_divergence",
        "stop",
        sweep.ON_DIVERGENCE,
        "A NaN/Inf in a configuration: stop the sweep (exit code 3), or mask the configuration (frozen at its last "
        "good state, recorded in results.csv) and go on.",
    ),
)
_LISTS = {
    field: cli.grouped(
        "sweep", flags.DEFINE_list(name, [], f"Comma-separated values of --{field} (default: --{field}).")
    )
    for field, name in sweep.LIST_FLAGS.items()
}
_WEIGHTINGS = cli.grouped(
    "sweep",
    flags.DEFINE_list(
        "weightings",
        [],
        "Task weightings to run the grid for, e.g. equal,gradnorm,dwa (one compiled sweep per method, in "
        "--workdir/<method>, plus combined results.csv/json and weightings.png); overrides --weighting.",
    ),
)
_SWEEP_DEVICES = cli.grouped(
    "sweep",
    flags.DEFINE_integer(
        "sweep_devices", 1, "Devices along the configuration axis; the client axis gets the rest of --num_devices."
    ),
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
    del argv  # cli.flags_parser refuses stray arguments
    cli.quiet_logging()
    cli.maybe_initialize_distributed(_DISTRIBUTED)  # before anything touches the devices
    cli.enable_compilation_cache(_CACHE.value)
    options = dict(sweep_devices=_SWEEP_DEVICES.value, on_divergence=_ON_DIVERGENCE.value, overwrite=_OVERWRITE.value)
    if _WEIGHTINGS.value:
        cli.run_or_exit(
            lambda: sweep.run_weightings(
                cli.config_from_flags(_FLAGS), _WEIGHTINGS.value, _values(), _WORKDIR.value, **options
            )
        )
    else:
        cli.run_or_exit(lambda: sweep.run_sweep(cli.config_from_flags(_FLAGS), _values(), _WORKDIR.value, **options))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(__doc__))
