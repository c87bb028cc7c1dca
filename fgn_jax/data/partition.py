"""Federated partitioning shared by every dataset.

Turns a train and a test :class:`~fgn_jax.data.pool.ExamplePool` into a
:class:`~fgn_jax.data.pool.FederatedDataset`: which client has which task,
how many examples each client gets (balanced, power-law or explicit sizes)
and which ones (IID, or label-skewed with Dirichlet(beta) class proportions).
A client's targets are those of its own task.

By default clients get disjoint examples. With ``overlap="across_tasks"``
clients of different tasks may hold the same example (e.g. one face used for
gender by one client and for smile by another); clients of one task stay
disjoint.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import pool as pool_lib

OVERLAP_NONE = "none"  # every client holds different examples
OVERLAP_ACROSS_TASKS = "across_tasks"  # clients of different tasks may share examples
OVERLAPS = (OVERLAP_NONE, OVERLAP_ACROSS_TASKS)


def round_robin_tasks(num_clients: int, num_tasks: int) -> np.ndarray:
    """Client c gets task ``c % num_tasks`` (one client per task when C == T)."""
    if num_clients < num_tasks:
        raise ValueError(f"num_clients={num_clients} is less than the number of tasks ({num_tasks})")
    return (np.arange(num_clients) % num_tasks).astype(np.int32)


def parse_client_tasks(spec: str, task_names: Sequence[str]) -> np.ndarray:
    """Parses a client->task map such as ``"0,1,2,2"`` or ``"gender,smile"``.

    Every task must have at least one client.
    """
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item.isdigit():
            k = int(item)
            if k >= len(task_names):
                raise ValueError(f"task index {k} out of range (tasks: {', '.join(task_names)})")
        elif item in task_names:
            k = list(task_names).index(item)
        else:
            raise ValueError(f"unknown task {item!r} (tasks: {', '.join(task_names)})")
        out.append(k)
    missing = sorted(set(range(len(task_names))) - set(out))
    if missing:
        raise ValueError(f"tasks without a client: {', '.join(task_names[k] for k in missing)}")
    return np.asarray(out, np.int32)


def power_law_sizes(total: int, num_clients: int, imbalance: float, min_size: int = 1) -> np.ndarray:
    """Client sizes with share proportional to ``(c + 1) ** -imbalance``.

    ``imbalance = 0`` gives equal sizes; larger values make later clients
    smaller (client 0 always has the most data). Sizes sum to at most ``total``
    and are at least ``min_size``.
    """
    if imbalance < 0:
        raise ValueError(f"imbalance must be >= 0, got {imbalance}")
    if total < num_clients * min_size:
        raise ValueError(f"{total} examples cannot give {num_clients} clients at least {min_size} examples each")
    share = (np.arange(num_clients) + 1.0) ** -imbalance
    share /= share.sum()
    sizes = np.maximum(np.floor(share * total).astype(np.int64), min_size)
    # Taking min_size from the largest clients keeps the sum within total.
    while sizes.sum() > total:
        sizes[np.argmax(sizes)] -= 1
    return sizes.astype(np.int32)


def iid_indices(num_examples: int, sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint uniformly random index sets of the given sizes."""
    if sum(sizes) > num_examples:
        raise ValueError(f"clients need {sum(sizes)} examples but only {num_examples} exist")
    perm = rng.permutation(num_examples)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def partition(
    name: str,
    train: pool_lib.ExamplePool,
    test: pool_lib.ExamplePool | None,
    client_task: np.ndarray,
    train_sizes: Sequence[int],
    test_sizes: Sequence[int] | None,
    seed: int,
    *,
    beta: float | None = None,
    overlap: str = OVERLAP_NONE,
    holdout_fraction: float | None = None,
) -> pool_lib.FederatedDataset:
    """Partitions a train and a test pool over clients.

    With the defaults this is the IID disjoint partition (the same draws as
    before the keyword options existed).

    Args:
      name: dataset name.
      train: pool the training examples come from.
      test: pool the held-out examples come from (unused, may be None, with
        ``holdout_fraction``).
      client_task: ``[C]`` task index of each client.
      train_sizes: ``[C]`` examples each client draws from ``train``.
      test_sizes: ``[C]`` examples each client draws from ``test`` (unused,
        may be None, with ``holdout_fraction``).
      seed: seed of every random choice.
      beta: None for IID; else Dirichlet(beta) label skew
        (:func:`label_proportions`); a client's held-out examples follow the
        same class proportions as its training examples.
      overlap: ``"none"`` (disjoint clients) or ``"across_tasks"`` (only
        clients of the same task are disjoint).
      holdout_fraction: if set, each client's held-out set is this share of
        the ``train_sizes[c]`` examples it drew (:func:`holdout_split`),
        instead of a draw from ``test``.

    Returns:
      The :class:`~fgn_jax.data.pool.FederatedDataset`.
    """
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    rng = np.random.default_rng(seed)
    client_task = np.asarray(client_task, np.int32)
    proportions = None if beta is None else label_proportions(train, client_task, beta, rng)

    def draw(pool: pool_lib.ExamplePool, sizes: Sequence[int]) -> list[np.ndarray]:
        if proportions is None and overlap == OVERLAP_NONE:
            return iid_indices(len(pool), sizes, rng)
        return skewed_indices(pool, client_task, sizes, proportions, rng, overlap)

    train_idx = draw(train, train_sizes)
    if holdout_fraction is None:
        if test is None or test_sizes is None:
            raise ValueError("a test pool and test sizes are needed unless holdout_fraction is set")
        test_pool, test_idx = test, draw(test, test_sizes)
    else:
        test_pool = train
        train_idx, test_idx = holdout_split(train_idx, holdout_fraction, rng)
    return pool_lib.FederatedDataset(
        name=name,
        tasks=tuple(train.tasks),
        client_task=client_task,
        train=pool_lib.stack_split(train, train_idx, client_task),
        test=pool_lib.stack_split(test_pool, test_idx, client_task),
    )


