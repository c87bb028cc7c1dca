"""RadComDynamic as the TFDS builder ``radcom_dynamic``.

Jagannath & Jagannath, "Multi-task Learning Approach for Automatic Modulation
and Wireless Signal Classification", ICC 2021. One HDF5 file,
``RadComDynamic.hdf5``, one dataset per example. The key is the ``str()`` of
a tuple ``(modulation, signal, snr, index)``, e.g. ``"('bpsk', 'Satcom', -10,
0)"``; the value holds 256 floats, I = [0:128] and Q = [128:256]. Keys are
checked to be a tuple literal of (str, str, int, int) before
``ast.literal_eval`` reads them; nothing is ever evaluated.

Examples: ``iq`` ``[128, 2]`` float32 (column 0 = I, 1 = Q), ``modulation``
(index into :data:`MODULATIONS`), ``signal`` (index into :data:`SIGNALS`),
``snr`` in dB, and ``anomaly``.

The dataset has no anomaly field; we derive one. Default rule: ``anomaly = 1``
when ``snr >= anomaly_snr_db = 10`` dB, i.e. an unusually strong (close or
high-power) emitter; with SNRs -20..18 dB in 2 dB steps that marks 5 of 20
SNR levels. The threshold is part of the builder config.

There is no official split. An example goes to ``test`` when a SHA-256 of
``(split_seed, modulation, signal, snr, index)`` falls below
``test_fraction`` (default 20%), so the split is the same on every run and
machine and does not depend on file order. Both settings are in the config
name, e.g. ``radcom_dynamic/anomaly_snr10_test0.2_seed0``.

Importing this module is cheap (no tensorflow_datasets); the builder class
:data:`RadcomDynamic` is created (and registered with TFDS, so that
``tfds.data_source("radcom_dynamic", ...)`` finds it) on first use::

    import tensorflow_datasets as tfds
    from fgn_jax.data import radcom
    b = radcom.builder("/data/tfds", anomaly_snr_db=6)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="/data/radcom"))
    test = b.as_data_source("test")  # test[0]["iq"]: [128, 2] float32
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
from typing import Any

import numpy as np

from fgn_jax import tasks as tasks_lib
from fgn_jax.data import loaders
from fgn_jax.data import pool as pool_lib

MODULATIONS = ("pulsed", "fmcw", "bpsk", "amdsb", "amssb", "ask")
SIGNALS = (
    "Airborne-detection",
    "Airborne-range",
    "Air-Ground-MTI",
    "Ground mapping",
    "Radar-Altimeter",
    "Satcom",
    "AM radio",
    "short-range",
)
TASKS = (
    tasks_lib.TaskSpec("modulation", tasks_lib.CLASSIFICATION, len(MODULATIONS), tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("signal", tasks_lib.CLASSIFICATION, len(SIGNALS), tasks_lib.ACCURACY),
    tasks_lib.TaskSpec("anomaly", tasks_lib.CLASSIFICATION, 2, tasks_lib.ACCURACY),
)

DEFAULT_ANOMALY_SNR_DB = 10


def anomaly_label(snr_db, threshold_db: float = DEFAULT_ANOMALY_SNR_DB):
    """The derived anomaly task (shared with the synthetic generator): 1 where SNR >= threshold."""
    return (np.asarray(snr_db) >= threshold_db).astype(np.int64)


SOURCE_FILENAME = "RadComDynamic.hdf5"
NUM_SAMPLES = 128
FIELDS = ("iq", "modulation", "signal", "snr", "anomaly")

DESCRIPTION = (
    "RadComDynamic (Jagannath & Jagannath, ICC 2021): I/Q snapshots [128, 2] with modulation, "
    "signal and SNR labels, a derived anomaly label (snr >= threshold) and a seeded hash split."
)
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Obtain RadComDynamic.hdf5 from the authors' dataset page (Jagannath &
Jagannath, ICC 2021; license CC BY-NC-SA 4.0, so it is never shipped here) and
pass the folder that holds it (or the file itself) as the manual dir
(--data_dir).
"""


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings that change the built data (and so name the build).

    Attributes:
      anomaly_snr_db: ``anomaly = 1`` when ``snr >= anomaly_snr_db``.
      test_fraction: share of examples in the held-out split, in (0, 1).
      split_seed: seed of the hash that assigns examples to splits.
    """

    anomaly_snr_db: int = DEFAULT_ANOMALY_SNR_DB
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if int(self.anomaly_snr_db) != self.anomaly_snr_db or int(self.split_seed) != self.split_seed:
            raise ValueError("anomaly_snr_db and split_seed must be integers")

    @property
    def config_name(self) -> str:
        return f"anomaly_snr{int(self.anomaly_snr_db)}_test{self.test_fraction:g}_seed{int(self.split_seed)}"


def parse_key(key: str, where: str) -> tuple[str, str, int, int]:
    """Parses ``"('bpsk', 'Satcom', -10, 0)"`` without evaluating anything.

    Args:
      key: an HDF5 key.
      where: the file, for error messages.

    Returns:
      ``(modulation, signal, snr, index)``.

    Raises:
      DataError: the key is not a tuple literal of (str, str, int, int).
    """
    bad = loaders.DataError(
        f"{where}: key {key!r} is not a tuple literal (modulation: str, signal: str, snr: int, index: int)"
    )
    try:
        node = ast.parse(key.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        raise bad from None
    if not isinstance(node, ast.Tuple) or len(node.elts) != 4:
        raise bad
    kinds = (str, str, int, int)
    for elt, kind in zip(node.elts, kinds, strict=True):
        # Negative ints parse as a unary minus applied to a constant.
        if kind is int and isinstance(elt, ast.UnaryOp) and isinstance(elt.op, ast.USub):
            elt = elt.operand
        if not (isinstance(elt, ast.Constant) and type(elt.value) is kind):
            raise bad
    # Safe now: the tree holds only a tuple of constants.
    return ast.literal_eval(node)


def labels_of(parsed: tuple[str, str, int, int], where: str, key: str) -> tuple[int, int]:
    """Modulation and signal indices of a parsed key, or a DataError."""
    modulation, signal, _, _ = parsed
    if modulation not in MODULATIONS:
        raise loaders.DataError(
            f"{where}: key {key!r}: unknown modulation {modulation!r} (known: {', '.join(MODULATIONS)})"
        )
    if signal not in SIGNALS:
        raise loaders.DataError(f"{where}: key {key!r}: unknown signal {signal!r} (known: {', '.join(SIGNALS)})")
    return MODULATIONS.index(modulation), SIGNALS.index(signal)


def is_test(parsed: tuple[str, str, int, int], options: Options) -> bool:
    """Whether an example is held out: a seeded hash of its identity, not of its position."""
    text = "|".join(str(v) for v in (options.split_seed, *parsed))
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return value < options.test_fraction * 2.0**64


def _open(path: str) -> Any:
    import h5py  # about 0.1 s to import: only when reading

    if not os.path.isfile(path):
        raise loaders.DataError(f"{path}: RadComDynamic file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise loaders.DataError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None


def read_index(path: str) -> list[tuple[str, tuple[str, str, int, int]]]:
    """Validates every key of the file (values are checked while building).

    Returns:
      ``(key, (modulation, signal, snr, index))`` pairs sorted by labels, SNR
      and index.

    Raises:
      DataError: the file is missing or not HDF5, a key is malformed or
        unknown, a member is not a dataset, or two keys name one example.
    """
    import h5py  # about 0.1 s to import: only when reading

    with _open(path) as f:
        entries, seen = [], {}
        for key in f.keys():
            parsed = parse_key(key, path)
            labels_of(parsed, path, key)
            if parsed in seen:
                raise loaders.DataError(f"{path}: keys {seen[parsed]!r} and {key!r} name the same example")
            seen[parsed] = key
            if f.get(key, getclass=True) is not h5py.Dataset:
                raise loaders.DataError(f"{path}: key {key!r} is not a dataset")
            entries.append((key, parsed))
    if not entries:
        raise loaders.DataError(f"{path}: holds no examples")
    order = {m: i for i, m in enumerate(MODULATIONS)} | {s: i for i, s in enumerate(SIGNALS)}
    entries.sort(key=lambda e: (order[e[1][0]], order[e[1][1]], e[1][2], e[1][3]))
    return entries


def read_iq(f: Any, key: str, where: str) -> np.ndarray:
    """Reads one example's 256 floats as ``[128, 2]`` float32 (I, Q).

    Raises:
      DataError: unreadable, not 256 real numbers, or not finite.
    """
    try:
        value = np.asarray(f[key][()])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise loaders.DataError(f"{where}: key {key!r}: cannot read ({str(e).splitlines()[0]})") from None
    if value.dtype.kind not in "fiu":
        raise loaders.DataError(f"{where}: key {key!r}: values are {value.dtype}, expected real numbers")
    if value.size != 2 * NUM_SAMPLES:
        raise loaders.DataError(f"{where}: key {key!r}: has {value.size} values, expected {2 * NUM_SAMPLES} (I then Q)")
    flat = value.reshape(-1).astype(np.float32)
    if not np.all(np.isfinite(flat)):
        raise loaders.DataError(f"{where}: key {key!r}: contains NaN or infinite values")
    return np.stack([flat[:NUM_SAMPLES], flat[NUM_SAMPLES:]], axis=1)


def source_fingerprint(path: str) -> str:
    """Identity of the raw file: a SHA-256 of its contents."""
    if not os.path.isfile(path):
        raise loaders.DataError(f"{path}: RadComDynamic file does not exist")
    return loaders.file_digest([path], extra="radcom_dynamic")


@functools.cache
def _builder_class() -> type:
    from etils import epath
    import tensorflow_datasets as tfds  # slow to import: only when a builder is needed

    @dataclasses.dataclass
    class RadcomConfig(tfds.core.BuilderConfig):
        """Builder config holding :class:`Options`."""

        options: Options = Options()

    class RadcomDynamic(tfds.core.GeneratorBasedBuilder):
        """RadComDynamic I/Q snapshots with modulation, signal, SNR and derived anomaly labels."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "I/Q [128, 2], hash split, anomaly = snr >= threshold."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
        # TFDS derives this from the package with importlib_resources, which tfds 4.9.10 imports
        # but does not install on Python >= 3.9; a plain path avoids that.
        code_path = epath.Path(__file__)
        BUILDER_CONFIGS = [RadcomConfig(name=Options().config_name, description="default rule and split")]
        # The raw file inside the manual dir; an instance may point elsewhere.
        source_filename = SOURCE_FILENAME

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{DESCRIPTION} Config: {self.builder_config.options}.",
                features=tfds.features.FeaturesDict(
                    {
                        "iq": tfds.features.Tensor(shape=(NUM_SAMPLES, 2), dtype=np.float32, encoding="bytes"),
                        "modulation": tfds.features.ClassLabel(names=MODULATIONS),
                        "signal": tfds.features.ClassLabel(names=SIGNALS),
                        "snr": tfds.features.Scalar(dtype=np.int64),
                        "anomaly": tfds.features.ClassLabel(names=("normal", "anomaly")),
                    }
                ),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            path = os.path.join(loaders.manual_dir(dl_manager), self.source_filename)
            options = self.builder_config.options
            # Validate every key before writing anything.
            entries = read_index(path)
            self.info.metadata[loaders.FINGERPRINT_KEY] = source_fingerprint(path)
            test = [e for e in entries if is_test(e[1], options)]
            train = [e for e in entries if not is_test(e[1], options)]
            return {
                "train": self._generate_examples(path, train),
                "test": self._generate_examples(path, test),
            }

        def _generate_examples(self, path, entries):
            threshold = self.builder_config.options.anomaly_snr_db
            with _open(path) as f:
                for key, parsed in entries:
                    modulation, signal = labels_of(parsed, path, key)
                    snr = parsed[2]
                    yield (
                        key,
                        {
                            "iq": read_iq(f, key, path),
                            "modulation": modulation,
                            "signal": signal,
                            "snr": snr,
                            "anomaly": int(anomaly_label(snr, threshold)),
                        },
                    )

    for cls, name in ((RadcomConfig, "RadcomConfig"), (RadcomDynamic, "RadcomDynamic")):
        cls.__module__, cls.__qualname__ = __name__, name
    return RadcomDynamic


