"""Channel robustness of HOTA-FedGradNorm: equal vs channel-unaware vs channel-aware task weights against the SNR.

    python -m benchmarks.channel_robustness --workdir=/tmp/fgn_bench/channel     # the full grid (hours on 2 CPUs)
    python -m benchmarks.channel_robustness --toy --workdir=/tmp/fgn_bench/toy_channel   # CI smoke size
    python -m benchmarks.channel_robustness --cost --workdir=/tmp/fgn_bench/channel      # s/round: ideal vs hota

The paper's robustness claim (Mortaheb, Vahapoglu, Ulukus, Algorithms
15(11):421, 2022): channel-aware weights stay ahead of static equal weights
(FedRep) as the channel degrades. For each synthetic dataset
(``synthetic_radcom``, ``synthetic_mtfl``), power control (``tci``,
``phase``) and path loss (``none``: every client at distance 1; ``far``:
distances uniform in ``--far_range``), three methods train with
``--aggregation=hota`` (experiments/train.py's defaults otherwise):

* ``equal``: ``--algorithm=fedrep`` (w = 1);
* ``unaware``: FedGradNorm with ``--channel_aware=false``;
* ``aware``: FedGradNorm with ``--channel_aware=true``.

Each method runs its whole SNR x seed grid as ONE compiled program
(:func:`fgn_jax.sweep.run_sweep` over ``snr_db`` and ``seed``; divergent
configurations are masked, not fatal). The measure per task: the training
loss relative to round 0, smoothed by a trailing mean over ``--smooth``
rounds; the target is ``--fraction`` of the loss reduction that equal
weights reach at SNR = inf by the last round. Reported per setting, method
and SNR: rounds until every task reached its target, censored seeds kept
(how many of the seeds get there and the median over all of them, as in
:mod:`benchmarks.convergence`), the final mean relative train loss and the
final per-task test metrics (mean ± std over seeds); and for the two
FedGradNorm variants, paired per seed against equal weights at the same SNR
(the same data, initialisation and channel draws): the ratio of all-task
rounds (above 1: faster than equal, a censored seed counted at the budget;
geometric mean, paired-t 95% interval) and the drop in final relative loss
(above 0: lower than equal). Output in ``--workdir``: a
table on the terminal, ``channel_robustness.jsonl`` (one ``machine`` record,
one ``setting`` record per dataset / power control / path loss) and
``channel_robustness.png`` (final relative loss against SNR, one panel per
setting, one line per method). Whichever way it comes out.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Sequence

import numpy as np

from benchmarks import common, convergence
from fgn_jax import sweep, training

METHODS = {
    "equal": dict(algorithm="fedrep"),
    "unaware": dict(algorithm="fedgradnorm", channel_aware=False),
    "aware": dict(algorithm="fedgradnorm", channel_aware=True),
}
DATASETS = ("synthetic_radcom", "synthetic_mtfl")
POWER_CONTROLS = ("tci", "phase")
PATH_LOSSES = ("none", "far")


def run_method(
    base: training.ExperimentConfig, snrs: Sequence[float], seeds: Sequence[int], num_tasks: int, workdir: str
) -> dict:
    """One method's SNR x seed grid as one sweep: ``{snr: {"loss" [S, R, T], "metric" [S, T]}}`` (NaN: diverged)."""
    results = sweep.run_sweep(
        base, {"snr_db": list(snrs), "seed": list(seeds)}, workdir, log=None, on_divergence="mask"
    )
    out = {}
    for snr in snrs:
        loss, metric = [], []
        for r in (r for r in results if r["snr_db"] == snr):
            rows = common.read_jsonl(os.path.join(workdir, r["name"], "metrics.jsonl"))
            curve = np.full((base.rounds, num_tasks), np.nan)
            for row in rows:
                curve[row["round"]] = row["task_loss"]
            loss.append(curve)
            final = r["final_test_metric"] if r["diverged_round"] is None else None
            metric.append(np.full((num_tasks,), np.nan) if final is None else np.asarray(final))
        out[snr] = {"loss": np.array(loss), "metric": np.array(metric)}
    return out


