"""Sensitivity: FedGradNorm's alpha x weight lr against FedRep, all-task rounds to target.

    python -m benchmarks.sensitivity --workdir=/tmp/fgn_bench/sensitivity              # RadCom, 3 seeds
    python -m benchmarks.sensitivity --datasets=synthetic_mtfl --rounds=300             # MTFL (hours on 2 cores)
    python -m benchmarks.sensitivity --toy --workdir=/tmp/fgn_bench/toy_sensitivity     # CI smoke size

For each dataset and balance (balanced, and power-law imbalanced client
data), FedGradNorm runs the grid ``--alphas`` x ``--weight_lrs`` x seeds as
ONE sweep (:func:`fgn_jax.sweep.run_sweep`: the whole grid is one vmapped
program, resumable from its work directory), and FedRep runs the same seeds
(same data and initialisation per seed). Every other setting is
experiments/train.py's default.

The measure is that of :mod:`benchmarks.convergence`: per task, the training
loss smoothed over ``--smooth`` rounds; the target is ``--fraction`` of the
loss reduction FedRep's mean curve reaches by the last round; per seed, the
round by which *all* tasks reach their targets, a seed that never gets there
counted at the round budget. Each cell of the grid gives the seed-paired ratio
FedRep / FedGradNorm of that round (above 1: FedGradNorm is faster) as a
geometric mean with a paired-t 95% interval (:func:`convergence.paired_ratio`),
how many seeds FedGradNorm wins and loses, the slowest task's ratio, and the
mean final held-out metric per task beside FedRep's.

Output in ``--workdir``: a table on the terminal, ``sensitivity.jsonl`` (one
``machine`` record, one ``setting`` record per dataset and balance holding
all its cells), and ``sensitivity_<dataset>_<balance>.png``: heatmaps of the
all-task ratio and of the slowest task's ratio over alpha x weight lr (a
cell marked ``+`` / ``-`` when its 95% interval lies above / below 1, and
``<=`` with ``k/S reach`` when only k of the S seeds of FedGradNorm brought
every task to its target: the others enter at the round budget, so the
ratio shown is an upper bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Sequence

import numpy as np

from benchmarks import common, convergence
from fgn_jax import sweep

DATASETS = ("synthetic_radcom",)


def _floats(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise SystemExit(f"--{flag}: expected one or more finite numbers >= 0, got {text!r}")
    return values


def grid_runs(base, alphas, weight_lrs, seeds, workdir) -> dict[tuple[float, float], convergence.Runs]:
    """FedGradNorm over ``alphas x weight_lrs x seeds`` as one sweep; the curves of each ``(alpha, weight_lr)``."""
    values = {"alpha": list(alphas), "weight_lr": list(weight_lrs), "seed": list(seeds)}
    start = time.time()
    sweep.run_sweep(base, values, workdir, log=None)
    wall = time.time() - start
    configs = sweep.grid(base, values)
    fields = sweep.varied(configs)
    dirs: dict[tuple[float, float], list[str]] = {}
    for c in configs:
        dirs.setdefault((c.alpha, c.weight_lr), []).append(os.path.join(workdir, sweep.config_name(c, fields)))
    return {key: convergence.read_runs(run_dirs, "sweep", wall) for key, run_dirs in dirs.items()}


def cell(rep: convergence.Runs, gn: convergence.Runs, alpha: float, weight_lr: float, args) -> dict:
    """One grid cell: the paired all-task ratio and per-task ratios against FedRep (same seeds)."""
    a = convergence.analyse(rep, gn, args.smooth, args.fraction)
    pa, pt = a["paired_ratio_all_tasks"], a["paired_ratio"]
    return {
        "alpha": alpha,
        "weight_lr": weight_lr,
        "ratio_all_tasks": pa["geomean"],
        "ci95_all_tasks": pa["ci95"],
        "faster_all_tasks": pa["faster"],
        "slower_all_tasks": pa["slower"],
        "ratio_per_task": pt["geomean"],
        "ci95_per_task": pt["ci95"],
        "slowest_task": a["task_names"][int(np.argmin(pt["geomean"]))],
        "slowest_task_ratio": float(min(pt["geomean"])),
        "reached_all_tasks": {
            "fedrep": a["fedrep"]["rounds_all_tasks_censored"]["reached"][0],
            "fedgradnorm": a["fedgradnorm"]["rounds_all_tasks_censored"]["reached"][0],
        },
        "final_test_metric": a["fedgradnorm"]["final_test_metric"]["mean"],
        "final_task_weight": a["fedgradnorm"]["final_task_weight"],
        "target_loss": a["target_loss"],
    }


def verdict(ratio: float, ci: Sequence[float] | None) -> str:
    """``+`` / ``-`` when the 95% interval lies wholly above / below 1, else ``~``."""
    if ci is None:
        return "~"
    return "+" if ci[0] > 1 else "-" if ci[1] < 1 else "~"


def table(settings: list[dict]) -> str:
    lines = []
    for s in settings:
        n = len(s["seeds"])
        lines.append(
            f"\n{s['dataset']} {s['balance']} (imbalance {s['imbalance']}), {s['rounds']} rounds, {n} seeds: "
            "all-task rounds-to-target ratio FedRep/FedGN, paired geomean [95% CI] (+/-: CI above/below 1), "
            "GN wins/losses, seeds where FedGN brings all tasks to target (the others count at the budget: "
            "the true ratio is lower), slowest task's ratio"
        )
        head = (
            f"{'alpha':>6}{'weight_lr':>10}{'ratio [95% CI]':>22}{'':>3}{'W/L':>6}{'GN reach':>9}{'slowest task':>22}"
        )
        head += "".join(f"{t[:10]:>11}" for t in s["task_names"])
        lines += [head, "-" * len(head)]
        lines.append(f"{'FedRep':>16}{'':>62}" + "".join(f"{m:>11.3f}" for m in s["fedrep_final_test_metric"]))
        for c in s["cells"]:
            ci = c["ci95_all_tasks"]
            ratio = f"{c['ratio_all_tasks']:.2f}" + ("" if ci is None else f" [{ci[0]:.2f},{ci[1]:.2f}]")
            lines.append(
                f"{c['alpha']:>6g}{c['weight_lr']:>10g}{ratio:>22}{verdict(c['ratio_all_tasks'], ci):>3}"
                f"{str(c['faster_all_tasks']) + '/' + str(c['slower_all_tasks']):>6}"
                f"{str(c['reached_all_tasks']['fedgradnorm']) + '/' + str(n):>9}"
                f"{c['slowest_task'] + ' ' + format(c['slowest_task_ratio'], '.2f'):>22}"
                + "".join(f"{m:>11.3f}" for m in c["final_test_metric"])
            )
    return "\n".join(lines)


def plot(setting: dict, path: str) -> None:
    """Heatmaps over alpha (rows) x weight lr (columns): the all-task ratio and the slowest task's ratio."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors
    import matplotlib.pyplot as plt

    alphas, lrs = setting["alphas"], setting["weight_lrs"]
    at = {(c["alpha"], c["weight_lr"]): c for c in setting["cells"]}
    panels = (
        ("ratio_all_tasks", "ci95_all_tasks", "all tasks: FedRep / FedGN rounds"),
        ("slowest_task_ratio", None, "slowest task: FedRep / FedGN rounds"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 2.0 * len(lrs), 1.8 + 0.45 * len(alphas)))
    for ax, (key, ci_key, title) in zip(axes, panels):
        z = np.array([[at[(a, w)][key] for w in lrs] for a in alphas])
        span = max(float(np.max(np.abs(np.log2(z)))), 0.1)
        im = ax.imshow(np.log2(z), cmap="RdBu", norm=colors.TwoSlopeNorm(0.0, -span, span), aspect="auto")
        for i, a in enumerate(alphas):
            for j, w in enumerate(lrs):
                c = at[(a, w)]
                mark = verdict(c[key], c[ci_key]) if ci_key else ""
                text = f"{z[i, j]:.2f}{mark if mark != '~' else ''}"
                reached = c["reached_all_tasks"]["fedgradnorm"]
                if ci_key and reached < len(setting["seeds"]):  # censored seeds: the ratio is an upper bound
                    text = f"<={text}\n{reached}/{len(setting['seeds'])} reach"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lrs)), [f"{w:g}" for w in lrs])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("weight lr")
        ax.set_ylabel("alpha")
        ax.set_title(title, fontsize=9)
        bar = fig.colorbar(im, ax=ax)
        bar.set_label("log2 ratio (blue: FedGradNorm faster)")
    fig.suptitle(
        f"{setting['dataset']}, {setting['balance']}: {setting['rounds']} rounds, {len(setting['seeds'])} seeds "
        "(+/-: 95% CI above/below 1; k/S reach: seeds where FedGN brought all tasks to target)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/sensitivity")
    convergence.add_data_flags(p, DATASETS)
    p.add_argument("--balances", default=",".join(convergence.BALANCES), help="balanced and/or imbalanced")
    p.add_argument("--imbalance", type=float, default=1.0, help="power-law exponent of the imbalanced setting")
    p.add_argument("--alphas", default="0,0.5,1,1.5,2,3")
    p.add_argument("--weight_lrs", default="0.01,0.05,0.2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=300)
    convergence.add_measure_flags(p)
    p.add_argument("--toy", action="store_true", help="CI smoke size: RadCom, 2 x 2 grid, 2 seeds, 4 rounds")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.toy:
        args.datasets = args.datasets or "synthetic_radcom"
        args.seeds, args.rounds, args.log_every, args.smooth = 2, 4, 2, 2
        args.alphas, args.weight_lrs = "0,1.5", "0,0.2"
        args.examples_per_client, args.test_examples_per_client, args.batch_size = 48, 16, 8
    alphas, weight_lrs = _floats("alphas", args.alphas), _floats("weight_lrs", args.weight_lrs)
    datasets = convergence.datasets_of(args, DATASETS)
    balances = convergence.balances_of(args)
    if args.seeds < 2:
        raise SystemExit(f"--seeds: a paired 95% interval needs at least 2 seeds, got {args.seeds}")
    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "sensitivity.jsonl")
    common.start_results(out_path, argv)
    seeds = list(range(args.seeds))
    settings = []
    for dataset in datasets:
        for balance in balances:
            imbalance = 0.0 if balance == "balanced" else args.imbalance
            base = convergence.base_config(dataset, args.rounds, imbalance, args)
            wd = os.path.join(args.workdir, dataset, balance)
            start = time.time()
            print(f"{dataset} {balance}: fedrep, {len(seeds)} seeds x {args.rounds} rounds ...", flush=True)
            rep = convergence.run_seeds(dataclasses.replace(base, algorithm="fedrep"), seeds, "sweep", f"{wd}/fedrep")
            print(
                f"{dataset} {balance}: fedgradnorm, {len(alphas)}x{len(weight_lrs)}x{len(seeds)} grid ...", flush=True
            )
            grid = grid_runs(
                dataclasses.replace(base, algorithm="fedgradnorm"), alphas, weight_lrs, seeds, f"{wd}/grid"
            )
            setting = {
                "record": "setting",
                "dataset": dataset,
                "balance": balance,
                "imbalance": imbalance,
                "rounds": args.rounds,
                "seeds": seeds,
                "smooth": args.smooth,
                "fraction": args.fraction,
                "alphas": alphas,
                "weight_lrs": weight_lrs,
                "task_names": rep.task_names,
                "runner": "sweep",
                "config": dataclasses.asdict(base),
                "fedrep_final_test_metric": rep.final_test_metric.mean(axis=0).tolist(),
                "cells": [cell(rep, grid[(a, w)], a, w, args) for a in alphas for w in weight_lrs],
                "wall_s": time.time() - start,
                "load_1min": common.load_average(),
            }
            settings.append(setting)
            common.append_jsonl(out_path, [setting])
            plot(setting, os.path.join(args.workdir, f"sensitivity_{dataset}_{balance}.png"))
    print(table(settings))
    print(f"wrote {out_path} and the sensitivity_*.png heatmaps")
    return settings


if __name__ == "__main__":
    main()