def __getattr__(name: str) -> Any:
    # The builder class needs tensorflow_datasets; create it on first access.
    if name == "RadcomDynamic":
        return _builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def builder(build_dir: str | None = None, **options: Any) -> Any:
    """The ``radcom_dynamic`` TFDS builder for the given :class:`Options`.

    Args:
      build_dir: where the ArrayRecord files go (default: TFDS's data dir).
      **options: fields of :class:`Options`.
    """
    opts = Options(**options)
    cls = _builder_class()
    config = cls.BUILDER_CONFIGS[0]
    if opts != config.options:
        config = type(config)(name=opts.config_name, options=opts)
    return cls(data_dir=build_dir or loaders.default_build_dir(), config=config, file_format="array_record")


def load_pools(
    data_dir: str, build_dir: str | None = None, **options: Any
) -> tuple[pool_lib.ExamplePool, pool_lib.ExamplePool]:
    """Builds RadComDynamic once and reads its hash split.

    Args:
      data_dir: the folder holding ``RadComDynamic.hdf5``, or the file itself.
      build_dir: where the TFDS build lives (see :func:`loaders.default_build_dir`).
      **options: fields of :class:`Options` (``anomaly_snr_db``,
        ``test_fraction``, ``split_seed``).

    Returns:
      ``(train_pool, test_pool)`` with x ``[N, 128, 2]`` and the tasks in
      :data:`TASKS`.
    """
    if os.path.isfile(data_dir):
        manual, filename = os.path.split(os.path.abspath(data_dir))
    else:
        manual, filename = loaders.check_dir(data_dir, "RadComDynamic folder"), SOURCE_FILENAME
    fingerprint = source_fingerprint(os.path.join(manual, filename))

    def make_builder():
        b = builder(build_dir, **options)
        b.source_filename = filename
        return b

    b = loaders.prepare(make_builder, manual, fingerprint)
    return tuple(_to_pool(loaders.read_split(b, split, FIELDS)) for split in ("train", "test"))


def _to_pool(columns: dict[str, np.ndarray]) -> pool_lib.ExamplePool:
    targets = {t.name: columns[t.name].astype(np.float32)[:, None] for t in TASKS}
    return pool_lib.ExamplePool(x=columns["iq"].astype(np.float32), targets=targets, tasks=TASKS)
