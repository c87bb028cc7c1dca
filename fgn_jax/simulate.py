"""Runs a population of clients: one vmap over the client axis, scan over rounds.

A :class:`Simulation` ties an :class:`~fgn_jax.algorithms.AlgorithmConfig`
to a federated dataset. Its state (:class:`SimState`) is one pytree: the
server state and every client leaf stacked on a leading ``[C]`` axis. Rounds
run inside ``lax.scan`` in chunks of fixed length, so a run compiles once; the
float hyperparameters (:class:`~fgn_jax.algorithms.HParams`) are arguments of
the compiled program, so changing them (or vmapping over them in a sweep)
never recompiles.

Two ways to execute the clients, same results:

* ``vmap`` (default): the client function is vmapped over all clients; with
  the rounds inside ``lax.scan`` a whole chunk is one XLA program.
* ``loop``: the same client function, jitted once, called in a Python loop
  over clients (how fedjax's default backend works); kept as the baseline the
  vectorised path is benchmarked against.

Randomness: round r of client c uses ``fold_in(fold_in(key, r), client_id)``,
so results do not depend on how clients are batched, padded or sharded.

Sharding (DESIGN.md section 3, :mod:`fgn_jax.sharding`): with a ``mesh``, the
client axis is split over the mesh's ``"clients"`` axis and the server state
is replicated; the state is created already sharded (``jit(init,
out_shardings=...)``) and every program is jitted with explicit in/out
shardings. The example arrays are split too, one block of examples per
device (:func:`make_env`), and the vmapped client update and evaluation run
inside ``jax.shard_map`` (:meth:`Simulation._per_device`), so each device
reads only its own clients' examples; the server update stays under the
SPMD partitioner (one all-reduce). :func:`programs` also gives the sweep
versions of the programs:
the same functions vmapped over a leading configuration axis ``[S]`` of the
state and the hyperparameters (the environment is shared), so a whole sweep
is one compiled program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from fgn_jax import algorithms, channel, sampling, sharding
from fgn_jax import tasks as tasks_lib
from fgn_jax.data import pool as pool_lib
from fgn_jax.types import PRNGKey

CLIENT_EXECUTIONS = ("vmap", "loop")


@struct.dataclass
class SimState:
    server: algorithms.ServerState
    clients: algorithms.ClientState  # every leaf [C, ...]
    key: PRNGKey  # base key of the round randomness


@struct.dataclass
class Env:
    """Everything about the population that is data, not state."""

    info: algorithms.ClientInfo  # every leaf [C]
    data: algorithms.DeviceData


def make_env(
    dataset: pool_lib.FederatedDataset,
    num_clients: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    standardize_targets: bool = False,
) -> Env:
    """Moves a federated dataset to the device(s), each device only its own clients' part.

    The example arrays are laid out in per-device blocks
    (:func:`fgn_jax.data.pool.block_layout`): block ``d`` holds the examples
    of the client slots of device ``d`` along the mesh's ``"clients"`` axis,
    and each client's ``train_offset`` / ``test_offset`` is relative to its
    block. Without a mesh there is one block: the clients' examples in
    client order, offsets as in the dataset.

    Slot order: client slot ``s`` holds client ``info.client_id[s]``; that is
    client ``s`` (padding after the real clients) unless the clients are so
    imbalanced that keeping their order would make one device's block much
    larger than needed (:func:`fgn_jax.data.pool.slot_order`). Results do not
    depend on the order: a client's head and randomness derive from its id,
    and the server's sums and per-task means are over all slots.

    Args:
      dataset: the partitioned dataset (host-side, identical on every process).
      num_clients: total client slots; extra slots beyond the dataset's
        clients are masked padding that changes nothing (used to make the
        client axis divisible by the device count).
      mesh: if given, every leaf (client-axis leaves and example blocks) is
        sharded over its ``"clients"`` axis, and each process builds and
        transfers only the shards of its own devices; ``num_clients`` must
        then be a multiple of the client-axis devices (see
        :meth:`Simulation.make_env`).
      standardize_targets: regression clients predict their targets
        standardised with their own training mean and std
        (:func:`fgn_jax.tasks.target_standardization`); metrics stay in the
        data's units.

    Returns:
      The environment, every leaf a ``jax.Array``.
    """
    c_real = dataset.num_clients
    c = num_clients or c_real
    if c < c_real:
        raise ValueError(f"num_clients={c} is less than the dataset's {c_real} clients")
    blocks = sharding.axis_size(mesh, sharding.CLIENT_AXIS)
    if c % blocks:
        raise ValueError(f"{c} client slots do not split over the mesh {dict(mesh.shape)}; pad them")
    pad = c - c_real
    order = client_order(dataset, c, mesh)

    def slots(a, fill=0):
        a = np.asarray(a)
        return np.concatenate([a, np.full((pad,), fill, a.dtype)])[order]

    real = order < c_real
    train = pool_lib.block_layout(slots(dataset.train.offset), slots(dataset.train.size), blocks)
    test = pool_lib.block_layout(slots(dataset.test.offset), slots(dataset.test.size), blocks)
    client_task = slots(dataset.client_task)
    width = tasks_lib.max_outputs(dataset.tasks)
    shift, scale = np.zeros((c, width), np.float32), np.ones((c, width), np.float32)
    if standardize_targets:
        fitted = tasks_lib.target_standardization(
            dataset.tasks, dataset.client_task, [dataset.train.client(i)[1] for i in range(c_real)]
        )
        shift[:c_real], scale[:c_real] = fitted
        shift, scale = shift[order], scale[order]
    distance = np.ones((c_real,), np.float32) if dataset.client_distance is None else dataset.client_distance
    # Host-side (numpy) first, so that a sharded placement transfers only
    # each process's shards. Padding slots sample row 0 of their block.
    info = algorithms.ClientInfo(
        client_id=order.astype(np.int32),
        task_index=client_task,
        task=jax.tree.map(np.asarray, tasks_lib.TaskArrays.for_clients(dataset.tasks, client_task, shift, scale)),
        train_offset=np.where(real, train.offset, 0).astype(np.int32),
        train_size=slots(dataset.train.size, 1),
        test_offset=np.where(real, test.offset, 0).astype(np.int32),
        test_size=slots(dataset.test.size, 1),
        mask=real.astype(np.float32),
        distance=slots(np.asarray(distance, np.float32), 1.0),
    )
    fields = {
        "train_x": (train, dataset.train.x),
        "train_y": (train, dataset.train.y),
        "test_x": (test, dataset.test.x),
        "test_y": (test, dataset.test.y),
    }
    if mesh is None:
        data = {k: layout.block(a, 0) for k, (layout, a) in fields.items()}
        return jax.tree.map(jnp.asarray, Env(info=info, data=algorithms.DeviceData(**data)))
    split = sharding.clients(mesh)
    data = {k: _place_blocks(layout, a, split) for k, (layout, a) in fields.items()}
    return Env(info=sharding.put(info, split), data=algorithms.DeviceData(**data))


def client_order(dataset: pool_lib.FederatedDataset, num_slots: int, mesh: jax.sharding.Mesh | None) -> np.ndarray:
    """``[num_slots]`` the client in each slot of :func:`make_env`'s environment (padding: ids past the clients).

    Dataset order, unless imbalanced clients would make one device's block
    much larger than a balanced one (:func:`fgn_jax.data.pool.slot_order`).
    Host-side and identical on every process.
    """
    blocks = sharding.axis_size(mesh, sharding.CLIENT_AXIS)
    return pool_lib.slot_order(dataset.train.size + dataset.test.size, num_slots, blocks)


def _place_blocks(layout: pool_lib.BlockLayout, a: np.ndarray, split: jax.sharding.Sharding) -> jax.Array:
    # make_array_from_callback asks only for this process's devices' shards
    # (each one block), so a process never builds or transfers other blocks.
    shape = (layout.num_blocks * layout.block_size, *a.shape[1:])

    def shard(index):
        rows = index[0].indices(shape[0])
        return layout.rows(a, rows[0], rows[1])[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, split, shard)


def _client_keys(key: PRNGKey, round_index, client_ids) -> jax.Array:
    round_key = jax.random.fold_in(key, round_index)
    return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(client_ids)


# The server's randomness of a round (weighting draws, channel) comes from
# the round key folded with this id, which no client slot ever has.
SERVER_STREAM = 2**31 - 1


def _server_key(key: PRNGKey, round_index) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(key, round_index), SERVER_STREAM)


def _expand(flag: jax.Array, like: jax.Array) -> jax.Array:
    """``[K]`` flag broadcastable against a ``[K, ...]`` leaf."""
    return flag.reshape(flag.shape + (1,) * (like.ndim - 1))


# Number of times each Simulation's round chunk was traced (compiled); tests
# use it to prove that later chunks reuse the first compilation.
trace_counts: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Compiled round chunks, evaluation and state construction for one setup.

    A Simulation is hashable and passed to ``jax.jit`` as a static argument,
    so two equal Simulations (same static settings) share their compiled
    programs.

    Attributes:
      config: static algorithm settings.
      input_shape: shape of one example.
      max_test_size: largest client test size (static; pads the evaluation).
      chunk: rounds per compiled ``lax.scan`` chunk.
      client_execution: ``"vmap"`` or ``"loop"``.
      client_batch: clients updated at once per device in a round (0: all of
        them, one ``vmap``). Smaller groups run one after another
        (``lax.map``): the same results, a working set that fits the CPU's
        caches (measured in benchmarks/README.md).
      eval_client_batch: clients evaluated at once per device (bounds
        evaluation memory).
      mesh: shards the client axis over its ``"clients"`` axis (see
        :func:`fgn_jax.sharding.make_mesh`); None: default device placement.
        Needs ``client_execution="vmap"``.
      standardize_targets: :meth:`make_env` standardises each regression
        client's targets (see :func:`make_env`). Data only: the programs do
        not depend on it.
      clients_per_round: cohort size K of partial participation (0: every
        client, every round). Only the cohort computes (see
        :meth:`_update_cohort`); on a mesh K must split over the client axis.
      client_sampling: how the cohort is drawn (:data:`fgn_jax.sampling.SAMPLINGS`).
      dropout_prob: probability that a sampled client fails to report.
    """

    config: algorithms.AlgorithmConfig
    input_shape: tuple[int, ...]
    max_test_size: int
    chunk: int = 10
    client_execution: str = "vmap"
    client_batch: int = 0
    eval_client_batch: int = 64
    mesh: jax.sharding.Mesh | None = None  # hashable: the mesh is part of the static jit key
    standardize_targets: bool = False
    clients_per_round: int = 0
    client_sampling: str = "uniform"
    dropout_prob: float = 0.0

    def __post_init__(self):
        if self.client_execution not in CLIENT_EXECUTIONS:
            raise ValueError(f"client_execution must be one of {CLIENT_EXECUTIONS}")
        if self.mesh is not None and self.client_execution != "vmap":
            raise ValueError("a mesh needs client_execution='vmap'")
        if self.client_batch < 0:
            raise ValueError(f"client_batch must be >= 0, got {self.client_batch}")
        if self.client_sampling not in sampling.SAMPLINGS:
            raise ValueError(f"client_sampling must be one of {sampling.SAMPLINGS}")
        if self.clients_per_round and self.config.algorithm == "centralized":
            raise ValueError("centralized trains on every client's data jointly: no cohorts")
        if self.clients_per_round % sharding.axis_size(self.mesh, sharding.CLIENT_AXIS):
            raise ValueError(f"clients_per_round={self.clients_per_round} does not split over the mesh")

    @property
    def trace_count(self) -> int:
        return trace_counts[self]

    def algorithm(self, hparams: algorithms.HParams) -> algorithms.FederatedAlgorithm:
        return algorithms.build(self.config, hparams, self.input_shape)

    def make_env(self, dataset: pool_lib.FederatedDataset) -> Env:
        """The dataset on the device(s), padded with masked clients to split over the mesh."""
        slots = sharding.padded_num_clients(dataset.num_clients, self.mesh)
        return make_env(dataset, slots, self.mesh, self.standardize_targets)

    def client_order(self, dataset: pool_lib.FederatedDataset) -> np.ndarray:
        """The client in each slot of :meth:`make_env`'s environment (see :func:`client_order`)."""
        return client_order(dataset, sharding.padded_num_clients(dataset.num_clients, self.mesh), self.mesh)

    # ----------------------------------------------------------------- state
    def init(self, key: PRNGKey, env: Env, hparams: algorithms.HParams) -> SimState:
        """Fresh state: trunk and heads initialised from ``key`` (sharded over the mesh)."""
        return programs(self).init(key, env, hparams)

    def _init(self, key: PRNGKey, env: Env, hparams: algorithms.HParams) -> SimState:
        alg = self.algorithm(hparams)
        k_trunk, k_heads, k_rounds = jax.random.split(key, 3)
        head_keys = jax.vmap(lambda i: jax.random.fold_in(k_heads, i))(env.info.client_id)
        server = alg.init_server(k_trunk)
        clients = jax.vmap(alg.init_client)(head_keys)
        if self.config.algorithm == "local":  # every client starts its own trunk from the common one
            c = env.info.client_id.shape[0]
            clients = clients.replace(trunk=jax.tree.map(lambda a: jnp.broadcast_to(a, (c, *a.shape)), server.trunk))
        return SimState(server=server, clients=clients, key=k_rounds)

    # ---------------------------------------------------------------- rounds
    def round_step(self, state: SimState, env: Env, hparams: algorithms.HParams):
        """One round for all clients (vmapped); returns ``(state, metrics)``."""
        keys = _client_keys(state.key, state.server.round, env.info.client_id)
        server_key = _server_key(state.key, state.server.round)
        infos, cohort_metrics = env.info, {}
        if self.config.algorithm == "centralized":
            server, clients, outputs = self._central_steps(state, env, keys, hparams)
            state = SimState(server=server, clients=clients, key=state.key)
        elif self.clients_per_round:  # partial participation: only the cohort computes
            clients, outputs, infos, cohort_metrics = self._update_cohort(state, env, hparams)
        else:
            clients, outputs = self._per_device(self._update_clients)(
                state.server.trunk, state.clients, env.info, env.data, keys, hparams
            )
        alg = self.algorithm(hparams)
        if not alg.aggregator.hierarchical:
            server, metrics = alg.server_update(state.server, outputs, infos, server_key)
            return SimState(server=server, clients=clients, key=state.key), {**metrics, **cohort_metrics}
        # Hierarchical aggregation (aggregation.run_hierarchical): intra-cluster
        # rounds e >= 1 train every client again from its cluster's trunk.
        cluster = channel.cluster_of(env.info.client_id, env.info.mask, alg.aggregator.num_clusters)

        def local_round(clients, e, offsets):
            trunks = jax.tree.map(lambda t, o: t[None] + o[cluster], state.server.trunk, offsets)  # [C, ...]
            e_keys = jax.vmap(lambda k: jax.random.fold_in(k, e))(keys)
            clients, out = self._per_device(self._update_clients_own_trunk, trunk_per_client=True)(
                trunks, clients, env.info, env.data, e_keys, hparams
            )
            return clients, out.delta

        server, clients, metrics = alg.hierarchical_update(
            state.server, outputs, env.info, server_key, clients, local_round
        )
        return SimState(server=server, clients=clients, key=state.key), metrics

    # ------------------------------------------------- partial participation
    def _sample(self, key: PRNGKey, round_index, info: algorithms.ClientInfo):
        """The round's cohort (:func:`fgn_jax.sampling.sample_cohort`): block-local slots [K], used mask [K]."""
        blocks = sharding.axis_size(self.mesh, sharding.CLIENT_AXIS)
        return sampling.sample_cohort(
            self.client_sampling,
            sampling.cohort_key(_server_key(key, round_index)),
            info.task_index,
            info.mask,
            self.clients_per_round,
            self.config.num_tasks,
            blocks,
            self.dropout_prob,
        )

    def _update_cohort(self, state: SimState, env: Env, hparams):
        """Gathers the cohort's states and infos, updates them (vmapped over K), scatters them back.

        Compute and temporaries are O(K); the states and examples of all C
        clients stay where they are (on a mesh each device gathers from and
        scatters to its own block). Returns the new client states ``[C]``,
        the cohort's outputs ``[K]``, its infos ``[K]`` with ``mask`` = real,
        sampled and reported (the server's per-task means, aggregation and
        weighting see only those), and the cohort metrics (ids, used mask).
        """
        slots, used = self._sample(state.key, state.server.round, env.info)
        k = self.clients_per_round
        round_keys = jnp.broadcast_to(jax.random.fold_in(state.key, state.server.round), (k,))

        def per_block(trunk, clients, info, data, slots, used, round_keys, hparams):
            take = lambda tree: jax.tree.map(lambda a: a[slots], tree)  # noqa: E731
            cohort, cohort_info = take(clients), take(info)
            keys = jax.vmap(jax.random.fold_in)(round_keys, cohort_info.client_id)  # as _client_keys
            new, outputs = self._update_clients(trunk, cohort, cohort_info, data, keys, hparams)
            # A client that did not report loses its round: its state stays.
            new = jax.tree.map(lambda n, o: jnp.where(_expand(used > 0, n), n, o), new, cohort)
            clients = jax.tree.map(lambda a, n: a.at[slots].set(n), clients, new)
            return clients, outputs, cohort_info.replace(mask=cohort_info.mask * used)

        clients, outputs, infos = self._per_device(per_block)(
            state.server.trunk, state.clients, env.info, env.data, slots, used, round_keys, hparams
        )
        return clients, outputs, infos, {"cohort_ids": infos.client_id, "cohort_used": infos.mask > 0}

    def _central_steps(self, state: SimState, env: Env, keys, hparams):
        """``centralized``: ``tau_head + tau_shared`` joint steps; outputs of the first (its losses, ``g``)."""
        alg = self.algorithm(hparams)
        steps = self.config.tau_head + self.config.tau_shared
        step_keys = jax.vmap(lambda k: jax.random.split(k, steps), out_axes=1)(keys)  # [steps, C]

        def clients_step(trunk, clients, info, data, keys, hparams):
            return jax.vmap(alg.central_client_step, in_axes=(None, 0, 0, None, 0))(trunk, clients, info, data, keys)

        def step(carry, k):
            server, clients = carry
            clients, out = self._per_device(clients_step)(server.trunk, clients, env.info, env.data, k, hparams)
            return (alg.central_server_step(server, out, env.info), clients), (out.loss, out.grad_norm)

        (server, clients), (loss, grad_norm) = jax.lax.scan(step, (state.server, state.clients), step_keys)
        # The trunk has moved already: the server update only records the metrics.
        no_delta = jax.tree.map(lambda a: jnp.zeros((keys.shape[0], *a.shape), a.dtype), server.trunk)
        return server, clients, algorithms.ClientOutput(no_delta, loss[0], grad_norm[0])

    def _update_clients(self, trunk, clients, info, data, keys, hparams, trunk_axis=None):
        # ``data`` is this device's block: ``info``'s offsets index into it.
        # trunk_axis=0: every client has its own trunk (hierarchical rounds e >= 1).
        client_update = self.algorithm(hparams).client_update
        if not self.client_batch or self.client_batch >= keys.shape[0]:
            return jax.vmap(client_update, in_axes=(trunk_axis, 0, 0, None, 0))(trunk, clients, info, data, keys)
        # Groups of client_batch clients, vmapped within a group, one group
        # after another: each client computes exactly what it computes under
        # the one vmap, on a working set small enough for the caches.
        if trunk_axis is None:
            return jax.lax.map(
                lambda args: client_update(trunk, args[0], args[1], data, args[2]),
                (clients, info, keys),
                batch_size=self.client_batch,
            )
        return jax.lax.map(
            lambda args: client_update(args[3], args[0], args[1], data, args[2]),
            (clients, info, keys, trunk),
            batch_size=self.client_batch,
        )

    def _update_clients_own_trunk(self, trunks, clients, info, data, keys, hparams):
        return self._update_clients(trunks, clients, info, data, keys, hparams, trunk_axis=0)

    def _per_device(self, fn: Callable, trunk_per_client: bool = False) -> Callable:
        """``fn(trunk, clients, info, data, *per_client, hparams)`` run on each device's own clients and data.

        On a mesh ``fn`` runs under ``jax.shard_map`` over every mesh axis:
        the trunk and hyperparameters replicated, the client leaves, the
        environment (client info and example blocks) and the other per-client
        arguments split ``P("clients")``, so each device indexes only its own
        block (under plain jit, a gather at per-client offsets into a sharded
        array would all-gather it). Outputs are per-client, ``P("clients")``.
        Inside a sweep's ``vmap(spmd_axis_name="sweep")`` the batched
        arguments are split over the sweep axis as well. With
        ``trunk_per_client`` the trunk has a client axis and is split like
        the client leaves. Without a mesh,
        ``fn`` is called as is (one block holds every client's examples).
        """
        if self.mesh is None:
            return fn
        c, r = jax.sharding.PartitionSpec(sharding.CLIENT_AXIS), jax.sharding.PartitionSpec()

        def call(*args):
            in_specs = (c if trunk_per_client else r, c, c, c, *([c] * (len(args) - 5)), r)
            # check_vma=False: the body is per-client math without
            # collectives. With the check on, a client's gradient in the
            # replicated (device-invariant) trunk would be psum-ed over the
            # devices by AD: wrong here, where every client needs its own.
            return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=c, check_vma=False)(*args)

        return call

    def _run_chunk(self, state, env, hparams, stop_round):
        trace_counts[self] += 1

        def body(state, _):
            active = state.server.round < stop_round
            new_state, metrics = jax.lax.cond(
                active,
                lambda s: self.round_step(s, env, hparams),
                lambda s: (s, self._empty_metrics()),
                state,
            )
            metrics["round"] = state.server.round
            metrics["active"] = active
            return new_state, metrics

        return jax.lax.scan(body, state, None, length=self.chunk)

    def _empty_metrics(self):
        t = self.config.num_tasks
        z = jnp.zeros((t,), jnp.float32)
        empty = {
            "task_loss": z,
            "task_loss_min": z,
            "task_loss_max": z,
            "grad_norm": z,
            "task_weight": z,
            "participants": z,
            "participation": z,
            "channel_gain": z,
        }
        if self.clients_per_round:
            k = self.clients_per_round
            empty.update(cohort_ids=jnp.zeros((k,), jnp.int32), cohort_used=jnp.zeros((k,), bool))
        return empty

    def run_chunk(self, state: SimState, env: Env, hparams: algorithms.HParams, stop_round) -> tuple[SimState, Any]:
        """Advances up to ``chunk`` rounds, never past ``stop_round``.

        Returns the new state and per-round metrics stacked ``[chunk, ...]``
        with a boolean ``active`` marking the rounds that ran. ``state`` is
        donated.
        """
        if self.client_execution == "loop":
            return self._run_chunk_loop(state, env, hparams, stop_round)
        return programs(self).run_chunk(state, env, hparams, jnp.asarray(stop_round, jnp.int32))

    # ------------------------------------------------------- loop execution
    def _one_client(self, trunk, client, info, data, key, hparams):
        return self.algorithm(hparams).client_update(trunk, client, info, data, key)

    def _server(self, server, outputs, infos, key, hparams):
        return self.algorithm(hparams).server_update(server, outputs, infos, key)

    def _run_chunk_loop(self, state, env, hparams, stop_round):
        rows = []
        num_clients = env.info.mask.shape[0]
        for _ in range(self.chunk):
            round_index = int(state.server.round)
            if round_index >= int(stop_round):
                break
            keys = _client_keys(state.key, round_index, env.info.client_id)
            # Partial participation: the loop runs over the cohort's slots only.
            slots, used = np.arange(num_clients), np.ones(num_clients, np.float32)
            if self.clients_per_round:
                slots, used = map(np.asarray, _jit_sample(self, state.key, round_index, env.info))
            new_clients, outputs = [], []
            for c, u in zip(slots, used):
                pick = lambda tree: jax.tree.map(lambda a: a[c], tree)  # noqa: B023,E731
                client, out = _jit_client(
                    self, state.server.trunk, pick(state.clients), pick(env.info), env.data, keys[c], hparams
                )
                new_clients.append(client if u else pick(state.clients))  # a dropped client keeps its state
                outputs.append(out)
            stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
            server_key = _server_key(state.key, round_index)
            infos, clients = env.info, stack(new_clients)
            if self.clients_per_round:
                infos = jax.tree.map(lambda a: a[slots], env.info)  # noqa: B023
                infos = infos.replace(mask=infos.mask * used)
                clients = jax.tree.map(lambda a, n: a.at[slots].set(n), state.clients, clients)  # noqa: B023
            server, metrics = _jit_server(self, state.server, stack(outputs), infos, server_key, hparams)
            if self.clients_per_round:
                metrics.update(cohort_ids=infos.client_id, cohort_used=infos.mask > 0)
            state = SimState(server=server, clients=clients, key=state.key)
            metrics["round"] = jnp.asarray(round_index)
            metrics["active"] = jnp.asarray(True)
            rows.append(metrics)
        if not rows:
            return state, None
        return state, jax.tree.map(lambda *a: jnp.stack(a), *rows)

    # ------------------------------------------------------------ evaluation
    def _evaluate_clients(self, trunk, heads, info, data, own_trunks, hparams):
        # lax.map: a sequential loop over this device's clients, in batches
        # of eval_client_batch (bounds the evaluation's memory).
        alg = self.algorithm(hparams)

        def one(args):
            head, info, own_trunk = args
            client_trunk = trunk if own_trunk is None else own_trunk
            return algorithms.evaluate_client(alg, client_trunk, head, info, data, self.max_test_size)

        return jax.lax.map(one, (heads, info, own_trunks), batch_size=self.eval_client_batch)

    def _evaluate(self, state: SimState, env: Env, hparams):
        # local: every client is evaluated with its own trunk.
        loss, metric = self._per_device(self._evaluate_clients)(
            state.server.trunk, state.clients.head, env.info, env.data, state.clients.trunk, hparams
        )
        member = jax.nn.one_hot(env.info.task_index, self.config.num_tasks) * env.info.mask[:, None]
        count = jnp.maximum(jnp.sum(member, axis=0), 1.0)
        low, high = algorithms.task_range(member, metric)
        return {
            "test_loss": member.T @ loss / count,
            "test_metric": member.T @ metric / count,
            "test_metric_min": low,  # per task, the range of the metric over its clients
            "test_metric_max": high,
        }

    def evaluate(self, state: SimState, env: Env, hparams: algorithms.HParams):
        """Held-out per-task loss and metric (means over each task's clients)."""
        return programs(self).evaluate(state, env, hparams)