def analyse(runs: dict, window: int, fraction: float) -> dict:
    """Targets from equal weights at the best SNR; per method and SNR rounds to target, final loss and metrics."""
    best = max(runs["equal"])
    ref = runs["equal"][best]["loss"]
    start = ref[:, 0, :].mean(axis=0)
    rel = lambda loss: convergence.smooth(loss / start, window)  # noqa: E731  relative to L(0)
    target = 1.0 - fraction * (1.0 - np.nanmean(rel(ref), axis=0)[-1])
    out = {"target_relative_loss": target.tolist(), "reference_snr_db": best, "methods": {}}
    all_tasks, final = {}, {}
    for method, per_snr in runs.items():
        for snr, r in per_snr.items():
            curves = rel(r["loss"])
            per_task = convergence.rounds_to_target(np.nan_to_num(curves, nan=np.inf), target)
            all_tasks[method, snr] = convergence.all_tasks_rounds(per_task)  # [S, 1], NaN: censored or diverged
            final[method, snr] = np.mean(curves[:, -1, :], axis=1)  # [S]
    for method, per_snr in runs.items():
        rows = {}
        for snr, r in per_snr.items():
            budget = r["loss"].shape[1]
            rows[str(snr)] = {
                "rounds_all_tasks": convergence._stats(all_tasks[method, snr]),
                "rounds_all_tasks_censored": convergence.censored_stats(all_tasks[method, snr], budget),
                "final_relative_loss": convergence._stats(final[method, snr][:, None]),
                "final_test_metric": convergence._stats(r["metric"]),
            }
            if method != "equal":
                # Paired per seed against equal weights at the same SNR (same data, init and channel draws).
                rows[str(snr)]["vs_equal"] = {
                    "ratio_all_tasks": convergence.paired_ratio(
                        all_tasks["equal", snr], all_tasks[method, snr], budget
                    ),
                    "relative_loss_drop": paired_difference(final["equal", snr], final[method, snr]),
                }
        out["methods"][method] = rows
    return out


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Seed-paired ``a - b`` (``[S]``, NaN seeds dropped): mean, paired-t 95% interval, seeds with ``b < a``."""
    from scipy import stats  # a dependency of jax

    d = (a - b)[np.isfinite(a - b)]
    n = d.size
    mean = float(d.mean()) if n else None
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "seeds": int(n), "b_lower": int((d > 0).sum())}


def table(settings: list[dict]) -> str:
    lines = []
    for s in settings:
        a = s["analysis"]
        lines.append(
            f"\n{s['dataset']} power_control={s['power_control']} path_loss={s['path_loss']}: {s['rounds']} rounds, "
            f"{len(s['seeds'])} seeds, target = {s['fraction']:.0%} of equal weights' loss reduction at "
            f"{a['reference_snr_db']} dB"
        )
        head = (
            f"{'SNR dB':>7}{'method':>9}{'all tasks: k/S median':>23}{'x equal [95% CI]':>24}"
            f"{'final rel. loss':>18}{'drop vs equal':>16}  test metric per task"
        )
        lines += [head, "-" * (len(head) + 20)]
        for snr in s["snr_dbs"]:
            for method in METHODS:
                r = a["methods"][method][str(snr)]
                n = len(s["seeds"])
                metrics = " ".join(
                    convergence.plus_minus(r["final_test_metric"], i, ".3f") for i in range(len(s["task_names"]))
                )
                vs = r.get("vs_equal")
                ratio = convergence.ratio_cell(vs["ratio_all_tasks"], 0) if vs else "-"
                drop = vs["relative_loss_drop"]["mean"] if vs else None
                lines.append(
                    f"{snr:>7g}{method:>9}{convergence.censored_cell(r['rounds_all_tasks_censored'], 0, n):>23}"
                    f"{ratio:>24}{convergence.plus_minus(r['final_relative_loss'], 0, '.3f'):>18}"
                    f"{'-' if drop is None else f'{drop:+.3f}':>16}  {metrics}"
                )
    return "\n".join(lines)


def plot(settings: list[dict], path: str) -> None:
    """Final relative train loss (mean ± std over seeds) against the SNR, one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(3.4 * len(settings), 3.2), squeeze=False)
    for ax, s in zip(axes[0], settings):
        snrs = s["snr_dbs"]
        # inf is drawn one step to the right of the largest finite SNR.
        finite = [v for v in snrs if math.isfinite(v)] or [0.0]
        x = [v if math.isfinite(v) else max(finite) + 10 for v in snrs]
        for method in METHODS:
            stats = [s["analysis"]["methods"][method][str(v)]["final_relative_loss"] for v in snrs]
            mean = np.array([np.nan if st["mean"][0] is None else st["mean"][0] for st in stats])
            std = np.array([0.0 if st["std"][0] is None else st["std"][0] for st in stats])
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method)
        ax.set_xticks(x, [f"{v:g}" if math.isfinite(v) else "inf" for v in snrs])
        ax.set_title(f"{s['dataset'].replace('synthetic_', '')} {s['power_control']} pl={s['path_loss']}", fontsize=9)
        ax.set_xlabel("client SNR (dB)")
    axes[0][0].set_ylabel("final train loss / L(0)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COST_VARIANTS = {
    "ideal": dict(aggregation="ideal"),
    "ota": dict(aggregation="ota"),
    "hota_E1": dict(aggregation="hota", cluster_rounds=1),
    "hota_E2": dict(aggregation="hota", cluster_rounds=2),
}


