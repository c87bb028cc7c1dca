"""Convergence: FedGradNorm against FedRep, rounds to a target loss per task.

    python -m benchmarks.convergence --workdir=/tmp/fgn_bench/convergence           # 300 rounds, 5 seeds
    python -m benchmarks.convergence --mtfl_rounds=500 --radcom_rounds=500 --seeds=10   # a bigger run
    python -m benchmarks.convergence --toy --workdir=/tmp/fgn_bench/toy_conv            # CI smoke size
    python -m benchmarks.convergence --dataset=mtfl --data_dir=/path/to/MTFL            # the real faces

Real data: ``--dataset=mtfl`` or ``--dataset=radcom_dynamic`` with
``--data_dir`` (and ``--build_dir``, where the TFDS build goes) runs the same
benchmark on the real files, with their flagfiles' data settings
(``REAL_DATA``: one client per task, each seeing the whole training set);
every benchmark built on :func:`base_config` (sensitivity, weighting,
channel_robustness) takes the same three flags.

For each synthetic dataset (``synthetic_mtfl``, ``synthetic_radcom``), with
balanced client data and with power-law imbalanced data (``--imbalance``),
both algorithms train from the same seeds (the same data and initialisation
per seed; every other setting is experiments/train.py's default, 300 rounds
as there). Seeds run as one vmapped program through :mod:`fgn_jax.sweep`
(``--runner=sequential``: one ``training.train_and_evaluate`` per seed
instead); which runner produced the numbers is recorded.

First, whether every task learns: per method, the seeds whose final held-out
metric clears the constant predictor (``constant_baseline``) by the margin
of the default-run check (accuracy +0.12, NME at most 0.6x), ``learns``.

The measure, per task ``k``: the training loss ``L_k(t)`` of every round
(measured on a fresh minibatch, step 3 of the round), smoothed by a trailing
mean over ``--smooth`` rounds. FedRep's mean curve over seeds defines the
target: ``L_k(0) - 0.9 (L_k(0) - L_k^FedRep(end))``, 90% of the loss
reduction FedRep reaches by the last round (``L_k(0)``, the round-0 loss, is
the same for both algorithms: their first round is identical). A seed that
never reaches the target within the round budget is right-censored and kept:
per task and method the table gives how many seeds reach it and the median
over all seeds (censored ones ranked last; ``>budget`` when half or more are
censored), and the comparison is paired per seed: the ratio FedRep /
FedGradNorm of rounds to target (above 1: FedGradNorm is faster), a censored
seed counted at the budget (a bound that pulls the ratio towards 1), as a
geometric mean with a paired-t 95% interval on the log ratio, and how many
seeds FedGradNorm wins and loses; the same for the round by which all tasks
reach their targets. Whichever way it comes out: FedGradNorm balances the
tasks' relative progress, which need not make every task faster.

Reference points (``--references``, default ``local,centralized``): the
same seeds trained by each client alone (``--algorithm=local``) and on the
union of the clients' data (``--algorithm=centralized``); their final
held-out metrics sit beside the two methods' and a per-task ``ordering``
says whether ``local < FedRep <= FedGradNorm <= centralized`` holds (in each
metric's direction, on the seed means) or where it breaks.

Output in ``--workdir``: a table on the terminal, ``convergence.jsonl`` (one
``machine`` record, one ``setting`` record per dataset and balance) and
``convergence_<dataset>_<balance>.png`` (loss curves with the target, and
FedGradNorm's task weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Sequence

import numpy as np

from benchmarks import common
from fgn_jax import baselines, sweep, training

ALGORITHMS = ("fedrep", "fedgradnorm")
REFERENCES = ("local", "centralized")
# The expected order of the final held-out metrics, worst to best.
ORDER = ("local", "fedrep", "fedgradnorm", "centralized")
BALANCES = ("balanced", "imbalanced")
DATASETS = ("synthetic_mtfl", "synthetic_radcom")
# The real datasets' data settings, as in their flagfiles (experiments/flags/<dataset>.flags): one client per
# task, every client sees the whole training set with its own task's labels. Flags given explicitly win.
REAL_DATA = {
    "mtfl": dict(overlap="across_tasks", examples_per_client=10000, test_examples_per_client=2995),
    "radcom_dynamic": dict(
        overlap="across_tasks", examples_per_client=20000, test_examples_per_client=5000, anomaly_snr_db=10.0
    ),
}


@dataclasses.dataclass
class Runs:
    """Curves of one algorithm over the seeds of one setting."""

    task_loss: np.ndarray  # [S, R, K] training loss per round
    task_weight: np.ndarray  # [S, R, K] task weights used in each round
    final_test_metric: np.ndarray  # [S, K]
    final_test_loss: np.ndarray  # [S, K]
    task_names: list[str]
    runner: str
    wall_s: float


def _read_curves(run_dirs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    loss, weight, metric, test_loss = [], [], [], []
    for d in run_dirs:
        rows = common.read_jsonl(os.path.join(d, "metrics.jsonl"))
        loss.append([r["task_loss"] for r in rows])
        weight.append([r["task_weight"] for r in rows])
        final = [r for r in rows if "test_metric" in r][-1]
        metric.append(final["test_metric"])
        test_loss.append(final["test_loss"])
    return np.array(loss), np.array(weight), np.array(metric), np.array(test_loss)


def run_seeds(base: training.ExperimentConfig, seeds: Sequence[int], runner: str, workdir: str) -> Runs:
    """Trains ``base`` for every seed and reads back the curves.

    ``runner``: ``"sweep"`` (the seeds as one vmapped program, fgn_jax.sweep)
    or ``"sequential"`` (one ``training.train_and_evaluate`` per seed). Both
    write ``<workdir>/seed<s>/metrics.jsonl`` (the sweep's folder names).
    """
    start = time.time()
    dirs = [os.path.join(workdir, f"seed{s}") for s in seeds]
    if runner == "sweep":
        sweep.run_sweep(base, {"seed": list(seeds)}, workdir, log=None)
    elif runner == "sequential":
        for s, d in zip(seeds, dirs):
            training.train_and_evaluate(dataclasses.replace(base, seed=s), d, log=None)
    else:
        raise ValueError(f"unknown runner {runner!r}")
    return read_runs(dirs, runner, time.time() - start)


def read_runs(run_dirs: Sequence[str], runner: str, wall_s: float) -> Runs:
    """The curves of the runs in ``run_dirs`` (one per seed, each with ``metrics.jsonl`` and ``config.json``)."""
    loss, weight, metric, test_loss = _read_curves(run_dirs)
    with open(os.path.join(run_dirs[0], "config.json")) as f:
        task_names = json.load(f)["task_names"]
    return Runs(loss, weight, metric, test_loss, task_names, runner, wall_s)


def smooth(curves: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` rounds along axis -2 (fewer at the start)."""
    c = np.cumsum(curves, axis=-2)
    out = c.copy()
    out[..., window:, :] = c[..., window:, :] - c[..., :-window, :]
    counts = np.minimum(np.arange(1, curves.shape[-2] + 1), window)[:, None]
    return out / counts


def rounds_to_target(curves: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``[S, K]`` rounds done when ``curves [S, R, K]`` first reach ``target [K]`` (NaN: never)."""
    hit = curves <= target
    first = np.argmax(hit, axis=1).astype(float) + 1
    first[~hit.any(axis=1)] = np.nan
    return first


def _stats(values: np.ndarray) -> dict:
    """Mean, std and count over the finite entries of ``values [S, ...]`` along axis 0."""
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    safe = np.where(finite, values, 0.0)
    mean = np.where(n > 0, safe.sum(axis=0) / np.maximum(n, 1), np.nan)
    var = np.where(n > 1, (np.where(finite, values - mean, 0.0) ** 2).sum(axis=0) / np.maximum(n - 1, 1), np.nan)
    as_list = lambda a: [None if not math.isfinite(v) else float(v) for v in np.atleast_1d(a)]  # noqa: E731
    return {"mean": as_list(mean), "std": as_list(np.sqrt(var)), "reached": [int(v) for v in np.atleast_1d(n)]}


def censored_stats(r: np.ndarray, budget: int) -> dict:
    """Rounds to target over seeds, keeping the seeds that never reach it (right-censored at ``budget``).

    Args:
      r: ``[S, K]`` rounds to target, NaN where a seed never reached it.
      budget: the rounds run; a censored seed's round is known only to exceed it.

    Returns:
      Per task: ``reached`` (seeds that got there), ``median`` (the median over
      all seeds with censored ones ranked last; None, shown as ``>budget``,
      when half or more are censored) and ``mean_lower_bound`` (the mean of
      ``min(round, budget)``: every censored seed counted at the budget, a
      lower bound on the true mean).
    """
    s = r.shape[0]
    ranked = np.sort(np.where(np.isfinite(r), r, np.inf), axis=0)
    lo, hi = ranked[(s - 1) // 2], ranked[s // 2]  # the two middle seeds (the same one for odd S)
    median = np.where(np.isfinite(hi), (lo + hi) / 2, np.nan)
    bounded = np.where(np.isfinite(r), r, float(budget))
    as_list = lambda a: [None if not math.isfinite(v) else float(v) for v in np.atleast_1d(a)]  # noqa: E731
    return {
        "reached": [int(v) for v in np.atleast_1d(np.isfinite(r).sum(axis=0))],
        "median": as_list(median),
        "mean_lower_bound": as_list(bounded.mean(axis=0)),
        "budget": int(budget),
    }


def paired_ratio(slow: np.ndarray, fast: np.ndarray, budget: int) -> dict:
    """Seed-paired ratio ``slow / fast`` of rounds to target, censored seeds counted at the budget.

    Both methods of a seed share its data and initialisation, so the ratio is
    taken per seed (``min(round, budget)`` for each method: a censored seed
    enters at the budget, which pulls the ratio towards 1, never away from it)
    and summarised by its geometric mean with a paired-t 95% interval on the
    log ratio (``S - 1`` degrees of freedom; no interval for one seed).

    Args:
      slow, fast: ``[S, K]`` rounds to target of the two methods (NaN: never).
      budget: the rounds run.

    Returns:
      Per task: ``geomean``, ``ci95`` (``[low, high]`` or None), ``per_seed``,
      ``faster`` / ``slower`` (seeds where ``fast`` took fewer / more rounds)
      and ``bound_per_seed``: ``"="`` when both reached the target (an exact
      ratio), ``">="`` when only ``fast`` did (the true ratio is at least the
      one shown), ``"<="`` when only ``slow`` did, ``"?"`` when neither did.
    """
    from scipy import stats  # a dependency of jax

    a = np.where(np.isfinite(slow), slow, float(budget))
    b = np.where(np.isfinite(fast), fast, float(budget))
    log = np.log(a / b)
    s = log.shape[0]
    mean = log.mean(axis=0)
    if s > 1:
        half = stats.t.ppf(0.975, s - 1) * log.std(axis=0, ddof=1) / math.sqrt(s)
        ci = [[float(np.exp(m - h)), float(np.exp(m + h))] for m, h in zip(mean, half)]
    else:
        ci = [None] * log.shape[1]
    marks = np.select(
        [np.isfinite(slow) & np.isfinite(fast), np.isfinite(fast), np.isfinite(slow)], ["=", ">=", "<="], "?"
    )
    return {
        "geomean": [float(v) for v in np.exp(mean)],
        "ci95": ci,
        "per_seed": (a / b).tolist(),
        "bound_per_seed": marks.tolist(),
        "faster": [int(v) for v in (b < a).sum(axis=0)],
        "slower": [int(v) for v in (b > a).sum(axis=0)],
    }


def all_tasks_rounds(r: np.ndarray) -> np.ndarray:
    """``[S, 1]``: the round by which every task reached its target (NaN if any task never did)."""
    done = np.isfinite(r).all(axis=1)
    return np.where(done, np.nanmax(np.where(np.isfinite(r), r, -1), axis=1), np.nan)[:, None]


def run_stats(runs: Runs, smoothed: np.ndarray, target: np.ndarray) -> dict:
    """One method's seeds: rounds to ``target`` per task and for all tasks, final metrics and weights.

    Args:
      runs: the method's curves over the seeds.
      smoothed: ``smooth(runs.task_loss, window)``, ``[S, R, K]``.
      target: ``[K]`` target losses.
    """
    r = rounds_to_target(smoothed, target)
    all_tasks = all_tasks_rounds(r)
    budget = smoothed.shape[1]
    return {
        "rounds_to_target": _stats(r),
        "rounds_to_target_censored": censored_stats(r, budget),
        "rounds_to_target_per_seed": [[None if not math.isfinite(v) else int(v) for v in row] for row in r],
        "rounds_all_tasks": _stats(all_tasks),
        "rounds_all_tasks_censored": censored_stats(all_tasks, budget),
        "final_test_metric": _stats(runs.final_test_metric),
        "final_test_loss": _stats(runs.final_test_loss),
        "final_task_weight": runs.task_weight[:, -1, :].mean(axis=0).tolist(),
        "runner": runs.runner,
        "wall_s": runs.wall_s,
    }


def analyse(rep: Runs, gn: Runs, window: int, fraction: float) -> dict:
    """Targets from FedRep, rounds to them for both algorithms, ratios and final metrics."""
    rep_s, gn_s = smooth(rep.task_loss, window), smooth(gn.task_loss, window)
    start = rep.task_loss[:, 0, :].mean(axis=0)
    end = rep_s.mean(axis=0)[-1]
    target = start - fraction * (start - end)
    out = {"task_names": rep.task_names, "start_loss": start.tolist(), "fedrep_end_loss": end.tolist()}
    out["target_loss"] = target.tolist()
    per_alg = {"fedrep": run_stats(rep, rep_s, target), "fedgradnorm": run_stats(gn, gn_s, target)}
    out.update(per_alg)
    budget = rep_s.shape[1]
    rep_r, gn_r = rounds_to_target(rep_s, target), rounds_to_target(gn_s, target)
    # Paired over seeds, censored seeds kept at the budget (never a mean over the seeds that finished).
    paired = paired_ratio(rep_r, gn_r, budget)
    paired_all = paired_ratio(all_tasks_rounds(rep_r), all_tasks_rounds(gn_r), budget)
    out["paired_ratio"] = paired
    out["paired_ratio_all_tasks"] = {
        k: [row[0] for row in v] if k in ("per_seed", "bound_per_seed") else v[0] for k, v in paired_all.items()
    }
    out["ratio_fedrep_over_fedgradnorm"] = paired["geomean"]
    out["ratio_all_tasks"] = paired_all["geomean"][0]
    return out


def ordering(final_metric: dict[str, Sequence[float]], metrics: Sequence[str]) -> list[str]:
    """Per task: "holds" if the mean final metrics improve along :data:`ORDER`, else the pairs out of order.

    ``final_metric``: algorithm -> per-task mean final held-out metric (the
    algorithms present); ``metrics``: each task's metric name (its direction).
    A tie (FedRep = FedGradNorm, FedGradNorm = centralized) counts as in order;
    local must be strictly worse than FedRep.
    """
    present = [a for a in ORDER if a in final_metric]
    out = []
    for k, metric in enumerate(metrics):
        sign = 1.0 if baselines.HIGHER_IS_BETTER[metric] else -1.0
        broken = []
        for worse, better in zip(present, present[1:]):
            a, b = sign * final_metric[worse][k], sign * final_metric[better][k]
            if (a >= b) if worse == "local" else (a > b):
                broken.append(f"{worse} {'ties or beats' if worse == 'local' and a == b else 'beats'} {better}")
        out.append("holds" if not broken else "; ".join(broken))
    return out


def plus_minus(stats: dict, i: int, spec: str = ".1f") -> str:
    """``mean±std`` of entry ``i`` of :func:`run_stats`' statistics (``never``: no seed reached it)."""
    mean, std = stats["mean"][i], stats["std"][i]
    if mean is None:
        return "never"
    text = format(mean, spec) + (f"±{format(std, spec)}" if std is not None else "")
    return text


def censored_cell(stats: dict, i: int, seeds: int) -> str:
    """``reached/S median`` of :func:`censored_stats` (``>budget`` when the median is censored)."""
    median = stats["median"][i]
    return f"{stats['reached'][i]}/{seeds} " + (f">{stats['budget']}" if median is None else f"{median:g}")


def ratio_cell(paired: dict, i: int | None = None) -> str:
    """``geomean [low, high]`` of :func:`paired_ratio` (entry ``i``, or the all-tasks summary)."""
    pick = (lambda v: v) if i is None else (lambda v: v[i])  # noqa: E731
    geomean, ci = pick(paired["geomean"]), pick(paired["ci95"])
    return f"{geomean:.2f}" + ("" if ci is None else f" [{ci[0]:.2f},{ci[1]:.2f}]")


def table(settings: list[dict]) -> str:
    pm = plus_minus
    lines = []
    for s in settings:
        a = s["analysis"]
        n = len(s["seeds"])
        lines.append(
            f"\n{s['dataset']} {s['balance']} (imbalance {s['imbalance']}), {s['rounds']} rounds, "
            f"{n} seeds, target = {s['fraction']:.0%} of FedRep's loss reduction; rounds: seeds reaching it and "
            "their median (censored seeds ranked last); ratio FedRep/FedGN: paired geometric mean [95% CI]"
        )
        head = (
            f"{'task':<12}{'target':>8}{'FedRep rnds':>14}{'FedGN rnds':>14}{'ratio [95% CI]':>20}{'GN +/-':>8}"
            f"{'FedRep test':>14}{'FedGN test':>14}{'constant':>10}{'learns':>9}{'FedGN p':>8}"
        )
        lines += [head, "-" * len(head)]
        rep, gn, paired = a["fedrep"], a["fedgradnorm"], a["paired_ratio"]
        for i, task in enumerate(a["task_names"]):
            learns = a.get("learns", {})
            lines.append(
                f"{task:<12}{a['target_loss'][i]:>8.3f}"
                f"{censored_cell(rep['rounds_to_target_censored'], i, n):>14}"
                f"{censored_cell(gn['rounds_to_target_censored'], i, n):>14}"
                f"{ratio_cell(paired, i):>20}{str(paired['faster'][i]) + '/' + str(paired['slower'][i]):>8}"
                f"{pm(rep['final_test_metric'], i, '.3f'):>14}{pm(gn['final_test_metric'], i, '.3f'):>14}"
                f"{a['constant_baseline'][i] if 'constant_baseline' in a else float('nan'):>10.3f}"
                f"{'/'.join(str(learns[m][i]) for m in ALGORITHMS) if learns else '-':>9}"
                f"{gn['final_task_weight'][i]:>8.2f}"
            )
        pa = a["paired_ratio_all_tasks"]
        lines.append(
            f"{'all tasks':<12}{'':>8}{censored_cell(rep['rounds_all_tasks_censored'], 0, n):>14}"
            f"{censored_cell(gn['rounds_all_tasks_censored'], 0, n):>14}{ratio_cell(pa):>20}"
            f"{str(pa['faster']) + '/' + str(pa['slower']):>8}"
        )
        refs = a.get("references", {})
        if refs:
            lines.append("final held-out metric, reference points beside the methods:")
            head = (
                f"{'task':<12}" + "".join(f"{name:>16}" for name in ORDER if name in refs or name in a) + "  ordering"
            )
            lines += [head, "-" * len(head)]
            for i, task in enumerate(a["task_names"]):
                cells = [plus_minus((refs.get(name) or a[name]["final_test_metric"]), i, ".3f") for name in ORDER]
                lines.append(f"{task:<12}" + "".join(f"{c:>16}" for c in cells) + f"  {a['ordering'][i]}")
    return "\n".join(lines)


def plot(rep: Runs, gn: Runs, analysis: dict, window: int, title: str, path: str) -> None:
    """Smoothed loss curves (mean and std band over seeds) per task, with the target; FedGradNorm's weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(rep.task_names)
    fig, axes = plt.subplots(1, k + 1, figsize=(3.2 * (k + 1), 3.2))
    rounds = np.arange(1, rep.task_loss.shape[1] + 1)
    for runs, label, color in ((rep, "FedRep", "tab:blue"), (gn, "FedGradNorm", "tab:orange")):
        s = smooth(runs.task_loss, window)
        mean, std = s.mean(axis=0), s.std(axis=0)
        for i in range(k):
            axes[i].plot(rounds, mean[:, i], color=color, label=label)
            axes[i].fill_between(rounds, mean[:, i] - std[:, i], mean[:, i] + std[:, i], color=color, alpha=0.2)
    for i, task in enumerate(rep.task_names):
        axes[i].axhline(analysis["target_loss"][i], color="k", ls="--", lw=0.8, label="target")
        axes[i].set_title(task)
        axes[i].set_xlabel("round")
    axes[0].set_ylabel(f"train loss (mean of last {window} rounds)")
    axes[0].legend(fontsize=7)
    w = gn.task_weight.mean(axis=0)
    for i, task in enumerate(gn.task_names):
        axes[k].plot(rounds, w[:, i], label=task)
    axes[k].set_title("FedGradNorm task weights")
    axes[k].set_xlabel("round")
    axes[k].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def base_config(dataset: str, rounds: int, imbalance: float, args: argparse.Namespace) -> training.ExperimentConfig:
    """experiments/train.py's defaults, with the benchmark's length, data and balance."""
    default = training.ExperimentConfig()
    log_every = min(args.log_every, rounds)
    eval_every = log_every * math.ceil(rounds / log_every)  # evaluate at the end only
    changes = dict(dataset=dataset, rounds=rounds, imbalance=imbalance, log_every=log_every, eval_every=eval_every)
    if dataset in REAL_DATA:
        changes.update(REAL_DATA[dataset], data_dir=args.data_dir, build_dir=args.build_dir)
    # Checkpoints every 100 rounds or so: a killed benchmark resumes (the same command), not restarts.
    changes["checkpoint_every"] = min(eval_every, log_every * max(1, 100 // log_every))
    if args.conv_impl:
        changes["conv_impl"] = args.conv_impl
    for name in ("examples_per_client", "test_examples_per_client", "batch_size"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    return dataclasses.replace(default, **changes)


def add_data_flags(p: argparse.ArgumentParser, default: Sequence[str]) -> None:
    """``--datasets`` (alias ``--dataset``), ``--data_dir`` and ``--build_dir``, as every benchmark takes them."""
    p.add_argument(
        "--datasets",
        "--dataset",
        dest="datasets",
        default=None,
        help=f"comma-separated, from {', '.join(training.DATASETS)} (default {','.join(default)}); "
        "mtfl and radcom_dynamic read --data_dir",
    )
    p.add_argument("--data_dir", default="", help="real datasets: the folder with MTFL.zip or RadComDynamic.hdf5")
    p.add_argument("--build_dir", default="", help="real datasets: where the TFDS build goes")


def datasets_of(args: argparse.Namespace, default: Sequence[str]) -> list[str]:
    """The datasets ``--datasets`` names (``default`` when not given), checked before anything runs."""
    datasets = [d for d in (args.datasets or ",".join(default)).split(",") if d]
    if not datasets:
        raise SystemExit("--datasets: expected at least one dataset")
    for d in datasets:
        if d not in training.DATASETS:
            raise SystemExit(f"--datasets: unknown dataset {d!r}; choose from {','.join(training.DATASETS)}")
        if d in REAL_DATA and not args.data_dir:
            raise SystemExit(f"--data_dir: dataset {d!r} reads its files from --data_dir (README: real datasets)")
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data_dir: {args.data_dir!r} is not a directory")
    return datasets


def add_measure_flags(p: argparse.ArgumentParser, reference: str = "FedRep") -> None:
    """The chunk length, the loss measure and the sizes :func:`base_config` reads, as every benchmark takes them."""
    p.add_argument("--log_every", type=int, default=10, help="rounds per compiled chunk")
    p.add_argument("--smooth", type=int, default=5, help="trailing-mean window of the loss curves (rounds)")
    p.add_argument("--fraction", type=float, default=0.9, help=f"target: this fraction of {reference}'s loss reduction")
    p.add_argument("--conv_impl", default="", help="'' keeps experiments/train.py's default")
    p.add_argument("--examples_per_client", type=int, default=0, help="0: experiments/train.py's default")
    p.add_argument("--test_examples_per_client", type=int, default=0, help="0: experiments/train.py's default")
    p.add_argument("--batch_size", type=int, default=0, help="0: experiments/train.py's default")


def balances_of(args: argparse.Namespace) -> list[str]:
    """The balances ``--balances`` names, checked."""
    balances = [b for b in args.balances.split(",") if b]
    for b in balances:
        if b not in BALANCES:
            raise SystemExit(f"--balances: unknown {b!r}; choose from {','.join(BALANCES)}")
    return balances


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/convergence")
    add_data_flags(p, DATASETS)
    p.add_argument("--balances", default=",".join(BALANCES), help="balanced and/or imbalanced")
    p.add_argument("--imbalance", type=float, default=1.0, help="power-law exponent of the imbalanced setting")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--mtfl_rounds", type=int, default=300)
    p.add_argument("--radcom_rounds", type=int, default=300)
    add_measure_flags(p)
    p.add_argument("--runner", default="sweep", choices=("sweep", "sequential"))
    p.add_argument("--references", default=",".join(REFERENCES), help="reference algorithms to run ('' for none)")
    p.add_argument("--toy", action="store_true", help="CI smoke size: RadCom, 2 seeds, 4 rounds, tiny data")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.toy:
        args.datasets = args.datasets or "synthetic_radcom"
        args.seeds, args.radcom_rounds, args.mtfl_rounds, args.log_every, args.smooth = 2, 4, 4, 2, 2
        args.examples_per_client, args.test_examples_per_client, args.batch_size = 48, 16, 8
    datasets = datasets_of(args, DATASETS)
    balances = balances_of(args)
    references = [r for r in args.references.split(",") if r]
    for r in references:
        if r not in REFERENCES:
            raise SystemExit(f"--references: unknown {r!r}; choose from {','.join(REFERENCES)}")
    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "convergence.jsonl")
    common.start_results(out_path, argv)
    seeds = list(range(args.seeds))
    settings = []
    for dataset in datasets:
        rounds = args.mtfl_rounds if "mtfl" in dataset else args.radcom_rounds
        for balance in balances:
            imbalance = args.imbalance if balance == "imbalanced" else 0.0
            runs = {}
            # The setting's record (config, tasks, constant baseline) is the base config, not a reference's.
            base = base_config(dataset, rounds, imbalance, args)
            for algorithm in ALGORITHMS:
                config = dataclasses.replace(base, algorithm=algorithm)
                config.validate()
                print(f"{dataset} {balance}: {algorithm}, {len(seeds)} seeds x {rounds} rounds ...", flush=True)
                workdir = os.path.join(args.workdir, dataset, balance, algorithm)
                runs[algorithm] = run_seeds(config, seeds, args.runner, workdir)
            for algorithm in references:
                config = dataclasses.replace(base, algorithm=algorithm)
                print(f"{dataset} {balance}: reference {algorithm}, {len(seeds)} seeds ...", flush=True)
                # Sequential: a reference's state differs from the methods' (local: a trunk per client).
                runs[algorithm] = run_seeds(
                    config, seeds, "sequential", os.path.join(args.workdir, dataset, balance, algorithm)
                )
            analysis = analyse(runs["fedrep"], runs["fedgradnorm"], args.smooth, args.fraction)
            analysis["references"] = {name: _stats(runs[name].final_test_metric) for name in references}
            metrics = [t.metric for t in training.task_table(base)]
            # Every task must learn first: seeds whose final held-out metric clears the constant predictor
            # by the issue-11 margin (accuracy +0.12, NME x0.6), per method.
            analysis["constant_baseline"] = baselines.constant_baseline(training.build_dataset(base))
            analysis["learns"] = {
                name: [
                    sum(baselines.beats(m, float(v), b) for v in runs[name].final_test_metric[:, k])
                    for k, (m, b) in enumerate(zip(metrics, analysis["constant_baseline"]))
                ]
                for name in ALGORITHMS
            }
            means = {name: np.mean(runs[name].final_test_metric, axis=0) for name in (*ALGORITHMS, *references)}
            analysis["ordering"] = ordering(means, metrics)
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
            title = f"{dataset}, {balance}: FedRep vs FedGradNorm ({len(seeds)} seeds)"
            png = os.path.join(args.workdir, f"convergence_{dataset}_{balance}.png")
            plot(runs["fedrep"], runs["fedgradnorm"], analysis, args.smooth, title, png)
    print(table(settings))
    print(f"wrote {out_path} and the convergence_*.png plots")
    return settings


if __name__ == "__main__":
    main()
