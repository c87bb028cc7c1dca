"""Throughput of one FedGradNorm round: vectorised JAX vs a per-client loop vs PyTorch.

    python -m benchmarks.throughput --workdir=/tmp/fgn_bench/throughput
    python -m benchmarks.throughput --toy --workdir=/tmp/fgn_bench/toy   # CI smoke size, seconds

Times the identical round (same trunk, tau_head, tau_shared, SGD client
optimiser, batch size; DESIGN.md section 2) in three implementations:

* ``vmap``: fgn_jax's vectorised path, ``Simulation.run_chunk`` (clients
  vmapped in groups of ``--client_batch``, rounds in ``lax.scan``), compiled
  ahead of time so that compilation is timed separately; ``vmap/2dev``: the
  same with the cores split into 2 XLA host devices
  (``--xla_force_host_platform_device_count``) and the clients sharded over
  them, as ``--num_devices`` does in experiments/train.py;
* ``loop``: ``--client_execution=loop``, the same client function jitted once
  and called in a Python loop over clients;
* ``torch`` / ``torch_cl``: the PyTorch reference (benchmarks/torch_reference.py;
  ``_cl``: channels-last MTFL images, PyTorch's CPU tuning for convolutions),
  skipped with a note when torch is not installed.

Setups default to the issue's: the MTFL trunk with 32 clients x batch 64 and
the RadCom 1-D CNN with 64, 512 and 4096 clients x batch 32 (loop and PyTorch
capped at ``--loop_max_clients`` / ``--torch_max_clients``, reported as not
run above). Data is random, of the right shapes, in fgn_jax's own
FederatedDataset. Each (setup, implementation) runs in a fresh subprocess by
default, so peak memory (``ru_maxrss``) is its own and one run cannot slow the
next through a warm cache or a full heap.

Reported per measurement: compilation time, seconds per round (the minimum
over timed chunks: the machines are shared, the minimum is the least
disturbed), client steps per second (``C * (tau_head + 1 + tau_shared)`` per
round, the measurement counted as a step, as in the PyTorch reference), model
GFLOP per round from XLA's cost analysis of one client's head step,
measurement and shared step (times C), achieved GFLOP/s and its fraction of
the machine's ``jnp.dot`` float32 peak (2048^2, measured in the same run), and
peak memory. Output: a table on the terminal, ``throughput.jsonl`` (one
``machine`` record, one ``peak`` record, one ``result`` per measurement, one
``default_experiment`` record) and ``throughput.png`` (seconds per round
against the client count) in ``--workdir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from benchmarks import common
from fgn_jax import algorithms, models, sharding, simulate, training
from fgn_jax import tasks as tasks_lib

IMPLS = ("vmap", "loop", "torch", "torch_cl")
RESULT_MARKER = "THROUGHPUT_RESULT "
DEFAULT_SETUPS = "mtfl:32:64,radcom:64:32,radcom:512:32,radcom:4096:32"
FAR_AWAY = 2**30  # stop_round that never stops a chunk early


@dataclasses.dataclass(frozen=True)
class Spec:
    """One measurement: a setup and an implementation."""

    kind: str
    num_clients: int
    batch_size: int
    impl: str
    tau_head: int = 1
    tau_shared: int = 1
    rounds: int = 5  # rounds per chunk (one compiled call; amortises its buffer allocation)
    repeats: int = 2  # timed chunks after the warm-up chunk
    max_warmup_s: float = 120.0  # a slower warm-up chunk leaves one timed chunk
    examples_per_client: int = 64
    conv_impl: str = "auto"
    client_batch: int = 0  # clients per vmapped group (0: experiments/train.py's automatic choice)
    cpu_devices: int = 1  # vmap: XLA host devices the clients are sharded over (the cores split between them)
    torch_threads: int = 0  # 0: torch's default
    client_lr: float = 0.05
    seed: int = 0
    clients_per_round: int = 0  # partial participation: a cohort of K of the num_clients (0: all)
    test_examples_per_client: int = 8

    @property
    def setup(self) -> str:
        cohort = f"/K{self.clients_per_round}" if self.clients_per_round else ""
        return f"{self.kind}:{self.num_clients}x{self.batch_size}{cohort}"

    @property
    def cohort(self) -> int:
        """Clients updated per round."""
        return self.clients_per_round or self.num_clients

    @property
    def label(self) -> str:
        """The implementation, with torch's thread count (``torch_cl/1t``)."""
        if self.impl.startswith("torch"):
            return f"{self.impl}/{self.torch_threads or 'default'}t"
        if self.cpu_devices > 1:
            return f"{self.impl}/{self.cpu_devices}dev"
        return self.impl


