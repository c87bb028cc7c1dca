"""MTFL, the Multi-Task Facial Landmark dataset, as the TFDS builder ``mtfl``.

Zhang, Luo, Loy, Tang, "Facial Landmark Detection by Deep Multi-task
Learning", ECCV 2014 (TCDCN). 12,995 faces with five landmarks and four
attributes; the official split is ``training.txt`` / ``testing.txt``.

Each face becomes a 40x40 grayscale crop (float32 in [0, 1]): the bounding
box of the five landmarks, widened by ``MARGIN`` of its larger side on every
side and made square around its centre, cut from the image (parts outside the
image are black) and resized with bilinear filtering. Landmarks are given in
the crop, normalised to [0, 1]: ``(x - left) / side``. Attributes become
0-based labels.

Importing this module is cheap (no tensorflow_datasets); the builder class
:data:`Mtfl` is created (and registered with TFDS, so that
``tfds.data_source("mtfl", ...)`` finds it) on first use. TensorFlow is never
needed::

    import tensorflow_datasets as tfds
    from fgn_jax.data import mtfl
    b = mtfl.builder("/data/tfds")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/MTFL"))
    train = b.as_data_source("train")  # train[0]["image"]: [40, 40, 1] float32
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import loaders
from fgn_jax.data import pool as pool_lib

TASKS = (
    tasks_lib.TaskSpec("landmarks", tasks_lib.REGRESSION, 10, tasks_lib.NME),
    tasks_lib.TaskSpec("gender", tasks_lib.CLASSIFICATION, 2, tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("smile", tasks_lib.CLASSIFICATION, 2, tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("glasses", tasks_lib.CLASSIFICATION, 2, tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("pose", tasks_lib.CLASSIFICATION, 5, tasks_lib.ACCURACY),
)

IMAGE_SIZE = 40
NUM_POINTS = 5
# Five inner-face points span roughly 40% of the face; widening their box by
# 60% of its side on each side (2.2x in all) keeps the whole face in the crop.
MARGIN = 0.6
SPLIT_FILES = {"train": "training.txt", "test": "testing.txt"}
IMAGE_FOLDERS = ("lfw_5590", "net_7876", "AFLW")
# Attribute names and class names, in file order; the file stores 1-based ids.
ATTRIBUTES = {
    "gender": ("male", "female"),
    "smile": ("smiling", "not smiling"),
    "glasses": ("glasses", "no glasses"),
    "pose": ("left profile", "left", "frontal", "right", "right profile"),
}
_COORDS = [f"x{i}" for i in range(1, 6)] + [f"y{i}" for i in range(1, 6)]
_NUM_FIELDS = 1 + len(_COORDS) + len(ATTRIBUTES)
FIELDS = ("image", "landmarks", *ATTRIBUTES)

DESCRIPTION = (
    "MTFL faces (Zhang et al., ECCV 2014): 40x40 grayscale crops around five landmarks "
    f"(box widened by {MARGIN} of its side), landmarks in [0, 1] of the crop, 0-based "
    "gender, smile, glasses and head-pose labels; official training.txt / testing.txt split."
)
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download MTFL.zip from http://mmlab.ie.cuhk.edu.hk/projects/TCDCN.html and
extract it; pass the extracted folder (holding training.txt, testing.txt,
lfw_5590/, net_7876/ and AFLW/) as the manual dir (--data_dir).
"""


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One validated line of an annotation file.

    Attributes:
      source: the annotation file.
      line: 1-based line number in ``source``.
      path: image path relative to the dataset folder, ``/``-separated.
      x: ``[5]`` landmark x in pixels of the original image.
      y: ``[5]`` landmark y.
      labels: attribute name -> 0-based class.
    """

    source: str
    line: int
    path: str
    x: np.ndarray
    y: np.ndarray
    labels: dict[str, int]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def safe_relative_path(raw: str) -> str | None:
    """Normalises an image path from an annotation file, or None if unsafe.

    Accepts ``\\`` and ``/`` separators. Rejects absolute paths, drive letters
    and any ``..`` component, so no line can make us read outside the dataset
    folder (a purely lexical check, so symlinked image folders still work).
    """
    path = raw.replace("\\", "/")
    if "\x00" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _parse_line(text: str, source: str, line: int, root: str) -> Annotation:
    where = f"{source}:{line}"
    fields = text.strip().rsplit(None, _NUM_FIELDS - 1)
    if len(fields) < _NUM_FIELDS:
        raise loaders.DataError(
            f"{where}: expected {_NUM_FIELDS} fields (path, x1..x5, y1..y5, gender, smile, glasses, pose), "
            f"found {len(fields)}"
        )
    path = safe_relative_path(fields[0])
    if path is None:
        raise loaders.DataError(f"{where}: image path {fields[0]!r} points outside the dataset folder")
    coords = []
    for name, value in zip(_COORDS, fields[1:11], strict=True):
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            raise loaders.DataError(f"{where}: coordinate {name} is not a finite number: {value!r}")
        coords.append(v)
    labels = {}
    for (name, classes), value in zip(ATTRIBUTES.items(), fields[11:], strict=True):
        try:
            v = int(value)
        except ValueError:
            raise loaders.DataError(f"{where}: {name} is not an integer: {value!r}") from None
        if not 1 <= v <= len(classes):
            raise loaders.DataError(f"{where}: {name}={v} is outside 1..{len(classes)}")
        labels[name] = v - 1
    x, y = np.array(coords[:NUM_POINTS]), np.array(coords[NUM_POINTS:])
    if max(np.ptp(x), np.ptp(y)) < 1.0:
        raise loaders.DataError(f"{where}: the five landmarks span less than one pixel")
    if not os.path.isfile(os.path.join(root, *path.split("/"))):
        raise loaders.DataError(f"{where}: image {path!r} does not exist")
    return Annotation(source=source, line=line, path=path, x=x, y=y, labels=labels)


def parse_annotations(root: str, filename: str) -> list[Annotation]:
    """Reads and validates every line of one annotation file.

    Blank lines (MTFL files end with a line holding one space) are skipped.

    Args:
      root: the extracted MTFL folder.
      filename: ``"training.txt"`` or ``"testing.txt"``.

    Returns:
      The annotations in file order.

    Raises:
      DataError: the file is missing, or a line is malformed, unsafe or
        points to a missing image.
    """
    source = os.path.join(root, filename)
    if not os.path.isfile(source):
        raise loaders.DataError(f"{source}: annotation file does not exist")
    try:
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise loaders.DataError(f"{source}: cannot read as text ({e})") from None
    out = [_parse_line(text, source, i, root) for i, text in enumerate(lines, 1) if text.strip()]
    if not out:
        raise loaders.DataError(f"{source}: no annotations")
    return out


def crop_face(image: Image.Image, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cuts the square face box around the landmarks and resizes it.

    Args:
      image: a grayscale (mode ``"L"``) PIL image.
      x: ``[5]`` landmark x in pixels.
      y: ``[5]`` landmark y in pixels.

    Returns:
      ``([IMAGE_SIZE, IMAGE_SIZE, 1] float32 in [0, 1], [10] float32 landmarks
      x1..x5, y1..y5 in [0, 1] of the crop)``.
    """
    extent = max(np.ptp(x), np.ptp(y))
    # The epsilon keeps 2.2 * 40 = 88.000...01 from rounding up to 89.
    side = math.ceil((1 + 2 * MARGIN) * extent - 1e-6)
    left = math.floor((x.min() + x.max()) / 2 - side / 2)
    top = math.floor((y.min() + y.max()) / 2 - side / 2)
    # PIL fills the parts of the box outside the image with zeros.
    crop = image.crop((left, top, left + side, top + side))
    crop = crop.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(crop, np.float32)[..., None] / 255.0
    landmarks = np.concatenate([(x - left) / side, (y - top) / side]).astype(np.float32)
    return pixels, landmarks