def measure_cost(dataset: str, rounds_per_chunk: int, repeats: int) -> dict:
    """Seconds per global round of the default experiment under each aggregation, side by side.

    Every variant has the same clients (``num_clusters`` x tasks, hota's
    default population) and the defaults otherwise; each compiles and runs
    one chunk first, then the variants take turns, ``repeats`` chunks each
    (interleaved, so a change of machine load hits all of them), and the
    median chunk counts. hota's global round holds E = ``cluster_rounds``
    rounds of local training, so ``per_local_round`` divides by E.
    """
    import time

    import jax

    default = training.ExperimentConfig(dataset=dataset, log_every=rounds_per_chunk)
    clients = default.num_clusters * len(training.task_table(default))
    runs = {}
    for name, changes in COST_VARIANTS.items():
        config = dataclasses.replace(default, num_clients=clients, rounds=10**6, **changes)
        config.validate()
        data = training.build_dataset(config)
        sim = training.build_simulation(config, data)
        env, hparams = sim.make_env(data), config.hparams()
        state = sim.init(jax.random.key(0), env, hparams)
        t0 = time.perf_counter()
        state, m = sim.run_chunk(state, env, hparams, config.rounds)
        jax.block_until_ready(m)
        runs[name] = dict(sim=sim, env=env, hparams=hparams, state=state, first_chunk_s=time.perf_counter() - t0, s=[])
    for _ in range(repeats):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], m = r["sim"].run_chunk(r["state"], r["env"], r["hparams"], 10**6)
            jax.block_until_ready(m)
            r["s"].append((time.perf_counter() - t0) / rounds_per_chunk)
    ideal = float(np.median(runs["ideal"]["s"]))
    out = {"record": "cost", "dataset": dataset, "num_clients": clients, "rounds_per_chunk": rounds_per_chunk}
    out["load_1min"] = common.load_average()
    for name, r in runs.items():
        e = COST_VARIANTS[name].get("cluster_rounds", 1)
        per_round = float(np.median(r["s"]))
        out[name] = {
            "s_per_round": per_round,
            "ratio_to_ideal": per_round / ideal,
            "local_rounds_per_round": e,
            "ratio_per_local_round": per_round / ideal / e,
            "first_chunk_s": r["first_chunk_s"],
        }
    return out


