"""Convergence: FedGradNorm against FedRep, rounds to a target loss per task.

    python -m benchmarks.convergence --workdir=/tmp/fgn_bench/convergence
    python -m benchmarks.convergence --mtfl_rounds=150 --radcom_rounds=300 --seeds=10   # a bigger run
    python -m benchmarks.convergence --toy --workdir=/tmp/fgn_bench/toy_conv            # CI smoke size

For each synthetic dataset (``synthetic_mtfl``, ``synthetic_radcom``), with
balanced client data and with power-law imbalanced data (``--imbalance``),
both algorithms train from the same seeds (every other setting is
experiments/train.py's default). Seeds run as one vmapped program through
:mod:`fgn_jax.sweep` (``--runner=sequential``: one
``training.train_and_evaluate`` per seed instead).

The measure, per task ``k``: the training loss ``L_k(t)`` of every round
(measured on a fresh minibatch, step 3 of the round), smoothed by a trailing
mean over ``--smooth`` rounds. FedRep's mean curve over seeds defines the
target: ``L_k(0) - 0.9 (L_k(0) - L_k^FedRep(end))``, 90% of the loss
reduction FedRep reaches by the last round (``L_k(0)``, the round-0 loss, is
the same for both algorithms: their first round is identical). Reported per
task and algorithm: rounds until the smoothed loss first reaches the target
(mean and standard deviation over the seeds that reach it, and how many do),
the ratio FedRep / FedGradNorm (above 1: FedGradNorm is faster), rounds until
all tasks have reached it, and the final held-out metrics. Whichever way it
comes out: FedGradNorm balances the tasks' relative progress, which need not
make every task faster.

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
import sys
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
    loss, weight, metric, test_loss = _read_curves(dirs)
    with open(os.path.join(dirs[0], "config.json")) as f:
        task_names = json.load(f)["task_names"]
    return Runs(loss, weight, metric, test_loss, task_names, runner, time.time() - start)


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


def run_stats(runs: Runs, smoothed: np.ndarray, target: np.ndarray) -> dict:
    """One method's seeds: rounds to ``target`` per task and for all tasks, final metrics and weights.

    Args:
      runs: the method's curves over the seeds.
      smoothed: ``smooth(runs.task_loss, window)``, ``[S, R, K]``.
      target: ``[K]`` target losses.
    """
    r = rounds_to_target(smoothed, target)
    # All tasks at target: the last task's round (NaN if any task never gets there).
    all_tasks = np.where(np.isfinite(r).all(axis=1), np.nanmax(np.where(np.isfinite(r), r, -1), axis=1), np.nan)
    return {
        "rounds_to_target": _stats(r),
        "rounds_to_target_per_seed": [[None if not math.isfinite(v) else int(v) for v in row] for row in r],
        "rounds_all_tasks": _stats(all_tasks[:, None]),
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
    rep_mean = np.array([np.nan if v is None else v for v in per_alg["fedrep"]["rounds_to_target"]["mean"]])
    gn_mean = np.array([np.nan if v is None else v for v in per_alg["fedgradnorm"]["rounds_to_target"]["mean"]])
    out["ratio_fedrep_over_fedgradnorm"] = [None if not math.isfinite(v) else float(v) for v in rep_mean / gn_mean]
    rep_all, gn_all = (
        per_alg["fedrep"]["rounds_all_tasks"]["mean"][0],
        per_alg["fedgradnorm"]["rounds_all_tasks"]["mean"][0],
    )
    out["ratio_all_tasks"] = None if rep_all is None or gn_all is None else rep_all / gn_all
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


def table(settings: list[dict]) -> str:
    pm = plus_minus
    lines = []
    for s in settings:
        a = s["analysis"]
        lines.append(
            f"\n{s['dataset']} {s['balance']} (imbalance {s['imbalance']}), {s['rounds']} rounds, "
            f"{len(s['seeds'])} seeds, target = {s['fraction']:.0%} of FedRep's loss reduction"
        )
        head = (
            f"{'task':<12}{'target':>8}{'FedRep rounds':>16}{'FedGN rounds':>16}{'ratio':>7}"
            f"{'FedRep test':>14}{'FedGN test':>14}{'FedGN p':>8}"
        )
        lines += [head, "-" * len(head)]
        n = len(s["seeds"])
        rep, gn = a["fedrep"], a["fedgradnorm"]
        for i, task in enumerate(a["task_names"]):
            ratio = a["ratio_fedrep_over_fedgradnorm"][i]
            rr, gr = rep["rounds_to_target"]["reached"][i], gn["rounds_to_target"]["reached"][i]
            lines.append(
                f"{task:<12}{a['target_loss'][i]:>8.3f}"
                f"{pm(rep['rounds_to_target'], i) + f' ({rr}/{n})':>16}"
                f"{pm(gn['rounds_to_target'], i) + f' ({gr}/{n})':>16}"
                f"{'-' if ratio is None else format(ratio, '.2f'):>7}"
                f"{pm(rep['final_test_metric'], i, '.3f'):>14}{pm(gn['final_test_metric'], i, '.3f'):>14}"
                f"{gn['final_task_weight'][i]:>8.2f}"
            )
        ratio = a["ratio_all_tasks"]
        lines.append(
            f"{'all tasks':<12}{'':>8}{pm(rep['rounds_all_tasks'], 0):>16}{pm(gn['rounds_all_tasks'], 0):>16}"
            f"{'-' if ratio is None else format(ratio, '.2f'):>7}"
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
    changes["checkpoint_every"] = eval_every
    if args.conv_impl:
        changes["conv_impl"] = args.conv_impl
    for name in ("examples_per_client", "test_examples_per_client", "batch_size"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    return dataclasses.replace(default, **changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/convergence")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--balances", default=",".join(BALANCES), help="balanced and/or imbalanced")
    p.add_argument("--imbalance", type=float, default=1.0, help="power-law exponent of the imbalanced setting")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--mtfl_rounds", type=int, default=30)
    p.add_argument("--radcom_rounds", type=int, default=80)
    p.add_argument("--log_every", type=int, default=10, help="rounds per compiled chunk")
    p.add_argument("--smooth", type=int, default=5, help="trailing-mean window of the loss curves (rounds)")
    p.add_argument("--fraction", type=float, default=0.9, help="target: this fraction of FedRep's loss reduction")
    p.add_argument("--runner", default="sweep", choices=("sweep", "sequential"))
    p.add_argument("--references", default=",".join(REFERENCES), help="reference algorithms to run ('' for none)")
    p.add_argument("--conv_impl", default="", help="'' keeps experiments/train.py's default")
    p.add_argument("--examples_per_client", type=int, default=0, help="0: experiments/train.py's default")
    p.add_argument("--test_examples_per_client", type=int, default=0, help="0: experiments/train.py's default")
    p.add_argument("--batch_size", type=int, default=0, help="0: experiments/train.py's default")
    p.add_argument("--toy", action="store_true", help="CI smoke size: RadCom, 2 seeds, 4 rounds, tiny data")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.toy:
        args.datasets, args.seeds, args.radcom_rounds, args.log_every, args.smooth = "synthetic_radcom", 2, 4, 2, 2
        args.examples_per_client, args.test_examples_per_client, args.batch_size = 48, 16, 8
    datasets = [d for d in args.datasets.split(",") if d]
    balances = [b for b in args.balances.split(",") if b]
    for b in balances:
        if b not in BALANCES:
            raise SystemExit(f"--balances: unknown {b!r}; choose from {','.join(BALANCES)}")
    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "convergence.jsonl")
    machine = {"record": "machine", **common.machine_info(), "argv": list(argv) if argv is not None else sys.argv[1:]}
    open(out_path, "w").close()
    common.append_jsonl(out_path, [machine])
    print(f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_1min']}, jax {machine['jax_version']}")
    seeds = list(range(args.seeds))
    settings = []
    for dataset in datasets:
        rounds = args.mtfl_rounds if "mtfl" in dataset else args.radcom_rounds
        for balance in balances:
            imbalance = args.imbalance if balance == "imbalanced" else 0.0
            runs = {}
            for algorithm in ALGORITHMS:
                config = dataclasses.replace(base_config(dataset, rounds, imbalance, args), algorithm=algorithm)
                config.validate()
                print(f"{dataset} {balance}: {algorithm}, {len(seeds)} seeds x {rounds} rounds ...", flush=True)
                workdir = os.path.join(args.workdir, dataset, balance, algorithm)
                runs[algorithm] = run_seeds(config, seeds, args.runner, workdir)
            references = [r for r in args.references.split(",") if r]
            for algorithm in references:
                if algorithm not in REFERENCES:
                    raise SystemExit(f"--references: unknown {algorithm!r}; choose from {','.join(REFERENCES)}")
                config = dataclasses.replace(base_config(dataset, rounds, imbalance, args), algorithm=algorithm)
                print(f"{dataset} {balance}: reference {algorithm}, {len(seeds)} seeds ...", flush=True)
                # Sequential: a reference's state differs from the methods' (local: a trunk per client).
                runs[algorithm] = run_seeds(
                    config, seeds, "sequential", os.path.join(args.workdir, dataset, balance, algorithm)
                )
            analysis = analyse(runs["fedrep"], runs["fedgradnorm"], args.smooth, args.fraction)
            analysis["references"] = {name: _stats(runs[name].final_test_metric) for name in references}
            metrics = [t.metric for t in training.task_table(config)]
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
                "config": dataclasses.asdict(config),
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
