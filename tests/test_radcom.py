"""Tests of the RadComDynamic builder and loader on a miniature HDF5 file in the real format."""

from __future__ import annotations

import ast
import hashlib
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fgn_jax.data import loaders, radcom
from tests import data_fixtures as fx

SNRS = (-10, 0, 10, 18)
PER_SNR = 2
NUM_EXAMPLES = len(fx.RADCOM_PAIRS) * len(SNRS) * PER_SNR


def held_out(modulation: str, signal: str, snr: int, index: int, seed: int = 0, fraction: float = 0.2) -> bool:
    """The documented split rule, written out independently of the library."""
    digest = hashlib.sha256(f"{seed}|{modulation}|{signal}|{snr}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def expected_split(values: dict[str, np.ndarray], test: bool, seed: int = 0) -> list[tuple[tuple, np.ndarray]]:
    """(parsed key, value) of one split in the documented order (labels, SNR, index)."""
    out = []
    for key, value in values.items():
        parsed = ast.literal_eval(key)
        if held_out(*parsed, seed=seed) == test:
            out.append((parsed, value))
    rank = lambda p: (radcom.MODULATIONS.index(p[0]), radcom.SIGNALS.index(p[1]), p[2], p[3])
    return sorted(out, key=lambda e: rank(e[0]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("radcom"))
    build_dir = str(tmp_path_factory.mktemp("build"))
    values = fx.write_radcom(os.path.join(folder, radcom.SOURCE_FILENAME), SNRS, PER_SNR)
    train, test = loaders.load_pools("radcom_dynamic", folder, build_dir=build_dir)
    return folder, build_dir, values, train, test


def test_import_does_not_load_tfds():
    code = "import sys, fgn_jax.data.radcom; assert 'tensorflow_datasets' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_shapes_and_tasks(built):
    _, _, _, train, test = built
    assert len(train) + len(test) == NUM_EXAMPLES
    assert train.tasks == radcom.TASKS == test.tasks
    assert [t.num_outputs for t in radcom.TASKS] == [6, 8, 2]
    assert train.x.shape == (len(train), 128, 2) and train.x.dtype == np.float32
    assert all(train.targets[t.name].shape == (len(train), 1) for t in radcom.TASKS)


@pytest.mark.parametrize("split", ["train", "test"])
def test_hash_split_iq_layout_and_labels(built, split):
    _, _, values, train, test = built
    pool = train if split == "train" else test
    expected = expected_split(values, test=split == "test")
    assert len(pool) == len(expected)
    for i, ((modulation, signal, snr, _), value) in enumerate(expected):
        np.testing.assert_array_equal(pool.x[i, :, 0], value[:128])  # I
        np.testing.assert_array_equal(pool.x[i, :, 1], value[128:])  # Q
        assert pool.targets["modulation"][i, 0] == radcom.MODULATIONS.index(modulation)
        assert pool.targets["signal"][i, 0] == radcom.SIGNALS.index(signal)
        assert pool.targets["anomaly"][i, 0] == (snr >= 10)


def test_split_is_about_the_requested_fraction():
    keys = [(m, s, snr, i) for m, s in fx.RADCOM_PAIRS for snr in range(-20, 20, 2) for i in range(50)]
    share = np.mean([radcom.is_test(k, radcom.Options()) for k in keys])
    assert abs(share - 0.2) < 0.02
    assert [radcom.is_test(k, radcom.Options()) for k in keys[:200]] == [held_out(*k) for k in keys[:200]]


def test_known_label_indices():
    assert radcom.MODULATIONS.index("bpsk") == 2 and radcom.SIGNALS.index("Satcom") == 5
    assert radcom.SIGNALS.index("Ground mapping") == 3 and radcom.SIGNALS.index("AM radio") == 6


def test_options_give_separate_builds(built):
    folder, build_dir, values, default_train, _ = built
    train, test = loaders.load_pools("radcom_dynamic", folder, build_dir=build_dir, anomaly_snr_db=0, split_seed=1)
    expected = expected_split(values, test=True, seed=1)
    assert len(test) == len(expected)
    np.testing.assert_array_equal(test.targets["anomaly"][:, 0], [p[2] >= 0 for p, _ in expected])
    names = sorted(os.listdir(os.path.join(build_dir, "radcom_dynamic")))
    assert names == [".config", "anomaly_snr0_test0.2_seed1", "anomaly_snr10_test0.2_seed0"]
    again, _ = loaders.load_pools("radcom_dynamic", folder, build_dir=build_dir)
    np.testing.assert_array_equal(again.targets["anomaly"], default_train.targets["anomaly"])


def test_file_path_and_float64_values(tmp_path):
    path = str(tmp_path / "copy.h5")
    values = fx.write_radcom(path, SNRS, PER_SNR, seed=3, dtype=np.float64)
    train, _ = loaders.load_pools("radcom_dynamic", path, build_dir=str(tmp_path / "build"))
    first_value = expected_split(values, test=False)[0][1]
    np.testing.assert_allclose(train.x[0, :, 0], first_value[:128], rtol=1e-6)


def test_readable_with_tfds_data_source(built):
    import tensorflow_datasets as tfds

    _, build_dir, _, train, _ = built
    name = f"radcom_dynamic/{radcom.Options().config_name}"
    source = tfds.data_source(name, data_dir=build_dir, download=False)
    assert len(source["train"]) == len(train)
    # The loader's direct record parsing gives what TFDS's own decoding gives.
    decoded = [source["train"][i] for i in range(len(train))]
    np.testing.assert_array_equal(np.stack([e["iq"] for e in decoded]), train.x)
    for task in radcom.TASKS:
        np.testing.assert_array_equal([e[task.name] for e in decoded], train.targets[task.name][:, 0])


def test_second_load_reuses_build(built, monkeypatch):
    folder, build_dir, _, train, _ = built
    data_path = radcom.builder(build_dir).data_path
    mtime = os.stat(data_path).st_mtime_ns

    def fail(*args):
        raise AssertionError("the build was regenerated")

    monkeypatch.setattr(radcom, "read_iq", fail)
    again, _ = loaders.load_pools("radcom_dynamic", folder, build_dir=build_dir)
    np.testing.assert_array_equal(again.x, train.x)
    assert os.stat(data_path).st_mtime_ns == mtime


@pytest.mark.parametrize(
    "key, expected",
    [
        ("('bpsk', 'Satcom', -10, 0)", ("bpsk", "Satcom", -10, 0)),
        ("('pulsed', 'Ground mapping', 18, 699)", ("pulsed", "Ground mapping", 18, 699)),
        ('("amssb", "AM radio", 0, 3)', ("amssb", "AM radio", 0, 3)),
    ],
)
def test_parse_key_accepts_tuple_literals(key, expected):
    assert radcom.parse_key(key, "f.hdf5") == expected


@pytest.mark.parametrize(
    "key",
    [
        "bpsk_Satcom_-10_0",
        "('bpsk', 'Satcom', -10)",
        "('bpsk', 'Satcom', '-10', 0)",
        "('bpsk', 'Satcom', -10.0, 0)",
        "('bpsk', 'Satcom', True, 0)",
        "['bpsk', 'Satcom', -10, 0]",
        "('bpsk', 'Satcom', -10, 0",
        "('bpsk', 'Satcom', -(1), 0 + 1)",
        "__import__('os').system('touch pwned')",
        "(__import__('os').system('touch pwned'), 'Satcom', 0, 0)",
    ],
)
def test_parse_key_rejects_everything_else(key, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loaders.DataError, match=r"^f\.hdf5: key .* is not a tuple literal"):
        radcom.parse_key(key, "f.hdf5")
    assert os.listdir(tmp_path) == []  # nothing ran


def _first_test_key(values: dict[str, np.ndarray]) -> str:
    return next(k for k in values if radcom.is_test(ast.literal_eval(k), radcom.Options()))


# Each case breaks a fresh file and returns (data_dir to load, expected message pattern).
def _missing_dir(folder, path, values):
    return os.path.join(folder, "absent"), r"absent: RadComDynamic folder does not exist$"


def _missing_file(folder, path, values):
    os.rename(path, os.path.join(folder, "other.hdf5"))
    return folder, r"RadComDynamic\.hdf5: RadComDynamic file does not exist$"


def _not_hdf5(folder, path, values):
    with open(path, "w") as f:
        f.write("modulation,signal,snr,index\n")
    return folder, r"RadComDynamic\.hdf5: not a readable HDF5 file \(.*\)$"


def _truncated(folder, path, values):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    return folder, r"RadComDynamic\.hdf5: not a readable HDF5 file \(.*truncated.*\)$"


def _extra_key(key, value=None, pattern=None):
    def case(folder, path, values):
        with h5py.File(path, "a") as f:
            f.create_dataset(key, data=np.zeros(256, np.float32) if value is None else value)
        return folder, pattern or rf"RadComDynamic\.hdf5: key {re.escape(repr(key))} is not a tuple literal"

    return case


def _bad_value(make_value, pattern):
    def case(folder, path, values):
        key = _first_test_key(values)  # fails after the train split was written
        with h5py.File(path, "a") as f:
            del f[key]
            f.create_dataset(key, data=make_value(values[key]))
        return folder, rf"RadComDynamic\.hdf5: key {re.escape(repr(key))}: {pattern}$"

    return case


def _with_nan(value):
    value = value.copy()
    value[130] = np.nan
    return value


BAD_INPUTS = {
    "missing_dir": _missing_dir,
    "missing_file": _missing_file,
    "not_hdf5": _not_hdf5,
    "truncated": _truncated,
    "key_not_tuple": _extra_key("bpsk_Satcom_-10_0"),
    "key_runs_code": _extra_key("__import__('os').system('touch pwned')"),
    "key_wrong_types": _extra_key("('bpsk', 'Satcom', '-10', 0)"),
    "unknown_modulation": _extra_key(
        "('qam16', 'Satcom', 0, 0)", pattern=r"key .*: unknown modulation 'qam16' \(known: pulsed, fmcw"
    ),
    "duplicate": _extra_key("('bpsk','Satcom',0,0)", pattern=r"keys .* and .* name the same example$"),
    "wrong_length": _bad_value(lambda v: v[:200], r"has 200 values, expected 256 \(I then Q\)"),
    "nan": _bad_value(_with_nan, "contains NaN or infinite values"),
    "complex": _bad_value(lambda v: v[:128] + 1j * v[128:], "values are complex.*, expected real numbers"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly_then_fixed_input_builds(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    folder, build_dir = str(tmp_path / "radcom"), str(tmp_path / "build")
    path = os.path.join(folder, radcom.SOURCE_FILENAME)
    values = fx.write_radcom(path, SNRS, PER_SNR)
    data_dir, pattern = BAD_INPUTS[case](folder, path, values)
    before = fx.tree_digest(folder)

    with pytest.raises(loaders.DataError) as err:
        loaders.load_pools("radcom_dynamic", data_dir, build_dir=build_dir)

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(os.path.join(folder, "")), message  # names the file
    assert re.search(pattern, message), message
    assert fx.tree_digest(folder) == before  # the source is untouched
    assert not radcom.builder(build_dir).data_path.exists()  # nothing a later run would reuse
    assert fx.leftovers(build_dir) == []
    assert not os.path.exists(tmp_path / "pwned")

    os.makedirs(folder, exist_ok=True)
    fx.write_radcom(path, SNRS, PER_SNR)  # the fixed input
    train, test = loaders.load_pools("radcom_dynamic", folder, build_dir=build_dir)
    assert len(train) + len(test) == NUM_EXAMPLES
