"""Trains FedGradNorm or FedRep on one dataset.

    python -m experiments.train --workdir=/tmp/fgn
    python -m experiments.train --flagfile=experiments/flags/synthetic_radcom.flags --workdir=/tmp/fgn_radcom

Writes config.json, metrics.jsonl, summary.json, curves.png and TensorBoard
events (tensorboard/) to --workdir (see fgn_jax/training.py); re-running the
same command resumes the run, a larger --rounds extends it. Invalid flags
print one line and exit with code 2.

Sharded and multi-host runs (docs/scaling.md):

    python -m experiments.train --num_devices=8 --workdir=/tmp/fgn          # clients over 8 devices
    python -m experiments.train --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0 ...
"""

from absl import app, flags

from experiments import cli
from fgn_jax import training

_WORKDIR = cli.define_workdir("Output directory; re-running on it resumes the run (a larger --rounds extends it).")
_OVERWRITE = cli.grouped(
    "output", flags.DEFINE_bool("overwrite", False, "Replace a run with a different configuration in --workdir.")
)
_FLAGS = cli.define_config_flags()
_DISTRIBUTED = cli.define_distributed_flags()
_CACHE = cli.define_compilation_cache_flag()


def main(argv):
    del argv  # cli.flags_parser refuses stray arguments
    cli.quiet_logging()
    cli.maybe_initialize_distributed(_DISTRIBUTED)  # before anything touches the devices
    cli.enable_compilation_cache(_CACHE.value)
    config = cli.config_from_flags(_FLAGS)
    cli.run_or_exit(lambda: training.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(__doc__))
