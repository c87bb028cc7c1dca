"""The linear-rate claim on the smallest problem that satisfies its assumptions.

    python -m benchmarks.convex_toy --out=/tmp/fgn_bench/convex_toy
    python -m benchmarks.convex_toy --out=/tmp/fgn_bench/convex_toy --rounds=400 --seeds=5 --tau_shared=3

FedGradNorm (Mortaheb, Vahapoglu, Ulukus, SPAWC 2022) states that under
strong convexity and smoothness in the shared parameters the trunk converges
exponentially fast (a linear rate: ``||theta_t - theta*|| <= c rho^t``). This
benchmark builds a federated multi-task least-squares problem where the
assumptions hold exactly, runs the project's round on it
(:class:`fgn_jax.simulate.Simulation`, algorithms ``fedgradnorm`` and
``fedrep``), fits ``log ||theta_t - theta*||`` against ``t`` by least squares
and reports the per-round contraction factor ``rate = exp(slope)`` and the fit's
``r2``.

The problem. ``T`` tasks (``--clients_per_task`` clients each), client ``c``
holds ``n`` examples ``x ~ N(0, I_d)`` with targets
``y = s_k x A_k + noise`` (``A_k`` a random ``[d, o]`` matrix, ``s_k`` spread
over ``[1, --scale_spread]`` so that the tasks' losses differ and GradNorm has
something to balance). The trunk is linear and bias-free
(``models.LinearTrunk``: features ``x K``, ``K`` of shape ``[d, F]``), the heads
are linear and FROZEN at their random initial values (``tau_head=0``: no head
phase). Client ``c``'s loss, the mean squared error of the round,
``L_c(K) = 1/(n o) sum_i ||x_i K H_c + b_c - y_i||^2``, is a quadratic in
``vec(K)`` with Hessian ``A_c = 2/(n o) kron(X_c^T X_c, H_c H_c^T)``;
their mean is positive definite as soon as the stacked heads span the feature
space (``T o >= F``) and each ``X_c`` has full column rank: strongly convex
and smooth.

The round as an affine map. Full-batch gradients: every local step uses all of
the client's examples (``sampling="cycle"`` with ``batch_size = n``: each step's
minibatch is the client's whole range, so there is no minibatch noise; with
sampling with replacement SGD noise gives a noise floor, not a linear rate).
Then ``tau_s`` local gradient steps with step ``eta`` map ``theta`` to
``P_c theta + q_c`` and the server's weighted mean of the deltas
(``(1/C) sum_c p_k(c) delta_c``, server SGD with lr ``s``) is
``theta_{t+1} = M(p) theta_t + v(p)``, ``M(p) = I + s/C sum_c p_k(c) (P_c - I)``.
:func:`round_map` computes ``M`` and ``v`` with numpy in float64; the test
checks the simulator's rounds against it.

What ``theta*`` means. For fixed weights ``p`` the round converges to the
fixed point ``theta*(p) = (I - M(p))^{-1} v(p)`` at the rate
``rho(M(p))`` (spectral radius), which the benchmark reports as
``predicted_rate``. With ``tau_s = 1`` (the default) ``theta*(p)`` is the
minimiser of ``sum_c p_k(c) L_c``; with ``tau_s > 1`` local steps drift it away
from that minimiser (reported as ``fixed_point_vs_minimiser``). FedRep has
``p = 1``: ``theta*`` is the equal-weight optimum. FedGradNorm moves ``p``
every round, so its target moves; we measure the distance to
``theta*(p_final)``, the fixed point of the weights it ends with, and also
report ``moving_rate`` / ``moving_r2``, the same fit of the distance to the
fixed point of the current weights, ``||theta_t - theta*(p_t)||``. GradNorm's
step on ``p`` is a subgradient step of constant size (``dL_grad/dp_k = +-g_k``),
so ``p`` need not settle exactly; where it keeps oscillating the distance
stops falling at a floor set by ``--weight_lr``, and the fit covers the rounds
before the floor.

The fit. Rounds ``0..t_end``, where ``t_end`` is the last round before the
distance first falls below ``--floor`` times its initial value (float32
round-off and GradNorm's weight oscillation both put a floor under it);
``rate`` and ``r2`` at the top of each method are the mean rate and the
smallest R² over the seeds.

Output in ``--out``: ``results.json`` (the machine, the problem, per method
``rate``, ``r2``, per-seed values and ``predicted_rate``), ``curves.jsonl``
(per seed, method and round: distance and weights) and ``convex_toy.png``
(``log ||theta_t - theta*||`` against ``t`` with the fitted lines).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax
import numpy as np

from benchmarks import common
from fgn_jax import algorithms, models, simulate
from fgn_jax import tasks as tasks_lib
from fgn_jax.data import partition
from fgn_jax.data import pool as pool_lib

METHODS = ("fedgradnorm", "fedrep")


def build_dataset(args: argparse.Namespace) -> pool_lib.FederatedDataset:
    """The least-squares tasks as an :class:`~fgn_jax.data.pool.ExamplePool`, partitioned over the clients."""
    rng = np.random.default_rng(args.data_seed)
    t, d, o = args.tasks, args.input_dim, args.outputs
    scales = np.geomspace(1.0, args.scale_spread, t)
    maps = rng.standard_normal((t, d, o)) / np.sqrt(d)
    specs = tuple(tasks_lib.TaskSpec(f"task{k}", tasks_lib.REGRESSION, o, tasks_lib.MSE) for k in range(t))
    c = t * args.clients_per_task

    def pool(n: int) -> pool_lib.ExamplePool:
        x = rng.standard_normal((n, d)).astype(np.float32)
        targets = {
            s.name: (scales[k] * (x @ maps[k]) + args.noise * rng.standard_normal((n, o))).astype(np.float32)
            for k, s in enumerate(specs)
        }
        return pool_lib.ExamplePool(x=x, targets=targets, tasks=specs)

    client_task = partition.round_robin_tasks(c, t)
    sizes = np.full(c, args.examples_per_client)
    return partition.partition(
        "convex_toy", pool(c * args.examples_per_client), pool(c * 8), client_task, sizes, np.full(c, 8), args.data_seed
    )


def client_quadratics(env: simulate.Env, heads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every client's loss as ``L_c(k) = k^T A_c k / 2 - b_c^T k + const`` in ``k = vec(K)`` (row-major).

    Read from the data and heads the simulator holds (slot order), in float64.

    Returns:
      ``A [C, D, D]``, ``b [C, D]`` (``D = d F``) and the task index ``[C]``
      of each client slot (only real clients: the toy has no padding).
    """
    info = jax.device_get(env.info)
    x_all, y_all = np.asarray(env.data.train_x, np.float64), np.asarray(env.data.train_y, np.float64)
    kernels = np.asarray(heads["params"]["out"]["kernel"], np.float64)  # [C, F, o]
    biases = np.asarray(heads["params"]["out"]["bias"], np.float64)  # [C, o]
    a, b = [], []
    for c in range(len(info.mask)):
        lo, n = int(info.train_offset[c]), int(info.train_size[c])
        x, y = x_all[lo : lo + n], y_all[lo : lo + n]
        h, o = kernels[c], y.shape[1]
        scale = 2.0 / (n * o)
        a.append(scale * np.kron(x.T @ x, h @ h.T))
        b.append(scale * (x.T @ (y - biases[c]) @ h.T).reshape(-1))
    return np.stack(a), np.stack(b), np.asarray(info.task_index)


