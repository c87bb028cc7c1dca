"""PyTorch reference for the throughput benchmark: one FedGradNorm round, per-client loop.

This is what a PyTorch researcher would write for FedGradNorm (Mortaheb,
Vahapoglu, Ulukus 2022) on top of FedRep (Collins et al. 2021): one torch model
per client, a Python loop over clients and ``torch.optim.SGD``. It is the
baseline the vectorised JAX simulator is timed against (issue "Benchmarks:
throughput against the per-client loop and PyTorch"); it is not part of
``fgn_jax`` and torch stays an optional dependency that ``fgn_jax`` never imports.

The round follows DESIGN.md section 2, for every client ``c`` in turn:

1. head phase: ``tau_head`` SGD steps on the client's head, trunk frozen
   (trunk forward under ``torch.no_grad``), each on a fresh random minibatch;
2. measure: on a fresh minibatch, the loss ``L_c`` and ``g_c = ||dL_c/dW||_2``,
   ``W`` the weight of the trunk's last Linear layer (``"feature"``);
3. shared phase: a deep copy of the global trunk takes ``tau_shared`` SGD steps,
   head frozen; ``delta_c = copy - global``;

then the server applies ``global += mean_c(p_{k(c)} delta_c)`` and takes one
GradNorm step on the task weights ``p`` (closed-form gradient
``sign(G_k - target_k) g_k``, clamp to ``eps``, renormalise to sum ``T``).

The architecture matches ``fgn_jax/models.py`` exactly (valid convolutions,
ReLU, floor 2x2 max pooling, flatten in channels-last order, dense "feature"
layer + ReLU, linear head of width ``max_outputs``), and :func:`load_flax_params`
copies a flax parameter tree into the torch modules, so the two implementations
can be checked against each other (tests/test_torch_reference.py). Inputs use the
torch layout: MTFL ``[N, 1, 40, 40]``, RadCom ``[N, 2, 128]``. The loss is
softmax cross-entropy with integer labels for every client (classification is
enough for a throughput benchmark); data is random.

Run: ``python -m benchmarks.torch_reference --kind=mtfl --num_clients=32 --batch_size=64``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

FEATURE_LAYER = "feature"  # same name as fgn_jax.models.FEATURE_LAYER

# Per kind: (torch input shape of one example, [(channels, kernel, pool)], feature width).
_SPECS = {
    "mtfl": ((1, 40, 40), [(20, 5, True), (48, 3, True), (64, 3, True), (80, 2, False)], 256),
    "radcom": ((2, 128), [(32, 7, True), (64, 5, True), (64, 3, True)], 128),
}


class Trunk(nn.Module):
    """Conv stack + dense "feature" layer, the torch twin of ``MTFLTrunk`` / ``RadComTrunk``.

    Children are named ``conv0``, ``conv1``, ... and ``feature`` like the flax
    modules, which is what :func:`load_flax_params` relies on.
    """

    def __init__(self, input_shape: Sequence[int], convs: Sequence[tuple[int, int, bool]], features: int):
        super().__init__()
        ndim = len(input_shape) - 1
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d}[ndim]
        self.ndim = ndim
        self.pools = [pool for _, _, pool in convs]
        cin, spatial = input_shape[0], list(input_shape[1:])
        for i, (ch, k, pool) in enumerate(convs):
            # Valid padding, stride 1, as in fgn_jax.models.Conv.
            self.add_module(f"conv{i}", conv_cls(cin, ch, k))
            spatial = [s - k + 1 for s in spatial]
            if pool:
                spatial = [s // 2 for s in spatial]
            cin = ch
        self.num_convs = len(convs)
        self.feature = nn.Linear(cin * int(np.prod(spatial)), features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool1d if self.ndim == 1 else F.max_pool2d
        for i in range(self.num_convs):
            x = F.relu(getattr(self, f"conv{i}")(x))
            if self.pools[i]:
                x = pool(x, 2)  # kernel 2, stride 2, floor: same as fgn_jax.models.max_pool
        # flax flattens channels-last; move channels last first so the dense
        # kernel rows line up 1:1 with the flax kernel.
        x = x.movedim(1, -1).flatten(1)
        return F.relu(self.feature(x))


class Head(nn.Module):
    """Personal linear head (``fgn_jax.models.Head``): one Linear named ``out``."""

    def __init__(self, features: int, max_outputs: int):
        super().__init__()
        self.out = nn.Linear(features, max_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(features)


def build_trunk(kind: str) -> nn.Module:
    """The trunk for ``kind`` in ``{"mtfl", "radcom"}`` (torch default init)."""
    if kind not in _SPECS:
        raise ValueError(f"unknown trunk kind {kind!r}; expected one of {sorted(_SPECS)}")
    return Trunk(*_SPECS[kind])


def build_head(features: int, max_outputs: int) -> nn.Module:
    return Head(features, max_outputs)


def input_shape(kind: str) -> tuple[int, ...]:
    """Torch layout of one example: MTFL ``(1, 40, 40)``, RadCom ``(2, 128)``."""
    return _SPECS[kind][0]


def _flax_kernel_to_torch(kernel: np.ndarray, layer: nn.Module) -> np.ndarray:
    if isinstance(layer, nn.Linear):  # [in, out] -> [out, in]
        return kernel.T
    if isinstance(layer, nn.Conv1d):  # [k, in, out] -> [out, in, k]
        return kernel.transpose(2, 1, 0)
    if isinstance(layer, nn.Conv2d):  # [kh, kw, in, out] -> [out, in, kh, kw]
        return kernel.transpose(3, 2, 0, 1)
    raise TypeError(f"no flax -> torch mapping for {type(layer).__name__}")


def load_flax_params(torch_module: nn.Module, flax_params: Mapping) -> nn.Module:
    """Copies a flax param tree (trunk or head) into ``torch_module`` in place.

    ``flax_params`` is what ``MTFLTrunk().init(...)`` returns (``{"params": ...}``)
    or its inner dict. Every layer of the torch module must be present in the
    flax tree under the same name and vice versa. The "feature" kernel rows are
    in channels-last flatten order, which :class:`Trunk` reproduces by moving
    channels last before flattening, so it is a plain transpose.
    """
    tree = flax_params.get("params", flax_params)
    layers = dict(torch_module.named_children())
    if set(layers) != set(tree):
        raise ValueError(f"layer names differ: torch {sorted(layers)} vs flax {sorted(tree)}")
    with torch.no_grad():
        for name, layer in layers.items():
            kernel = _flax_kernel_to_torch(np.asarray(tree[name]["kernel"]), layer)
            bias = np.asarray(tree[name]["bias"])
            if tuple(kernel.shape) != tuple(layer.weight.shape):
                raise ValueError(f"{name}: flax kernel {kernel.shape} vs torch weight {tuple(layer.weight.shape)}")
            layer.weight.copy_(torch.tensor(kernel, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return torch_module


# ---------------------------------------------------------------- one round


def loss_fn(trunk: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of the head outputs against integer labels."""
    return F.cross_entropy(head(trunk(x)), y)


