"""Task table: what each task predicts, its loss and its metric.

Heterogeneous tasks share one padded head of width ``max_outputs``. A task is
described by a static :class:`TaskSpec`; per client, the task table is turned
into small integer arrays (:class:`TaskArrays`) that are vmapped like data, so
a population with any mix of tasks is one array program and changing the mix
never recompiles.

Targets of every task live in one ``[N, target_width]`` float32 array:
regression tasks store their ``num_outputs`` values, classification tasks
store the 0-based class index in column 0.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REGRESSION = "regression"
CLASSIFICATION = "classification"
KINDS = (REGRESSION, CLASSIFICATION)

# Metric ids (used as array values inside jitted code).
ACCURACY = "accuracy"  # classification: fraction correct (higher is better)
NME = "nme"  # landmarks: mean point error / inter-ocular distance (lower is better)
MSE = "mse"  # generic regression: mean squared error (lower is better)
METRICS = (ACCURACY, NME, MSE)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task.

    Attributes:
      name: short identifier used in metrics files ("landmarks", "gender", ...).
      kind: ``"regression"`` (mean squared error) or ``"classification"``
        (softmax cross-entropy).
      num_outputs: regression: number of targets; classification: classes.
      metric: the held-out metric reported for this task (see ``METRICS``).
    """

    name: str
    kind: str
    num_outputs: int
    metric: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")
        if self.num_outputs < 1 or (self.kind == CLASSIFICATION and self.num_outputs < 2):
            raise ValueError(f"task {self.name!r}: num_outputs={self.num_outputs} is too small")
        if self.metric == NME and self.num_outputs % 2:
            raise ValueError(f"task {self.name!r}: nme needs x and y coordinates (even num_outputs)")

    @property
    def target_width(self) -> int:
        return self.num_outputs if self.kind == REGRESSION else 1


def max_outputs(tasks: Sequence[TaskSpec]) -> int:
    """Width of the padded head shared by all tasks."""
    return max(t.num_outputs for t in tasks)


def target_width(tasks: Sequence[TaskSpec]) -> int:
    """Width of the shared target array."""
    return max(t.target_width for t in tasks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskArrays:
    """The task table of one client (or, stacked, of all clients).

    All fields are int32 scalars per client (``[C]`` when stacked).
    """

    is_regression: jax.Array  # [] or [C] bool
    num_outputs: jax.Array  # [] or [C] int32
    metric: jax.Array  # [] or [C] int32, index into METRICS

    @classmethod
    def for_clients(cls, tasks: Sequence[TaskSpec], client_task: np.ndarray) -> "TaskArrays":
        client_task = np.asarray(client_task)
        return cls(
            is_regression=jnp.asarray(np.array([tasks[k].kind == REGRESSION for k in client_task])),
            num_outputs=jnp.asarray(np.array([tasks[k].num_outputs for k in client_task], np.int32)),
            metric=jnp.asarray(np.array([METRICS.index(tasks[k].metric) for k in client_task], np.int32)),
        )


def _masked_logits(outputs: jax.Array, num_outputs: jax.Array) -> jax.Array:
    valid = jnp.arange(outputs.shape[-1]) < num_outputs
    return jnp.where(valid, outputs, -1e9)


def _regression_mask(outputs: jax.Array, num_outputs: jax.Array) -> jax.Array:
    return (jnp.arange(outputs.shape[-1]) < num_outputs).astype(outputs.dtype)


def per_example_loss(outputs: jax.Array, targets: jax.Array, task: TaskArrays) -> jax.Array:
    """Loss of one client's task on a batch.

    Args:
      outputs: ``[B, max_outputs]`` padded head outputs.
      targets: ``[B, target_width]``.
      task: the client's (unbatched) :class:`TaskArrays`.

    Returns:
      ``[B]`` losses: mean squared error over the task's outputs for
      regression, softmax cross-entropy over its classes for classification.
    """
    width = outputs.shape[-1]
    # Regression: MSE over the first num_outputs columns (targets padded to width).
    padded = jnp.zeros(outputs.shape, outputs.dtype)
    k = min(targets.shape[-1], width)
    padded = padded.at[:, :k].set(targets[:, :k])
    mask = _regression_mask(outputs, task.num_outputs)
    mse = jnp.sum(mask * (outputs - padded) ** 2, axis=-1) / task.num_outputs
    # Classification: cross-entropy over the first num_outputs logits.
    labels = jnp.clip(targets[:, 0].astype(jnp.int32), 0, width - 1)
    logp = jax.nn.log_softmax(_masked_logits(outputs, task.num_outputs), axis=-1)
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return jnp.where(task.is_regression, mse, ce)


def per_example_metric(outputs: jax.Array, targets: jax.Array, task: TaskArrays) -> jax.Array:
    """Held-out metric of one client's task on a batch, ``[B]``."""
    width = outputs.shape[-1]
    labels = jnp.clip(targets[:, 0].astype(jnp.int32), 0, width - 1)
    pred = jnp.argmax(_masked_logits(outputs, task.num_outputs), axis=-1)
    accuracy = (pred == labels).astype(outputs.dtype)

    padded = jnp.zeros(outputs.shape, outputs.dtype)
    k = min(targets.shape[-1], width)
    padded = padded.at[:, :k].set(targets[:, :k])
    mask = _regression_mask(outputs, task.num_outputs)
    mse = jnp.sum(mask * (outputs - padded) ** 2, axis=-1) / task.num_outputs
    nme = _nme(outputs, padded, task.num_outputs)
    return jnp.select(
        [task.metric == METRICS.index(ACCURACY), task.metric == METRICS.index(NME)],
        [accuracy, nme],
        mse,
    )


def _nme(outputs: jax.Array, targets: jax.Array, num_outputs: jax.Array) -> jax.Array:
    """Mean point error normalised by the inter-ocular distance.

    Layout (MTFL): the first ``P = num_outputs // 2`` columns are x, the next P
    are y; points 0 and 1 are the left and right eye.
    """
    width = outputs.shape[-1]
    num_points = num_outputs // 2
    idx = jnp.arange(width)
    # Gather x_i = col i, y_i = col P + i for i < P (padded to width).
    x_idx = jnp.clip(idx, 0, width - 1)
    y_idx = jnp.clip(idx + num_points, 0, width - 1)
    point_valid = idx < num_points
    dx = jnp.take(outputs, x_idx, axis=-1) - jnp.take(targets, x_idx, axis=-1)
    dy = jnp.take(outputs, y_idx, axis=-1) - jnp.take(targets, y_idx, axis=-1)
    err = jnp.sum(jnp.where(point_valid, jnp.sqrt(dx**2 + dy**2), 0.0), axis=-1) / num_points
    eye_dx = targets[:, 0] - targets[:, 1]
    eye_dy = jnp.take(targets, num_points, axis=-1) - jnp.take(targets, num_points + 1, axis=-1)
    iod = jnp.sqrt(eye_dx**2 + eye_dy**2)
    return err / jnp.maximum(iod, 1e-6)