def cost_table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        lines.append(f"\n{row['dataset']}, {row['num_clients']} clients, median of chunks of {row['rounds_per_chunk']}")
        lines.append(f"{'aggregation':<10}{'s/round':>10}{'x ideal':>9}{'E':>3}{'x ideal per local round':>25}")
        for name in COST_VARIANTS:
            v = row[name]
            lines.append(
                f"{name:<10}{v['s_per_round']:>10.4f}{v['ratio_to_ideal']:>9.2f}{v['local_rounds_per_round']:>3}"
                f"{v['ratio_per_local_round']:>25.2f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/channel")
    convergence.add_data_flags(p, DATASETS)
    p.add_argument("--power_controls", default=",".join(POWER_CONTROLS))
    p.add_argument("--path_losses", default=",".join(PATH_LOSSES))
    p.add_argument("--far_range", default="1,3", help="client distances of path_loss=far (exponent 2)")
    p.add_argument("--snr_dbs", default="-10,0,10,20,inf")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--mtfl_rounds", type=int, default=30)
    p.add_argument("--radcom_rounds", type=int, default=80)
    convergence.add_measure_flags(p, reference="equal weights at the best SNR")
    p.add_argument("--toy", action="store_true", help="CI smoke size: RadCom, tci, no path loss, 2 seeds, 4 rounds")
    p.add_argument(
        "--cost",
        action="store_true",
        help="instead of the grid: seconds per round of the default experiment, ideal vs ota vs hota (E=1, 2)",
    )
    p.add_argument("--cost_repeats", type=int, default=5, help="--cost: timed chunks per variant")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.toy:
        args.datasets = args.datasets or "synthetic_radcom"
        args.power_controls, args.path_losses, args.snr_dbs = "tci", "none", "0,inf"
        args.seeds, args.radcom_rounds, args.log_every, args.smooth = 2, 4, 2, 2
        args.examples_per_client, args.test_examples_per_client, args.batch_size = 32, 16, 8
    datasets = convergence.datasets_of(args, DATASETS)
    snrs = [float(v) for v in args.snr_dbs.split(",")]
    seeds = list(range(args.seeds))
    os.makedirs(args.workdir, exist_ok=True)
    machine = common.machine_record(argv)
    if args.cost:
        if any(d in convergence.REAL_DATA for d in datasets):
            raise SystemExit("--cost: times the synthetic datasets only (the real ones add only load time)")
        cost_path = os.path.join(args.workdir, "channel_cost.jsonl")
        rows = [measure_cost(d, args.log_every, 1 if args.toy else args.cost_repeats) for d in datasets]
        open(cost_path, "w").close()
        common.append_jsonl(cost_path, [machine, *rows])
        print(cost_table(rows))
        return [machine, *rows]
    out_path = os.path.join(args.workdir, "channel_robustness.jsonl")
    open(out_path, "w").close()
    common.append_jsonl(out_path, [machine])
    settings = []
    for dataset in datasets:
        rounds = args.mtfl_rounds if "mtfl" in dataset else args.radcom_rounds
        for power_control in args.power_controls.split(","):
            for path_loss in args.path_losses.split(","):
                base = convergence.base_config(dataset, rounds, 0.0, args)
                distance = args.far_range if path_loss == "far" else "1,1"
                base = dataclasses.replace(
                    base, aggregation="hota", power_control=power_control, distance_range=distance
                )
                task_names = [t.name for t in training.task_table(base)]
                runs = {}
                for method, changes in METHODS.items():
                    config = dataclasses.replace(base, **changes)
                    config.validate()
                    print(f"{dataset} {power_control} path_loss={path_loss}: {method} ...", flush=True)
                    workdir = os.path.join(args.workdir, dataset, power_control, path_loss, method)
                    runs[method] = run_method(config, snrs, seeds, len(task_names), workdir)
                setting = {
                    "record": "setting",
                    "dataset": dataset,
                    "power_control": power_control,
                    "path_loss": path_loss,
                    "distance_range": distance,
                    "rounds": rounds,
                    "seeds": seeds,
                    "snr_dbs": snrs,
                    "smooth": args.smooth,
                    "fraction": args.fraction,
                    "task_names": task_names,
                    "analysis": analyse(runs, args.smooth, args.fraction),
                }
                settings.append(setting)
                common.append_jsonl(out_path, [setting])
    print(table(settings))
    plot(settings, os.path.join(args.workdir, "channel_robustness.png"))
    return [machine, *settings]


if __name__ == "__main__":
    main()
