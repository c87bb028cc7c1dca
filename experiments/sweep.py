"""Runs a grid of seeds and float hyperparameters as one compiled program.

    python -m experiments.sweep --workdir=/tmp/fgn_sweep --dataset=synthetic_radcom \\
        --seeds=0,1,2 --alphas=0.5,1.0,1.5 --weight_lrs=0.01,0.05

Every train flag (python -m experiments.train --helpfull) sets the values
shared by the grid; the list flags below override --seed, --alpha,
--weight_lr, --client_lr, --server_lr, --dwa_temperature, --cagrad_c,
--uncertainty_lr and, for --aggregation=ota|hota, the channel's --snr_db,
--ps_snr_db and --truncation_q (e.g. --snr_dbs=-10,0,10,20,inf runs the
whole SNR curve as one program). Writes one directory per
configuration (config.json, metrics.jsonl), results.csv/json (final metrics)
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
    "dwa_temperature": flags.DEFINE_list("dwa_temperatures", [], "DWA temperatures; default: --dwa_temperature."),
    "cagrad_c": flags.DEFINE_list("cagrad_cs", [], "CAGrad ball radii c; default: --cagrad_c."),
    "uncertainty_lr": flags.DEFINE_list(
        "uncertainty_lrs", [], "Uncertainty-weighting log-variance steps; default: --uncertainty_lr."
    ),
    "snr_db": flags.DEFINE_list("snr_dbs", [], "Client -> receiver SNRs in dB ('inf' allowed); default: --snr_db."),
    "ps_snr_db": flags.DEFINE_list("ps_snr_dbs", [], "IS -> PS SNRs in dB ('inf' allowed); default: --ps_snr_db."),
    "truncation_q": flags.DEFINE_list(
        "truncation_qs", [], "tci non-truncation probabilities; default: --truncation_q."
    ),
}
_WEIGHTINGS = flags.DEFINE_list(
    "weightings",
    [],
    "Task weightings to run the grid for, e.g. equal,gradnorm,dwa (one compiled sweep per method, in "
    "--workdir/<method>, plus combined results.csv/json and weightings.png); overrides --weighting.",
)
_SWEEP_DEVICES = flags.DEFINE_integer(
    "sweep_devices", 1, "Devices along the configuration axis; the client axis gets the rest of --num_devices."
)
_FLAGS = cli.define_config_flags()
_DISTRIBUTED = cli.define_distributed_flags()


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
    app.run(main)
