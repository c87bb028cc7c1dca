"""FedRep and FedGradNorm rounds for a population of personalised clients.

* FedRep: Collins, Hassani, Mokhtari, Shakkottai, "Exploiting Shared
  Representations for Personalized Federated Learning", ICML 2021.
* FedGradNorm: Mortaheb, Vahapoglu, Ulukus, "FedGradNorm: Personalized
  Federated Gradient-Normalized Multi-Task Learning", IEEE SPAWC 2022.

Two reference points bracket them (``--algorithm=local|centralized``):

* ``local``: every client trains its own trunk and head alone, with the same
  head and shared phases, and nothing is aggregated (the floor that
  federation must beat);
* ``centralized``: one trunk and the clients' heads trained jointly on the
  union of the clients' data: each of the round's ``tau_head + tau_shared``
  steps takes a minibatch of ``batch_size`` from every client, and the trunk
  follows the mean of the clients' gradients with one persistent client
  optimiser (the same number of example-gradient steps as a federated round;
  the ceiling of what sharing the trunk can give).

One round (DESIGN.md section 2), for every client c at once:

1. broadcast the trunk ``theta`` and task weights ``p``;
2. head phase: ``tau_head`` optimiser steps on the head, trunk frozen;
3. measure, on a fresh minibatch: ``L_c`` and ``g_c = ||dL_c/dW||`` (W: kernel
   of the last shared layer; unweighted loss);
4. shared phase: ``tau_shared`` steps on a copy of the trunk, head frozen,
   ``delta_c = theta_c - theta``;
5. server: ``delta = sum_c m_c p_k(c) delta_c / sum_c m_c`` through the server
   optimiser (m_c: 1 for real clients, 0 for padding);
6. FedGradNorm only: one GradNorm step on ``p`` from per-task means of ``L``
   and ``g``; FedRep keeps ``p = 1``.

Choices made where the paper text was not available (all documented in the
README): head phase -> measure -> shared phase; the task weight applied at the
server to the client update (a weight inside the client loss would be undone
by Adam's scale invariance); ``L_k(0)`` is the round-0 loss; plain gradient
descent on ``p``; minibatches drawn with replacement from the client's range;
each client's optimiser state for the head persists across rounds, the one for
its trunk copy starts fresh every round.

The client code below is written for ONE client; :mod:`fgn_jax.simulate`
vmaps (or loops) it over the client axis in exactly one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fgn_jax import aggregation as aggregation_lib
from fgn_jax import channel as channel_lib
from fgn_jax import models, optimizers, weightings
from fgn_jax import tasks as tasks_lib
from fgn_jax.types import Params, PRNGKey
from fgn_jax.weightings import base as weighting_base

ALGORITHMS = ("fedgradnorm", "fedrep", "local", "centralized")
# How a client draws a minibatch from its own range: "replacement" (uniform,
# with replacement; the default) or "cycle" (its examples in order, wrapping
# around: deterministic; with batch_size a multiple of the client's size, a
# step's gradient is exactly the full-batch gradient).
SAMPLINGS = ("replacement", "cycle")
# The weighting each algorithm name stands for (``--weighting`` overrides it).
WEIGHTING_OF_ALGORITHM = {"fedgradnorm": "gradnorm", "fedrep": "equal", "local": "equal", "centralized": "equal"}
# Reference algorithms (module docstring): no federated aggregation.
REFERENCES = ("local", "centralized")


@struct.dataclass
class HParams:
    """Float hyperparameters: pytree leaves, so a sweep can vmap over them."""

    client_lr: jax.Array
    server_lr: jax.Array
    alpha: jax.Array
    weight_lr: jax.Array
    dwa_temperature: jax.Array = 2.0  # DWA's softmax temperature (fgn_jax.weightings.dwa)
    cagrad_c: jax.Array = 0.5  # CAGrad's ball radius c (fgn_jax.weightings.cagrad)
    uncertainty_lr: jax.Array = 0.05  # step of the log-variances (fgn_jax.weightings.uncertainty)
    # Channel knobs (fgn_jax.channel; used by the ota/hota aggregations only).
    snr_db: jax.Array = 10.0  # client -> receiver SNR per entry, dB (inf: no noise)
    ps_snr_db: jax.Array = 20.0  # IS -> PS SNR per entry, dB (inf: no noise)
    truncation_q: jax.Array = 0.8  # tci non-truncation probability q
    rician_k: jax.Array = 3.0  # Rician K factor (linear)

    @classmethod
    def create(
        cls,
        client_lr,
        server_lr,
        alpha,
        weight_lr,
        dwa_temperature=2.0,
        cagrad_c=0.5,
        uncertainty_lr=0.05,
        *,
        snr_db=10.0,
        ps_snr_db=20.0,
        truncation_q=0.8,
        rician_k=3.0,
    ) -> "HParams":
        f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(
            f(client_lr),
            f(server_lr),
            f(alpha),
            f(weight_lr),
            f(dwa_temperature),
            f(cagrad_c),
            f(uncertainty_lr),
            snr_db=f(snr_db),
            ps_snr_db=f(ps_snr_db),
            truncation_q=f(truncation_q),
            rician_k=f(rician_k),
        )


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    """Static settings: they fix shapes and the program, not numbers."""

    algorithm: str = "fedgradnorm"
    trunk: str = "mtfl"
    trunk_width: int = 0  # features of the trunk's last layer; 0: the trunk's own default
    conv_impl: str = "auto"
    max_outputs: int = 10
    num_tasks: int = 5
    tau_head: int = 1  # 0: no head phase, every head stays at its initial value (frozen heads)
    tau_shared: int = 1
    batch_size: int = 32
    sampling: str = "replacement"  # one of SAMPLINGS
    client_optimizer: str = "sgd"
    server_optimizer: str = "sgd"
    weight_eps: float = 1e-3
    weighting: str = ""  # "": the algorithm's own (WEIGHTING_OF_ALGORITHM)
    aggregation: str = "ideal"
    channel: channel_lib.ChannelConfig = channel_lib.ChannelConfig()  # used by ota / hota

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {ALGORITHMS}")
        if self.weighting_name not in weightings.WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {weightings.WEIGHTINGS}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of {SAMPLINGS}")
        if self.tau_head < 0 or self.tau_shared < 1:
            raise ValueError(f"need tau_head >= 0 and tau_shared >= 1, got {self.tau_head}, {self.tau_shared}")
        if self.aggregation not in aggregation_lib.AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r}; choose one of {tuple(aggregation_lib.AGGREGATIONS)}"
            )
        if self.weighting_name in weightings.NEEDS_TASK_UPDATES and self.aggregation != "ideal":
            raise ValueError(
                f"weighting {self.weighting_name!r} needs the per-task updates at the server, which "
                f"aggregation {self.aggregation!r} does not deliver; use aggregation 'ideal'"
            )

    @property
    def weighting_name(self) -> str:
        return self.weighting or WEIGHTING_OF_ALGORITHM[self.algorithm]


@struct.dataclass
class ClientInfo:
    """What the round needs to know about each client (stacked: ``[C]``)."""

    client_id: jax.Array  # int32, stable id used to derive the client's RNG
    task_index: jax.Array  # int32 in [0, T)
    task: tasks_lib.TaskArrays
    train_offset: jax.Array  # int32
    train_size: jax.Array  # int32
    test_offset: jax.Array  # int32
    test_size: jax.Array  # int32
    mask: jax.Array  # float32, 1 for a real client, 0 for padding
    distance: jax.Array  # float32, distance to the receiver (path loss of ota / hota; 1: none)


@struct.dataclass
class DeviceData:
    """All clients' examples, one flat array per field (not per client)."""

    train_x: jax.Array  # [N_train, ...]
    train_y: jax.Array  # [N_train, target_width]
    test_x: jax.Array  # [N_test, ...]
    test_y: jax.Array  # [N_test, target_width]


