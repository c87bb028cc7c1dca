"""Constant predictors: the floor every task's held-out metric must clear.

A task "learns" only if its held-out metric beats the best input-independent
predictor fitted on the same clients' training data:

* classification: the majority class of the client's training labels
  (metric: accuracy, higher is better);
* regression: the mean target vector of the client's training examples
  (metric: NME or MSE, lower is better).

Each is scored on the client's own held-out examples with the task's metric
(:func:`fgn_jax.tasks.per_example_metric`), then averaged over the task's
clients exactly like ``test_metric`` (:meth:`fgn_jax.simulate.Simulation.evaluate`),
so the two numbers are directly comparable.
"""

from __future__ import annotations

import jax
import numpy as np

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import pool as pool_lib

# Direction of each metric: +1 when higher is better.
HIGHER_IS_BETTER = {tasks_lib.ACCURACY: True, tasks_lib.NME: False, tasks_lib.MSE: False}
SYMBOL = {tasks_lib.ACCURACY: "acc↑", tasks_lib.NME: "NME↓", tasks_lib.MSE: "MSE↓"}


def constant_outputs(task: tasks_lib.TaskSpec, train_y: np.ndarray, width: int) -> np.ndarray:
    """``[width]`` head outputs of the best constant predictor fitted on ``train_y``.

    Classification: a one-hot logit on the majority class (ties: the lowest
    class index); regression: the mean target.
    """
    out = np.zeros((width,), np.float32)
    if task.kind == tasks_lib.CLASSIFICATION:
        counts = np.bincount(train_y[:, 0].astype(int), minlength=task.num_outputs)
        out[int(np.argmax(counts))] = 1.0
    else:
        out[: task.num_outputs] = train_y[:, : task.num_outputs].mean(axis=0)
    return out


def constant_baseline(dataset: pool_lib.FederatedDataset) -> list[float]:
    """Per task (task order), the held-out metric of the constant predictor, averaged over the task's clients.

    Args:
      dataset: the partitioned dataset of a run.

    Returns:
      One float per task; NaN for a task without clients.
    """
    width = tasks_lib.max_outputs(dataset.tasks)
    out = []
    for k, task in enumerate(dataset.tasks):
        # One metric call per task over all its clients' held-out examples (a call per client
        # took seconds for a few hundred clients); each client's examples are then averaged alone.
        outputs, targets, sizes = [], [], []
        for c in np.flatnonzero(np.asarray(dataset.client_task) == k):
            _, train_y = dataset.train.client(int(c))
            _, test_y = dataset.test.client(int(c))
            if len(train_y) == 0 or len(test_y) == 0:
                continue
            outputs.append(np.broadcast_to(constant_outputs(task, train_y, width), (len(test_y), width)))
            targets.append(test_y)
            sizes.append(len(test_y))
        if not sizes:
            out.append(float("nan"))
            continue
        one = jax.tree.map(lambda a: a[0], tasks_lib.TaskArrays.for_clients(dataset.tasks, np.array([k])))
        metric = np.asarray(tasks_lib.per_example_metric(np.concatenate(outputs), np.concatenate(targets), one))
        bounds = np.cumsum([0, *sizes])
        out.append(float(np.mean([float(np.mean(metric[a:b])) for a, b in zip(bounds[:-1], bounds[1:])])))
    return out


def margin(metric: str, value: float, baseline: float) -> float:
    """How much ``value`` beats ``baseline``: a difference for accuracy, a ratio for errors.

    Accuracy: ``value - baseline`` (> 0 is better). NME/MSE: ``value / baseline``
    (< 1 is better).
    """
    if HIGHER_IS_BETTER[metric]:
        return value - baseline
    return value / baseline if baseline > 0 else float("inf")


def beats(metric: str, value: float, baseline: float, accuracy_margin: float = 0.12, error_ratio: float = 0.6) -> bool:
    """The issue-11 criterion: accuracy at least ``accuracy_margin`` above, errors at most ``error_ratio`` times."""
    m = margin(metric, value, baseline)
    return m >= accuracy_margin if HIGHER_IS_BETTER[metric] else m <= error_ratio