def parse_sizes(spec: str, num_clients: int) -> np.ndarray:
    """Parses explicit client sizes such as ``"500,200,100"``.

    Args:
      spec: comma-separated positive integers, one per client; a single
        number gives every client that size.
      num_clients: the number of clients.

    Returns:
      ``[num_clients]`` int32 sizes.
    """
    items = [item.strip() for item in spec.split(",")]
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"client sizes must be positive integers, got {spec!r}")
    sizes = [int(item) for item in items]
    if len(sizes) == 1:
        sizes *= num_clients
    if len(sizes) != num_clients:
        raise ValueError(f"{len(sizes)} client sizes given for {num_clients} clients: {spec!r}")
    return np.asarray(sizes, np.int32)


def _labels(pool: pool_lib.ExamplePool, task: tasks_lib.TaskSpec) -> np.ndarray:
    return pool.targets[task.name][:, 0].astype(np.int64)


def label_proportions(
    pool: pool_lib.ExamplePool, client_task: np.ndarray, beta: float, rng: np.random.Generator
) -> list[np.ndarray | None]:
    """Dirichlet(beta) class proportions for each classification client.

    Small ``beta`` (e.g. 0.1) gives each client a few dominant classes; large
    ``beta`` approaches the uniform mix. Regression clients get None (IID).

    Returns:
      Per client, ``[num_classes]`` proportions summing to 1, or None.
    """
    if not beta > 0:
        raise ValueError(f"Dirichlet beta must be > 0, got {beta}")
    out: list[np.ndarray | None] = []
    for k in client_task:
        task = pool.tasks[int(k)]
        if task.kind == tasks_lib.CLASSIFICATION:
            out.append(rng.dirichlet(np.full(task.num_outputs, float(beta))))
        else:
            out.append(None)
    return out


def skewed_indices(
    pool: pool_lib.ExamplePool,
    client_task: np.ndarray,
    sizes: Sequence[int],
    proportions: Sequence[np.ndarray | None] | None,
    rng: np.random.Generator,
    overlap: str = OVERLAP_NONE,
) -> list[np.ndarray]:
    """Index sets whose labels follow each client's class proportions.

    Client by client, draws ``Multinomial(size, q)`` examples per class. When
    a class runs short (earlier clients took its examples), the gap is filled
    from the remaining examples, still preferring the client's classes.

    Args:
      pool: the examples.
      client_task: ``[C]`` task of each client.
      sizes: ``[C]`` examples per client.
      proportions: per client class proportions, or None for uniform draws
        (None as a whole: every client uniform).
      rng: random generator.
      overlap: ``"none"`` or ``"across_tasks"`` (see :func:`partition`).

    Returns:
      Per client, the sorted example indices.
    """
    if proportions is None:
        proportions = [None] * len(client_task)
    free_by_group: dict[int, np.ndarray] = {}
    out = []
    for k, size, q in zip(client_task, sizes, proportions, strict=True):
        k, size = int(k), int(size)
        # One "free" mask shared by all clients, or one per task.
        group = k if overlap == OVERLAP_ACROSS_TASKS else -1
        free = free_by_group.setdefault(group, np.ones(len(pool), bool))
        candidates = np.flatnonzero(free)
        if size > len(candidates):
            raise ValueError(f"clients need more examples than the {len(pool)} that exist")
        if q is None:
            chosen = rng.choice(candidates, size, replace=False)
        else:
            labels = _labels(pool, pool.tasks[k])[candidates]
            counts = rng.multinomial(size, q)
            parts = []
            for cls, count in enumerate(counts):
                members = candidates[labels == cls]
                parts.append(rng.choice(members, min(count, len(members)), replace=False))
            chosen = np.concatenate(parts).astype(np.int64)
            if len(chosen) < size:
                rest = np.flatnonzero(free & ~np.isin(np.arange(len(pool)), chosen))
                # A tiny floor keeps classes with q ~ 0 eligible once the others run out.
                weight = q[_labels(pool, pool.tasks[k])[rest]] + 1e-12
                extra = rng.choice(rest, size - len(chosen), replace=False, p=weight / weight.sum())
                chosen = np.concatenate([chosen, extra])
        free[chosen] = False
        out.append(np.sort(chosen))
    return out