def head_phase(trunk: nn.Module, head: nn.Module, head_opt: torch.optim.Optimizer, batches: Iterable) -> None:
    """SGD steps on the head only; the trunk forward runs without autograd."""
    for x, y in batches:
        with torch.no_grad():
            features = trunk(x)
        loss = F.cross_entropy(head(features), y)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        head_opt.step()


def measure(trunk: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(L_c, g_c)``: the loss and ``||dL_c/dW||_2`` for W the "feature" weight."""
    loss = loss_fn(trunk, head, x, y)
    (grad_w,) = torch.autograd.grad(loss, getattr(trunk, FEATURE_LAYER).weight)
    return loss.item(), grad_w.norm().item()


def shared_phase(global_trunk: nn.Module, head: nn.Module, batches: Iterable, lr: float) -> list[torch.Tensor]:
    """SGD steps on a deep copy of the trunk, head frozen; returns ``delta_c = copy - global``."""
    local = copy.deepcopy(global_trunk)
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    head.requires_grad_(False)
    try:
        for x, y in batches:
            loss = loss_fn(local, head, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        head.requires_grad_(True)
    with torch.no_grad():
        return [pl - pg for pl, pg in zip(local.parameters(), global_trunk.parameters(), strict=True)]


def gradnorm_step(
    weights: torch.Tensor,
    losses: torch.Tensor,
    grad_norms: torch.Tensor,
    initial_losses: torch.Tensor,
    alpha: float,
    lr: float,
    eps: float,
) -> torch.Tensor:
    """One GradNorm step on the task weights (per-task ``losses`` and ``grad_norms``)."""
    g_weighted = weights * grad_norms
    ratios = losses / initial_losses
    target = g_weighted.mean() * (ratios / ratios.mean()) ** alpha
    weights = weights - lr * torch.sign(g_weighted - target) * grad_norms
    weights = weights.clamp(min=eps)
    return weights.numel() * weights / weights.sum()


@dataclasses.dataclass
class Client:
    x: torch.Tensor
    y: torch.Tensor
    task: int
    head: nn.Module
    head_opt: torch.optim.Optimizer


@dataclasses.dataclass
class Federation:
    trunk: nn.Module
    clients: list[Client]
    task_weights: torch.Tensor
    initial_losses: torch.Tensor | None
    generator: torch.Generator
    batch_size: int
    tau_head: int
    tau_shared: int
    lr: float
    alpha: float = 1.5
    weight_lr: float = 0.05
    weight_eps: float = 1e-3


def build_federation(
    kind: str,
    num_clients: int,
    batch_size: int,
    tau_head: int,
    tau_shared: int,
    lr: float = 0.05,
    examples_per_client: int = 256,
    max_outputs: int = 10,
    seed: int = 0,
    num_tasks: int | None = None,
    channels_last: bool = False,
) -> Federation:
    """Random data and fresh models; client ``c`` has task ``c % num_tasks`` (default C = T).

    ``channels_last`` (MTFL only) stores images and conv weights NHWC, PyTorch's
    documented CPU tuning for convolutions (about 15% per MTFL round on the 2-core machine);
    the plain NCHW default is what most research code does.
    """
    num_tasks = num_clients if num_tasks is None else num_tasks
    if not 1 <= num_tasks <= num_clients:
        raise ValueError(f"need 1 <= num_tasks <= num_clients, got {num_tasks} tasks for {num_clients} clients")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    trunk = build_trunk(kind)
    fmt = torch.channels_last if channels_last and len(input_shape(kind)) == 3 else torch.contiguous_format
    trunk = trunk.to(memory_format=fmt)
    features = trunk.feature.out_features
    clients = []
    for c in range(num_clients):
        x = torch.randn(examples_per_client, *input_shape(kind), generator=gen).contiguous(memory_format=fmt)
        y = torch.randint(max_outputs, (examples_per_client,), generator=gen)
        head = build_head(features, max_outputs)
        clients.append(Client(x, y, c % num_tasks, head, torch.optim.SGD(head.parameters(), lr=lr)))
    return Federation(trunk, clients, torch.ones(num_tasks), None, gen, batch_size, tau_head, tau_shared, lr)


def _minibatch(fed: Federation, client: Client) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(client.x.shape[0], (fed.batch_size,), generator=fed.generator)
    return client.x[idx], client.y[idx]


def run_round(fed: Federation) -> dict:
    """One FedGradNorm round over all clients (mutates ``fed``); returns the per-task L, g and p."""
    num_clients, num_tasks = len(fed.clients), fed.task_weights.numel()
    losses, grad_norms = torch.zeros(num_clients), torch.zeros(num_clients)
    update = [torch.zeros_like(p) for p in fed.trunk.parameters()]
    for c, client in enumerate(fed.clients):
        head_phase(fed.trunk, client.head, client.head_opt, (_minibatch(fed, client) for _ in range(fed.tau_head)))
        losses[c], grad_norms[c] = measure(fed.trunk, client.head, *_minibatch(fed, client))
        deltas = shared_phase(fed.trunk, client.head, (_minibatch(fed, client) for _ in range(fed.tau_shared)), fed.lr)
        scale = fed.task_weights[client.task].item() / num_clients
        for u, d in zip(update, deltas, strict=True):
            u.add_(d, alpha=scale)
    with torch.no_grad():
        for p, u in zip(fed.trunk.parameters(), update, strict=True):
            p.add_(u)  # server optimiser: plain SGD with lr 1
    # Per task: average L and g over its clients.
    tasks = torch.tensor([cl.task for cl in fed.clients])
    counts = torch.bincount(tasks, minlength=num_tasks).float()
    task_losses = torch.zeros(num_tasks).index_add_(0, tasks, losses) / counts
    task_norms = torch.zeros(num_tasks).index_add_(0, tasks, grad_norms) / counts
    if fed.initial_losses is None:
        fed.initial_losses = task_losses.clone()  # L_k(0) = round-0 loss
    fed.task_weights = gradnorm_step(
        fed.task_weights,
        task_losses,
        task_norms,
        fed.initial_losses,
        fed.alpha,
        fed.weight_lr,
        fed.weight_eps,
    )
    return {"losses": task_losses, "grad_norms": task_norms, "task_weights": fed.task_weights}


def run_rounds(
    kind: str,
    num_clients: int,
    batch_size: int,
    tau_head: int,
    tau_shared: int,
    rounds: int,
    lr: float = 0.05,
    examples_per_client: int = 256,
    max_outputs: int = 10,
    seed: int = 0,
    threads: int | None = None,
    channels_last: bool = False,
) -> dict:
    """Builds a federation, runs one warm-up round, then times ``rounds`` rounds."""
    if threads is not None:
        torch.set_num_threads(threads)
    fed = build_federation(
        kind,
        num_clients,
        batch_size,
        tau_head,
        tau_shared,
        lr,
        examples_per_client,
        max_outputs,
        seed,
        channels_last=channels_last,
    )
    run_round(fed)  # warm-up (also fixes L_k(0))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_round(fed)
        times.append(time.perf_counter() - start)
    seconds_per_round = sum(times) / rounds
    steps_per_round = num_clients * (tau_head + tau_shared + 1)
    return {
        "kind": kind,
        "num_clients": num_clients,
        "batch_size": batch_size,
        "tau_head": tau_head,
        "tau_shared": tau_shared,
        "rounds": rounds,
        "seconds_per_round": seconds_per_round,
        "seconds_per_round_min": min(times),  # robust to other load on a shared machine
        "client_steps_per_second": steps_per_round / seconds_per_round,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(_SPECS), default="mtfl")
    parser.add_argument("--num_clients", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tau_head", type=int, default=1)
    parser.add_argument("--tau_shared", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--examples_per_client", type=int, default=256)
    parser.add_argument("--max_outputs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--channels_last", action="store_true", help="NHWC images and conv weights (MTFL; faster on CPU)"
    )
    args = parser.parse_args(argv)
    result = run_rounds(**vars(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
