"""The aggregation seam: how the clients' weighted trunk updates reach the server.

An :class:`Aggregator` turns the stacked client updates ``delta_c`` and
their coefficients ``coef_c`` (task weight times the participation mask)
into the server's update and a per-client report of what the channel did:

    delta, report = aggregator.aggregate(deltas, coef, infos, key)

:func:`ideal` is the noiseless average ``(1/C_used) sum_c coef_c delta_c``
(DESIGN.md section 2, step 5). Over-the-air rules (a fading channel, power
control, receiver noise) implement the same signature, so the round does not
change when the rule does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class ChannelReport(NamedTuple):
    """Per client (``[C]``), what reached the server."""

    participation: jax.Array  # [C] float: fraction of the client's transmissions that arrived (1: ideal)
    gain: jax.Array  # [C] float: effective gain applied to its update (1: ideal)


class Aggregator(NamedTuple):
    aggregate: Callable  # (deltas [C, ...], coef [C], infos, key) -> (delta, ChannelReport)


def ideal() -> Aggregator:
    """The noiseless mean over the clients whose update is used: ``sum_c coef_c delta_c / sum_c m_c``."""

    def aggregate(deltas, coef, infos, key):
        del key
        # At least one: a round whose every sampled client dropped out moves nothing (no 0/0).
        num_used = jnp.maximum(jnp.sum(infos.mask), 1.0)
        delta = jax.tree.map(lambda d: jnp.tensordot(coef, d, axes=1) / num_used, deltas)
        ones = jnp.ones_like(infos.mask)
        return delta, ChannelReport(participation=ones, gain=ones)

    return Aggregator(aggregate)


AGGREGATIONS = {"ideal": ideal}
