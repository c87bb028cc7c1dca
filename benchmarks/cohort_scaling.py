"""Partial participation at scale: a round's cost against the cohort K and the population C.

    python -m benchmarks.cohort_scaling --workdir=/tmp/fgn_bench/cohort
    python -m benchmarks.cohort_scaling --toy --workdir=/tmp/fgn_bench/cohort_toy   # CI smoke size

Two curves of one FedGradNorm round on random RadCom-shaped data (the 1-D CNN
trunk; benchmarks/common.py), measured side by side in one run:

* cohort: ``--clients_per_round=K`` for K in ``--cohorts`` (default 8 ...
  8192) out of a population of ``--population`` clients, for ``vmap``
  (fgn_jax: gather the cohort, one vmapped update, scatter back), ``loop``
  (the same client function in a Python loop over the cohort) and ``torch``
  (the PyTorch per-client loop of benchmarks/torch_reference.py over K
  clients: a loop's cost does not depend on the clients that sit out);
* population: C in ``--populations`` (default 10^3, 10^4, 10^5) with K =
  ``--population_cohort`` (64), ``--population_examples`` / ``--population_test_examples``
  (16 / 4) examples per client, against C = K with full participation (the
  reference of the target "C = 10^5 at K = 64 within 1.5x of C = 64").

Every measurement is :func:`benchmarks.throughput.measure` of a
:class:`benchmarks.throughput.Spec` in its own subprocess (so its peak RSS is
its own): compilation timed separately (ahead-of-time for vmap), steady-state
seconds per round (minimum over timed chunks, after ``block_until_ready``),
client updates per second (K / seconds per round), peak RSS and, where the
backend reports it, peak device memory. Output in ``--workdir``:
``cohort_scaling.jsonl`` (machine, results, a ``targets`` record),
``cohort_scaling.png`` and a table on the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Sequence

from benchmarks import common, throughput

IMPLS = ("vmap", "loop", "torch")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/cohort")
    p.add_argument("--cohorts", default="8,32,128,512,2048,8192", help="cohort sizes K of the cohort curve")
    p.add_argument("--population", type=int, default=8192, help="clients C of the cohort curve")
    p.add_argument("--examples_per_client", type=int, default=32, help="cohort curve")
    p.add_argument("--test_examples_per_client", type=int, default=8, help="cohort curve")
    p.add_argument("--populations", default="1000,10000,100000", help="populations C of the population curve")
    p.add_argument("--population_cohort", type=int, default=64, help="K of the population curve")
    p.add_argument("--population_examples", type=int, default=16)
    p.add_argument("--population_test_examples", type=int, default=4)
    p.add_argument("--impls", default="vmap,loop,torch", help=f"subset of {','.join(IMPLS)} (cohort curve)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--tau_head", type=int, default=1)
    p.add_argument("--tau_shared", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="rounds per chunk (one compiled call for vmap)")
    p.add_argument("--repeats", type=int, default=2, help="timed chunks after the warm-up chunk")
    p.add_argument("--loop_max_clients", type=int, default=512, help="larger cohorts: loop reported as not run")
    p.add_argument("--torch_max_clients", type=int, default=2048, help="larger cohorts: torch reported as not run")
    p.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--timeout_s", type=float, default=1800, help="per measurement")
    p.add_argument("--toy", action="store_true", help="CI smoke size: tiny curves, no subprocesses")
    return p


def specs(args) -> list[tuple[str, throughput.Spec | None, dict]]:
    """``(curve, spec, not_run_row)`` for every point of both curves (spec None: over a cap)."""
    common_fields = dict(
        batch_size=args.batch_size,
        tau_head=args.tau_head,
        tau_shared=args.tau_shared,
        rounds=args.rounds,
        repeats=args.repeats,
    )
    out = []
    for k in _ints(args.cohorts):
        for impl in [i for i in args.impls.split(",") if i]:
            spec = throughput.Spec(
                "radcom",
                args.population,
                impl=impl,
                clients_per_round=k,
                examples_per_client=args.examples_per_client,
                test_examples_per_client=args.test_examples_per_client,
                torch_threads=args.torch_threads if impl == "torch" else 0,
                **common_fields,
            )
            cap = {"loop": args.loop_max_clients, "torch": args.torch_max_clients}.get(impl)
            if cap is not None and k > cap:
                flag = f"--{impl}_max_clients"
                out.append(("cohort", None, _row(spec, status="not_run", reason=f"K={k} > {flag}={cap}")))
            else:
                out.append(("cohort", spec, {}))
    k = args.population_cohort
    for c in [k, *_ints(args.populations)]:
        spec = throughput.Spec(
            "radcom",
            c,
            impl="vmap",
            clients_per_round=0 if c == k else k,  # the reference: C = K, everyone every round
            examples_per_client=args.population_examples,
            test_examples_per_client=args.population_test_examples,
            **common_fields,
        )
        out.append(("population", spec, {}))
    return out


def _row(spec: throughput.Spec, **fields) -> dict:
    return {"record": "result", "setup": spec.setup, "label": spec.label, **dataclasses.asdict(spec), **fields}


def targets(rows: list[dict], population_cohort: int, torch_k: int = 2048) -> dict:
    """The issue's targets, from the measured rows (None where a point is missing)."""
    ok = [r for r in rows if r.get("record") == "result" and r.get("status") == "ok"]
    pop = {r["num_clients"]: r for r in ok if r["curve"] == "population"}
    out: dict = {"record": "targets"}
    ref = pop.get(population_cohort)
    largest = max((c for c in pop if c != population_cohort), default=None)
    if ref is not None and largest is not None:
        out["population"] = largest
        out["population_ratio"] = pop[largest]["seconds_per_round"] / ref["seconds_per_round"]
        out["population_ratio_ok"] = out["population_ratio"] <= 1.5
        out["population_peak_rss_gib"] = pop[largest]["peak_rss_gib"]
        out["population_rss_ok"] = pop[largest]["peak_rss_gib"] < 12
    at_k = {r["impl"]: r for r in ok if r["curve"] == "cohort" and r["clients_per_round"] == torch_k}
    if "vmap" in at_k and "torch" in at_k:
        out["cohort"] = torch_k
        speedup = at_k["vmap"]["client_updates_per_second"] / at_k["torch"]["client_updates_per_second"]
        out["updates_per_s_vs_torch"] = speedup
        out["updates_per_s_vs_torch_ok"] = speedup >= 10
    return out


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table(rows: list[dict]) -> str:
    head = (
        f"{'curve':<11}{'setup':<24}{'impl':<16}{'status':<9}{'compile s':>10}{'s/round':>10}"
        f"{'updates/s':>11}{'RSS GiB':>9}{'dev GiB':>9}{'load':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("record") != "result":
            continue
        ok = r.get("status") == "ok"
        dev = r.get("device_peak_bytes")
        lines.append(
            f"{r['curve']:<11}{r['setup']:<24}{r['label']:<16}{r['status']:<9}"
            f"{_fmt(r.get('compile_s'), '.1f'):>10}{_fmt(r.get('seconds_per_round'), '.4f'):>10}"
            f"{_fmt(r.get('client_updates_per_second'), '.0f'):>11}"
            f"{_fmt(r.get('peak_rss_gib') if ok else None, '.2f'):>9}"
            f"{_fmt(None if dev is None else dev / 2**30, '.2f'):>9}{_fmt(r.get('load_before'), '.1f'):>6}"
        )
        if not ok:
            lines.append(f"{'':<11}  -> {r.get('reason', '')}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Left: seconds per round against K (one line per implementation); right: against C at fixed K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("record") == "result" and r.get("status") == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for impl in IMPLS:
        rs = sorted((r for r in ok if r["curve"] == "cohort" and r["impl"] == impl), key=lambda r: r["cohort_k"])
        if rs:
            left.plot([r["cohort_k"] for r in rs], [r["seconds_per_round"] for r in rs], marker="o", label=impl)
    pop = sorted((r for r in ok if r["curve"] == "population"), key=lambda r: r["num_clients"])
    if pop:
        right.plot([r["num_clients"] for r in pop], [r["seconds_per_round"] for r in pop], marker="o", label="vmap")
        right.axhline(pop[0]["seconds_per_round"] * 1.5, color="gray", ls="--", label="1.5x of C = K (target)")
    for ax, xlabel, title in (
        (left, "cohort K (clients per round)", f"population {rows[0].get('population', '')}"),
        (right, "population C", "cohort K fixed"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per round (min)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One FedGradNorm round with partial participation (RadCom 1-D CNN)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.toy:
        toy = dict(cohorts="2,4", population=8, populations="40", population_cohort=4, rounds=2, repeats=1)
        toy.update(examples_per_client=8, test_examples_per_client=2, batch_size=4, loop_max_clients=2)
        toy.update(torch_max_clients=4, population_examples=4, population_test_examples=2)
        for name, value in toy.items():  # explicit flags win
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    for impl in filter(None, args.impls.split(",")):
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; choose from {','.join(IMPLS)}")
    if args.population_cohort > min(_ints(args.populations), default=args.population_cohort):
        raise SystemExit("--population_cohort: larger than the smallest of --populations")
    if max(_ints(args.cohorts), default=0) > args.population:
        raise SystemExit("--cohorts: a cohort is larger than --population")

    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "cohort_scaling.jsonl")
    open(out_path, "w").close()
    machine = common.machine_record(argv)
    machine["population"] = args.population
    print(common.machine_line(machine))
    rows: list[dict] = [machine]
    for curve, spec, skipped in specs(args):
        if spec is None:
            row = skipped
        else:
            print(f"measuring {curve}: {spec.setup} {spec.label} (load {common.load_average()}) ...", flush=True)
            row = throughput.measure(spec) if args.toy else throughput._measure_in_subprocess(spec, args.timeout_s)  # noqa: SLF001
        row.update(curve=curve, cohort_k=row["clients_per_round"] or row["num_clients"])
        rows.append(row)
        common.append_jsonl(out_path, [row])  # partial results survive an interrupted run
    rows.append(targets(rows, args.population_cohort, torch_k=max(_ints(args.cohorts)) if args.toy else 2048))
    rows.append({"record": "end", "load_1min": common.load_average()})
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table(rows))
    print("targets: " + json.dumps({k: v for k, v in rows[-2].items() if k != "record"}))
    plot(rows, os.path.join(args.workdir, "cohort_scaling.png"))
    print(f"wrote {out_path} and cohort_scaling.png")
    return rows


if __name__ == "__main__":
    main()