def holdout_split(
    client_indices: Sequence[np.ndarray], fraction: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits each client's examples into its own train and held-out sets.

    Each client keeps ``round(fraction * n)`` examples aside (at least one,
    and at least one for training), so its held-out set follows exactly its
    own distribution.

    Returns:
      ``(train_indices, heldout_indices)``, per client, sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    train, heldout = [], []
    for c, idx in enumerate(client_indices):
        if len(idx) < 2:
            raise ValueError(f"client {c} has {len(idx)} example(s): too few to hold some out")
        n_out = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        perm = rng.permutation(idx)
        heldout.append(np.sort(perm[:n_out]))
        train.append(np.sort(perm[n_out:]))
    return train, heldout


def label_histograms(
    split: pool_lib.Split, tasks: Sequence[tasks_lib.TaskSpec], client_task: np.ndarray
) -> list[np.ndarray | None]:
    """Per client, counts of each class of its task (None for regression)."""
    out: list[np.ndarray | None] = []
    for c, k in enumerate(client_task):
        task = tasks[int(k)]
        if task.kind != tasks_lib.CLASSIFICATION:
            out.append(None)
            continue
        _, y = split.client(c)
        out.append(np.bincount(y[:, 0].astype(np.int64), minlength=task.num_outputs))
    return out


def _format_table(rows: list[tuple[str, ...]], right: tuple[bool, ...]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# Above this many clients, client_table prints one line per task instead of one per client.
MAX_TABLE_CLIENTS = 20


def client_table(dataset: pool_lib.FederatedDataset, max_clients: int = MAX_TABLE_CLIENTS) -> str:
    """A printable table of client sizes and label histograms (per task above ``max_clients`` clients).

    Example (one line per client)::

        client  task       train  test  train labels  test labels
             0  landmarks    500   100  -             -
             1  gender       200    50  150 50        38 12
         total               700   150

    Above ``max_clients`` clients, one line per task (:func:`task_table`).

    Returns:
      The table, with a header and a total line.
    """
    if dataset.num_clients > max_clients:
        return task_table(dataset)
    hist_train = label_histograms(dataset.train, dataset.tasks, dataset.client_task)
    hist_test = label_histograms(dataset.test, dataset.tasks, dataset.client_task)

    def fmt(h: np.ndarray | None) -> str:
        return "-" if h is None else " ".join(str(int(v)) for v in h)

    rows = [("client", "task", "train", "test", "train labels", "test labels")]
    for c, k in enumerate(dataset.client_task):
        rows.append(
            (
                str(c),
                dataset.tasks[int(k)].name,
                str(int(dataset.train.size[c])),
                str(int(dataset.test.size[c])),
                fmt(hist_train[c]),
                fmt(hist_test[c]),
            )
        )
    rows.append(("total", "", str(int(dataset.train.size.sum())), str(int(dataset.test.size.sum())), "", ""))
    return _format_table(rows, (True, False, True, True, False, False))


def task_table(dataset: pool_lib.FederatedDataset) -> str:
    """Per task: client count, train and test size min/median/max, the train label histogram summed over its clients.

    Example::

        task        clients  train min/median/max  test min/median/max  train labels
        modulation       86            12/ 31/600             8/  8/  8  603 211 ...
        total           256                  9000                  2048

    Returns:
      The table, one line per task plus a header and a total line.
    """
    hist_train = label_histograms(dataset.train, dataset.tasks, dataset.client_task)
    rows = [("task", "clients", "train min/median/max", "test min/median/max", "train labels")]

    def spread(sizes: np.ndarray) -> str:
        if not len(sizes):
            return "-"
        return f"{int(sizes.min())}/{int(np.median(sizes))}/{int(sizes.max())}"

    for k, task in enumerate(dataset.tasks):
        members = np.flatnonzero(np.asarray(dataset.client_task) == k)
        hists = [hist_train[c] for c in members if hist_train[c] is not None]
        labels = " ".join(str(int(v)) for v in np.sum(hists, axis=0)) if hists else "-"
        rows.append(
            (
                task.name,
                str(len(members)),
                spread(dataset.train.size[members]),
                spread(dataset.test.size[members]),
                labels,
            )
        )
    total_train, total_test = int(dataset.train.size.sum()), int(dataset.test.size.sum())
    rows.append(("total", str(dataset.num_clients), str(total_train), str(total_test), ""))
    return _format_table(rows, (False, True, True, True, False))
