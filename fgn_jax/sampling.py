"""The client-sampling seam: which K of the C clients take part in a round.

Partial participation as in FedAvg (McMahan, Moore, Ramage, Hampson, Agüera y
Arcas, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017: a fraction of the clients per round) and stratified
client sampling (Balakrishnan et al., "Diverse Client Selection for Federated
Learning via Submodular Maximization", ICLR 2022, discuss it as the baseline
that keeps every group represented). A sampler is a pure function

    selected = sampler(key, task_index, real, k, num_tasks)   # [C] bool

over one block of client slots; :func:`sample_cohort` turns it into the
cohort's slots ``[K]`` (unique, ascending within each block) and a ``[K]``
mask of the clients whose update is used (sampled, real, and reported: a
client drops out with probability ``dropout_prob``).

* ``uniform``: K clients uniformly without replacement;
* ``stratified``: task k gets a share of the cohort proportional to its
  clients (largest remainder), at least one where ``K`` is at least the
  number of tasks with clients; within a task, uniformly.

Randomness: the cohort of a round is a function of the round's key only
(:func:`cohort_key`: the server key of the round folded with
:data:`COHORT_STREAM`), so reruns, resumed runs and sweeps see the same
cohorts; sweep configurations with other seeds see other cohorts.

On a device mesh the slots are split in D blocks (one per device along the
"clients" axis, :func:`fgn_jax.simulate.make_env`), and each block draws
``K / D`` of its own slots (with its own key), so every device updates only
clients whose state and examples it holds; ``K`` must then be a multiple of
``D``, and stratified shares are per block.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fgn_jax.types import PRNGKey

SAMPLINGS = ("uniform", "stratified")
# The cohort's randomness: the round's server key folded with this constant
# (the server's own draws use the server key itself, so they do not change).
COHORT_STREAM = 0x5A3B1E


def cohort_key(server_key: PRNGKey) -> PRNGKey:
    """The key of a round's cohort, from that round's server key (``simulate._server_key``)."""
    return jax.random.fold_in(server_key, COHORT_STREAM)


def _mark(indices: jax.Array, size: int) -> jax.Array:
    return jnp.zeros((size,), bool).at[indices].set(True)


def uniform(key: PRNGKey, task_index: jax.Array, real: jax.Array, k: int, num_tasks: int) -> jax.Array:
    """``min(k, #real)`` real slots, uniformly without replacement.

    Args:
      key: the block's cohort key.
      task_index: ``[C]`` int task of each slot (unused).
      real: ``[C]`` bool, False for padding slots.
      k: cohort size (static).
      num_tasks: number of tasks (static, unused).

    Returns:
      ``[C]`` bool, the selected slots.
    """
    del task_index, num_tasks
    u = jnp.where(real, jax.random.uniform(key, real.shape), 2.0)  # padding last
    # top_k is O(C) (no sort of the population): the k smallest scores.
    return _mark(jax.lax.top_k(-u, k)[1], real.shape[0]) & real


def task_shares(counts: jax.Array, k) -> jax.Array:
    """``[T]`` int: cohort seats per task, proportional to ``counts`` (largest remainder).

    Every task with clients gets at least one seat when ``k`` is at least the
    number of such tasks; no task gets more seats than clients; the shares sum
    to ``min(k, sum(counts))``.

    Args:
      counts: ``[T]`` number of (real) clients of each task.
      k: cohort size.
    """
    counts = counts.astype(jnp.int32)
    total = jnp.sum(counts)
    k = jnp.minimum(k, total)
    quota = k * counts / jnp.maximum(total, 1)
    lo = jnp.where(k >= jnp.sum(counts > 0), jnp.minimum(counts, 1), 0)
    n = jnp.maximum(jnp.floor(quota).astype(jnp.int32), lo)
    # At most T seats are missing (remainders) or in excess (the bumps to one):
    # hand them out one at a time, a static loop over T.
    for _ in range(counts.shape[0]):
        short = jnp.sum(n) < k
        add = jnp.argmax(jnp.where(n < counts, quota - n, -jnp.inf))
        n = n.at[add].add(short.astype(jnp.int32))
        over = jnp.sum(n) > k
        cut = jnp.argmax(jnp.where(n > lo, n - quota, -jnp.inf))
        n = n.at[cut].add(-over.astype(jnp.int32))
    return n


def stratified(key: PRNGKey, task_index: jax.Array, real: jax.Array, k: int, num_tasks: int) -> jax.Array:
    """Each task's :func:`task_shares` seat count of its clients, uniformly within the task.

    Args and Returns as :func:`uniform`.
    """
    c = real.shape[0]
    member = (task_index[None, :] == jnp.arange(num_tasks)[:, None]) & real[None, :]  # [T, C]
    shares = task_shares(jnp.sum(member, axis=1), k)
    u = jax.random.uniform(key, (c,))
    # Per task, its k lowest-scoring clients in order (O(T C), no sort), of
    # which the first shares[t] are taken.
    scores = jnp.where(member, -u[None, :], -2.0)
    top = jax.lax.top_k(scores, min(k, c))[1]  # [T, k]
    take = jnp.arange(top.shape[1])[None, :] < shares[:, None]
    return jnp.zeros((c,), bool).at[top.reshape(-1)].max(take.reshape(-1)) & real


SAMPLERS: dict[str, Callable] = {"uniform": uniform, "stratified": stratified}


def cohort_slots(selected: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` slots of a selection, ascending, unique; and which of them are selected.

    With fewer than ``k`` selected slots (a block with few real clients) the
    cohort is filled with unselected slots, marked False.
    """
    # top_k breaks ties by the lower index: selected slots first, in order.
    slots = jnp.sort(jax.lax.top_k(selected.astype(jnp.float32), k)[1])
    return slots.astype(jnp.int32), selected[slots]


def sample_cohort(
    method: str,
    key: PRNGKey,
    task_index: jax.Array,
    mask: jax.Array,
    k: int,
    num_tasks: int,
    blocks: int = 1,
    dropout_prob: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """A round's cohort: block-local slots ``[K]`` and the mask of used updates ``[K]``.

    Args:
      method: one of :data:`SAMPLINGS`.
      key: the round's cohort key (:func:`cohort_key`).
      task_index: ``[C]`` int task of each client slot.
      mask: ``[C]`` float, 1 for real clients, 0 for padding.
      k: cohort size K (static), a multiple of ``blocks``.
      num_tasks: number of tasks (static).
      blocks: client-axis devices; block ``b`` holds slots ``[b C/D, (b+1) C/D)``
        and draws ``K / D`` of them with ``fold_in(key, b)``.
      dropout_prob: probability that a sampled client fails to report (static).

    Returns:
      ``(slots, used)``: ``slots[j]`` is the slot *within its block* of cohort
      member ``j`` (members ``[b K/D, (b+1) K/D)`` belong to block ``b``), and
      ``used[j]`` is 1.0 if its update counts (a real, sampled client that
      reported), else 0.0.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown client sampling {method!r}; choose one of {SAMPLINGS}")
    if k % blocks:
        raise ValueError(f"clients_per_round={k} does not split over {blocks} devices")
    per_block = k // blocks

    def block(b, task_index, mask):
        k_select, k_drop = jax.random.split(jax.random.fold_in(key, b))
        selected = SAMPLERS[method](k_select, task_index, mask > 0, per_block, num_tasks)
        slots, chosen = cohort_slots(selected, per_block)
        reported = jax.random.uniform(k_drop, (per_block,)) >= dropout_prob
        return slots, (chosen & reported).astype(jnp.float32)

    split = lambda a: a.reshape(blocks, -1)  # noqa: E731
    slots, used = jax.vmap(block)(jnp.arange(blocks), split(task_index), split(mask))
    return slots.reshape(k), used.reshape(k)
