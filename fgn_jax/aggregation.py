"""The aggregation seam: how the clients' weighted trunk updates reach the server.

An :class:`Aggregator` turns the stacked client updates ``delta_c`` and
their coefficients ``coef_c`` (task weight times the participation mask;
the weight multiplies a client's update *before* it is transmitted) into the
server's update and a per-client report of what the channel did:

    delta, report = aggregator.aggregate(deltas, coef, infos, key)

* :func:`ideal`: the noiseless average ``(1/C_used) sum_c coef_c delta_c``
  (DESIGN.md section 2, step 5).
* :func:`ota`: one hop, clients -> PS over a fading channel with power
  control and receiver noise (:mod:`fgn_jax.channel`).
* :func:`hota`: hierarchical OTA, HOTA-FedGradNorm (Mortaheb, Vahapoglu,
  Ulukus, Algorithms 15(11):421, 2022): clusters of clients aggregate at
  their intermediate server (IS) for E intra-cluster rounds, then the ISs
  send to a multi-antenna PS that combines blind. A hierarchical aggregator
  declares ``num_clusters`` and ``intra_rounds`` and gives ``cluster_step``
  and ``uplink`` instead of ``aggregate``; :func:`run_hierarchical` runs
  the E rounds, calling back into the round (``local_round``) to train the
  clients again from their cluster's trunk.

The equations, and which parts are our reconstruction, are in docs/hota.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fgn_jax import channel as channel_lib


class ChannelReport(NamedTuple):
    """Per client (``[C]``), what reached the server."""

    participation: jax.Array  # [C] float: fraction of the client's transmissions that arrived (1: ideal)
    gain: jax.Array  # [C] float: effective gain applied to its update (1: ideal)


class Aggregator(NamedTuple):
    """One aggregation rule.

    Flat rules set ``aggregate``; hierarchical ones set ``cluster_step``
    ``(deltas [C, ...], coef [C], infos, key) -> (cluster_deltas [K, ...],
    participation [C], gain [C])`` (one intra-cluster round at the ISs) and
    ``uplink`` ``(cluster_deltas [K, ...], key) -> (delta, ps_gain [K])`` (IS ->
    PS), run by :func:`run_hierarchical`.
    """

    aggregate: Callable | None  # (deltas [C, ...], coef [C], infos, key) -> (delta, ChannelReport)
    cluster_step: Callable | None = None
    uplink: Callable | None = None
    num_clusters: int = 1
    intra_rounds: int = 1

    @property
    def hierarchical(self) -> bool:
        return self.cluster_step is not None


def ideal(channel: channel_lib.ChannelConfig | None = None, hparams=None) -> Aggregator:
    """The noiseless mean over the clients whose update is used: ``sum_c coef_c delta_c / sum_c m_c``."""
    del channel, hparams

    def aggregate(deltas, coef, infos, key):
        del key
        # At least one: a round whose every sampled client dropped out moves nothing (no 0/0).
        num_used = jnp.maximum(jnp.sum(infos.mask), 1.0)
        delta = jax.tree.map(lambda d: jnp.tensordot(coef, d, axes=1) / num_used, deltas)
        ones = jnp.ones_like(infos.mask)
        return delta, ChannelReport(participation=ones, gain=ones)

    return Aggregator(aggregate)


def _sq_norms(tree) -> jax.Array:
    # [N] squared norm of each row of a stacked pytree (all leaves together).
    return sum(jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1) for x in jax.tree.leaves(tree))


def _dim(tree) -> int:
    # d: entries of one row of a stacked pytree (static).
    return sum(x[0].size for x in jax.tree.leaves(tree))


def _gaussian(key, std, like):
    """``std[k] * N(0, I)`` shaped like each leaf of the ``[K, ...]`` pytree ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    noise = [
        std.reshape((-1,) + (1,) * (x.ndim - 1)) * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(treedef, noise)


def receive(channel, hparams, deltas, coef, infos, key, cluster, num_clusters: int):
    """One over-the-air transmission of every client to its receiver (IS, or the PS for one hop).

    Client ``i`` of receiver ``c`` sends ``coef_i delta_i`` with power control
    (:func:`fgn_jax.channel.power_control_gains`); receiver ``c`` estimates
    ``sum_i a_i coef_i delta_i / K_c + n_c`` with ``n_c ~ N(0, s_c^2 I)``
    (:func:`fgn_jax.channel.is_noise_std`), or nothing if ``K_c = 0``.

    Args:
      channel: static :class:`fgn_jax.channel.ChannelConfig`.
      hparams: :class:`fgn_jax.algorithms.HParams` (``snr_db``, ``truncation_q``, ``rician_k``).
      deltas: ``[C, ...]`` client updates.
      coef: ``[C]`` coefficients (task weight times mask).
      infos: :class:`fgn_jax.algorithms.ClientInfo` (``mask``, ``distance``).
      key: this transmission's key (fading and noise).
      cluster: ``[C]`` int receiver of each client.
      num_clusters: K receivers (static).

    Returns:
      ``(estimates [K, ...], sent [C], a [C])``: ``sent`` is 1 where the
      client's update reached its receiver, ``a`` its effective gain.
    """
    k_h, k_z = jax.random.split(key)
    mask = infos.mask
    beta = channel_lib.path_gain(infos.distance, channel.path_loss_exponent)
    beta_ref = jnp.sum(mask * beta) / jnp.maximum(jnp.sum(mask), 1.0)
    h = channel_lib.draw_fading(k_h, beta, channel.fading, hparams.rician_k)
    a, h_ref = channel_lib.power_control_gains(
        jnp.abs(h), beta_ref, channel.power_control, hparams.truncation_q, channel.fading, hparams.rician_k
    )
    sent = mask * (a > 0) if channel.power_control == "tci" else mask
    a = a * sent
    w = coef * a
    member = jax.nn.one_hot(cluster, num_clusters) * sent[:, None]  # [C, K]
    num_sent = jnp.sum(member, axis=0)  # [K]
    if num_clusters == 1:
        # One receiver: the same contraction as the ideal mean (bit-identical in the ideal limit).
        sums = jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1)[None], deltas)
    else:
        sums = jax.tree.map(lambda d: jnp.tensordot((member * w[:, None]).T, d, axes=1), deltas)
    tx_norm = jnp.abs(coef) * jnp.sqrt(_sq_norms(deltas))  # what each client transmits: coef_i delta_i
    max_norm = jnp.max(member * tx_norm[:, None], axis=0)
    snr = channel_lib.db_to_linear(hparams.snr_db)
    std = channel_lib.is_noise_std(max_norm, h_ref, num_sent, _dim(deltas), snr)
    noise = _gaussian(k_z, std, sums)

    def estimate(s, n):
        shape = (-1,) + (1,) * (s.ndim - 1)
        return jnp.where(num_sent.reshape(shape) > 0, s / jnp.maximum(num_sent, 1.0).reshape(shape) + n, 0.0)

    return jax.tree.map(estimate, sums, noise), sent, a


