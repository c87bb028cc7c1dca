"""Tests of the MTFL builder and loader on miniature files in the real format."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from fgn_jax.data import loaders, mtfl
from tests import data_fixtures as fx

NUM_TRAIN, NUM_TEST = 12, 4

# Record 0: a flat 300x300 image (value 128), landmarks well inside.
# Box: extent 40 -> side ceil(2.2 * 40) = 88, left = floor(120 - 44) = 76, top = floor(130 - 44) = 86.
FLAT_X, FLAT_Y = [100.0, 140.0, 120.0, 105.0, 135.0], [110.0, 110.0, 130.0, 150.0, 150.0]
FLAT_LANDMARKS = np.array([24, 64, 44, 29, 59, 24, 24, 44, 64, 64]) / 88
# Record 1: a flat 100x100 image (value 200), face at the left edge.
# Box: extent 20 -> side 44, left = floor(15 - 22) = -7 (7 columns padded), top = floor(50 - 22) = 28.
EDGE_X, EDGE_Y = [5.0, 25.0, 15.0, 8.0, 22.0], [40.0, 40.0, 50.0, 60.0, 60.0]
EDGE_LANDMARKS = np.array([12, 32, 22, 15, 29, 12, 12, 22, 32, 32]) / 44


def write_dataset(root: str) -> dict[str, list[fx.FaceRecord]]:
    """The miniature MTFL folder, with two hand-computable faces first in training.txt."""
    records = fx.write_mtfl(root, NUM_TRAIN, NUM_TEST)
    flat, edge = records["train"][0], records["train"][1]
    fx.write_flat_image(root, flat.path.replace("\\", "/"), (300, 300), 128)
    fx.write_flat_image(root, edge.path.replace("\\", "/"), (100, 100), 200)
    flat.x, flat.y, edge.x, edge.y = FLAT_X, FLAT_Y, EDGE_X, EDGE_Y
    fx.write_annotations(root, "training.txt", [r.line() for r in records["train"]])
    return records


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("MTFL"))
    build_dir = str(tmp_path_factory.mktemp("build"))
    records = write_dataset(root)
    train, test = loaders.load_pools("mtfl", root, build_dir=build_dir)
    return root, build_dir, records, train, test


def test_import_does_not_load_tfds():
    code = "import sys, fgn_jax.data.mtfl; assert 'tensorflow_datasets' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_shapes_and_official_split(built):
    _, _, records, train, test = built
    assert len(train) == len(records["train"]) == NUM_TRAIN  # the trailing " " line is not an example
    assert len(test) == NUM_TEST
    assert train.tasks == mtfl.TASKS == test.tasks
    assert train.x.shape == (NUM_TRAIN, 40, 40, 1) and train.x.dtype == np.float32
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert train.targets["landmarks"].shape == (NUM_TRAIN, 10)
    assert train.targets["pose"].shape == (NUM_TRAIN, 1)


def test_attributes_become_zero_based(built):
    _, _, records, train, test = built
    for pool, recs in ((train, records["train"]), (test, records["test"])):
        for name, column in zip(("gender", "smile", "glasses", "pose"), range(4), strict=True):
            expected = np.array([r.attributes[column] - 1 for r in recs], np.float32)
            np.testing.assert_array_equal(pool.targets[name][:, 0], expected)
    assert set(np.unique(train.targets["pose"])) <= {0, 1, 2, 3, 4}


def test_landmarks_rescaled_into_crop(built):
    _, _, _, train, _ = built
    np.testing.assert_allclose(train.targets["landmarks"][0], FLAT_LANDMARKS, atol=1e-6)
    np.testing.assert_allclose(train.targets["landmarks"][1], EDGE_LANDMARKS, atol=1e-6)
    assert train.targets["landmarks"].min() >= 0.0 and train.targets["landmarks"].max() <= 1.0


def test_crop_pixels_and_padding(built):
    _, _, _, train, _ = built
    np.testing.assert_allclose(train.x[0], 128 / 255, atol=3 / 255)
    edge = train.x[1, :, :, 0]
    # 7 of 44 source columns lie left of the image: about 6 output columns are black padding.
    assert edge[:, :6].max() < 0.02
    np.testing.assert_allclose(edge[:, 8:], 200 / 255, atol=3 / 255)


def test_readable_with_tfds_data_source(built):
    import tensorflow_datasets as tfds

    _, build_dir, records, _, test = built
    source = tfds.data_source("mtfl", data_dir=build_dir, download=False)
    assert len(source["train"]) == NUM_TRAIN and len(source["test"]) == NUM_TEST
    example = source["test"][2]
    assert example["image"].shape == (40, 40, 1) and example["image"].dtype == np.float32
    assert example["pose"] == records["test"][2].attributes[3] - 1
    # The loader's direct record parsing gives what TFDS's own decoding gives.
    decoded = [source["test"][i] for i in range(NUM_TEST)]
    np.testing.assert_array_equal(np.stack([e["image"] for e in decoded]), test.x)
    np.testing.assert_array_equal(np.stack([e["landmarks"] for e in decoded]), test.targets["landmarks"])
    np.testing.assert_array_equal([e["smile"] for e in decoded], test.targets["smile"][:, 0])


def test_second_load_reuses_build(built, monkeypatch):
    root, build_dir, _, train, _ = built
    data_path = mtfl.builder(build_dir).data_path
    mtime = os.stat(data_path).st_mtime_ns

    def fail(*args):
        raise AssertionError("the build was regenerated")

    monkeypatch.setattr(mtfl, "load_example", fail)
    again, _ = loaders.load_pools("mtfl", root, build_dir=build_dir)
    np.testing.assert_array_equal(again.x, train.x)
    assert os.stat(data_path).st_mtime_ns == mtime


def test_changed_annotations_trigger_rebuild(tmp_path):
    root, build_dir = str(tmp_path / "MTFL"), str(tmp_path / "build")
    records = write_dataset(root)
    _, test = loaders.load_pools("mtfl", root, build_dir=build_dir)
    assert len(test) == NUM_TEST
    fx.write_annotations(root, "testing.txt", [r.line() for r in records["test"][:-1]])
    _, test = loaders.load_pools("mtfl", root, build_dir=build_dir)
    assert len(test) == NUM_TEST - 1


def _replace_field(root: str, filename: str, line: int, field: int, value: str) -> None:
    path = os.path.join(root, filename)
    with open(path, newline="") as f:
        lines = f.read().split("\r\n")
    parts = lines[line - 1].split()
    parts[field] = value
    lines[line - 1] = " " + " ".join(parts)
    with open(path, "w", newline="") as f:
        f.write("\r\n".join(lines))


def _image(records, split: str, i: int) -> str:
    return records[split][i].path.replace("\\", "/")


# Each case breaks a fresh dataset and returns (data_dir to load, expected message pattern).
def _missing_dir(root, records):
    return os.path.join(root, "absent"), r"absent: MTFL folder does not exist$"


def _missing_annotations(root, records):
    os.remove(os.path.join(root, "testing.txt"))
    return root, r"testing\.txt: annotation file does not exist$"


def _too_few_fields(root, records):
    fx.write_annotations(root, "training.txt", [r.line() for r in records["train"][:2]] + ["lfw_5590\\a.jpg 1 2 3"])
    return root, r"training\.txt:3: expected 15 fields .* found 4$"


def _non_numeric(root, records):
    _replace_field(root, "training.txt", 2, 3, "12,5")
    return root, r"training\.txt:2: coordinate x3 is not a finite number: '12,5'$"


def _nan_coordinate(root, records):
    _replace_field(root, "testing.txt", 1, 6, "nan")
    return root, r"testing\.txt:1: coordinate y1 is not a finite number: 'nan'$"


def _bad_attribute(root, records):
    _replace_field(root, "training.txt", 4, 14, "6")
    return root, r"training\.txt:4: pose=6 is outside 1\.\.5$"


def _image_missing(root, records):
    os.remove(os.path.join(root, _image(records, "test", 1)))
    return root, rf"testing\.txt:2: image '{_image(records, 'test', 1)}' does not exist$"


def _image_not_decodable(root, records):
    with open(os.path.join(root, _image(records, "test", 2)), "wb") as f:
        f.write(b"<html>not a jpeg</html>")
    return root, r"testing\.txt:3: image '.*' cannot be decoded \(.*\)$"


def _image_truncated(root, records):
    path = os.path.join(root, _image(records, "test", 3))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return root, r"testing\.txt:4: image '.*' cannot be decoded \(.*truncated.*\)$"


def _path_outside(value):
    def case(root, records):
        _replace_field(root, "training.txt", 1, 0, value)
        return root, r"training\.txt:1: image path .* points outside the dataset folder$"

    return case


def _landmarks_outside(root, records):
    # Test record 1 is a 160x120 net_7876 image; x2 = 165 lies right of it.
    _replace_field(root, "testing.txt", 2, 2, "165")
    return root, r"testing\.txt:2: landmarks lie outside the 160x120 image 'net_7876/.*'$"


BAD_INPUTS = {
    "missing_dir": _missing_dir,
    "missing_annotations": _missing_annotations,
    "too_few_fields": _too_few_fields,
    "non_numeric": _non_numeric,
    "nan_coordinate": _nan_coordinate,
    "bad_attribute": _bad_attribute,
    "image_missing": _image_missing,
    "image_not_decodable": _image_not_decodable,
    "image_truncated": _image_truncated,
    "path_parent": _path_outside("..\\..\\etc\\passwd"),
    "path_absolute": _path_outside("/etc/passwd"),
    "path_drive": _path_outside("C:\\Windows\\win.ini"),
    "landmarks_outside": _landmarks_outside,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly_then_fixed_input_builds(tmp_path, case):
    root, build_dir = str(tmp_path / "MTFL"), str(tmp_path / "build")
    records = write_dataset(root)
    data_dir, pattern = BAD_INPUTS[case](root, records)
    before = fx.tree_digest(root)

    with pytest.raises(loaders.DataError) as err:
        loaders.load_pools("mtfl", data_dir, build_dir=build_dir)

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(os.path.join(root, "")), message  # names the file
    assert re.search(pattern, message), message
    assert fx.tree_digest(root) == before  # the source is untouched
    assert not mtfl.builder(build_dir).data_path.exists()  # nothing a later run would reuse
    assert fx.leftovers(build_dir) == []

    write_dataset(root)  # the fixed input
    train, test = loaders.load_pools("mtfl", root, build_dir=build_dir)
    assert (len(train), len(test)) == (NUM_TRAIN, NUM_TEST)


def test_builder_reports_missing_manual_dir(tmp_path):
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "absent"), try_download_gcs=False)
    with pytest.raises(loaders.DataError, match=r"absent does not exist or is empty"):
        mtfl.builder(str(tmp_path / "build")).download_and_prepare(download_config=config)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("lfw_5590\\Aaron_Eckhart_0001.jpg", "lfw_5590/Aaron_Eckhart_0001.jpg"),
        ("AFLW/./image00002.jpg", "AFLW/image00002.jpg"),
        ("net_7876\\..\\..\\x.jpg", None),
        ("\\\\server\\share\\x.jpg", None),
        ("d:x.jpg", None),
        ("a/\x00.jpg", None),
    ],
)
def test_safe_relative_path(raw, expected):
    assert mtfl.safe_relative_path(raw) == expected
