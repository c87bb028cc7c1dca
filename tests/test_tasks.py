"""Per-task losses and metrics against hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np

from fgn_jax import tasks

TABLE = (
    tasks.TaskSpec("reg", tasks.REGRESSION, 2, tasks.MSE),
    tasks.TaskSpec("cls", tasks.CLASSIFICATION, 3, tasks.ACCURACY),
    tasks.TaskSpec("lm", tasks.REGRESSION, 4, tasks.NME),
)


def arrays(k):
    return jax.tree.map(lambda a: a[0], tasks.TaskArrays.for_clients(TABLE, np.array([k])))


def test_regression_loss_uses_only_the_task_outputs():
    out = jnp.array([[1.0, 2.0, 100.0, -50.0]])  # padded to 4; columns 2, 3 ignored
    y = jnp.array([[0.0, 4.0, 0.0, 0.0]])
    # ((1 - 0)^2 + (2 - 4)^2) / 2 = 2.5
    np.testing.assert_allclose(tasks.per_example_loss(out, y, arrays(0)), [2.5])
    np.testing.assert_allclose(tasks.per_example_metric(out, y, arrays(0)), [2.5])


def test_classification_loss_masks_padded_logits():
    out = jnp.array([[0.0, jnp.log(2.0), jnp.log(5.0), 30.0]])  # logit 3 is padding
    y = jnp.array([[1.0, 0.0, 0.0, 0.0]])
    # softmax over [1, 2, 5]: p(1) = 2/8 -> loss = log 4
    np.testing.assert_allclose(tasks.per_example_loss(out, y, arrays(1)), [np.log(4.0)], rtol=1e-6)
    # argmax over the three real classes is 2, label 1 -> accuracy 0
    np.testing.assert_allclose(tasks.per_example_metric(out, y, arrays(1)), [0.0])
    np.testing.assert_allclose(tasks.per_example_metric(out, jnp.array([[2.0, 0, 0, 0]]), arrays(1)), [1.0])


def test_nme_normalises_by_inter_ocular_distance():
    # Two points: eyes at (0, 0) and (4, 3) -> distance 5 (layout x1 x2 y1 y2).
    y = jnp.array([[0.0, 4.0, 0.0, 3.0]])
    out = jnp.array([[3.0, 4.0, 4.0, 3.0]])  # point 1 off by (3, 4) = 5, point 2 exact
    # mean point error 2.5, / 5 = 0.5
    np.testing.assert_allclose(tasks.per_example_metric(out, y, arrays(2)), [0.5], rtol=1e-6)
