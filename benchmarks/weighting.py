"""Task weightings compared: every ``--weighting`` method, rounds to a target loss and final metrics.

    python -m benchmarks.weighting --workdir=/tmp/fgn_bench/weighting
    python -m benchmarks.weighting --methods=equal,gradnorm,mgda --seeds=3      # a subset
    python -m benchmarks.weighting --toy --workdir=/tmp/fgn_bench/toy_weighting   # CI smoke size

For each synthetic dataset (``synthetic_mtfl``, ``synthetic_radcom``), with
balanced and power-law imbalanced client data (``--imbalance``), every
method of :data:`fgn_jax.weightings.WEIGHTINGS` trains from the same seeds
(the seeds of one method are one vmapped program, :mod:`fgn_jax.sweep`;
every other setting is experiments/train.py's default, the method's
hyperparameters included: ``--dwa_temperature=2``, ``--cagrad_c=0.5``, ...).

The measure is :mod:`benchmarks.convergence`'s, with equal weighting (FedRep)
as the reference: per task ``k`` the smoothed training loss ``L_k(t)``, the
target ``L_k(0) - fraction (L_k(0) - L_k^equal(end))``, and per method the
rounds until the smoothed loss first reaches it (mean ± std over the seeds
that do, and how many), the rounds until all tasks have, the final held-out
metrics and the final task weights. Whichever way it comes out: the table
reports it, no method is expected to win.

Output in ``--workdir``: a table on the terminal, ``weighting.jsonl`` (one
``machine`` record, one ``setting`` record per dataset and balance) and
``weighting_<dataset>_<balance>.png`` (per task, the smoothed loss curve of
every method, with the target).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np

from benchmarks import common, convergence
from fgn_jax import weightings

REFERENCE = "equal"  # the method whose final loss sets the target


def analyse(runs: dict[str, convergence.Runs], window: int, fraction: float) -> dict:
    """Targets from the reference method's curves, then every method's rounds to them and final metrics."""
    ref = runs[REFERENCE] if REFERENCE in runs else next(iter(runs.values()))
    start = ref.task_loss[:, 0, :].mean(axis=0)  # measured before any aggregation: the same for every method
    end = convergence.smooth(ref.task_loss, window).mean(axis=0)[-1]
    target = start - fraction * (start - end)
    methods = {
        name: convergence.run_stats(r, convergence.smooth(r.task_loss, window), target) for name, r in runs.items()
    }
    return {
        "task_names": ref.task_names,
        "reference": REFERENCE if REFERENCE in runs else next(iter(runs)),
        "start_loss": start.tolist(),
        "reference_end_loss": end.tolist(),
        "target_loss": target.tolist(),
        "methods": methods,
    }


def table(settings: list[dict]) -> str:
    """One block per setting: a row per method, per task rounds to target and final test metric."""
    pm = convergence.plus_minus
    lines = []
    for s in settings:
        a = s["analysis"]
        n = len(s["seeds"])
        lines.append(
            f"\n{s['dataset']} {s['balance']} (imbalance {s['imbalance']}), {s['rounds']} rounds, {n} seeds, "
            f"target = {s['fraction']:.0%} of {a['reference']}'s loss reduction"
        )
        tasks = a["task_names"]
        head = f"{'method':<12}" + "".join(f"{t[:10] + ' rnds':>16}" for t in tasks) + f"{'all tasks':>12}"
        head += "".join(f"{t[:10] + ' test':>16}" for t in tasks)
        lines += [head, "-" * len(head)]
        for name, m in a["methods"].items():
            row = f"{name:<12}"
            for i in range(len(tasks)):
                reached = m["rounds_to_target"]["reached"][i]
                row += f"{pm(m['rounds_to_target'], i) + f' ({reached}/{n})':>16}"
            row += f"{pm(m['rounds_all_tasks'], 0):>12}"
            row += "".join(f"{pm(m['final_test_metric'], i, '.3f'):>16}" for i in range(len(tasks)))
            lines.append(row)
    return "\n".join(lines)


def plot(runs: dict[str, convergence.Runs], analysis: dict, window: int, title: str, path: str) -> None:
    """Per task, every method's smoothed loss (mean over seeds) with the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = analysis["task_names"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, (name, r) in enumerate(runs.items()):
        mean = convergence.smooth(r.task_loss, window).mean(axis=0)
        rounds = np.arange(1, mean.shape[0] + 1)
        for i in range(len(tasks)):
            axes[0, i].plot(rounds, mean[:, i], color=cmap(j % 10), label=name, lw=1.2)
    for i, task in enumerate(tasks):
        axes[0, i].axhline(analysis["target_loss"][i], color="k", ls="--", lw=0.8)
        axes[0, i].set_title(task)
        axes[0, i].set_xlabel("round")
    axes[0, 0].set_ylabel(f"train loss (mean of last {window} rounds)")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = convergence.build_parser()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(workdir="/tmp/fgn_bench/weighting")
    p.add_argument("--methods", default=",".join(weightings.WEIGHTINGS), help="weightings to compare")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.toy:
        args.datasets = args.datasets or "synthetic_radcom"
        args.seeds, args.radcom_rounds, args.mtfl_rounds, args.log_every, args.smooth = 2, 4, 4, 2, 2
        args.examples_per_client, args.test_examples_per_client, args.batch_size = 48, 16, 8
    datasets = convergence.datasets_of(args, convergence.DATASETS)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in weightings.WEIGHTINGS:
            raise SystemExit(f"--methods: unknown weighting {m!r}; choose from {','.join(weightings.WEIGHTINGS)}")
    balances = convergence.balances_of(args)
    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "weighting.jsonl")
    common.start_results(out_path, argv)
    seeds = list(range(args.seeds))
    settings = []
    for dataset in datasets:
        rounds = args.mtfl_rounds if "mtfl" in dataset else args.radcom_rounds
        for balance in balances:
            imbalance = args.imbalance if balance == "imbalanced" else 0.0
            base = convergence.base_config(dataset, rounds, imbalance, args)
            runs = {}
            for method in methods:
                config = dataclasses.replace(base, weighting=method)
                config.validate()
                print(f"{dataset} {balance}: {method}, {len(seeds)} seeds x {rounds} rounds ...", flush=True)
                workdir = os.path.join(args.workdir, dataset, balance, method)
                runs[method] = convergence.run_seeds(config, seeds, args.runner, workdir)
            analysis = analyse(runs, args.smooth, args.fraction)
            setting = {
                "record": "setting",
                "dataset": dataset,
                "balance": balance,
                "imbalance": imbalance,
                "rounds": rounds,
                "seeds": seeds,
                "smooth": args.smooth,
                "fraction": args.fraction,
                "config": dataclasses.asdict(base),
                "load_1min": common.load_average(),
                "analysis": analysis,
            }
            settings.append(setting)
            common.append_jsonl(out_path, [setting])
            title = f"{dataset}, {balance}: task weightings ({len(seeds)} seeds)"
            plot(runs, analysis, args.smooth, title, os.path.join(args.workdir, f"weighting_{dataset}_{balance}.png"))
    print(table(settings))
    print(f"wrote {out_path} and the weighting_*.png plots")
    return settings


if __name__ == "__main__":
    main()