def load_example(root: str, ann: Annotation) -> dict[str, Any]:
    """Decodes, checks and crops the image of one annotation.

    Raises:
      DataError: the image cannot be decoded or the landmarks lie outside it.
    """
    path = os.path.join(root, *ann.path.split("/"))
    try:
        with Image.open(path) as im:
            im.load()
            gray = im.convert("L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise loaders.DataError(f"{ann.where}: image {ann.path!r} cannot be decoded ({e})") from None
    w, h = gray.size
    if ann.x.min() < 0 or ann.y.min() < 0 or ann.x.max() > w or ann.y.max() > h:
        raise loaders.DataError(f"{ann.where}: landmarks lie outside the {w}x{h} image {ann.path!r}")
    pixels, landmarks = crop_face(gray, ann.x, ann.y)
    return {"image": pixels, "landmarks": landmarks, **ann.labels}


def source_fingerprint(root: str) -> str:
    """Identity of the raw files: the annotation files and the crop settings."""
    paths = []
    for filename in SPLIT_FILES.values():
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            raise loaders.DataError(f"{path}: annotation file does not exist")
        paths.append(path)
    return loaders.file_digest(paths, extra=f"mtfl size={IMAGE_SIZE} margin={MARGIN}")


@functools.cache
def _builder_class() -> type:
    from etils import epath
    import tensorflow_datasets as tfds  # slow to import: only when a builder is needed

    class Mtfl(tfds.core.GeneratorBasedBuilder):
        """MTFL faces: 40x40 grayscale crops, 5 landmarks, 4 attributes."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "40x40 crops around the landmarks, margin 0.6."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
        # TFDS derives this from the package with importlib_resources, which tfds 4.9.10 imports
        # but does not install on Python >= 3.9; a plain path avoids that.
        code_path = epath.Path(__file__)

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32, encoding="bytes"),
                "landmarks": tfds.features.Tensor(shape=(2 * NUM_POINTS,), dtype=np.float32),
            }
            features.update({name: tfds.features.ClassLabel(names=c) for name, c in ATTRIBUTES.items()})
            return tfds.core.DatasetInfo(
                builder=self,
                description=DESCRIPTION,
                features=tfds.features.FeaturesDict(features),
                homepage="http://mmlab.ie.cuhk.edu.hk/projects/TCDCN.html",
                # File order, so example i of a split is the i-th annotation line.
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            root = loaders.manual_dir(dl_manager)
            # Validate every line of both files before writing anything.
            annotations = {split: parse_annotations(root, f) for split, f in SPLIT_FILES.items()}
            self.info.metadata[loaders.FINGERPRINT_KEY] = source_fingerprint(root)
            return {split: self._generate_examples(root, anns) for split, anns in annotations.items()}

        def _generate_examples(self, root, annotations):
            for ann in annotations:
                yield ann.line, load_example(root, ann)

    Mtfl.__module__ = __name__
    Mtfl.__qualname__ = "Mtfl"
    return Mtfl


def __getattr__(name: str) -> Any:
    # The builder class needs tensorflow_datasets; create it on first access.
    if name == "Mtfl":
        return _builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def builder(build_dir: str | None = None) -> Any:
    """The ``mtfl`` TFDS builder writing ArrayRecord files under ``build_dir``."""
    return _builder_class()(data_dir=build_dir or loaders.default_build_dir(), file_format="array_record")


def load_pools(data_dir: str, build_dir: str | None = None) -> tuple[pool_lib.ExamplePool, pool_lib.ExamplePool]:
    """Builds MTFL once from ``data_dir`` and reads the official train/test split.

    Args:
      data_dir: the extracted MTFL folder.
      build_dir: where the TFDS build lives (see :func:`loaders.default_build_dir`).

    Returns:
      ``(train_pool, test_pool)`` with x ``[N, 40, 40, 1]`` and the tasks in
      :data:`TASKS`.
    """
    root = loaders.check_dir(data_dir, "MTFL folder")
    fingerprint = source_fingerprint(root)
    b = loaders.prepare(lambda: builder(build_dir), root, fingerprint)
    return tuple(_to_pool(loaders.read_split(b, split, FIELDS)) for split in SPLIT_FILES)


def _to_pool(columns: dict[str, np.ndarray]) -> pool_lib.ExamplePool:
    targets = {"landmarks": columns["landmarks"].astype(np.float32)}
    targets.update({name: columns[name].astype(np.float32)[:, None] for name in ATTRIBUTES})
    return pool_lib.ExamplePool(x=columns["image"].astype(np.float32), targets=targets, tasks=TASKS)
