"""In-memory data structures shared by every dataset.

Every dataset (synthetic or real) first produces an :class:`ExamplePool` per
split: all examples with the labels of every task. Partitioning
(:mod:`fgn_jax.data.partition`) then turns a train and a test pool into a
:class:`FederatedDataset`: one flat array per field, each client owning an
``(offset, size)`` range, so imbalanced clients need no padding and sampling a
minibatch is an index computation on the device.

On a device mesh, :func:`block_layout` regroups a split into one block per
device (the examples of that device's clients) and :func:`slot_order` picks
which client goes to which device so that the blocks stay balanced.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Mapping, Sequence

import numpy as np

from fgn_jax import tasks as tasks_lib


@dataclasses.dataclass(frozen=True)
class ExamplePool:
    """Examples with the labels of every task (host-side numpy).

    Attributes:
      x: ``[N, ...]`` float32 inputs.
      targets: task name -> ``[N, task.target_width]`` float32 targets
        (classification: the 0-based class index in column 0).
      tasks: the task table, in task order.
    """

    x: np.ndarray
    targets: Mapping[str, np.ndarray]
    tasks: tuple[tasks_lib.TaskSpec, ...]

    def __post_init__(self):
        n = len(self.x)
        for task in self.tasks:
            t = self.targets.get(task.name)
            if t is None:
                raise ValueError(f"pool has no targets for task {task.name!r}")
            if t.shape != (n, task.target_width):
                raise ValueError(
                    f"targets of task {task.name!r} have shape {t.shape}, expected {(n, task.target_width)}"
                )

    def __len__(self) -> int:
        return len(self.x)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a federated dataset: flat arrays plus per-client ranges.

    Attributes:
      x: ``[N, ...]`` float32 inputs of all clients, client after client.
      y: ``[N, target_width]`` float32 targets of each example's client task.
      offset: ``[C]`` int32 index of each client's first example.
      size: ``[C]`` int32 number of examples of each client.
    """

    x: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        lo, n = int(self.offset[c]), int(self.size[c])
        return self.x[lo : lo + n], self.y[lo : lo + n]


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """A dataset split over clients, each client owning one task.

    Attributes:
      name: dataset name (for config and logs).
      tasks: task table, in task order.
      client_task: ``[C]`` int32 task index of each client.
      train: training split.
      test: held-out split (per client, same task).
      client_distance: ``[C]`` distance of each client to its receiver
        (path loss of over-the-air aggregation); None: all 1.
    """

    name: str
    tasks: tuple[tasks_lib.TaskSpec, ...]
    client_task: np.ndarray
    train: Split
    test: Split
    client_distance: np.ndarray | None = None  # [C] float distance to the receiver (ota/hota path loss); None: 1

    @property
    def num_clients(self) -> int:
        return len(self.client_task)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def stack_split(pool: ExamplePool, client_indices: Sequence[np.ndarray], client_task: np.ndarray) -> Split:
    """Gathers each client's examples (and its task's targets) into one Split."""
    width = tasks_lib.target_width(pool.tasks)
    sizes = np.array([len(i) for i in client_indices], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    xs, ys = [], []
    for idx, k in zip(client_indices, client_task):
        task = pool.tasks[int(k)]
        xs.append(pool.x[idx])
        y = np.zeros((len(idx), width), np.float32)
        y[:, : task.target_width] = pool.targets[task.name][idx]
        ys.append(y)
    x = np.concatenate(xs).astype(np.float32) if xs else pool.x[:0]
    return Split(x=x, y=np.concatenate(ys), offset=offsets, size=sizes)


def slot_order(sizes: np.ndarray, num_slots: int, num_blocks: int, gain: float = 0.2) -> np.ndarray:
    """Which client sits in each client slot, so that the per-device blocks stay balanced.

    Slot ``s`` lives on device ``s // (num_slots / num_blocks)``. Clients keep
    their order (slot ``c`` = client ``c``, padding after them) unless that
    makes the largest device's examples more than ``1 / (1 - gain)`` times
    what a greedy balance gives (imbalanced clients, e.g. ``--imbalance=1``
    puts most examples on the first device). Then clients are placed largest
    first on the device with the fewest examples and a free slot; a device's
    clients in increasing order, padding slots last.

    Args:
      sizes: ``[C_real]`` examples of each client (what a block must hold).
      num_slots: client slots ``C >= C_real``; slots past the real clients
        are padding (ids ``C_real .. C - 1``).
      num_blocks: devices along the client axis; must divide ``num_slots``.
      gain: the relative shrinking of the largest block worth a reordering.

    Returns:
      ``[C]`` int client index (padding: ``>= C_real``) of each slot.
    """
    c_real = len(sizes)
    if num_slots < c_real or num_slots % num_blocks:
        raise ValueError(f"{num_slots} client slots for {c_real} clients do not split into {num_blocks} blocks")
    k = num_slots // num_blocks
    sizes = np.concatenate([np.asarray(sizes, np.int64), np.zeros(num_slots - c_real, np.int64)])
    in_order = np.arange(num_slots)
    if num_blocks == 1:
        return in_order
    members: list[list[int]] = [[] for _ in range(num_blocks)]
    emptiest = [(0, b) for b in range(num_blocks)]  # heap of (examples, block) over blocks with a free slot
    largest = 0
    for c in np.argsort(-sizes[:c_real], kind="stable"):
        load, b = heapq.heappop(emptiest)
        members[b].append(int(c))
        load += int(sizes[c])
        largest = max(largest, load)
        if len(members[b]) < k:
            heapq.heappush(emptiest, (load, b))
    if largest >= (1 - gain) * sizes.reshape(num_blocks, k).sum(axis=1).max():
        return in_order
    padding = iter(range(c_real, num_slots))
    return np.array([c for m in members for c in sorted(m) + [next(padding) for _ in range(k - len(m))]])


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """A split's examples regrouped into equal-length blocks, one per device.

    Client slot ``c`` belongs to block ``c // (C / num_blocks)`` (the slots a
    ``P("clients")`` sharding gives device ``c // (C / num_blocks)``). Block
    ``b`` holds the examples of its clients, client after client, then zero
    rows up to :attr:`block_size`; the blocks laid end to end form a
    ``[num_blocks * block_size, ...]`` array whose shard ``b`` is block ``b``.

    Attributes:
      num_blocks: blocks (devices along the client axis).
      block_size: rows per block: the largest block's examples (at least 1).
      source_offset: ``[C]`` each client's first row in the split's flat arrays.
      size: ``[C]`` examples per client (0 for padding slots).
      offset: ``[C]`` each client's first row inside its own block.
    """

    num_blocks: int
    block_size: int
    source_offset: np.ndarray
    size: np.ndarray
    offset: np.ndarray

    @property
    def clients_per_block(self) -> int:
        return len(self.size) // self.num_blocks

    def block_rows(self, b: int) -> np.ndarray:
        """Row indices (into the split's flat arrays) of block ``b``'s examples, unpadded."""
        k = self.clients_per_block
        ranges = [
            np.arange(o, o + n) for o, n in zip(self.source_offset[b * k : (b + 1) * k], self.size[b * k : (b + 1) * k])
        ]
        return np.concatenate(ranges).astype(np.int64) if ranges else np.zeros((0,), np.int64)

    def block(self, a: np.ndarray, b: int) -> np.ndarray:
        """Block ``b`` of the flat array ``a`` (``[N, ...]``): its clients' rows, zero-padded."""
        rows = a[self.block_rows(b)]
        pad = np.zeros((self.block_size - len(rows), *a.shape[1:]), a.dtype)
        return np.concatenate([rows, pad])

    def rows(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the laid-out array, building only the blocks they cover."""
        if stop <= start:
            return np.zeros((0, *a.shape[1:]), a.dtype)
        first, last = start // self.block_size, (stop - 1) // self.block_size
        blocks = np.concatenate([self.block(a, b) for b in range(first, last + 1)])
        return blocks[start - first * self.block_size : stop - first * self.block_size]


def block_layout(offset: np.ndarray, size: np.ndarray, num_blocks: int) -> BlockLayout:
    """The :class:`BlockLayout` of a split's client ranges over ``num_blocks`` blocks.

    Args:
      offset: ``[C]`` the first row (in the split's flat arrays) of the
        client in each slot.
      size: ``[C]`` its example count (0 for a padding slot).
      num_blocks: blocks; must divide ``C``.
    """
    if len(size) % num_blocks:
        raise ValueError(f"{len(size)} client slots do not split into {num_blocks} blocks")
    per_block = np.asarray(size, np.int64).reshape(num_blocks, -1)
    # Exclusive cumulative sum inside each block: a client's offset in its block.
    local = (np.cumsum(per_block, axis=1) - per_block).reshape(-1)
    block_size = max(int(per_block.sum(axis=1).max(initial=0)), 1)
    return BlockLayout(
        num_blocks,
        block_size,
        np.asarray(offset, np.int64),
        per_block.reshape(-1).astype(np.int32),
        local.astype(np.int32),
    )