@struct.dataclass
class ClientState:
    head: Params  # [C, ...] when stacked
    head_opt_state: optax.OptState  # [C, ...] when stacked
    trunk: Params = None  # algorithm "local" only: the client's own trunk, [C, ...] when stacked


@struct.dataclass
class ServerState:
    trunk: Params
    opt_state: optax.OptState
    weighting: Any  # the weighting method's state (fgn_jax.weightings)
    round: jax.Array  # [] int32, rounds completed


class ClientOutput(NamedTuple):
    delta: Params  # theta_c - theta
    loss: jax.Array  # [] L_c measured in step 3
    grad_norm: jax.Array  # [] g_c


class FederatedAlgorithm(NamedTuple):
    """Pure functions of one algorithm (fedjax style).

    ``init_server(key)``, ``init_client(key)`` build fresh states;
    ``client_update(trunk, client_state, info, data, key)`` is one client's
    round (unbatched); ``server_update(server_state, outputs, infos, key)``
    takes the client outputs stacked on a leading axis and returns the new
    server state and the round's metrics.
    """

    init_server: Callable
    init_client: Callable
    client_update: Callable
    server_update: Callable
    trunk_model: nn.Module
    head_model: nn.Module
    central_client_step: Callable  # centralized: (trunk, client, info, data, key) -> (client, ClientOutput)
    central_server_step: Callable  # centralized: (server, outputs, infos) -> server
    aggregator: aggregation_lib.Aggregator
    # (server, outputs, infos, key, clients, local_round) -> (server, clients, metrics): the round's server
    # side for a hierarchical aggregator (aggregation.run_hierarchical calls local_round for rounds e >= 1).
    hierarchical_update: Callable


