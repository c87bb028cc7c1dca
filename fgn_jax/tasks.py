"""Task table: what each task predicts, its loss and its metric.

Heterogeneous tasks share one padded head of width ``max_outputs``. A task is
described by a static :class:`TaskSpec`; per client, the task table is turned
into small integer arrays (:class:`TaskArrays`) that are vmapped like data, so
a population with any mix of tasks is one array program and changing the mix
never recompiles.

Targets of every task live in one ``[N, target_width]`` float32 array:
regression tasks store their ``num_outputs`` values, classification tasks
store the 0-based class index in column 0.

Standardised regression: a client may carry a per-output affine map
(``target_shift``, ``target_scale``, fitted on its own training targets by
:func:`target_standardization`). Its head then predicts standardised targets
``(y - shift) / scale``: the loss is the MSE in those units (about 1 for the
mean predictor, the scale of a cross-entropy), and metrics are computed on
``shift + scale * output``, in the data's own units. Without it (shift 0,
scale 1), the landmark MSE in [0, 1] image coordinates is ~0.004 for the mean
predictor, so small next to the cross-entropies that the shared trunk hardly
learns the landmarks and plain SGD on the head needs thousands of steps just
to reach the mean.
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

    Per client: three scalars and the ``[max_outputs]`` standardisation of
    its regression targets (``[C]`` / ``[C, max_outputs]`` when stacked).
    """

    is_regression: jax.Array  # [] or [C] bool
    num_outputs: jax.Array  # [] or [C] int32
    metric: jax.Array  # [] or [C] int32, index into METRICS
    target_shift: jax.Array  # [W] or [C, W] float32: the head predicts (y - shift) / scale (0: none)
    target_scale: jax.Array  # [W] or [C, W] float32 (1: none)

    @classmethod
    def for_clients(
        cls,
        tasks: Sequence[TaskSpec],
        client_task: np.ndarray,
        target_shift: np.ndarray | None = None,
        target_scale: np.ndarray | None = None,
    ) -> "TaskArrays":
        """Stacked task arrays of clients ``client_task``; unstandardised unless shift/scale ``[C, W]`` are given."""
        client_task = np.asarray(client_task)
        shape = (len(client_task), max_outputs(tasks))
        shift = np.zeros(shape, np.float32) if target_shift is None else np.asarray(target_shift, np.float32)
        scale = np.ones(shape, np.float32) if target_scale is None else np.asarray(target_scale, np.float32)
        return cls(
            is_regression=jnp.asarray(np.array([tasks[k].kind == REGRESSION for k in client_task])),
            num_outputs=jnp.asarray(np.array([tasks[k].num_outputs for k in client_task], np.int32)),
            metric=jnp.asarray(np.array([METRICS.index(tasks[k].metric) for k in client_task], np.int32)),
            target_shift=jnp.asarray(shift),
            target_scale=jnp.asarray(scale),
        )


def target_standardization(
    tasks: Sequence[TaskSpec], client_task: np.ndarray, client_targets: Sequence[np.ndarray], min_scale: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Per-client ``(shift, scale)``, each ``[C, max_outputs]``: mean and std of each regression output.

    Fitted on each client's own training targets (what a client knows
    locally); classification clients and padding columns get shift 0, scale 1.
    ``scale`` is floored at ``min_scale`` (a constant output stays finite).
    """
    width = max_outputs(tasks)
    shift = np.zeros((len(client_task), width), np.float32)
    scale = np.ones((len(client_task), width), np.float32)
    for c, (k, y) in enumerate(zip(client_task, client_targets)):
        task = tasks[int(k)]
        if task.kind == REGRESSION and len(y):
            n = task.num_outputs
            shift[c, :n] = y[:, :n].mean(axis=0)
            scale[c, :n] = np.maximum(y[:, :n].std(axis=0), min_scale)
    return shift, scale


def _masked_logits(outputs: jax.Array, num_outputs: jax.Array) -> jax.Array:
    valid = jnp.arange(outputs.shape[-1]) < num_outputs
    return jnp.where(valid, outputs, -1e9)


def _regression_mask(outputs: jax.Array, num_outputs: jax.Array) -> jax.Array:
    return (jnp.arange(outputs.shape[-1]) < num_outputs).astype(outputs.dtype)


def _padded_targets(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    # [B, target_width] -> [B, max_outputs] (zeros beyond the target width).
    k = min(targets.shape[-1], outputs.shape[-1])
    return jnp.zeros(outputs.shape, outputs.dtype).at[:, :k].set(targets[:, :k])


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
    # Regression: MSE over the first num_outputs columns (targets padded to
    # width), in the client's standardised units.
    padded = _padded_targets(outputs, targets)
    mask = _regression_mask(outputs, task.num_outputs)
    standardized = (padded - task.target_shift) / task.target_scale
    mse = jnp.sum(mask * (outputs - standardized) ** 2, axis=-1) / task.num_outputs
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

    # Regression metrics in the data's own units.
    padded = _padded_targets(outputs, targets)
    prediction = task.target_shift + task.target_scale * outputs
    mask = _regression_mask(outputs, task.num_outputs)
    mse = jnp.sum(mask * (prediction - padded) ** 2, axis=-1) / task.num_outputs
    nme = _nme(prediction, padded, task.num_outputs)
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