def ota(channel: channel_lib.ChannelConfig, hparams) -> Aggregator:
    """One hop: every client -> the PS over the client channel model (:func:`receive` with one receiver)."""

    def aggregate(deltas, coef, infos, key):
        est, sent, a = receive(channel, hparams, deltas, coef, infos, key, jnp.zeros_like(infos.task_index), 1)
        return jax.tree.map(lambda e: e[0], est), ChannelReport(participation=sent, gain=a)

    return Aggregator(aggregate)


def hota(channel: channel_lib.ChannelConfig, hparams) -> Aggregator:
    """Clients -> IS of their cluster (E rounds, :func:`receive`) -> multi-antenna PS, blind combining.

    The PS forms ``(1/K) sum_c b_c Delta_c + n`` with ``b_c = ||g_c||^2 / (M
    beta_bar)`` (:func:`fgn_jax.channel.blind_gain`) and ``n`` of std
    :func:`fgn_jax.channel.ps_noise_std`. The ISs are taken to be at equal
    distance from the PS (``beta_c = beta_bar = 1``).
    """
    k = channel.num_clusters

    def cluster_step(deltas, coef, infos, key):
        cluster = channel_lib.cluster_of(infos.client_id, infos.mask, k)
        return receive(channel, hparams, deltas, coef, infos, key, cluster, k)

    def uplink(cluster_deltas, key):
        k_g, k_n = jax.random.split(key)
        b = channel_lib.blind_gain(k_g, jnp.ones((k,)), 1.0, channel.ps_antennas, channel.fading, hparams.rician_k)
        combined = jax.tree.map(lambda d: jnp.tensordot(b, d, axes=1) / k, cluster_deltas)
        max_norm = jnp.max(jnp.sqrt(_sq_norms(cluster_deltas)))
        snr = channel_lib.db_to_linear(hparams.ps_snr_db)
        std = channel_lib.ps_noise_std(max_norm, k, channel.ps_antennas, 1.0, _dim(cluster_deltas), snr)
        noise = _gaussian(k_n, std[None], jax.tree.map(lambda d: d[:1], cluster_deltas))
        return jax.tree.map(lambda c, n: c + n[0], combined, noise), b

    return Aggregator(None, cluster_step, uplink, num_clusters=k, intra_rounds=channel.cluster_rounds)


def run_hierarchical(aggregator: Aggregator, deltas, coef, infos, key, carry, local_round: Callable):
    """E intra-cluster rounds, then the IS -> PS uplink, as one traced program (``lax.scan`` over e).

    Round ``e = 0`` aggregates ``deltas`` (the clients' updates from the
    broadcast trunk); each later round calls ``local_round(carry, e,
    offsets) -> (carry, deltas)`` to train the clients again from their
    cluster's trunk ``theta + offsets[cluster]`` (``offsets``: ``[K, ...]``,
    the sum of the cluster's estimates so far). Channel draws of round ``e``
    use ``fold_in(key, e)``; the uplink ``fold_in(key, E)``.

    Returns:
      ``(delta, ChannelReport, carry)``: participation is the mean over the E
      rounds, the gain ``b_{cluster} * mean_e a`` (the ``a-bar`` of the
      channel-aware weight step).
    """
    e_total = aggregator.intra_rounds
    offsets, part, gain = aggregator.cluster_step(deltas, coef, infos, jax.random.fold_in(key, 0))

    def body(state, e):
        carry, offsets, part_sum, gain_sum = state
        carry, deltas = local_round(carry, e, offsets)
        est, p, g = aggregator.cluster_step(deltas, coef, infos, jax.random.fold_in(key, e))
        return (carry, jax.tree.map(jnp.add, offsets, est), part_sum + p, gain_sum + g), None

    (carry, offsets, part, gain), _ = jax.lax.scan(body, (carry, offsets, part, gain), jnp.arange(1, e_total))
    delta, ps_gain = aggregator.uplink(offsets, jax.random.fold_in(key, e_total))
    cluster = channel_lib.cluster_of(infos.client_id, infos.mask, aggregator.num_clusters)
    report = ChannelReport(participation=part / e_total, gain=ps_gain[cluster] * gain / e_total)
    return delta, report, carry


# name -> factory (channel: ChannelConfig, hparams: HParams) -> Aggregator
AGGREGATIONS = {"ideal": ideal, "ota": ota, "hota": hota}