def _sample(key: PRNGKey, x, y, offset, size, batch_size, sampling: str = "replacement"):
    if sampling == "cycle":
        # Deterministic: the key is unused, every step sees the same examples.
        idx = offset + jnp.arange(batch_size) % jnp.maximum(size, 1)
    else:
        idx = offset + jax.random.randint(key, (batch_size,), 0, jnp.maximum(size, 1))
    return x[idx], y[idx]


def build(config: AlgorithmConfig, hparams: HParams, input_shape: tuple[int, ...]) -> FederatedAlgorithm:
    """Builds the algorithm's pure functions.

    Args:
      config: static settings.
      hparams: float hyperparameters (may be tracers inside a vmapped sweep).
      input_shape: shape of one example, e.g. ``(40, 40, 1)``.
    """
    width = {"features": config.trunk_width} if config.trunk_width else {}
    trunk_model = models.TRUNKS[config.trunk](conv_impl=config.conv_impl, **width)
    head_model = models.Head(config.max_outputs)
    client_tx = optimizers.make(config.client_optimizer, hparams.client_lr)
    server_tx = optimizers.make(config.server_optimizer, hparams.server_lr)
    # The two seams the round calls: how tasks are weighted, how updates are aggregated.
    weighting = weightings.make(config.weighting_name, hparams, eps=config.weight_eps)
    aggregator = aggregation_lib.AGGREGATIONS[config.aggregation](config.channel, hparams)
    if config.aggregation != "ideal" and weighting.needs_task_updates:
        # Over the air the server only receives the superposed sum, never the per-task updates.
        raise ValueError(f"aggregation {config.aggregation!r} cannot serve the weighting {config.weighting_name!r}")

    def features(trunk, x):
        return trunk_model.apply(trunk, x)

    def sample_minibatch(key, info, data):
        return _sample(
            key, data.train_x, data.train_y, info.train_offset, info.train_size, config.batch_size, config.sampling
        )

    def loss_from_features(head, feats, y, task):
        return jnp.mean(tasks_lib.per_example_loss(head_model.apply(head, feats), y, task))

    def init_server(key: PRNGKey) -> ServerState:
        trunk = trunk_model.init(key, jnp.zeros((1, *input_shape), jnp.float32))
        # centralized: the trunk follows the clients' mean gradient with a
        # persistent client optimiser (no server optimiser).
        trunk_tx = client_tx if config.algorithm == "centralized" else server_tx
        return ServerState(
            trunk=trunk,
            opt_state=trunk_tx.init(trunk),
            weighting=weighting.init(config.num_tasks),
            round=jnp.zeros((), jnp.int32),
        )

    def init_client(key: PRNGKey) -> ClientState:
        feature_dim = trunk_model.features
        head = head_model.init(key, jnp.zeros((1, feature_dim), jnp.float32))
        return ClientState(head=head, head_opt_state=client_tx.init(head))

    def client_update(trunk, client: ClientState, info: ClientInfo, data: DeviceData, key: PRNGKey):
        k_head, k_measure, k_shared = jax.random.split(key, 3)
        if config.algorithm == "local":
            trunk = client.trunk  # alone: the client's own trunk, never aggregated

        def sample(k):
            return sample_minibatch(k, info, data)

        # 2. Head phase: the trunk is the broadcast theta for every client, so
        # its forward pass runs with shared weights (one big matmul under vmap).
        def head_step(carry, k):
            head, opt_state = carry
            x, y = sample(k)
            feats = features(trunk, x)
            grads = jax.grad(loss_from_features)(head, feats, y, info.task)
            updates, opt_state = client_tx.update(grads, opt_state, head)
            return (optax.apply_updates(head, updates), opt_state), None

        (head, head_opt_state), _ = jax.lax.scan(
            head_step, (client.head, client.head_opt_state), jax.random.split(k_head, config.tau_head)
        )

        # 3. Measure L_c and ||dL_c/dW||, differentiating in W only.
        x, y = sample(k_measure)

        def loss_of_w(w):
            feats = features(models.set_last_shared_kernel(trunk, w), x)
            return loss_from_features(head, feats, y, info.task)

        loss, grad_w = jax.value_and_grad(loss_of_w)(models.get_last_shared_kernel(trunk))
        grad_norm = jnp.sqrt(jnp.sum(grad_w**2))

        # 4. Shared phase on this client's own copy of the trunk.
        def shared_step(carry, k):
            local, opt_state = carry
            x, y = sample(k)
            grads = jax.grad(lambda t: loss_from_features(head, features(t, x), y, info.task))(local)
            updates, opt_state = client_tx.update(grads, opt_state, local)
            return (optax.apply_updates(local, updates), opt_state), None

        shared_keys = jax.random.split(k_shared, config.tau_shared)
        # The first step starts from the broadcast theta, the same for every
        # client, so it runs outside the scan: under vmap its trunk forward
        # pass then has shared weights (one dense convolution over all
        # clients' examples), while a scan carry would be per-client from the
        # start. Same keys and arithmetic as scanning all tau_shared steps.
        first, _ = shared_step((trunk, client_tx.init(trunk)), shared_keys[0])
        (local, _), _ = jax.lax.scan(shared_step, first, shared_keys[1:])
        delta = jax.tree.map(jnp.subtract, local, trunk)
        own_trunk = local if config.algorithm == "local" else client.trunk
        return ClientState(head, head_opt_state, own_trunk), ClientOutput(delta, loss, grad_norm)

    def central_client_step(trunk, client: ClientState, info: ClientInfo, data: DeviceData, key: PRNGKey):
        """``centralized``, one client's part of one joint step on a fresh minibatch.

        Returns the client state after its head step and ``ClientOutput``
        with the trunk gradient in place of a delta, the loss and ``g_c``
        (both at the step's starting point).
        """
        x, y = sample_minibatch(key, info, data)

        def loss_of(t, h):
            return loss_from_features(h, features(t, x), y, info.task)

        loss, (g_trunk, g_head) = jax.value_and_grad(loss_of, argnums=(0, 1))(trunk, client.head)
        updates, head_opt_state = client_tx.update(g_head, client.head_opt_state, client.head)
        head = optax.apply_updates(client.head, updates)
        grad_norm = jnp.sqrt(jnp.sum(models.get_last_shared_kernel(g_trunk) ** 2))
        return ClientState(head, head_opt_state, client.trunk), ClientOutput(g_trunk, loss, grad_norm)

    def central_server_step(server: ServerState, outputs: ClientOutput, infos: ClientInfo) -> ServerState:
        """``centralized``: the trunk takes one client-optimiser step on the mean of the clients' gradients."""
        grad = jax.tree.map(lambda g: jnp.tensordot(infos.mask, g, axes=1) / jnp.sum(infos.mask), outputs.delta)
        updates, opt_state = client_tx.update(grad, server.opt_state, server.trunk)
        return server.replace(trunk=optax.apply_updates(server.trunk, updates), opt_state=opt_state)

    def server_round(server: ServerState, outputs: ClientOutput, infos: ClientInfo, key: PRNGKey, aggregate):
        # The server side of a round; aggregate(deltas, coef, key) -> (delta, report, extra).
        """The server side of a round: task weights, aggregation, server optimiser, weighting update.

        ``aggregate(deltas, coef, key) -> (delta, report, extra)``. ``local``
        and ``centralized`` (whose trunk moved during the round's steps)
        aggregate nothing: only the metrics and the round counter.
        """
        k_weights, k_channel = jax.random.split(key)
        # [C, T] membership of each used client in each task (padding and
        # clients that did not report have mask 0).
        member = jax.nn.one_hot(infos.task_index, config.num_tasks) * infos.mask[:, None]
        count = jnp.sum(member, axis=0)
        present = count > 0
        per_task = lambda v: member.T @ v / jnp.maximum(count, 1.0)  # noqa: E731
        task_loss, task_grad_norm = per_task(outputs.loss), per_task(outputs.grad_norm)
        task_loss_min, task_loss_max = task_range(member, outputs.loss)
        # 5. This round's task weights (from this round's per-task updates for
        # the methods that need them), then the weighted aggregation.
        gram = None
        if weighting.needs_task_updates:
            task_updates = jax.tree.map(
                lambda d: (
                    jnp.tensordot(member.T, d, axes=1) / jnp.maximum(count, 1.0).reshape((-1,) + (1,) * (d.ndim - 1))
                ),
                outputs.delta,
            )
            gram = weighting_base.task_gram(task_updates)
        weights = weighting.weights(server.weighting, weighting_base.RoundInputs(k_weights, present, gram))
        if config.algorithm in REFERENCES:
            ones = jnp.ones_like(infos.mask)
            trunk, opt_state, extra = server.trunk, server.opt_state, None
            report = aggregation_lib.ChannelReport(ones, ones)
        else:
            client_weight = infos.mask * weights[infos.task_index]
            delta, report, extra = aggregate(outputs.delta, client_weight, k_channel)
            # The server optimiser gets -delta as a gradient.
            neg = jax.tree.map(jnp.negative, delta)
            updates, opt_state = server_tx.update(neg, server.opt_state, server.trunk)
            trunk = optax.apply_updates(server.trunk, updates)
        # 6. The weighting's step (GradNorm: on per-task means over each task's clients).
        # The channel-aware step sees the effective gain a-bar; channel-unaware GradNorm sees 1.
        task_gain = per_task(report.gain)
        weight_gain = task_gain if config.channel.channel_aware else jnp.ones_like(task_gain)
        stats = weighting_base.TaskStats(task_loss, task_grad_norm, present, weight_gain, weights)
        new_weighting = weighting.update(server.weighting, stats)
        metrics = {
            "task_loss": task_loss,
            # Per task, the smallest and largest loss over its used clients (the mean's range; curves.png).
            "task_loss_min": task_loss_min,
            "task_loss_max": task_loss_max,
            "grad_norm": task_grad_norm,
            "task_weight": weights,
            "participation": per_task(report.participation),
            "channel_gain": task_gain,
            "participants": count,  # per task, the clients whose update was used this round
        }
        new_server = ServerState(trunk=trunk, opt_state=opt_state, weighting=new_weighting, round=server.round + 1)
        return new_server, metrics, extra

    def server_update(server: ServerState, outputs: ClientOutput, infos: ClientInfo, key: PRNGKey):
        if aggregator.hierarchical:
            raise ValueError(f"aggregation {config.aggregation!r} is hierarchical: use hierarchical_update")

        def aggregate(deltas, coef, k):
            return (*aggregator.aggregate(deltas, coef, infos, k), None)

        new_server, metrics, _ = server_round(server, outputs, infos, key, aggregate)
        return new_server, metrics

    def hierarchical_update(server, outputs: ClientOutput, infos: ClientInfo, key: PRNGKey, clients, local_round):
        def aggregate(deltas, coef, k):
            return aggregation_lib.run_hierarchical(aggregator, deltas, coef, infos, k, clients, local_round)

        new_server, metrics, clients = server_round(server, outputs, infos, key, aggregate)
        return new_server, clients, metrics

    return FederatedAlgorithm(
        init_server,
        init_client,
        client_update,
        server_update,
        trunk_model,
        head_model,
        central_client_step,
        central_server_step,
        aggregator,
        hierarchical_update,
    )


