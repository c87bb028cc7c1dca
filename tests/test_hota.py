"""Over-the-air aggregation (fgn_jax/channel.py, the ota / hota aggregators): limits, statistics, flags.

* the ideal limit: no fading, infinite SNRs and one intra-cluster round
  reproduce the ideal (noiseless) run round for round, for ota and hota;
* Monte Carlo over many draws inside one jitted call against the formulas
  of docs/hota.md (tci participation, phase-only gain, IS noise, PS blind
  combining);
* channel-aware GradNorm compensates a task whose clients are far away;
* bad channel flags: one line naming the flag, exit code 2, nothing written.
"""

import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import aggregation, algorithms, channel, training
from tests.conftest import make_setup, run_alone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = dict(rounds=4, log_every=2, eval_every=4, examples_per_client=32, batch_size=8, tau_head=1, tau_shared=1)
IDEAL_LIMIT = dict(snr_db=math.inf, ps_snr_db=math.inf, fading="none", cluster_rounds=1)


@pytest.fixture(scope="module")
def ideal_rows():
    # 6 clients: 2 per task, so hota's default topology (2 clusters x 3 tasks) is the same population.
    return run_alone(make_setup(num_clients=6, **SMALL))[1]


def _assert_rows_close(rows, reference):
    assert [r["round"] for r in rows] == [r["round"] for r in reference]
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        for key in ref.keys() - {"round"}:
            np.testing.assert_allclose(row[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} round {row['round']}")


@pytest.mark.parametrize("aggregation_name,power_control", [("ota", "tci"), ("hota", "tci"), ("hota", "phase")])
def test_ideal_limit_reproduces_the_ideal_run(ideal_rows, aggregation_name, power_control):
    setup = make_setup(aggregation=aggregation_name, power_control=power_control, num_clients=6, **SMALL, **IDEAL_LIMIT)
    if aggregation_name == "hota":
        assert setup.sim.config.channel.num_clusters == 2
    _, rows = run_alone(setup)
    _assert_rows_close(rows, ideal_rows)
    assert all(r["participation"] == [1.0, 1.0, 1.0] and r["channel_gain"] == [1.0, 1.0, 1.0] for r in rows)


@pytest.mark.slow
def test_hota_default_topology_and_noisy_rounds_are_reproducible(ideal_rows):
    # --num_clients=0 under hota: num_clusters x T clients, client (c, i) has task i.
    setup = make_setup(aggregation="hota", snr_db=0.0, **SMALL)
    assert setup.dataset.client_task.tolist() == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(
        channel.cluster_of(setup.env.info.client_id, setup.env.info.mask, 2), [0, 0, 0, 1, 1, 1]
    )
    _, first = run_alone(setup)
    _, again = run_alone(setup)
    assert first == again  # the channel draws come from the run's key
    # Each of a task's 2 clients is received in 0, 1 or 2 of the E = 2 rounds.
    part = np.array([r["participation"] for r in first])
    np.testing.assert_allclose(part * 4, np.round(part * 4), atol=1e-6)
    assert part.min() < 1.0  # tci at q = 0.8 truncates some transmissions
    assert not np.allclose([r["task_loss"] for r in first[1:]], [r["task_loss"] for r in ideal_rows[1:]])


# ------------------------------------------------------------ statistics
N_DRAWS = 200_000


@pytest.mark.parametrize("q", [0.5, 0.8])
def test_tci_participation_is_q_and_far_clients_drop_more(q):
    beta = jnp.asarray([1.0, 0.25])  # reference client, a client twice as far (exponent 2)

    @jax.jit
    def participation(key):
        h = channel.draw_fading(key, jnp.tile(beta, N_DRAWS // 2), "rayleigh", 0.0)
        a, _ = channel.power_control_gains(jnp.abs(h), 1.0, "tci", q, "rayleigh", 0.0)
        return a.reshape(-1, 2).mean(axis=0)

    p = np.asarray(participation(jax.random.key(0)))
    # P(|h|^2 >= -beta_ref ln q) = q^(beta_ref / beta) for |h|^2 ~ Exp(beta).
    np.testing.assert_allclose(p, [q, q**4], atol=0.006)


@pytest.mark.parametrize("fading,k", [("rayleigh", 0.0), ("rician", 3.0), ("rician", 0.0)])
def test_phase_only_gain_has_mean_one(fading, k):
    @jax.jit
    def gains(key):
        h = channel.draw_fading(key, jnp.full((N_DRAWS,), 2.0), fading, k)
        a, h_ref = channel.power_control_gains(jnp.abs(h), 2.0, "phase", 0.8, fading, k)
        return a.mean(), jnp.mean(jnp.abs(h) ** 2), h_ref

    mean_a, power, h_ref = gains(jax.random.key(1))
    assert abs(float(mean_a) - 1.0) < 0.005
    assert abs(float(power) - 2.0) < 0.02  # E|h|^2 = beta
    if fading == "rayleigh":
        np.testing.assert_allclose(h_ref, math.sqrt(math.pi * 2.0) / 2, rtol=1e-6)


def test_is_noise_std_matches_the_formula():
    # 6 clients in 2 clusters of 3, no fading (all received), SNR 0 dB: the
    # estimate is the cluster mean of coef * delta plus N(0, s_c^2).
    rng = np.random.default_rng(0)
    deltas = {"a": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=(6, 2, 3)).astype(np.float32)}
    coef = np.asarray([1.0, 2.0, 0.5, 1.0, 1.0, 3.0], np.float32)
    infos = types.SimpleNamespace(mask=jnp.ones(6), distance=jnp.ones(6))
    cluster = jnp.asarray([0, 0, 0, 1, 1, 1])
    hp = algorithms.HParams.create(0.1, 1.0, 1.5, 0.05, snr_db=0.0, truncation_q=0.8)
    config = channel.ChannelConfig(fading="none", power_control="tci")

    @jax.jit
    def estimates(keys):
        return jax.vmap(lambda k: aggregation.receive(config, hp, deltas, coef, infos, k, cluster, 2)[0])(keys)

    est = estimates(jax.random.split(jax.random.key(2), 4000))
    flat = np.concatenate([np.asarray(est["a"]).reshape(4000, 2, -1), np.asarray(est["b"]).reshape(4000, 2, -1)], -1)
    d_flat = np.concatenate([deltas["a"], deltas["b"].reshape(6, -1)], 1) * coef[:, None]  # [6, 11]
    mean = d_flat.reshape(2, 3, -1).mean(axis=1)  # exact cluster means
    noise = flat - mean[None]
    # s_c = max ||coef delta|| / (h_th K_c sqrt(d SNR)), h_th = sqrt(-ln q), K_c = 3, d = 11, SNR = 1.
    max_norm = np.linalg.norm(d_flat, axis=1).reshape(2, 3).max(axis=1)
    expected = max_norm / (math.sqrt(-math.log(0.8)) * 3 * math.sqrt(11))
    np.testing.assert_allclose(noise.std(axis=(0, 2)), expected, rtol=0.03)
    np.testing.assert_allclose(noise.mean(axis=(0, 2)), 0.0, atol=0.03 * expected.max())


def test_blind_combining_gain_mean_and_variance():
    beta = jnp.asarray([0.5, 1.0, 2.0])
    beta_bar = float(jnp.mean(beta))

    def moments(m):
        @jax.jit
        def draws(keys):
            return jax.vmap(lambda k: channel.blind_gain(k, beta, beta_bar, m, "rayleigh", 0.0))(keys)

        b = np.asarray(draws(jax.random.split(jax.random.key(m), 50_000)))
        return b.mean(axis=0), b.var(axis=0)

    for m in (4, 16):
        mean, var = moments(m)
        ratio = np.asarray(beta) / beta_bar
        np.testing.assert_allclose(mean, ratio, rtol=0.01)
        np.testing.assert_allclose(var * m, ratio**2, rtol=0.04)  # Gamma(M, beta/M)/beta_bar: var = ratio^2 / M
    # No fading: b = beta / beta_bar exactly (the ideal limit relies on it).
    b = channel.blind_gain(jax.random.key(0), jnp.ones(2), 1.0, 16, "none", 0.0)
    np.testing.assert_array_equal(b, [1.0, 1.0])


def test_infinite_snr_means_exactly_no_noise():
    assert float(channel.is_noise_std(jnp.asarray(3.0), 0.5, jnp.asarray(2.0), 10, channel.db_to_linear(math.inf))) == 0
    assert float(channel.ps_noise_std(3.0, 2, 16, 1.0, 10, channel.db_to_linear(math.inf))) == 0
    # K_c = 0: the cluster skips the update, no noise either.
    assert float(channel.is_noise_std(jnp.asarray(3.0), 0.5, jnp.asarray(0.0), 10, 1.0)) == 0
    np.testing.assert_allclose(channel.ps_noise_std(3.0, 2, 16, 1.0, 10, 100.0), 3.0 / math.sqrt(2 * 16 * 10 * 100))


# ------------------------------------------------------- compensation
@pytest.mark.slow
def test_channel_aware_weights_raise_a_far_task():
    # Task 0's client is 3x farther (beta 1/9): under phase-only correction
    # without fading its gain is a-bar = sqrt(beta / beta_ref) ~ 0.4 every
    # round, the other tasks' ~ 1.19; the channel-aware step raises its weight.
    kw = dict(
        aggregation="ota",
        client_distances="3,1,1",
        snr_db=math.inf,
        power_control="phase",
        fading="none",
        **{**SMALL, "rounds": 6, "log_every": 3, "eval_every": 6},
    )
    aware = run_alone(make_setup(channel_aware=True, **kw))[1]
    unaware = run_alone(make_setup(channel_aware=False, **kw))[1]
    beta = np.asarray([1 / 9, 1, 1])
    np.testing.assert_allclose(aware[-1]["channel_gain"], np.sqrt(beta / beta.mean()), rtol=1e-5)
    assert aware[-1]["task_weight"][0] > unaware[-1]["task_weight"][0] + 0.1
    # Round 0 uses the initial weights, so both runs agree there.
    assert aware[0]["task_loss"] == unaware[0]["task_loss"]


# ------------------------------------------------------------ bad input
def test_hota_clusters_must_split_the_clients():
    with pytest.raises(training.ConfigError, match=r"^--num_clusters: 5 clients do not split evenly"):
        training.ExperimentConfig(dataset="synthetic_radcom", aggregation="hota", num_clients=5).validate()
    with pytest.raises(training.ConfigError, match=r"^--client_distances: 2 distances for 6 clients"):
        training.ExperimentConfig(dataset="synthetic_radcom", aggregation="hota", client_distances="1,2").validate()
    training.ExperimentConfig(dataset="synthetic_radcom", aggregation="hota", num_clients=9, num_clusters=3).validate()


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--snr_db=nan"], "--snr_db: must be a number of dB or inf"),
        (["--truncation_q=0"], "--truncation_q: must be in (0, 1]"),
        (["--truncation_q=1.5"], "--truncation_q: must be in (0, 1]"),
        (["--num_clusters=0"], "--num_clusters: must be at least 1"),
        (["--aggregation=hota", "--num_clients=6", "--num_clusters=4"], "--num_clusters: 6 clients do not split"),
        (["--aggregation=hota", "--num_clients=3", "--num_clusters=6"], "--num_clusters: 3 clients do not split"),
        (["--ps_antennas=0"], "--ps_antennas: must be at least 1"),
        (["--rician_k=-1"], "--rician_k: must be >= 0"),
    ],
)
def test_bad_channel_flags_exit_2_with_one_line(flags, expected, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            f"--workdir={tmp_path / 'w'}",
            "--dataset=synthetic_radcom",
            "--rounds=2",  # should validation ever pass, the run stays short
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written
