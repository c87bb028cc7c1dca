"""Does the default experiment learn? Every task against its constant predictor, per seed.

    python -m benchmarks.default_runs --workdir=/tmp/fgn_bench/defaults

Runs the default settings (``fgn_jax.training.ExperimentConfig()``) on each
synthetic dataset for every algorithm and seed, through
:func:`fgn_jax.training.train_and_evaluate` (the README's main command is the
synthetic_mtfl / fedgradnorm / seed 0 cell), and scores each task's final
held-out metric against the constant predictor of the same clients
(:func:`fgn_jax.baselines.constant_baseline`): accuracy must be at least
``--accuracy_margin`` above the majority class, NME at most ``--error_ratio``
times the mean predictor's. Writes ``default_runs.jsonl`` (one row per run)
and prints a table; exits 1 if a federated run (fedgradnorm, fedrep) misses
a threshold. ``--override`` changes a default for the whole grid (the search
that chose the defaults ran this with ``--override``, see
benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from fgn_jax import baselines, training

FEDERATED = ("fedgradnorm", "fedrep")


def run_one(config: training.ExperimentConfig, workdir: str) -> dict:
    """One default run; its final test metrics beside the constant baselines."""
    start = time.time()
    summary = training.train_and_evaluate(config, workdir, log=None, overwrite=True)
    dataset = training.build_dataset(config)
    base = baselines.constant_baseline(dataset)
    metrics = [t.metric for t in dataset.tasks]
    test = summary["final_test_metric"]
    return {
        "dataset": config.dataset,
        "algorithm": config.algorithm,
        "seed": config.seed,
        "task_names": dataset.task_names,
        "metric": metrics,
        "test_metric": test,
        "constant_baseline": base,
        "margin": [baselines.margin(m, v, b) for m, v, b in zip(metrics, test, base)],
        "final_task_weight": summary["final_task_weight"],
        "wall_time_s": time.time() - start,
    }


def parse_overrides(items: list[str]) -> dict:
    """``["rounds=100", "client_optimizer=sgd"]`` -> typed ExperimentConfig overrides."""
    defaults, out = training.ExperimentConfig(), {}
    for item in items:
        name, _, value = item.partition("=")
        if not hasattr(defaults, name):
            raise SystemExit(f"error: --override: unknown setting {name!r}")
        kind = type(getattr(defaults, name))
        out[name] = (value.lower() in ("1", "true")) if kind is bool else kind(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--datasets", default="synthetic_mtfl,synthetic_radcom")
    parser.add_argument("--algorithms", default="fedgradnorm,fedrep,local,centralized")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--override", action="append", default=[], help="name=value, e.g. rounds=100 (repeatable)")
    parser.add_argument("--accuracy_margin", type=float, default=0.12)
    parser.add_argument("--error_ratio", type=float, default=0.6)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.override)
    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "default_runs.jsonl")
    rows, failed = [], []
    for dataset in args.datasets.split(","):
        for algorithm in args.algorithms.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                config = dataclasses.replace(
                    training.ExperimentConfig(), dataset=dataset, algorithm=algorithm, seed=seed, **overrides
                )
                row = run_one(config, os.path.join(args.workdir, f"{dataset}_{algorithm}_seed{seed}"))
                row["overrides"] = overrides
                ok = [
                    baselines.beats(m, v, b, args.accuracy_margin, args.error_ratio)
                    for m, v, b in zip(row["metric"], row["test_metric"], row["constant_baseline"])
                ]
                row["beats_baseline"] = ok
                if algorithm in FEDERATED and not all(ok):
                    failed.append(f"{dataset}/{algorithm}/seed {seed}")
                rows.append(row)
                with open(out_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                cells = " | ".join(
                    f"{n} {baselines.SYMBOL[m]} {v:.3f} (const {b:.3f}){'' if k else ' MISS'}"
                    for n, m, v, b, k in zip(
                        row["task_names"], row["metric"], row["test_metric"], row["constant_baseline"], ok
                    )
                )
                print(f"{dataset:16s} {algorithm:12s} seed {seed}: {cells}  [{row['wall_time_s']:.0f} s]", flush=True)
    print(table(rows))
    if failed:
        print(f"below the thresholds: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def table(rows: list[dict]) -> str:
    """Markdown: per dataset and algorithm, each task's metric mean ± std over seeds and the worst margin."""
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        names, metrics = mine[0]["task_names"], mine[0]["metric"]
        lines += [
            "",
            f"{dataset} (constant predictor: "
            + ", ".join(f"{n} {b:.3f}" for n, b in zip(names, np.mean([r["constant_baseline"] for r in mine], 0)))
            + ")",
            "",
            "| algorithm | seeds | "
            + " | ".join(f"{n} {baselines.SYMBOL[m]}" for n, m in zip(names, metrics))
            + " | s/run |",
            "|---|---|" + "---|" * len(names) + "---|",
        ]
        for algorithm in dict.fromkeys(r["algorithm"] for r in mine):
            runs = [r for r in mine if r["algorithm"] == algorithm]
            v = np.array([r["test_metric"] for r in runs])
            ok = np.array([r["beats_baseline"] for r in runs])
            cells = [f"{m:.3f} ± {s:.3f}{'' if k.all() else ' (miss)'}" for m, s, k in zip(v.mean(0), v.std(0), ok.T)]
            wall = np.mean([r["wall_time_s"] for r in runs])
            lines.append(f"| {algorithm} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
