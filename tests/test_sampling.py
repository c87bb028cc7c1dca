"""Partial participation: cohorts (fgn_jax/sampling.py) and the cohort round (Simulation.round_step)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgn_jax import sampling, testing, training
from tests.conftest import make_setup, run_alone, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(tau_head=1, tau_shared=1)  # compiles faster; the sampling is the same


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    "counts,k,expected",
    [
        ([3, 1, 0], 2, [1, 1, 0]),  # quotas 1.5, 0.5, 0: the lone client of task 1 still gets a seat
        ([6, 3, 1], 5, [3, 1, 1]),  # 3, 1.5, 0.5 -> floors 3, 1, 0, task 2 raised to one
        ([6, 3, 1], 4, [2, 1, 1]),  # 2.4, 1.2, 0.4
        ([6, 3, 1], 2, [1, 1, 0]),  # fewer seats than tasks: largest remainders (0.6 beats 0.2)
        ([8, 1, 1], 3, [1, 1, 1]),  # 2.4, .3, .3 -> 2, 1, 1 is one too many: the largest task gives one back
        ([6, 3, 1], 10, [6, 3, 1]),  # everyone
        ([6, 3, 1], 12, [6, 3, 1]),  # more seats than clients: capped
    ],
)
def test_task_shares_by_hand(counts, k, expected):
    assert np.asarray(sampling.task_shares(jnp.asarray(counts), k)).tolist() == expected


def cohorts(method, k, task_index, mask, rounds, dropout_prob=0.0, blocks=1, seed=0):
    """``rounds`` cohorts in ONE jitted call (vmapped over the rounds' keys)."""

    num_tasks = int(task_index.max()) + 1

    @jax.jit
    def draw(keys):
        return jax.vmap(
            lambda key: sampling.sample_cohort(method, key, task_index, mask, k, num_tasks, blocks, dropout_prob)
        )(keys)

    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(rounds))
    return tuple(map(np.asarray, draw(keys)))


def test_stratified_gives_each_task_its_share_every_round():
    task = jnp.asarray([0, 0, 0, 0, 0, 0, 1, 1, 1, 2], jnp.int32)
    slots, used = cohorts("stratified", 5, task, jnp.ones(10), rounds=400)
    per_task = np.stack([np.bincount(np.asarray(task)[s], minlength=3) for s in slots])
    assert (per_task == [3, 1, 1]).all() and (used == 1).all()
    assert all(len(set(s)) == 5 and list(s) == sorted(s) for s in slots)  # unique, ascending
    # Uniform within a task: each of task 0's clients sits in 3 of 6 seats, half the rounds (4 sigma: 0.1).
    freq = np.bincount(slots.reshape(-1), minlength=10) / 400
    np.testing.assert_allclose(freq[:6], 0.5, atol=0.1)
    np.testing.assert_allclose(freq[6:9], 1 / 3, atol=0.1)
    assert freq[9] == 1.0


def test_uniform_is_uniform_and_skips_padding():
    task = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 0], jnp.int32)
    mask = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)  # two padding slots
    slots, used = cohorts("uniform", 3, task, mask, rounds=600)
    assert (used == 1).all() and (slots < 6).all()
    np.testing.assert_allclose(np.bincount(slots.reshape(-1), minlength=8)[:6] / 600, 0.5, atol=0.09)
    # Asking for more than the real clients: all of them, the rest padding marked unused.
    slots, used = cohorts("uniform", 7, task, mask, rounds=3)
    assert (np.sort(slots[:, :6]) == np.arange(6)).all() and (used.sum(axis=1) == 6).all()


def test_dropout_removes_about_p_of_the_updates():
    task = jnp.asarray(np.arange(64) % 3, jnp.int32)
    _, used = cohorts("uniform", 16, task, jnp.ones(64), rounds=2000, dropout_prob=0.3)
    # 32,000 draws: sigma = sqrt(.3 * .7 / 32000) = 0.0026.
    assert abs(1 - used.mean() - 0.3) < 0.011
    _, none_dropped = cohorts("uniform", 16, task, jnp.ones(64), rounds=50, dropout_prob=0.0)
    assert (none_dropped == 1).all()


def test_per_device_blocks_draw_their_own_slots():
    task = jnp.asarray(np.arange(8) % 3, jnp.int32)
    slots, used = cohorts("uniform", 4, task, jnp.ones(8), rounds=100, blocks=2)
    assert (slots < 4).all()  # block-local slots, 2 per block
    assert all(len(set(s[:2])) == 2 and len(set(s[2:])) == 2 for s in slots)
    with pytest.raises(ValueError, match="does not split"):
        sampling.sample_cohort("uniform", jax.random.key(0), task, jnp.ones(8), 3, 3, blocks=2)


def test_all_clients_per_round_reproduces_full_participation_exactly():
    full = make_setup(num_clients=4, rounds=4, **FAST)
    cohort = make_setup(num_clients=4, rounds=4, clients_per_round=4, **FAST)
    s1, r1 = run_alone(full)
    s2, r2 = run_alone(cohort)
    assert r1 == r2  # every metric, bit for bit (floats compared exactly)
    assert [r["participants"] for r in r1] == [[2, 1, 1]] * 4  # 4 clients round-robin over 3 tasks
    testing.assert_trees_allclose(s1.server, s2.server, rtol=0, atol=0)
    testing.assert_trees_allclose(s1.clients, s2.clients, rtol=0, atol=0)


