"""Overlays the training curves of several runs in one PNG.

    python -m experiments.plot /tmp/fgn_fedgradnorm /tmp/fgn_fedrep --out=/tmp/compare.png

Each argument is a run directory of experiments.train (or one configuration's
directory of a sweep); each run gets its own line style and marker. Rows:
per-task training loss, task weight and held-out metric against the round
index (metrics.jsonl ``round``, 0-based); columns: tasks (see fgn_jax/curves.py).
"""

from absl import app, flags

from experiments import cli
from fgn_jax import curves

_OUT = cli.grouped("output", flags.DEFINE_string("out", "curves_overlay.png", "The PNG to write."))
_LABELS = cli.grouped(
    "output", flags.DEFINE_list("labels", [], "Legend entries, one per run (default: algorithm and directory name).")
)
_TITLE = cli.grouped("output", flags.DEFINE_string("title", "", "Figure title."))


def main(argv):
    cli.quiet_logging()
    workdirs = argv[1:]
    if not workdirs:
        cli.fail("give one or more run directories: python -m experiments.plot WORKDIR [WORKDIR ...]")
    if _LABELS.value and len(_LABELS.value) != len(workdirs):
        cli.fail(f"--labels: {len(_LABELS.value)} labels for {len(workdirs)} runs")
    labels = _LABELS.value or [None] * len(workdirs)
    try:
        runs = [curves.read_run(w, label) for w, label in zip(workdirs, labels)]
    except ValueError as e:
        cli.fail(e)
    empty = [w for w, r in zip(workdirs, runs) if not r.rows]
    if empty:
        cli.fail(f"no metrics rows in {', '.join(empty)}")
    curves.plot(runs, _OUT.value, _TITLE.value)
    print(f"wrote {_OUT.value} ({len(runs)} runs)")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.flags_parser(__doc__, positional=True))
