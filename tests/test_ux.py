"""The first hour of a user: quiet logs, flag help and errors, checks before work, curves, file modes."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys

from absl import flags
import numpy as np
import pytest

from experiments import cli
from fgn_jax import algorithms, baselines, curves, training, workdir
from fgn_jax.data import partition
from tests.conftest import make_setup, run_alone, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = (
    "--dataset=synthetic_radcom",
    "--rounds=2",
    "--log_every=2",
    "--eval_every=2",
    "--examples_per_client=32",
    "--test_examples_per_client=8",
    "--batch_size=8",
    "--tau_head=1",
    "--tau_shared=1",
)
CONFIG = tiny_config(rounds=4, log_every=2, eval_every=2, checkpoint_every=2)


def run_cli(*args, module="experiments.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


class Log:
    def __init__(self):
        self.lines = []

    def write(self, s):
        self.lines.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.lines)


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of CONFIG under umask 022: (workdir, summary, log text)."""
    path = tmp_path_factory.mktemp("run")
    log = Log()
    with umask(0o022):
        summary = training.train_and_evaluate(CONFIG, str(path), log=log)
    return path, summary, log.text


# ----------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "args,expected",
    [
        (("--workdir=W", "--rounds=abc"), "error: --rounds=abc: invalid literal for int() with base 10: 'abc'"),
        (("--workdir=W", "--round=5"), "error: Unknown command line flag 'round'. Did you mean: rounds ?"),
        (("--rounds=3",), "error: --workdir: required (no default)"),
        (("--workdir=W", "extra"), "error: unexpected arguments: extra (flags are --name=value)"),
        (
            ("--workdir=W", "--algorithm=fedavg"),
            "error: --algorithm=fedavg: value should be one of <fedgradnorm|fedrep|local|centralized>",
        ),
    ],
)
def test_flag_errors_exit_2_with_one_line(args, expected, tmp_path):
    args = [a.replace("W", str(tmp_path / "w")) for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [expected]
    assert not (tmp_path / "w").exists()


def test_help_lists_the_experiment_flags_by_group_with_choices():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "  --dataset: one of synthetic_mtfl|synthetic_radcom|mtfl|radcom_dynamic (default synthetic_mtfl)" in out
    headings = [line for line in out.splitlines() if line.endswith(" flags:")]
    assert headings[:5] == [f"{g} flags:" for g in training.FLAG_GROUPS]
    for field in dataclasses.fields(training.ExperimentConfig):  # every field, each with its own help
        assert f"  --{field.name}: " in out
    assert "See fgn_jax" not in out
    assert out.index("--workdir:") > out.index("output flags:")


def test_every_config_field_is_documented_and_choice_fields_are_enums():
    fields = {f.name for f in dataclasses.fields(training.ExperimentConfig)}
    assert set(training.FLAG_DOCS) == fields, "add a FlagDoc line for each new ExperimentConfig field"
    defaults = training.ExperimentConfig()
    for name, doc in training.FLAG_DOCS.items():
        assert doc.group in training.FLAG_GROUPS and doc.help.endswith(".")
        if doc.choices is not None:
            assert getattr(defaults, name) in doc.choices


def test_a_field_without_doc_gets_a_generic_help(monkeypatch):
    monkeypatch.setattr(training, "FLAG_DOCS", {k: v for k, v in training.FLAG_DOCS.items() if k != "alpha"})
    values = flags.FlagValues()
    holders = cli.define_config_flags(values)
    assert values["alpha"].help == "See fgn_jax.training.ExperimentConfig.alpha."
    assert values["alpha"].default == 1.5 and values["dataset"].parser.enum_values == list(training.DATASETS)
    assert set(holders) == {f.name for f in dataclasses.fields(training.ExperimentConfig)}


# ------------------------------------------------- checks before any work


def refuse_data(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data was generated before the check")

    monkeypatch.setattr(training, "build_dataset", fail)
    monkeypatch.setattr(training, "_load_pools", fail)


def test_batch_larger_than_every_client_is_refused_before_data(monkeypatch, tmp_path):
    refuse_data(monkeypatch)
    config = tiny_config(batch_size=49)  # every client has 48 examples
    with pytest.raises(training.ConfigError, match=r"^--batch_size: 49 is larger than every client's training data"):
        training.train_and_evaluate(config, str(tmp_path / "w"), log=None)
    assert not (tmp_path / "w").exists()


def test_batch_larger_than_a_small_client_warns():
    sizes = np.array([48, 30, 5])
    assert training.check_batch_size(tiny_config(batch_size=5), sizes) is None
    warning = training.check_batch_size(tiny_config(batch_size=31), sizes)
    assert warning.startswith("warning: --batch_size=31 is larger than the training data of 2 client(s) (smallest: 5")
    # The planned sizes follow --client_sizes and --imbalance without any data.
    assert list(training.planned_train_sizes(tiny_config(client_sizes="7,9,11"))) == [7, 9, 11]
    imbalanced = training.planned_train_sizes(tiny_config(imbalance=1.0))
    assert imbalanced[0] > imbalanced[-1] and imbalanced.sum() <= 48 * 3


def test_workdir_conflict_is_refused_before_data_and_names_only_flags(finished_run, monkeypatch):
    path, _, _ = finished_run
    refuse_data(monkeypatch)
    with pytest.raises(workdir.WorkdirError, match=r"different configuration: --alpha \(1\.5 -> 0\.5\); use") as e:
        training.train_and_evaluate(dataclasses.replace(CONFIG, alpha=0.5), str(path), log=None)
    assert "task_names" not in str(e.value) and "client_slots" not in str(e.value)


def test_finished_run_reinvoked_says_so_without_data_or_compiling(finished_run, monkeypatch):
    path, summary, _ = finished_run
    refuse_data(monkeypatch)
    log = Log()
    again = training.train_and_evaluate(CONFIG, str(path), log=log)
    assert again == json.load(open(path / "summary.json")) and again["rounds"] == 4
    assert log.text.startswith(f"{path} already holds this run, finished after 4 rounds")
    assert log.text.count("\n") == 1


def test_layout_change_is_refused_naming_devices(finished_run):
    path, _, _ = finished_run
    with pytest.raises(workdir.WorkdirError, match=r"laid out for other devices \(client_slots 3 -> 4\)"):
        workdir.check_layout(str(path), {"client_slots": 4})
    workdir.check_layout(str(path), {"client_slots": 3, "task_names": ["modulation", "signal", "anomaly"]})


# ------------------------------------------------------------ run output


def test_progress_lines_name_tasks_and_directions(finished_run):
    _, summary, text = finished_run
    lines = text.splitlines()
    assert lines[0] == "fedgradnorm on synthetic_radcom: 3 clients, tasks modulation, signal, anomaly"
    assert "compiling (the first 2 rounds include it) ..." in lines
    assert any(re.fullmatch(r"first 2 rounds done in [\d.]+ s \(compilation included\)", line) for line in lines)
    (last,) = [line for line in lines if line.startswith("round 4/4 ")]
    assert re.match(r"round 4/4 \| [\d.]+ rounds/s, ETA 0 s \| modulation loss [\d.]+ w [\d.]+ acc↑ [\d.]+ \| ", last)
    row = {"task_loss": [1.0, 0.25], "task_weight": [1.5, 0.5], "test_metric": [0.875, 0.1081]}
    line = training.progress_line(20, 150, row, ["gender", "landmarks"], ["acc↑", "NME↓"], rate=2.0)
    assert line == (
        "round 20/150 | 2.00 rounds/s, ETA 1 min 05 s | gender loss 1.000 w 1.50 acc↑ 0.875"
        " | landmarks loss 0.250 w 0.50 NME↓ 0.108"
    )
    final = [line for line in lines if line.startswith("held-out after the last round")]
    assert final and all(f"(constant {b:.3f})" in final[0] for b in summary["constant_baseline"])


def test_summary_has_the_constant_baseline(finished_run):
    path, summary, _ = finished_run
    want = baselines.constant_baseline(training.build_dataset(CONFIG))
    assert json.load(open(path / "summary.json"))["constant_baseline"] == want == summary["constant_baseline"]
    assert summary["task_metrics"] == ["acc↑"] * 3 and len(summary["final_test_metric"]) == 3


def test_curves_png_and_tensorboard_events(finished_run):
    path, _, _ = finished_run
    png = (path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (events,) = [f for f in os.listdir(path / "tensorboard") if f.startswith("events.out.tfevents")]
    data = (path / "tensorboard" / events).read_bytes()
    for tag in (b"task_loss/modulation", b"task_weight/anomaly", b"test_metric/signal"):
        assert tag in data


def test_task_range_is_the_min_and_max_over_each_tasks_used_clients():
    # 5 clients of 3 tasks; client 4 did not report (mask 0), task 2 has nobody.
    task, mask = np.array([0, 0, 1, 0, 1]), np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    values = np.array([0.5, 2.0, 7.0, -1.0, 100.0], np.float32)
    member = np.eye(3, dtype=np.float32)[task] * mask[:, None]
    low, high = algorithms.task_range(member, values)
    np.testing.assert_array_equal(np.asarray(low), [-1.0, 7.0, 0.0])
    np.testing.assert_array_equal(np.asarray(high), [2.0, 7.0, 0.0])


def test_rows_carry_the_range_over_clients_and_curves_draw_it(tmp_path):
    # Two clients per task: each task's mean lies in its range, and some range is not a point.
    _, rows = run_alone(make_setup(num_clients=6, rounds=2, eval_every=2))
    for row in rows:
        for key in ("task_loss", *(["test_metric"] if "test_metric" in row else [])):
            low, mean, high = (np.array(row[k]) for k in (f"{key}_min", key, f"{key}_max"))
            assert np.all(low <= mean + 1e-6) and np.all(mean <= high + 1e-6), (key, low, mean, high)
    assert any(np.any(np.array(r["task_loss_max"]) > np.array(r["task_loss_min"])) for r in rows)
    assert "test_metric_min" in rows[-1]
    # The band changes the picture; rows without the range keys draw the lines alone.
    bare = [{k: v for k, v in r.items() if not k.endswith(("_min", "_max"))} for r in rows]
    names, symbols = ["modulation", "signal", "anomaly"], ["acc↑"] * 3
    with_band, without = tmp_path / "band.png", tmp_path / "bare.png"
    curves.plot([curves.Run("a", names, symbols, rows)], str(with_band))
    curves.plot([curves.Run("a", names, symbols, bare)], str(without))
    assert with_band.read_bytes() != without.read_bytes()


def test_output_files_are_readable_under_umask_022(finished_run):
    path, _, _ = finished_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert mode(path / name) == 0o644, name


def test_atomic_writes_follow_the_umask(tmp_path):
    with umask(0o027):
        workdir.write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
        workdir.reset_metrics(str(tmp_path), 0)
    assert mode(tmp_path / "a.json") == 0o640 and mode(tmp_path / "metrics.jsonl") == 0o640
    assert json.load(open(tmp_path / "a.json")) == {"x": 1}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_extension_rewrites_config_rounds(finished_run, tmp_path):
    path, _, _ = finished_run
    extended = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        (extended / name).parent.mkdir(exist_ok=True)
        (extended / name).write_bytes((path / name).read_bytes())
    shutil.copytree(path / "checkpoints", extended / "checkpoints")
    summary = training.train_and_evaluate(dataclasses.replace(CONFIG, rounds=6), str(extended), log=None)
    assert json.load(open(extended / "config.json"))["rounds"] == 6 == summary["rounds"]
    assert [r["round"] for r in workdir.read_metrics(str(extended))] == list(range(6))


def test_client_table_is_summarised_per_task_above_20_clients():
    config = tiny_config(num_clients=24, examples_per_client=8, test_examples_per_client=4, imbalance=0.5)
    dataset = training.build_dataset(config)
    lines = partition.client_table(dataset).splitlines()
    assert len(lines) == 1 + 3 + 1  # header, one line per task, total
    assert lines[0].split()[:2] == ["task", "clients"]
    hists = partition.label_histograms(dataset.train, dataset.tasks, dataset.client_task)
    for k, task in enumerate(dataset.tasks):
        members = np.flatnonzero(dataset.client_task == k)
        sizes = dataset.train.size[members]
        cells = lines[1 + k].split()
        assert cells[:3] == [task.name, "8", f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"]
        assert cells[4:] == [str(v) for v in np.sum([hists[c] for c in members], axis=0)]
    assert lines[-1].split()[:2] == ["total", "24"]
    small = partition.client_table(training.build_dataset(tiny_config()))
    assert len(small.splitlines()) == 1 + 3 + 1 and small.startswith("client  task")


@pytest.mark.slow
def test_default_cli_run_is_quiet_and_writes_readable_files(tmp_path):
    with umask(0o022):  # the child inherits it
        proc = run_cli(f"--workdir={tmp_path}", *TINY_FLAGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[:2000]  # no INFO (nor any) logging
    assert "round 2/2 | " in proc.stdout and "acc↑" in proc.stdout
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert mode(tmp_path / name) == 0o644
    proc = run_cli(f"--workdir={tmp_path}", *TINY_FLAGS, "--verbosity=0")  # finished: one line, INFO back on
    assert proc.returncode == 0 and proc.stdout.startswith(f"{tmp_path} already holds this run, finished")
    assert re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr[:2000]


def test_plot_overlays_runs_and_refuses_a_non_run(finished_run, tmp_path):
    path, _, _ = finished_run
    out = tmp_path / "overlay.png"
    proc = run_cli(str(path), str(path), "--labels=fedgradnorm,again", f"--out={out}", module="experiments.plot")
    assert proc.returncode == 0 and proc.stdout == f"wrote {out} (2 runs)\n", proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli(str(tmp_path / "nothing"), module="experiments.plot")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(f"error: {tmp_path / 'nothing'}: no readable config.json")
