"""Smoke tests of the benchmarks at toy size: the output structure and the values that could go wrong.

Each runs the real entry point (``main``) in-process on a few clients and
rounds; their time is compilation (tens of seconds on a shared 2-core CPU).
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from benchmarks import common, convergence, throughput

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_throughput_toy(tmp_path):
    rows = throughput.main(
        ["--toy", "--setups=radcom:3:4,radcom:6:4", "--impls=vmap,loop,torch", f"--workdir={tmp_path}"]
    )
    on_disk = common.read_jsonl(os.path.join(tmp_path, "throughput.jsonl"))
    assert [r["record"] for r in on_disk] == [r["record"] for r in rows]
    assert rows[0]["record"] == "machine" and rows[0]["cores"] >= 1 and "load_1min" in rows[0]
    assert rows[1]["record"] == "peak" and _positive(rows[1]["matmul_gflops"])
    results = {(r["setup"], r["label"]): r for r in rows if r["record"] == "result"}
    assert set(results) == {
        ("radcom:3x4", "vmap"),
        ("radcom:3x4", "loop"),
        ("radcom:3x4", "torch/1t"),
        ("radcom:6x4", "vmap"),
        ("radcom:6x4", "loop"),
        ("radcom:6x4", "torch/1t"),
    }
    # Above the (toy) caps, loop and PyTorch are reported, not run.
    for label in ("loop", "torch/1t"):
        assert results[("radcom:6x4", label)]["status"] == "not_run"
        assert "max_clients" in results[("radcom:6x4", label)]["reason"]
    vm, lp, pt = (results[("radcom:3x4", k)] for k in ("vmap", "loop", "torch/1t"))
    for row in (vm, lp, results[("radcom:6x4", "vmap")]):
        assert row["status"] == "ok"
        for key in ("seconds_per_round", "client_steps_per_second", "model_gflop_per_round", "gflops_per_s"):
            assert _positive(row[key]), (key, row[key])
        assert 0 < row["fraction_of_peak"] < 2
        assert row["compile_s"] >= 0 and _positive(row["peak_rss_gib"])
        assert row["client_steps_per_second"] == pytest.approx(3 * row["num_clients"] / row["seconds_per_round"])
    # Both execution modes run the same rounds from the same state.
    assert len(vm["first_chunk_task_loss"]) == 2
    np.testing.assert_allclose(vm["first_chunk_task_loss"], lp["first_chunk_task_loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vm["final_task_loss"], lp["final_task_loss"], rtol=1e-4, atol=1e-6)
    assert _positive(vm["speedup_vs_loop"])
    if HAS_TORCH:
        assert pt["status"] == "ok" and _positive(pt["seconds_per_round"])
        assert _positive(vm["speedup_vs_torch"]) and vm["torch_baseline"] == "torch/1t"
    else:
        assert pt["status"] == "not_run" and "torch" in pt["reason"]
    assert os.path.getsize(os.path.join(tmp_path, "throughput.png")) > 0


def test_parse_setups_rejects_unknown_trunk():
    assert throughput.parse_setups("mtfl:32:64,radcom:8:4") == [("mtfl", 32, 64), ("radcom", 8, 4)]
    with pytest.raises(ValueError, match="unknown trunk"):
        throughput.parse_setups("resnet:4:4")


def test_smooth_and_rounds_to_target_hand_computed():
    curves = np.array([[[4.0], [2.0], [3.0], [1.0]]])  # one seed, four rounds, one task
    np.testing.assert_allclose(convergence.smooth(curves, 2)[0, :, 0], [4.0, 3.0, 2.5, 2.0])
    r = convergence.rounds_to_target(np.array([[[3.0, 5.0], [2.0, 5.0], [1.0, 5.0]]]), np.array([2.0, 4.0]))
    assert r[0, 0] == 2 and np.isnan(r[0, 1])  # task 0 reaches 2.0 in round 2; task 1 never reaches 4.0


def test_censored_rounds_keep_the_seeds_that_never_reach_the_target():
    nan = float("nan")
    r = np.array([[2.0, nan], [4.0, nan], [nan, 3.0]])  # 3 seeds, 2 tasks, budget 10
    c = convergence.censored_stats(r, 10)
    assert c["reached"] == [2, 1] and c["budget"] == 10
    # Task 0: 2, 4, >10 -> median 4; task 1: 3, >10, >10 -> the median is censored.
    assert c["median"] == [4.0, None]
    np.testing.assert_allclose(c["mean_lower_bound"], [(2 + 4 + 10) / 3, (10 + 10 + 3) / 3])
    even = convergence.censored_stats(np.array([[1.0, 1.0], [3.0, 3.0], [5.0, nan], [nan, nan]]), 8)
    assert even["median"] == [4.0, None]  # (3 + 5) / 2; half censored: undefined


def test_paired_ratio_hand_computed():
    nan = float("nan")
    slow, fast = np.array([[4.0], [6.0], [nan]]), np.array([[2.0], [nan], [5.0]])
    p = convergence.paired_ratio(slow, fast, 10)
    # Per seed, censored at the budget: 4/2, 6/10, 10/5.
    np.testing.assert_allclose(np.array(p["per_seed"])[:, 0], [2.0, 0.6, 2.0])
    assert p["bound_per_seed"] == [["="], ["<="], [">="]]
    assert p["faster"] == [2] and p["slower"] == [1]
    logs = np.log([2.0, 0.6, 2.0])
    assert p["geomean"][0] == pytest.approx(np.exp(logs.mean()))
    half = 4.302653 * logs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 dof)
    np.testing.assert_allclose(p["ci95"][0], np.exp([logs.mean() - half, logs.mean() + half]), rtol=1e-5)
    assert convergence.paired_ratio(slow[:1], fast[:1], 10)["ci95"] == [None]
    np.testing.assert_array_equal(convergence.all_tasks_rounds(np.array([[3.0, 7.0], [2.0, nan]]))[:, 0], [7.0, nan])


def test_convergence_toy(tmp_path):
    settings = convergence.main(["--toy", "--balances=balanced", f"--workdir={tmp_path}"])
    records = common.read_jsonl(os.path.join(tmp_path, "convergence.jsonl"))
    assert [r["record"] for r in records] == ["machine", "setting"]
    (setting,) = settings
    assert json.loads(json.dumps(setting)) == records[1]  # what is returned is what is written
    a = setting["analysis"]
    k, seeds, rounds = len(a["task_names"]), setting["seeds"], setting["rounds"]
    assert a["task_names"] == ["modulation", "signal", "anomaly"] and seeds == [0, 1] and rounds == 4
    # The target lies between the round-0 loss and FedRep's final loss.
    for start, end, target in zip(a["start_loss"], a["fedrep_end_loss"], a["target_loss"]):
        assert min(start, end) <= target <= max(start, end)
    for algorithm in convergence.ALGORITHMS:
        alg = a[algorithm]
        assert alg["runner"] in ("sweep", "sequential")
        for per_seed in alg["rounds_to_target_per_seed"]:
            assert len(per_seed) == k and all(r is None or 1 <= r <= rounds for r in per_seed)
        assert all(0 <= n <= len(seeds) for n in alg["rounds_to_target"]["reached"])
        assert all(0 <= m <= 1 for m in alg["final_test_metric"]["mean"])  # accuracies
        assert sum(alg["final_task_weight"]) == pytest.approx(k, rel=1e-4)
    assert a["fedrep"]["final_task_weight"] == [1.0] * k
    assert os.path.getsize(os.path.join(tmp_path, "convergence_synthetic_radcom_balanced.png")) > 0
    # The reference points ran on the same seeds, and the ordering verdict has one entry per task.
    assert set(a["references"]) == {"local", "centralized"}
    assert all(len(v["mean"]) == k and v["reached"] == [2] * k for v in a["references"].values())
    assert len(a["ordering"]) == k
    # Censored seeds are kept: the paired ratio covers every seed, and the learning check every method.
    assert len(a["paired_ratio"]["per_seed"]) == len(seeds) and len(a["paired_ratio_all_tasks"]["per_seed"]) == 2
    for algorithm in convergence.ALGORITHMS:
        assert a[algorithm]["rounds_to_target_censored"]["budget"] == rounds
        assert all(0 <= n <= len(seeds) for n in a["learns"][algorithm])
    assert len(a["constant_baseline"]) == k and all(0 < b < 1 for b in a["constant_baseline"])


def test_ordering_verdict_hand_computed():
    means = {"local": [0.5, 0.3], "fedrep": [0.6, 0.2], "fedgradnorm": [0.6, 0.25], "centralized": [0.7, 0.1]}
    # Task 0 (accuracy): 0.5 < 0.6 = 0.6 < 0.7 holds. Task 1 (NME, lower is better): 0.3 > 0.2 (local worse:
    # fine), then FedGradNorm 0.25 is worse than FedRep 0.2.
    assert convergence.ordering(means, ["accuracy", "nme"]) == ["holds", "fedrep beats fedgradnorm"]
    assert convergence.ordering({"local": [0.6], "fedrep": [0.6]}, ["accuracy"]) == ["local ties or beats fedrep"]


@pytest.mark.slow
def test_channel_robustness_toy(tmp_path):
    from benchmarks import channel_robustness

    rows = channel_robustness.main(["--toy", f"--workdir={tmp_path}"])
    on_disk = common.read_jsonl(os.path.join(tmp_path, "channel_robustness.jsonl"))
    assert [r["record"] for r in on_disk] == ["machine", "setting"] == [r["record"] for r in rows]
    setting = rows[1]
    assert setting["snr_dbs"] == [0.0, math.inf] and setting["power_control"] == "tci"
    methods = setting["analysis"]["methods"]
    assert set(methods) == {"equal", "unaware", "aware"}
    for per_snr in methods.values():
        assert set(per_snr) == {"0.0", "inf"}
        for r in per_snr.values():
            loss = r["final_relative_loss"]["mean"][0]
            assert loss is not None and 0 < loss < 2  # a loss relative to round 0
            assert len(r["final_test_metric"]["mean"]) == 3
            assert r["rounds_all_tasks_censored"]["budget"] == setting["rounds"]
    for method in ("unaware", "aware"):
        for r in methods[method].values():  # paired against equal weights, every seed kept
            assert len(r["vs_equal"]["ratio_all_tasks"]["per_seed"]) == 2
            assert r["vs_equal"]["relative_loss_drop"]["seeds"] == 2
    assert all("vs_equal" not in r for r in methods["equal"].values())
    # The target comes from equal weights at SNR = inf (relative to round 0, so finite and positive).
    assert setting["analysis"]["reference_snr_db"] == math.inf
    assert all(math.isfinite(t) and t > 0 for t in setting["analysis"]["target_relative_loss"])
    assert os.path.getsize(os.path.join(tmp_path, "channel_robustness.png")) > 1000


def test_paired_difference_hand_computed():
    from benchmarks import channel_robustness

    d = channel_robustness.paired_difference(np.array([1.0, 2.0, 4.0, np.nan]), np.array([0.5, 2.5, 1.0, 1.0]))
    # differences 0.5, -0.5, 3.0 (the NaN seed dropped): mean 1.0, sd sqrt(3.25), t(0.975, 2) = 4.302653
    half = 4.302653 * math.sqrt(3.25) / math.sqrt(3)
    assert d["mean"] == pytest.approx(1.0) and d["seeds"] == 3 and d["b_lower"] == 2
    np.testing.assert_allclose(d["ci95"], [1.0 - half, 1.0 + half], rtol=1e-6)


@pytest.mark.slow
def test_channel_cost_side_by_side(tmp_path):
    from benchmarks import channel_robustness

    machine, row = channel_robustness.main(
        ["--cost", "--toy", "--datasets=synthetic_radcom", "--log_every=2", f"--workdir={tmp_path}"]
    )
    assert common.read_jsonl(os.path.join(tmp_path, "channel_cost.jsonl")) == [machine, row]
    assert row["num_clients"] == 6  # 2 clusters x 3 tasks, for every variant
    assert row["ideal"]["ratio_to_ideal"] == 1.0
    for name, e in (("ideal", 1), ("ota", 1), ("hota_E1", 1), ("hota_E2", 2)):
        v = row[name]
        assert v["s_per_round"] > 0 and v["local_rounds_per_round"] == e
        assert v["ratio_per_local_round"] == pytest.approx(v["ratio_to_ideal"] / e)


def test_cohort_scaling_toy(tmp_path):
    from benchmarks import cohort_scaling

    rows = cohort_scaling.main(["--toy", "--cohorts=2", f"--workdir={tmp_path}"])
    on_disk = common.read_jsonl(os.path.join(tmp_path, "cohort_scaling.jsonl"))
    assert [r["record"] for r in on_disk] == [r["record"] for r in rows]
    results = {(r["curve"], r["setup"], r["impl"]): r for r in rows if r["record"] == "result"}
    assert set(results) == {
        ("cohort", "radcom:8x4/K2", "vmap"),
        ("cohort", "radcom:8x4/K2", "loop"),
        ("cohort", "radcom:8x4/K2", "torch"),
        ("population", "radcom:4x4", "vmap"),  # the reference: C = K, full participation
        ("population", "radcom:40x4/K4", "vmap"),
    }
    vm, lp = results[("cohort", "radcom:8x4/K2", "vmap")], results[("cohort", "radcom:8x4/K2", "loop")]
    for row in (vm, lp, *(r for (curve, _, _), r in results.items() if curve == "population")):
        assert row["status"] == "ok" and _positive(row["seconds_per_round"]) and _positive(row["peak_rss_gib"])
        assert row["client_updates_per_second"] == pytest.approx(row["cohort_k"] / row["seconds_per_round"])
    # Both executions sample the same cohorts and run the same rounds.
    np.testing.assert_allclose(vm["first_chunk_task_loss"], lp["first_chunk_task_loss"], rtol=1e-4, atol=1e-6)
    targets = rows[-2]
    assert targets["record"] == "targets" and targets["population"] == 40
    pop = {r["num_clients"]: r for (curve, _, _), r in results.items() if curve == "population"}
    assert targets["population_ratio"] == pytest.approx(pop[40]["seconds_per_round"] / pop[4]["seconds_per_round"])
    assert os.path.getsize(os.path.join(tmp_path, "cohort_scaling.png")) > 0


def test_sensitivity_toy(tmp_path):
    from benchmarks import sensitivity

    settings = sensitivity.main(["--toy", "--balances=balanced", f"--workdir={tmp_path}"])
    records = common.read_jsonl(os.path.join(tmp_path, "sensitivity.jsonl"))
    assert [r["record"] for r in records] == ["machine", "setting"]
    (setting,) = settings
    assert json.loads(json.dumps(setting)) == records[1]
    cells = {(c["alpha"], c["weight_lr"]): c for c in setting["cells"]}
    assert set(cells) == {(0.0, 0.0), (0.0, 0.2), (1.5, 0.0), (1.5, 0.2)}
    k = len(setting["task_names"])
    for (_alpha, lr), c in cells.items():
        assert len(c["ratio_per_task"]) == k and _positive(c["ratio_all_tasks"])
        assert c["faster_all_tasks"] + c["slower_all_tasks"] <= 2
        assert c["slowest_task_ratio"] == pytest.approx(min(c["ratio_per_task"]))
        assert sum(c["final_task_weight"]) == pytest.approx(k, rel=1e-4)
        if lr == 0.0:
            # A weight lr of 0 keeps GradNorm's weights at 1: FedRep itself, so every paired ratio is 1.
            assert c["final_task_weight"] == pytest.approx([1.0] * k)
            assert c["ratio_all_tasks"] == pytest.approx(1.0) and c["ratio_per_task"] == pytest.approx([1.0] * k)
            np.testing.assert_allclose(c["final_test_metric"], setting["fedrep_final_test_metric"], atol=1e-6)
    assert any(c["final_task_weight"] != pytest.approx([1.0] * k) for c in cells.values())  # lr 0.2 moves them
    assert os.path.getsize(os.path.join(tmp_path, "sensitivity_synthetic_radcom_balanced.png")) > 0
    # Bad input: one line naming the flag, before anything runs or is overwritten.
    with pytest.raises(SystemExit, match="--balances: unknown 'even'"):
        sensitivity.main(["--toy", "--balances=even", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit, match="--alphas: expected .* got '0,x'"):
        sensitivity.main(["--alphas=0,x", f"--workdir={tmp_path}"])
    with pytest.raises(SystemExit, match="--weight_lrs: expected .* >= 0"):
        sensitivity.main(["--weight_lrs=-1", f"--workdir={tmp_path}"])
    assert common.read_jsonl(os.path.join(tmp_path, "sensitivity.jsonl")) == records


def _flagfile(name: str) -> dict[str, str]:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "flags", name)
    flags = {}
    for line in open(path):
        if line.startswith("--") and "=" in line:
            key, value = line[2:].strip().split("=", 1)
            flags[key] = value
    return flags


@pytest.mark.parametrize("dataset", sorted(convergence.REAL_DATA))
def test_real_data_settings_are_the_flagfiles(dataset):
    flags = _flagfile(f"{dataset}.flags")
    assert flags["dataset"] == dataset
    for key, value in convergence.REAL_DATA[dataset].items():
        assert type(value)(flags[key]) == value, key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset=mtfl"], "--data_dir: dataset 'mtfl'"),
        (["--dataset=radcom_dynamic"], "--data_dir: dataset 'radcom_dynamic'"),
        (["--datasets=synthetic_radcom,bogus"], "--datasets: unknown dataset 'bogus'"),
        (["--dataset=mtfl", "--data_dir=/nonexistent/MTFL"], "--data_dir: '/nonexistent/MTFL' is not a directory"),
    ],
)
def test_benchmarks_check_the_dataset_flags_first(tmp_path, argv, message):
    from benchmarks import channel_robustness, sensitivity, weighting

    for module in (convergence, sensitivity, weighting, channel_robustness):
        workdir = tmp_path / module.__name__
        with pytest.raises(SystemExit, match=message):
            module.main([*argv, f"--workdir={workdir}"])
        assert not workdir.exists()  # refused before anything is written


@pytest.mark.slow
def test_convergence_on_real_format_radcom(tmp_path):
    from tests import data_fixtures

    raw = tmp_path / "raw"
    data_fixtures.write_radcom(str(raw / "RadComDynamic.hdf5"), per_snr=3)
    before = data_fixtures.tree_digest(str(raw))
    argv = ["--toy", "--dataset=radcom_dynamic", f"--data_dir={raw}", f"--build_dir={tmp_path / 'tfds'}"]
    (setting,) = convergence.main([*argv, "--balances=balanced", "--references=", f"--workdir={tmp_path / 'out'}"])
    assert setting["dataset"] == "radcom_dynamic"
    config = setting["config"]
    assert config["data_dir"] == str(raw) and config["overlap"] == "across_tasks"
    assert config["examples_per_client"] == 48  # the explicit (toy) size wins over the flagfile's
    a = setting["analysis"]
    assert a["task_names"] == ["modulation", "signal", "anomaly"]
    assert len(a["constant_baseline"]) == 3 and all(0 < b <= 1 for b in a["constant_baseline"])
    assert len(a["paired_ratio_all_tasks"]["per_seed"]) == 2
    assert data_fixtures.tree_digest(str(raw)) == before


def test_compile_cache_toy(tmp_path):
    """Two runs on one empty cache: the first compiles every program, the second reads each one back."""
    from benchmarks import compile_cache

    machine, first, second, targets = compile_cache.main(["--toy", f"--workdir={tmp_path}"])
    assert [r["record"] for r in common.read_jsonl(os.path.join(tmp_path, "compile_cache.jsonl"))] == [
        "machine", "config", "run", "run", "targets",
    ]  # fmt: skip
    assert first["programs"] > 0 and first["cache_hits"] == 0
    assert second["programs"] == first["programs"] and second["cache_hits"] == second["programs"]
    for run in (first, second):
        assert run["compile_s"] == pytest.approx(run["trace_s"] + run["lower_s"] + run["backend_s"])
        assert 0 < run["compile_s"] < run["wall_s"]
    assert targets["second_run_compile_s"] == second["compile_s"]
    assert os.listdir(os.path.join(tmp_path, "jax_cache"))