def cohort_ids(setup, seed, rounds=6):
    info = setup.env.info
    key = setup.init(seed).key
    draw = jax.jit(jax.vmap(lambda r: setup.sim._sample(key, r, info)))
    slots, used = draw(jnp.arange(rounds))
    return np.asarray(info.client_id)[np.asarray(slots)].tolist(), np.asarray(used).tolist()


def test_cohorts_follow_the_seed():
    setup = make_setup(num_clients=12, clients_per_round=4, **FAST)
    a, b, c = cohort_ids(setup, 0), cohort_ids(setup, 0), cohort_ids(setup, 1)
    assert a == b and a != c
    assert len({tuple(ids) for ids in a[0]}) > 1  # rounds differ


def test_a_round_uses_only_the_cohort_and_dropped_clients_keep_their_state():
    setup = make_setup(num_clients=9, clients_per_round=6, dropout_prob=0.5, client_sampling="stratified", **FAST)
    state = setup.init()
    before = jax.device_get(state.clients.head)
    slots, used = map(np.asarray, setup.sim._sample(state.key, 0, setup.env.info))
    new, metrics = jax.jit(setup.sim.round_step)(state, setup.env, setup.hparams)
    task = np.asarray(setup.env.info.task_index)
    assert np.asarray(metrics["participants"]).tolist() == np.bincount(task[slots[used > 0]], minlength=3).tolist()
    assert (np.asarray(metrics["cohort_ids"]) == slots).all() and (np.asarray(metrics["cohort_used"]) == used).all()
    assert 0 < used.sum() < 6  # (seed 0) some dropped, some reported: both cases below are exercised
    changed = [
        not all(np.array_equal(a[c], b[c]) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new.clients.head)))
        for c in range(9)
    ]
    assert changed == [c in set(slots[used > 0]) for c in range(9)]


def test_a_task_without_participants_keeps_its_weight():
    # 3 clients, one per task, 2 per round: every round one task is absent.
    setup = make_setup(num_clients=3, clients_per_round=2, rounds=6, log_every=6, eval_every=6, weight_lr=0.5, **FAST)
    _, rows = run_alone(setup)
    assert all(sorted(r["participants"]) == [0, 1, 1] for r in rows)
    for now, nxt in zip(rows, rows[1:]):
        absent = now["participants"].index(0)
        assert nxt["task_weight"][absent] == now["task_weight"][absent]  # kept, bit for bit
        present = [k for k in range(3) if k != absent]
        np.testing.assert_allclose(
            sum(nxt["task_weight"][k] for k in present), 3 - now["task_weight"][absent], rtol=1e-6
        )
    assert any(nxt["task_weight"] != now["task_weight"] for now, nxt in zip(rows, rows[1:]))  # it did learn


def test_resumed_run_has_the_same_cohorts(tmp_path):
    config = tiny_config(num_clients=6, clients_per_round=2, log_participants=True, rounds=6, eval_every=6, **FAST)
    training.train_and_evaluate(config, str(tmp_path / "whole"), log=None)
    # The same run stopped after 2 rounds, then continued (--rounds may change on resume).
    training.train_and_evaluate(dataclasses.replace(config, rounds=2), str(tmp_path / "resumed"), log=None)
    training.train_and_evaluate(config, str(tmp_path / "resumed"), log=None)
    whole, resumed = (read_jsonl(tmp_path / d / "participants.jsonl") for d in ("whole", "resumed"))
    assert [r["round"] for r in whole] == list(range(6)) and whole == resumed
    assert all(len(r["sampled"]) == 2 and r["reported"] == r["sampled"] for r in whole)
    metrics = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    ids_task = json.load(open(tmp_path / "whole" / "config.json"))["client_task"]
    for m, p in zip(metrics, whole):
        assert m["participants"] == np.bincount([ids_task[i] for i in p["sampled"]], minlength=3).tolist()
    # Identical but for the evaluation the 2-round run made at its end.
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("test_")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == strip(metrics)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (dict(clients_per_round=-1), "--clients_per_round: must be >= 0"),
        (dict(clients_per_round=4), "--clients_per_round: 4 is more than the 3 clients"),
        (dict(clients_per_round=2, algorithm="centralized"), "--clients_per_round: --algorithm=centralized"),
        (dict(dropout_prob=1.0), "--dropout_prob: must be in [0, 1)"),
        (dict(dropout_prob=-0.1), "--dropout_prob: must be in [0, 1)"),
        (dict(client_sampling="greedy"), "--client_sampling: choose one of uniform, stratified"),
    ],
)
def test_invalid_sampling_flags(overrides, expected):
    with pytest.raises(training.ConfigError) as e:
        tiny_config(**overrides).validate()
    assert str(e.value).startswith(expected)


def test_cli_dropout_prob_one_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'w'}", "--dropout_prob=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("I1", "W1"))]
    assert proc.returncode == 2 and lines == ["error: --dropout_prob: must be in [0, 1), got 1.0"], proc.stderr
