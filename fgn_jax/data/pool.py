"""In-memory data structures shared by every dataset.

Every dataset (synthetic or real) first produces an :class:`ExamplePool` per
split: all examples with the labels of every task. Partitioning
(:mod:`fgn_jax.data.partition`) then turns a train and a test pool into a
:class:`FederatedDataset`: one flat array per field, each client owning an
``(offset, size)`` range, so imbalanced clients need no padding and sampling a
minibatch is an index computation on the device.
"""

from __future__ import annotations

import dataclasses
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
    """

    name: str
    tasks: tuple[tasks_lib.TaskSpec, ...]
    client_task: np.ndarray
    train: Split
    test: Split

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