def round_map(a, b, task_index, weights, client_lr, server_lr, tau_shared) -> tuple[np.ndarray, np.ndarray]:
    """The round as ``theta -> M theta + v`` for task weights ``weights [T]`` (full-batch local steps).

    Args:
      a, b, task_index: from :func:`client_quadratics`.
      weights: ``[T]`` the task weights applied in the round.
      client_lr, server_lr: plain SGD steps of the clients and the server.
      tau_shared: local steps per round.

    Returns:
      ``M [D, D]`` and ``v [D]``.
    """
    num_clients, dim = b.shape
    eye = np.eye(dim)
    m_sum, v_sum = np.zeros((dim, dim)), np.zeros(dim)
    for c in range(num_clients):
        step = eye - client_lr * a[c]
        p_c, q_c = eye, np.zeros(dim)
        for _ in range(tau_shared):  # theta <- step theta + lr b, tau_shared times
            p_c, q_c = step @ p_c, step @ q_c + client_lr * b[c]
        w = weights[task_index[c]]
        m_sum += w * (p_c - eye)
        v_sum += w * q_c
    return eye + server_lr / num_clients * m_sum, server_lr / num_clients * v_sum


def fixed_point(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.linalg.solve(np.eye(len(v)) - m, v)


def weighted_minimiser(a, b, task_index, weights) -> np.ndarray:
    """``argmin_k sum_c p_k(c) L_c(k)``."""
    w = np.asarray(weights)[task_index]
    return np.linalg.solve(np.einsum("c,cij->ij", w, a), np.einsum("c,ci->i", w, b))


def fit_rate(dist: np.ndarray, floor: float, plateau_factor: float) -> dict:
    """Least-squares fit of ``log dist_t = log c + t log rate`` over the rounds before the floor.

    The floor: ``max(floor * dist[0], plateau_factor * plateau)``, where
    ``plateau`` is the median distance over the last quarter of the rounds
    (float32 round-off for fixed weights, the weights' oscillation for
    GradNorm). The fit covers rounds ``0..t_end - 1``, ``t_end`` the first
    round below the floor (all rounds if none is).

    Args:
      dist: ``[R + 1]`` distances at rounds ``0..R``.
      floor: relative floor (to the initial distance).
      plateau_factor: how far above the plateau the fit must stop.

    Returns:
      ``{"rate", "r2", "fit_rounds", "plateau"}``; ``rate`` and ``r2`` are
      NaN when fewer than 3 rounds lie above the floor (no rate to speak of).
    """
    plateau = float(np.median(dist[-max(len(dist) // 4, 1) :]))
    level = max(floor * dist[0], plateau_factor * plateau)
    below = np.nonzero(dist < level)[0]
    end = int(below[0]) if len(below) else len(dist)
    if end < 3:
        return {"rate": float("nan"), "r2": float("nan"), "fit_rounds": end, "plateau": plateau}
    t, y = np.arange(end, dtype=np.float64), np.log(dist[:end])
    slope, intercept = np.polyfit(t, y, 1)
    resid = y - (slope * t + intercept)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    return {"rate": float(np.exp(slope)), "r2": r2, "fit_rounds": end, "plateau": plateau}


def make_simulation(args: argparse.Namespace, method: str, dataset: pool_lib.FederatedDataset) -> simulate.Simulation:
    config = algorithms.AlgorithmConfig(
        algorithm=method,
        trunk="linear",
        trunk_width=args.features,
        max_outputs=args.outputs,
        num_tasks=dataset.num_tasks,
        tau_head=0,  # frozen heads: the loss is a fixed quadratic in the trunk
        tau_shared=args.tau_shared,
        batch_size=args.examples_per_client,
        sampling="cycle",  # each local step sees the client's whole range: full-batch gradients
        client_optimizer="sgd",
        server_optimizer="sgd",
    )
    return simulate.Simulation(config, tuple(dataset.train.x.shape[1:]), int(dataset.test.size.max()), chunk=1)


def run_one(args, sim, env, seed) -> dict:
    """One seed of one method: the trunk after every round, the weights applied, the closed-form references."""
    hparams = algorithms.HParams.create(1.0, args.server_lr, args.alpha, args.weight_lr)
    state = sim.init(jax.random.key(seed), env, hparams)
    a, b, task_index = client_quadratics(env, jax.device_get(state.clients.head))
    # Step 1/L_max, L_max the largest client smoothness (unless --client_lr is set): every client's
    # local step is then a contraction, whatever tau_shared.
    smooth = float(max(np.linalg.eigvalsh(a_c).max() for a_c in a))
    client_lr = args.client_lr or 1.0 / smooth
    hparams = algorithms.HParams.create(client_lr, args.server_lr, args.alpha, args.weight_lr)
    thetas = [np.asarray(models.get_last_shared_kernel(state.server.trunk), np.float64).reshape(-1)]
    weights = []
    for _ in range(args.rounds):
        state, m = sim.run_chunk(state, env, hparams, args.rounds)
        thetas.append(np.asarray(models.get_last_shared_kernel(state.server.trunk), np.float64).reshape(-1))
        weights.append(np.asarray(m["task_weight"][0], np.float64))
    thetas, weights = np.stack(thetas), np.stack(weights)
    if not np.all(np.isfinite(thetas)):
        raise SystemExit(f"{sim.config.algorithm}, seed {seed}: the trunk diverged (lower --client_lr)")
    final_w = weights[-1]
    m_fin, v_fin = round_map(a, b, task_index, final_w, client_lr, args.server_lr, args.tau_shared)
    star = fixed_point(m_fin, v_fin)
    moving = np.array(
        [fixed_point(*round_map(a, b, task_index, w, client_lr, args.server_lr, args.tau_shared)) for w in weights]
    )
    dist = np.linalg.norm(thetas - star, axis=1)
    # Distance at round t to the fixed point of the weights round t applies (the last round's for t = R).
    dist_moving = np.linalg.norm(thetas - np.concatenate([moving, moving[-1:]]), axis=1)
    # One-round check of the simulator against the closed form, on the first round.
    m0, v0 = round_map(a, b, task_index, weights[0], client_lr, args.server_lr, args.tau_shared)
    one_round_error = float(np.linalg.norm(thetas[1] - (m0 @ thetas[0] + v0)) / np.linalg.norm(thetas[1] - thetas[0]))
    fit = fit_rate(dist, args.floor, args.plateau_factor)
    fit_moving = fit_rate(dist_moving, args.floor, args.plateau_factor)
    return {
        "seed": seed,
        "client_lr": client_lr,
        "smoothness": smooth,
        "strong_convexity": float(np.linalg.eigvalsh(a.mean(axis=0)).min()),
        **fit,
        "moving_rate": fit_moving["rate"],
        "moving_r2": fit_moving["r2"],
        "predicted_rate": float(np.abs(np.linalg.eigvals(m_fin)).max()),
        "final_weights": final_w.tolist(),
        "fixed_point_vs_minimiser": float(
            np.linalg.norm(star - weighted_minimiser(a, b, task_index, final_w)) / np.linalg.norm(star)
        ),
        "one_round_relative_error": one_round_error,
        "plateau_relative": fit["plateau"] / float(dist[0]),
        "final_distance": float(dist[-1]),
        "initial_distance": float(dist[0]),
        "dist": dist,
        "weights": weights,
    }


def plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (method, seeds) in zip(axes[0], runs.items()):
        for r in seeds:
            t = np.arange(len(r["dist"]))
            ax.semilogy(t, r["dist"], lw=1, label=f"seed {r['seed']}")
            n = r["fit_rounds"]
            if np.isfinite(r["rate"]):
                c0 = np.exp(np.polyfit(t[:n], np.log(r["dist"][:n]), 1)[1])
                ax.semilogy(t[:n], c0 * r["rate"] ** t[:n], "k--", lw=0.7)
        rates = [r["rate"] for r in seeds if np.isfinite(r["rate"])]
        ax.set_title(f"{method}: fitted rate {np.mean(rates):.4f}" if rates else f"{method}: no linear segment")
        ax.set_xlabel("round t")
        ax.set_ylabel("||theta_t - theta*||")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/fgn_bench/convex_toy")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (trunk and head initialisations)")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--clients_per_task", type=int, default=1)
    p.add_argument("--input_dim", type=int, default=6)
    p.add_argument("--features", type=int, default=3, help="trunk width F (needs tasks * outputs >= F)")
    p.add_argument("--outputs", type=int, default=2)
    p.add_argument("--examples_per_client", type=int, default=32)
    p.add_argument("--scale_spread", type=float, default=4.0, help="task target scales: geometric in [1, this]")
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--tau_shared", type=int, default=1)
    p.add_argument("--client_lr", type=float, default=0.0, help="0: 1/L_max, the largest client smoothness")
    p.add_argument("--server_lr", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--weight_lr", type=float, default=0.05)
    p.add_argument("--floor", type=float, default=1e-4, help="fit the rounds before dist < floor * dist_0 ...")
    p.add_argument("--plateau_factor", type=float, default=3.0, help="... or dist < this times the final plateau")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for flag in ("rounds", "seeds", "tasks", "clients_per_task", "input_dim", "features", "outputs", "tau_shared"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    if args.tasks * args.outputs < args.features:
        raise SystemExit(
            f"--features: {args.features} features are not identifiable from "
            f"{args.tasks} tasks x {args.outputs} outputs (not strongly convex)"
        )
    if args.examples_per_client < args.input_dim:
        raise SystemExit(f"--examples_per_client: need at least --input_dim={args.input_dim} for strong convexity")
    os.makedirs(args.out, exist_ok=True)
    dataset = build_dataset(args)
    runs = {}
    curves_path = os.path.join(args.out, "curves.jsonl")
    open(curves_path, "w").close()
    for method in METHODS:
        sim = make_simulation(args, method, dataset)
        env = sim.make_env(dataset)
        runs[method] = [run_one(args, sim, env, seed) for seed in range(args.seeds)]
        common.append_jsonl(
            curves_path,
            (
                {
                    "method": method,
                    "seed": r["seed"],
                    "round": t,
                    "dist": float(r["dist"][t]),
                    "task_weight": r["weights"][min(t, len(r["weights"]) - 1)].tolist(),
                }
                for r in runs[method]
                for t in range(len(r["dist"]))
            ),
        )

    def mean(values):  # over the seeds with a rate (None: no seed has one)
        finite = [v for v in values if np.isfinite(v)]
        return float(np.mean(finite)) if finite else None

    def least(values):
        finite = [v for v in values if np.isfinite(v)]
        return float(np.min(finite)) if finite else None

    results = {
        "machine": common.machine_info(),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "problem": {k: v for k, v in vars(args).items() if k != "out"},
    }
    for method, seeds in runs.items():
        per_seed = [{k: v for k, v in r.items() if k not in ("dist", "weights")} for r in seeds]
        results[method] = {
            "rate": mean([r["rate"] for r in seeds]),
            "r2": least([r["r2"] for r in seeds]),
            "seeds_with_rate": int(sum(np.isfinite(r["rate"]) for r in seeds)),
            "predicted_rate": mean([r["predicted_rate"] for r in seeds]),
            "moving_rate": mean([r["moving_rate"] for r in seeds]),
            "moving_r2": least([r["moving_r2"] for r in seeds]),
            "plateau_relative": mean([r["plateau_relative"] for r in seeds]),
            "seeds": [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in per_seed
            ],
        }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(runs, os.path.join(args.out, "convex_toy.png"))
    for method in METHODS:
        r = results[method]
        print(
            f"{method:12s} rate {r['rate']} (predicted {r['predicted_rate']:.5f}) r2 {r['r2']} "
            f"moving: rate {r['moving_rate']} r2 {r['moving_r2']} plateau/d0 {r['plateau_relative']:.2e}"
        )
    print(f"wrote {args.out}/results.json, curves.jsonl, convex_toy.png")
    return results


if __name__ == "__main__":
    main()
