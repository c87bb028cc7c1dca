"""Trains FedGradNorm or FedRep on one dataset.

    python -m experiments.train --workdir=/tmp/fgn
    python -m experiments.train --flagfile=experiments/flags/radcom.flags --workdir=/tmp/fgn_radcom

Writes config.json, metrics.jsonl and summary.json to --workdir (see
fgn_jax/training.py). Invalid flags print one line and exit with code 2.
"""

import dataclasses
import sys

from absl import app, flags

from fgn_jax import training

_D = training.ExperimentConfig()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; re-running on it resumes the run.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a run with a different configuration in --workdir.")
_FLAGS = {}
for _field in dataclasses.fields(training.ExperimentConfig):
    _default = getattr(_D, _field.name)
    _define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
        type(_default), flags.DEFINE_string
    )
    _FLAGS[_field.name] = _define(_field.name, _default, f"See fgn_jax.training.ExperimentConfig.{_field.name}.")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"unexpected arguments: {' '.join(argv[1:])}")
    config = training.ExperimentConfig(**{name: holder.value for name, holder in _FLAGS.items()})
    try:
        training.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
    except training.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except training.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except training.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    app.run(main)
