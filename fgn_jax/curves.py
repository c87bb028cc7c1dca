"""Training curves of a run: ``curves.png`` and TensorBoard event files.

Both read the rows of ``metrics.jsonl`` (:mod:`fgn_jax.training`): per task
the training loss ``task_loss`` (L_k(t), step 3 of the round), the task
weight ``task_weight`` (p_k used in the round's aggregation) and, every
``eval_every`` rounds, the held-out ``test_metric``. The x axis is the row's
``round``: the 0-based index of the round (the progress lines count rounds
*done*, i.e. ``round + 1``). The per-task values are already means over the
task's clients (the round computes them so), so one line per task and run;
where a task has several clients, a shaded band spans the lowest to the
highest client (``task_loss_min`` / ``task_loss_max``, ``test_metric_min`` /
``test_metric_max``; task weights are per task, so they have no band).

* :func:`plot` draws runs side by side (one line style and marker per run,
  so coinciding curves stay visible): ``curves.png`` of a run, and
  ``python -m experiments.plot WORKDIR [WORKDIR ...]`` for several (e.g.
  FedGradNorm against FedRep).
* :class:`TensorBoard` writes the same scalars with tensorboardX (no
  TensorFlow needed): ``tensorboard --logdir WORKDIR``.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence
import warnings

import numpy as np

# Line styles and markers cycled over runs: curves that coincide still show (each a different dash and marker).
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")
# A positive quantity whose max/min ratio is above this gets a log axis; narrower ranges read better linear.
LOG_RANGE = 10.0
# Rows may carry each quantity's range over a task's clients as ``<key>_min`` / ``<key>_max``.
RANGE = ("min", "max")
QUANTITIES = (("task_loss", "training loss L_k"), ("task_weight", "task weight p_k"), ("test_metric", "held-out"))


class Run(NamedTuple):
    """One run's curves.

    Attributes:
      label: the legend entry.
      task_names: task names, in task order.
      metric_names: per task, the held-out metric's label, e.g. ``"acc↑"``.
      rows: the metrics.jsonl rows.
    """

    label: str
    task_names: list[str]
    metric_names: list[str]
    rows: list[dict]


def read_run(workdir: str, label: str | None = None) -> Run:
    """The curves of the run in ``workdir`` (its config.json and metrics.jsonl).

    Args:
      workdir: a run directory (or a sweep configuration's directory).
      label: the legend entry (default: the algorithm and the directory name).

    Raises:
      ValueError: ``workdir`` holds no readable run (one-line message).
    """
    from fgn_jax import workdir as workdir_lib  # here: workdir needs nothing from this module

    try:
        with open(os.path.join(workdir, workdir_lib.CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{workdir}: no readable {workdir_lib.CONFIG} ({e})") from None
    names = list(config.get("task_names", []))
    metrics = list(config.get("task_metrics") or ["test metric"] * len(names))
    default = f"{config.get('algorithm', '?')} ({os.path.basename(os.path.normpath(workdir))})"
    return Run(label or default, names, metrics, workdir_lib.read_metrics(workdir))


def line_style(i: int, n: int) -> dict:
    """Matplotlib style of curve ``i`` of ``n``: its own dash and hollow marker, earlier curves' markers larger.

    Curves that coincide then still all show: each marker rings the next one.
    """
    return dict(
        linestyle=STYLES[i % len(STYLES)],
        marker=MARKERS[i % len(MARKERS)],
        markerfacecolor="none",
        markersize=3 + 2.5 * (n - 1 - i) / max(n - 1, 1) * min(n - 1, 3),
    )


def scale_axis(ax, values: np.ndarray) -> None:
    """A log y axis if ``values`` are positive and span more than :data:`LOG_RANGE`; else linear."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > LOG_RANGE:
        ax.set_yscale("log")


def plot(runs: Sequence[Run], path: str, title: str = "") -> None:
    """Saves per-task training loss, task weight and held-out metric against rounds as a PNG.

    Args:
      runs: the runs to overlay (same tasks, in the same order: the first
        run's task names head the columns).
      path: output ``.png``.
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    t = max(len(r.task_names) for r in runs)
    fig, axes = plt.subplots(len(QUANTITIES), t, figsize=(3.2 * t, 8), squeeze=False, sharex=True)
    seen: dict[tuple[int, int], list[np.ndarray]] = {}
    for i, run in enumerate(runs):
        style = line_style(i, len(runs))
        style["color"] = f"C{i % 10}"
        for q, (key, _) in enumerate(QUANTITIES):
            rows = [r for r in run.rows if key in r]
            if not rows:
                continue
            x = np.array([r["round"] for r in rows])
            y = np.array([r[key] for r in rows], dtype=float)  # [rounds, T]
            every = max(1, len(x) // 12)  # about a dozen markers per curve
            low, high = (np.array([r.get(f"{key}_{end}", r[key]) for r in rows], dtype=float) for end in RANGE)
            for k in range(min(t, y.shape[1])):
                ax = axes[q, k]
                label = run.label if (q, k) == (0, 0) else None
                ax.plot(x, y[:, k], markevery=every, linewidth=1.2, label=label, **style)
                seen.setdefault((q, k), []).append(y[:, k])
                if np.any(high[:, k] > low[:, k]):  # several clients: the band from the lowest to the highest
                    ax.fill_between(x, low[:, k], high[:, k], color=style["color"], alpha=0.15, linewidth=0)
                    seen[(q, k)] += [low[:, k], high[:, k]]
    first = runs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (q, k), ys in seen.items():
            scale_axis(axes[q, k], np.concatenate(ys))
    for k in range(t):
        axes[0, k].set_title(first.task_names[k] if k < len(first.task_names) else f"task {k}")
        axes[-1, k].set_xlabel("round (0-based)")
        if k < len(first.metric_names):
            axes[2, k].set_ylabel(f"held-out {first.metric_names[k]}")
    axes[0, 0].set_ylabel(QUANTITIES[0][1])
    axes[1, 0].set_ylabel(QUANTITIES[1][1])
    fig.suptitle(title)
    if len(runs) > 1:
        fig.legend(loc="lower center", ncol=min(len(runs), 4), fontsize="small", frameon=False)
        fig.tight_layout(rect=(0, 0.03 * ((len(runs) + 3) // 4), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class TensorBoard:
    """Writes metric rows as TensorBoard scalars ``<quantity>/<task>`` at step = the row's ``round``.

    Args:
      logdir: the event files' directory (created).
      task_names: task names, in task order.
      purge_step: on resume, the first round recomputed: TensorBoard then
        drops events of that round and later that an interrupted run left.
    """

    KEYS = ("task_loss", "grad_norm", "task_weight", "test_loss", "test_metric")

    def __init__(self, logdir: str, task_names: Sequence[str], purge_step: int | None = None):
        from tensorboardX import SummaryWriter  # here: only runs that write files need it

        self.task_names = list(task_names)
        self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=30)

    def write(self, rows: Sequence[dict]) -> None:
        for row in rows:
            for key in self.KEYS:
                for name, value in zip(self.task_names, row.get(key, ())):
                    self._writer.add_scalar(f"{key}/{name}", value, row["round"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