def _env_shardings(mesh: jax.sharding.Mesh) -> Env:
    # Client info and example blocks: split over the client axis. The
    # environment is shared by every configuration of a sweep: never batched.
    return Env(info=sharding.clients(mesh), data=sharding.clients(mesh))


class Programs(NamedTuple):
    """A Simulation's jitted programs (see :func:`programs`)."""

    init: Callable  # (key, env, hparams) -> state
    run_chunk: Callable  # (state, env, hparams, stop_round) -> (state, metrics); donates state
    evaluate: Callable  # (state, env, hparams) -> {"test_loss", "test_metric"}


@functools.lru_cache(maxsize=None)
def programs(sim: Simulation, sweep: bool = False) -> Programs:
    """The jitted init / round-chunk / evaluation programs of ``sim`` (cached).

    Args:
      sim: the simulation; with ``sim.mesh`` every program is jitted with
        explicit in/out shardings: client leaves ``P("clients")``, server
        leaves, keys and hyperparameters replicated, metrics replicated (so
        every process can read them).
      sweep: vmap every program over a leading configuration axis of the
        key, state and hyperparameters (the environment and ``stop_round``
        are shared). Evaluation maps over the configurations one at a time
        (``lax.map``: the memory of one run) unless that axis is sharded.
        Each leaf of ``hparams`` and the key then has shape ``[S]``; metrics
        come back as ``[S, chunk, ...]``.

    Returns:
      :class:`Programs`. They trace once per Simulation and shapes; later
      chunks and new hyperparameter values reuse the compilation.
    """
    init, run_chunk, evaluate = sim._init, sim._run_chunk, sim._evaluate
    if sweep:
        # Sharding constraints or collectives inside the vmapped code then
        # keep the configuration axis on the sweep mesh axis (if there is one)
        # instead of replicating it.
        spmd = sharding.SWEEP_AXIS if sim.mesh is not None and sharding.SWEEP_AXIS in sim.mesh.axis_names else None
        init = jax.vmap(init, in_axes=(0, None, 0), spmd_axis_name=spmd)
        run_chunk = jax.vmap(run_chunk, in_axes=(0, None, 0, None), spmd_axis_name=spmd)
        if spmd is not None and sim.mesh.shape[spmd] > 1:
            evaluate = jax.vmap(evaluate, in_axes=(0, None, 0), spmd_axis_name=spmd)
        else:
            # One configuration at a time: evaluation holds the whole held-out set's activations, and
            # vmapped over a large grid (36 MTFL configurations: 38 GB) it outgrew the host's memory.
            evaluate = _map_configurations(evaluate)
    if sim.mesh is None:
        return Programs(jax.jit(init), jax.jit(run_chunk, donate_argnums=0), jax.jit(evaluate))
    b = int(sweep)
    # Keys, hparams and server leaves: replicated over the clients (but split
    # over the sweep axis, if any). Shardings are pytree prefixes of the args.
    per_run = sharding.replicated(sim.mesh, b)
    state = SimState(server=per_run, clients=sharding.clients(sim.mesh, b), key=per_run)
    env, everywhere = _env_shardings(sim.mesh), sharding.replicated(sim.mesh)
    return Programs(
        init=jax.jit(init, in_shardings=(per_run, env, per_run), out_shardings=state),
        run_chunk=jax.jit(
            run_chunk,
            in_shardings=(state, env, per_run, everywhere),
            out_shardings=(state, everywhere),
            donate_argnums=0,
        ),
        evaluate=jax.jit(evaluate, in_shardings=(state, env, per_run), out_shardings=everywhere),
    )


