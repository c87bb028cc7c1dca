"""Shared fixtures: tiny populations that compile and run in seconds."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from fgn_jax import simulate, sweep, training

# The entry points' persistent compilation cache defaults to the user's home;
# tests (and the entry points they run as subprocesses) leave it off.
os.environ["FGN_JAX_COMPILATION_CACHE_DIR"] = ""
# No persistent compilation cache in the test process at all (an XLA:CPU compile that also
# writes a cache entry crashed once in a full-suite run).
jax.config.update("jax_enable_compilation_cache", False)

TINY = dict(
    dataset="synthetic_radcom",
    rounds=4,
    examples_per_client=48,
    test_examples_per_client=16,
    batch_size=8,
    tau_head=2,
    tau_shared=2,
    log_every=2,
    eval_every=2,
    client_optimizer="sgd",  # the tests' hand-checked numbers and tolerances are for plain SGD
    client_lr=0.05,
    standardize_targets=False,
)


def tiny_config(**overrides) -> training.ExperimentConfig:
    return dataclasses.replace(training.ExperimentConfig(**TINY), **overrides)


@dataclasses.dataclass
class Setup:
    config: training.ExperimentConfig
    dataset: object
    sim: simulate.Simulation
    env: simulate.Env
    hparams: object

    def init(self, seed=None):
        seed = self.config.seed if seed is None else seed
        return self.sim.init(jax.random.key(seed), self.env, self.hparams)


def make_setup(**overrides) -> Setup:
    config = tiny_config(**overrides)
    config.validate()
    dataset = training.build_dataset(config)
    sim = training.build_simulation(config, dataset)
    return Setup(config, dataset, sim, sim.make_env(dataset), config.hparams())


@pytest.fixture
def tiny_setup():
    return make_setup


def run_alone(setup: Setup):
    """A whole run of ``setup`` through the single-run programs: ``(final state, rows as in metrics.jsonl)``."""
    state, rows = setup.init(), []
    while int(state.server.round) < setup.config.rounds:
        state, m = setup.sim.run_chunk(state, setup.env, setup.hparams, setup.config.rounds)
        rows += simulate.metrics_rows(m)
        if int(state.server.round) % setup.config.eval_every == 0:
            ev = setup.sim.evaluate(state, setup.env, setup.hparams)
            rows[-1].update({k: np.asarray(v).tolist() for k, v in ev.items()})
    return state, rows


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Frees every compiled program after each test module.

    The whole suite in one process otherwise accumulates thousands of XLA:CPU
    executables; two full-suite runs on the 2-core CI machine then segfaulted
    inside an XLA compile late in the suite (each module alone passes).
    """
    yield
    simulate.programs.cache_clear()
    sweep.chunk_program.cache_clear()
    jax.clear_caches()