def task_range(member: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per task, the min and max of ``values`` [C] over the clients of ``member`` [C, T] (0, 0 for none)."""
    v = values[:, None]
    present = jnp.any(member > 0, axis=0)
    low = jnp.min(jnp.where(member > 0, v, jnp.inf), axis=0)
    high = jnp.max(jnp.where(member > 0, v, -jnp.inf), axis=0)
    return jnp.where(present, low, 0.0), jnp.where(present, high, 0.0)


def evaluate_client(alg: FederatedAlgorithm, trunk, head, info: ClientInfo, data: DeviceData, max_size: int):
    """Held-out loss and metric of one client over its whole test range.

    ``max_size`` (static) is the largest client test size; shorter clients are
    masked. Returns ``(loss, metric)`` scalars.
    """
    idx = info.test_offset + jnp.arange(max_size)
    valid = (jnp.arange(max_size) < info.test_size).astype(jnp.float32)
    idx = jnp.where(valid > 0, idx, info.test_offset)
    x, y = data.test_x[idx], data.test_y[idx]
    out = alg.head_model.apply(head, alg.trunk_model.apply(trunk, x))
    n = jnp.maximum(jnp.sum(valid), 1.0)
    loss = jnp.sum(valid * tasks_lib.per_example_loss(out, y, info.task)) / n
    metric = jnp.sum(valid * tasks_lib.per_example_metric(out, y, info.task)) / n
    return loss, metric
