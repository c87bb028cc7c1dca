"""The PyTorch benchmark reference matches the flax models and a jax.grad SGD step.

Skipped when torch (an optional dependency) is not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference as tr  # noqa: E402
from fgn_jax import models  # noqa: E402

# (kind, flax trunk, torch input shape of one example)
KINDS = [("mtfl", models.MTFLTrunk, (1, 40, 40)), ("radcom", models.RadComTrunk, (2, 128))]
MAX_OUTPUTS = 5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny tensors: one thread avoids OpenMP barrier stalls when the CPU is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _to_flax_layout(x):
    """torch [N, C, *S] -> flax [N, *S, C]."""
    return jnp.asarray(np.moveaxis(x, 1, -1))


def _random_params(module, x, rng):
    """Random params with the module's shapes (eval_shape: no slow XLA init compile).

    Biases are non-zero too, so the bias mapping is exercised.
    """
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=s.shape).astype(np.float32) / np.sqrt(fan_in))

    return jax.tree.map(draw, shapes)


def _setup(kind, trunk_cls, shape, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, MAX_OUTPUTS, size=batch)
    flax_trunk = trunk_cls()
    trunk_params = _random_params(flax_trunk, _to_flax_layout(x), rng)
    features = jax.eval_shape(flax_trunk.apply, trunk_params, _to_flax_layout(x))
    flax_head = models.Head(MAX_OUTPUTS)
    head_params = _random_params(flax_head, features, rng)
    torch_trunk = tr.load_flax_params(tr.build_trunk(kind), trunk_params)
    torch_head = tr.load_flax_params(tr.build_head(features.shape[-1], MAX_OUTPUTS), head_params)
    return x, y, flax_trunk, trunk_params, flax_head, head_params, torch_trunk, torch_head


@pytest.mark.parametrize("kind,trunk_cls,shape", KINDS)
def test_forward_matches_flax(kind, trunk_cls, shape):
    x, _, flax_trunk, trunk_params, flax_head, head_params, torch_trunk, torch_head = _setup(kind, trunk_cls, shape)
    want_features = flax_trunk.apply(trunk_params, _to_flax_layout(x))
    want_logits = flax_head.apply(head_params, want_features)
    with torch.no_grad():
        got_features = torch_trunk(torch.from_numpy(x))
        got_logits = torch_head(got_features)
    np.testing.assert_allclose(got_features.numpy(), np.asarray(want_features), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_logits.numpy(), np.asarray(want_logits), atol=1e-4, rtol=1e-4)
    if kind == "mtfl":  # the --channels_last variant computes the same function
        nhwc = torch_trunk.to(memory_format=torch.channels_last)
        with torch.no_grad():
            got = nhwc(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
        np.testing.assert_allclose(got.numpy(), np.asarray(want_features), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,trunk_cls,shape", KINDS)
def test_shared_phase_sgd_step_matches_jax_grad(kind, trunk_cls, shape):
    lr = 0.1
    x, y, flax_trunk, trunk_params, flax_head, head_params, torch_trunk, torch_head = _setup(
        kind, trunk_cls, shape, seed=1
    )

    def loss(params):
        logits = flax_head.apply(head_params, flax_trunk.apply(params, _to_flax_layout(x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    grads = jax.jit(jax.grad(loss))(trunk_params)
    stepped = jax.tree.map(lambda p, g: p - lr * g, trunk_params, grads)
    want = tr.load_flax_params(tr.build_trunk(kind), stepped)

    batch = (torch.from_numpy(x), torch.from_numpy(y))
    deltas = tr.shared_phase(torch_trunk, torch_head, [batch], lr)
    names = [n for n, _ in torch_trunk.named_parameters()]
    want_params = dict(want.named_parameters())
    for name, global_p, delta in zip(names, torch_trunk.parameters(), deltas, strict=True):
        np.testing.assert_allclose(
            (global_p + delta).detach().numpy(), want_params[name].detach().numpy(), atol=1e-4, err_msg=name
        )
    # The global trunk and the frozen head are untouched, and the head is trainable again.
    np.testing.assert_array_equal(
        torch_trunk.feature.weight.detach().numpy(), np.asarray(trunk_params["params"]["feature"]["kernel"]).T
    )
    assert all(p.requires_grad for p in torch_head.parameters())
    assert any(float(d.abs().max()) > 0 for d in deltas)


def test_measure_grad_norm_matches_jax():
    kind, trunk_cls, shape = KINDS[1]
    x, y, flax_trunk, trunk_params, flax_head, head_params, torch_trunk, torch_head = _setup(
        kind, trunk_cls, shape, seed=2
    )

    def loss(w):
        params = models.set_last_shared_kernel(trunk_params, w)
        logits = flax_head.apply(head_params, flax_trunk.apply(params, _to_flax_layout(x)))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    w = models.get_last_shared_kernel(trunk_params)
    want_loss, want_grad = jax.jit(jax.value_and_grad(loss))(w)
    got_loss, got_norm = tr.measure(torch_trunk, torch_head, torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(got_loss, float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(got_norm, float(jnp.linalg.norm(want_grad)), rtol=1e-4)


def test_run_rounds_smoke():
    out = tr.run_rounds(
        "radcom", num_clients=3, batch_size=4, tau_head=1, tau_shared=2, rounds=1, examples_per_client=8
    )
    assert out["seconds_per_round"] > 0
    assert out["client_steps_per_second"] == pytest.approx(3 * 4 / out["seconds_per_round"])
    assert out["torch_version"] == torch.__version__


def test_task_weights_stay_normalised():
    fed = tr.build_federation(
        "radcom", num_clients=4, batch_size=4, tau_head=1, tau_shared=1, examples_per_client=8, num_tasks=2
    )
    for _ in range(3):
        out = tr.run_round(fed)
    p = out["task_weights"]
    assert p.shape == (2,)
    assert float(p.sum()) == pytest.approx(2.0, rel=1e-5)
    assert float(p.min()) > 0