def _map_configurations(evaluate):
    # evaluate(state, env, hparams) over the leading configuration axis of state and hparams, sequentially.
    def mapped(state, env, hparams):
        return jax.lax.map(lambda x: evaluate(x[0], env, x[1]), (state, hparams))

    return mapped


_jit_client = jax.jit(Simulation._one_client, static_argnums=0)
_jit_server = jax.jit(Simulation._server, static_argnums=0, donate_argnums=1)
_jit_sample = jax.jit(Simulation._sample, static_argnums=0)


def metrics_rows(chunk_metrics) -> list[dict]:
    """Host-side per-round rows (lists in task order) from a chunk's metrics."""
    if chunk_metrics is None:
        return []
    m = jax.device_get(chunk_metrics)
    rows = []
    for i in range(len(m["round"])):
        if not m["active"][i]:
            continue
        rows.append(
            {
                "round": int(m["round"][i]),
                "task_loss": [float(v) for v in m["task_loss"][i]],
                "task_loss_min": [float(v) for v in m["task_loss_min"][i]],
                "task_loss_max": [float(v) for v in m["task_loss_max"][i]],
                "grad_norm": [float(v) for v in m["grad_norm"][i]],
                "task_weight": [float(v) for v in m["task_weight"][i]],
                "participation": [float(v) for v in m["participation"][i]],
                "channel_gain": [float(v) for v in m["channel_gain"][i]],
                "participants": [int(v) for v in m["participants"][i]],
            }
        )
    return rows


def participants_rows(chunk_metrics) -> list[dict]:
    """Host-side per-round cohorts of a partial-participation chunk (``--log_participants``).

    Each row: ``round``, ``sampled`` (the cohort's client ids, ascending
    within each device block) and ``reported`` (those whose update was used).
    Empty without a cohort (``clients_per_round=0``: every client, every round).
    """
    if chunk_metrics is None or "cohort_ids" not in chunk_metrics:
        return []
    m = jax.device_get({k: chunk_metrics[k] for k in ("round", "active", "cohort_ids", "cohort_used")})
    return [
        {
            "round": int(m["round"][i]),
            "sampled": [int(c) for c in m["cohort_ids"][i]],
            "reported": [int(c) for c, u in zip(m["cohort_ids"][i], m["cohort_used"][i]) if u],
        }
        for i in range(len(m["round"]))
        if m["active"][i]
    ]