def parse_setups(text: str) -> list[tuple[str, int, int]]:
    """``"mtfl:32:64,radcom:512:32"`` -> ``[("mtfl", 32, 64), ("radcom", 512, 32)]``."""
    out = []
    for item in filter(None, text.split(",")):
        kind, clients, batch = item.split(":")
        if kind not in common.INPUT_SHAPES:
            raise ValueError(f"unknown trunk {kind!r} in --setups; choose from {sorted(common.INPUT_SHAPES)}")
        out.append((kind, int(clients), int(batch)))
    return out


def _flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def model_gflop_per_round(kind: str, num_clients: int, batch_size: int, tau_head: int, tau_shared: int) -> float:
    """Model GFLOP of one round from XLA's cost analysis of one client's pieces, times C.

    A head step is a trunk forward pass and a head gradient, the measurement
    a forward pass and the gradient in W, a shared step the full trunk
    gradient. Counted on the plain ``lax`` convolution, the same number for
    every implementation, so achieved GFLOP/s compare like for like. (Cost
    analysis counts a while-loop body once, hence the pieces.)
    """
    trunk = models.TRUNKS[kind](conv_impl="lax")
    tasks = common.TASK_TABLES[kind]
    head = models.Head(tasks_lib.max_outputs(tasks))
    x = jnp.zeros((batch_size, *common.INPUT_SHAPES[kind]), jnp.float32)
    labels = jnp.zeros((batch_size,), jnp.int32)
    tp = trunk.init(jax.random.key(0), x)
    hp = head.init(jax.random.key(1), jnp.zeros((1, trunk.features), jnp.float32))

    # Everything is an argument: a closed-over constant would be folded away
    # by XLA at compile time and its FLOPs not counted.
    def loss(tp, hp, x, labels):
        logits = head.apply(hp, trunk.apply(tp, x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    def head_grad(tp, hp, x, labels):
        return jax.grad(loss, argnums=1)(jax.lax.stop_gradient(tp), hp, x, labels)

    def measure_grad(w, tp, hp, x, labels):
        return jax.value_and_grad(lambda w: loss(models.set_last_shared_kernel(tp, w), hp, x, labels))(w)

    head_step = _flops(head_grad, tp, hp, x, labels)
    measure = _flops(measure_grad, models.get_last_shared_kernel(tp), tp, hp, x, labels)
    shared_step = _flops(jax.grad(loss), tp, hp, x, labels)
    return num_clients * (tau_head * head_step + measure + tau_shared * shared_step) / 1e9


# ------------------------------------------------------------------ workers
def _measure_jax(spec: Spec) -> dict:
    dataset = common.random_dataset(
        spec.kind, spec.num_clients, spec.examples_per_client, spec.test_examples_per_client, seed=spec.seed
    )
    config = algorithms.AlgorithmConfig(
        algorithm="fedgradnorm",
        trunk=spec.kind,
        conv_impl=spec.conv_impl,
        max_outputs=tasks_lib.max_outputs(dataset.tasks),
        num_tasks=dataset.num_tasks,
        tau_head=spec.tau_head,
        tau_shared=spec.tau_shared,
        batch_size=spec.batch_size,
    )
    sim = simulate.Simulation(
        config,
        common.INPUT_SHAPES[spec.kind],
        max_test_size=int(dataset.test.size.max()),
        chunk=spec.rounds,
        client_execution=spec.impl,
        client_batch=spec.client_batch or training.auto_client_batch(spec.batch_size),
        mesh=sharding.make_mesh(spec.cpu_devices) if spec.cpu_devices > 1 else None,
        clients_per_round=spec.clients_per_round,
    )
    env = sim.make_env(dataset)
    hparams = algorithms.HParams.create(spec.client_lr, 1.0, 1.5, 0.05)
    state = sim.init(jax.random.key(spec.seed), env, hparams)
    jax.block_until_ready(state)
    out: dict = {}
    if spec.impl == "vmap":
        stop = jnp.asarray(FAR_AWAY, jnp.int32)
        start = time.perf_counter()
        compiled = simulate.programs(sim).run_chunk.lower(state, env, hparams, stop).compile()
        out["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        if memory is not None:
            out["xla_temp_gib"] = memory.temp_size_in_bytes / 2**30
        chunk = lambda s: compiled(s, env, hparams, stop)  # noqa: E731
    else:
        chunk = lambda s: sim.run_chunk(s, env, hparams, FAR_AWAY)  # noqa: E731

    start = time.perf_counter()
    state, metrics = chunk(state)
    jax.block_until_ready(state)
    out["first_chunk_s"] = time.perf_counter() - start
    out["first_chunk_task_loss"] = [row["task_loss"] for row in simulate.metrics_rows(metrics)]
    times = []
    for _ in range(min(spec.repeats, 1) if out["first_chunk_s"] > spec.max_warmup_s else spec.repeats):
        start = time.perf_counter()
        state, metrics = chunk(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / spec.rounds)
    if not times:  # --repeats=0: the warm-up chunk is the only measurement
        times = [out["first_chunk_s"] / spec.rounds]
    out["seconds_per_round_all"] = times
    out["seconds_per_round"] = min(times)
    if spec.impl == "loop":
        # The loop's client and server functions compile during the first
        # chunk; the rest of that chunk ran at the steady rate.
        out["compile_s"] = max(out["first_chunk_s"] - spec.rounds * min(times), 0.0)
        out["compile_s_estimated"] = True
    out["final_task_loss"] = simulate.metrics_rows(metrics)[-1]["task_loss"]
    return out


def _measure_torch(spec: Spec) -> dict:
    from benchmarks import torch_reference

    # A per-client loop over the cohort: its cost does not depend on the
    # clients that sit the round out.
    result = torch_reference.run_rounds(
        spec.kind,
        spec.cohort,
        spec.batch_size,
        spec.tau_head,
        spec.tau_shared,
        spec.rounds,
        lr=spec.client_lr,
        examples_per_client=spec.examples_per_client,
        max_outputs=tasks_lib.max_outputs(common.TASK_TABLES[spec.kind]),
        seed=spec.seed,
        threads=spec.torch_threads or None,
        channels_last=spec.impl == "torch_cl",
    )
    return {
        "seconds_per_round": result["seconds_per_round_min"],
        "seconds_per_round_mean": result["seconds_per_round"],
        "torch_version": result["torch_version"],
        "torch_threads": result["threads"],
    }


def measure(spec: Spec) -> dict:
    """Runs one measurement in this process and returns its result record."""
    row = {"record": "result", "setup": spec.setup, "label": spec.label, **dataclasses.asdict(spec)}
    row["load_before"] = common.load_average()
    try:
        row.update(_measure_torch(spec) if spec.impl.startswith("torch") else _measure_jax(spec))
        row["status"] = "ok"
    except ImportError as e:
        row.update(status="not_run", reason=f"torch is not installed ({e})")
    row["load_after"] = common.load_average()
    row["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    row["peak_rss_gib"] = common.peak_rss_gib()
    row["device_peak_bytes"] = None if spec.impl.startswith("torch") else common.device_peak_bytes()
    if row["status"] == "ok":
        steps = spec.cohort * (spec.tau_head + 1 + spec.tau_shared)
        row["client_steps_per_second"] = steps / row["seconds_per_round"]
        row["client_updates_per_second"] = spec.cohort / row["seconds_per_round"]
    return row


def _measure_in_subprocess(spec: Spec, timeout_s: float, malloc_hugetlb: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--worker", json.dumps(dataclasses.asdict(spec))]
    base = {"record": "result", "setup": spec.setup, "label": spec.label, **dataclasses.asdict(spec)}
    env = dict(os.environ)
    if spec.cpu_devices > 1:
        flag = f"--xla_force_host_platform_device_count={spec.cpu_devices}"
        env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), flag]))
    if malloc_hugetlb:
        # Transparent huge pages for malloc'd buffers: a program whose buffers
        # are gigabytes spends less time first-touching 4 KiB pages.
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    reason = f"exit code {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
    return {**base, "status": "error", "reason": reason + ": " + " | ".join(tail)}


def default_experiment_compile() -> dict:
    """Trace + compile time of the round chunk of ``python -m experiments.train`` with its defaults.

    Measured for the configured ``conv_impl`` and, when that is not it, for
    ``"auto"``, in this process after the other measurements (a fresh
    Simulation always traces and compiles anew).
    """
    config = training.ExperimentConfig()
    row: dict = {"record": "default_experiment", "conv_impl_default": config.conv_impl}
    dataset = training.build_dataset(config)
    for impl in dict.fromkeys([config.conv_impl, "auto"]):
        sim = training.build_simulation(dataclasses.replace(config, conv_impl=impl), dataset)
        env = simulate.make_env(dataset)
        hparams = config.hparams()
        state = sim.init(jax.random.key(config.seed), env, hparams)
        start = time.perf_counter()
        lowered = simulate.programs(sim).run_chunk.lower(state, env, hparams, jnp.asarray(config.rounds, jnp.int32))
        traced = time.perf_counter()
        lowered.compile()
        row[f"{impl}_trace_s"] = traced - start
        row[f"{impl}_compile_s"] = time.perf_counter() - traced
        row[f"{impl}_total_s"] = time.perf_counter() - start
    return row


# ------------------------------------------------------------------ report
def add_ratios(rows: list[dict]) -> None:
    """Per setup: speed-up of vmap over loop and over the fastest PyTorch variant."""
    by_setup: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            by_setup.setdefault(row["setup"], {})[row["label"]] = row
    for labels in by_setup.values():
        torches = [row for label, row in labels.items() if label.startswith("torch")]
        for label, vm in labels.items():
            if not label.startswith("vmap"):
                continue
            if "loop" in labels:
                vm["speedup_vs_loop"] = labels["loop"]["seconds_per_round"] / vm["seconds_per_round"]
            if torches:
                best = min(torches, key=lambda r: r["seconds_per_round"])
                vm["speedup_vs_torch"] = best["seconds_per_round"] / vm["seconds_per_round"]
                vm["torch_baseline"] = best["label"]


def add_flops(rows: list[dict], peak_gflops: float | None) -> None:
    cache: dict[tuple, float] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["kind"], row["num_clients"], row["batch_size"], row["tau_head"], row["tau_shared"])
        if key not in cache:
            cache[key] = model_gflop_per_round(*key)
        row["model_gflop_per_round"] = cache[key]
        row["gflops_per_s"] = cache[key] / row["seconds_per_round"]
        if peak_gflops:
            row["fraction_of_peak"] = row["gflops_per_s"] / peak_gflops


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def table(rows: list[dict]) -> str:
    head = (
        f"{'setup':<18}{'impl':<12}{'status':<9}{'compile s':>10}{'s/round':>10}{'steps/s':>10}"
        f"{'GFLOP/s':>9}{'%peak':>7}{'RSS GiB':>9}{'x loop':>8}{'x torch':>8}{'load':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("record") != "result":
            continue
        ok = r.get("status") == "ok"
        peak = r.get("fraction_of_peak")
        lines.append(
            f"{r['setup']:<18}{r['label']:<12}{r['status']:<9}"
            f"{_fmt(r.get('compile_s'), '.1f'):>10}{_fmt(r.get('seconds_per_round'), '.3f'):>10}"
            f"{_fmt(r.get('client_steps_per_second'), '.0f'):>10}{_fmt(r.get('gflops_per_s'), '.1f'):>9}"
            f"{_fmt(None if peak is None else 100 * peak, '.1f'):>7}"
            f"{_fmt(r.get('peak_rss_gib') if ok else None, '.2f'):>9}"
            f"{_fmt(r.get('speedup_vs_loop'), '.2f'):>8}{_fmt(r.get('speedup_vs_torch'), '.2f'):>8}"
            f"{_fmt(r.get('load_before'), '.1f'):>6}"
        )
        if not ok:
            lines.append(f"{'':<18}  -> {r.get('reason', '')}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Seconds per round against the client count, one line per trunk and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lines: dict[tuple, list] = {}
    for r in rows:
        if r.get("record") == "result" and r.get("status") == "ok":
            lines.setdefault((r["kind"], r["label"], r["batch_size"]), []).append(r)
    for (kind, impl, batch), rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: r["num_clients"])
        ax.plot(
            [r["num_clients"] for r in rs],
            [r["seconds_per_round"] for r in rs],
            marker="o" if kind == "radcom" else "s",
            label=f"{kind} B={batch}: {impl}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("seconds per round (min)")
    ax.set_title("One FedGradNorm round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/fgn_bench/throughput")
    p.add_argument("--setups", default=DEFAULT_SETUPS, help="comma-separated kind:clients:batch")
    p.add_argument("--impls", default="vmap,loop,torch,torch_cl", help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--tau_head", type=int, default=1)
    p.add_argument("--tau_shared", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="rounds per chunk (one compiled call for vmap)")
    p.add_argument("--repeats", type=int, default=2, help="timed chunks after the warm-up chunk (0: time the warm-up)")
    p.add_argument("--examples_per_client", type=int, default=64)
    p.add_argument("--conv_impl", default="auto", choices=models.CONV_IMPLS)
    p.add_argument(
        "--client_batch", type=int, default=0, help="clients per vmapped group (0: experiments/train.py's choice)"
    )
    p.add_argument("--loop_max_clients", type=int, default=512, help="larger setups: loop reported as not run")
    p.add_argument("--torch_max_clients", type=int, default=512, help="larger setups: torch reported as not run")
    p.add_argument(
        "--torch_threads", default="1,2", help="comma-separated torch.set_num_threads values, each timed (0: default)"
    )
    p.add_argument(
        "--cpu_devices",
        default="1,2",
        help="vmap: comma-separated XLA host device counts, each timed (the clients sharded over them)",
    )
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True, help="one subprocess each")
    p.add_argument("--timeout_s", type=float, default=3600, help="per measurement (with --isolate)")
    p.add_argument(
        "--malloc_hugetlb", action="store_true", help="workers run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
    )
    p.add_argument("--skip_peak", action="store_true", help="do not measure the matmul peak")
    p.add_argument("--skip_default_compile", action="store_true", help="do not time the default experiment")
    p.add_argument("--toy", action="store_true", help="CI smoke size: tiny setups, one round, no subprocesses")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        row = measure(Spec(**json.loads(args.worker)))
        print(RESULT_MARKER + json.dumps(row), flush=True)
        return [row]
    if args.toy:
        parser = build_parser()
        toy = dict(setups="mtfl:5:4,radcom:3:4,radcom:6:4", torch_threads="1", cpu_devices="1", rounds=2, repeats=1)
        toy.update(examples_per_client=8, loop_max_clients=5, torch_max_clients=5)
        for name, value in toy.items():  # explicit flags win
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        args.isolate, args.skip_default_compile = False, True
    impls = [i for i in args.impls.split(",") if i]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; choose from {','.join(IMPLS)}")

    os.makedirs(args.workdir, exist_ok=True)
    out_path = os.path.join(args.workdir, "throughput.jsonl")
    open(out_path, "w").close()
    machine = common.machine_record(argv)
    print(common.machine_line(machine))
    rows: list[dict] = [machine]
    peak = None
    if not args.skip_peak:
        peak = common.matmul_peak_gflops()
        rows.append({"record": "peak", "matmul_gflops": peak, "n": 2048, "load": common.load_average()})
        print(f"jnp.dot 2048^2 float32 peak: {peak:.1f} GFLOP/s")

    threads = [int(t) for t in args.torch_threads.split(",") if t]
    cpu_devices = [int(d) for d in args.cpu_devices.split(",") if d]
    if any(d > 1 for d in cpu_devices) and not args.isolate:
        raise SystemExit("--cpu_devices above 1 needs --isolate (the device count is fixed when JAX starts)")
    results = []
    for kind, clients, batch in parse_setups(args.setups):
        variants = []
        for impl in impls:
            if impl == "torch_cl" and kind != "mtfl":
                continue  # channels-last only changes 2-D convolutions
            if impl.startswith("torch"):
                variants += [(impl, t, 1) for t in threads]
            elif impl == "vmap":
                variants += [(impl, 0, d) for d in cpu_devices]
            else:
                variants.append((impl, 0, 1))
        for impl, torch_threads, devices in variants:
            spec = Spec(
                kind,
                clients,
                batch,
                impl,
                tau_head=args.tau_head,
                tau_shared=args.tau_shared,
                rounds=args.rounds,
                repeats=args.repeats,
                examples_per_client=args.examples_per_client,
                conv_impl=args.conv_impl,
                client_batch=args.client_batch,
                torch_threads=torch_threads,
                cpu_devices=devices,
            )
            cap = args.loop_max_clients if impl == "loop" else args.torch_max_clients
            if impl != "vmap" and clients > cap:
                flag = "--loop_max_clients" if impl == "loop" else "--torch_max_clients"
                row = {"record": "result", "setup": spec.setup, "label": spec.label, **dataclasses.asdict(spec)}
                row.update(status="not_run", reason=f"{clients} clients > {flag}={cap}")
            else:
                print(f"measuring {spec.setup} {spec.label} (load {common.load_average()}) ...", flush=True)
                if args.isolate:
                    row = _measure_in_subprocess(spec, args.timeout_s, args.malloc_hugetlb)
                else:
                    row = measure(spec)
            results.append(row)
            common.append_jsonl(out_path, [row])  # partial results survive an interrupted run
    add_flops(results, peak)
    add_ratios(results)
    rows += results
    if not args.skip_default_compile:
        print("timing the compilation of the default experiment ...", flush=True)
        rows.append(default_experiment_compile())
    rows.append({"record": "end", "load_1min": common.load_average()})
    with open(out_path, "w") as f:  # rewrite with the ratios and FLOP numbers
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(table(rows))
    for row in rows:
        if row["record"] == "default_experiment":
            timed = [k[: -len("_total_s")] for k in row if k.endswith("_total_s")]
            print("default experiment trace+compile: " + ", ".join(f"{i} {row[i + '_total_s']:.1f} s" for i in timed))
    plot(rows, os.path.join(args.workdir, "throughput.png"))
    print(f"wrote {out_path} and throughput.png")
    return rows


if __name__ == "__main__":
    main()
