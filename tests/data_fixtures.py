"""Miniature MTFL and RadComDynamic files in exactly the real on-disk formats.

MTFL: JPEG faces in ``lfw_5590/``, ``net_7876/`` and ``AFLW/``, annotation
lines ``path x1..x5 y1..y5 gender smile glasses pose`` with Windows
separators, CRLF line ends and a last line holding one space.
RadComDynamic: one HDF5 file with one dataset per example, keyed by the
``str()`` of ``(modulation, signal, snr, index)``, 256 floats (I then Q).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import h5py
import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------- MTFL

# (folder, image size, colour mode, file name pattern) like the real folders.
_MTFL_SOURCES = (
    ("lfw_5590", (250, 250), "RGB", "Person_Name_{:04d}.jpg"),
    ("net_7876", (160, 120), "RGB", "{:04d}.jpg"),
    ("AFLW", (180, 220), "L", "image{:05d}.jpg"),
)


@dataclasses.dataclass
class FaceRecord:
    """One annotation line: Windows path, landmarks in pixels, 1-based attributes."""

    path: str
    x: list[float]
    y: list[float]
    attributes: tuple[int, int, int, int]  # gender, smile, glasses, pose (1-based)

    def line(self) -> str:
        coords = " ".join(f"{v:g}" for v in [*self.x, *self.y])
        # The real files start each line with a space.
        return f" {self.path} {coords} {' '.join(str(a) for a in self.attributes)}"


def draw_face(size: tuple[int, int], mode: str, x: list[float], y: list[float], rng: np.random.Generator):
    """A face-like picture: noisy background, a skin ellipse, dark eyes, nose and mouth."""
    w, h = size
    noise = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(im)
    cx, cy = np.mean(x[:2]), np.mean(y)
    rx, ry = 1.1 * (max(x) - min(x)), 1.2 * (max(y) - min(y))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(210, 170, 140))
    for px, py in zip(x, y, strict=True):
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(30, 20, 20))
    return im.convert(mode)


def random_face(size: tuple[int, int], rng: np.random.Generator) -> tuple[list[float], list[float]]:
    """Plausible landmarks (eyes, nose, mouth corners) inside an image of ``size``."""
    w, h = size
    s = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.55) * h
    dx = np.array([-0.2, 0.2, 0.0, -0.15, 0.15])
    dy = np.array([-0.1, -0.1, 0.08, 0.25, 0.25])
    jitter = rng.normal(0, 0.01 * s, size=(2, 5))
    # Quarter pixels, like the real files (e.g. 107.25).
    x = np.round(4 * (cx + s * dx + jitter[0])) / 4
    y = np.round(4 * (cy + s * dy + jitter[1])) / 4
    return x.tolist(), y.tolist()


def write_annotations(root: str, filename: str, lines: list[str], trailing_space_line: bool = True) -> str:
    """Writes an annotation file with CRLF line ends (and the final ``" "`` line)."""
    text = "\r\n".join(lines + ([" "] if trailing_space_line else [])) + "\r\n"
    path = os.path.join(root, filename)
    with open(path, "w", newline="") as f:
        f.write(text)
    return path


def write_mtfl(root: str, num_train: int = 12, num_test: int = 4, seed: int = 0) -> dict[str, list[FaceRecord]]:
    """Writes a miniature MTFL folder under ``root``.

    Returns:
      ``{"train": records, "test": records}`` in file order.
    """
    rng = np.random.default_rng(seed)
    for folder, *_ in _MTFL_SOURCES:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    records: dict[str, list[FaceRecord]] = {"train": [], "test": []}
    for i in range(num_train + num_test):
        folder, size, mode, pattern = _MTFL_SOURCES[i % len(_MTFL_SOURCES)]
        name = pattern.format(i + 1)
        x, y = random_face(size, rng)
        draw_face(size, mode, x, y, rng).save(os.path.join(root, folder, name), quality=90)
        attributes = (
            int(rng.integers(1, 3)),
            int(rng.integers(1, 3)),
            int(rng.integers(1, 3)),
            int(rng.integers(1, 6)),
        )
        split = "train" if i < num_train else "test"
        records[split].append(FaceRecord(f"{folder}\\{name}", x, y, attributes))
    write_annotations(root, "training.txt", [r.line() for r in records["train"]])
    write_annotations(root, "testing.txt", [r.line() for r in records["test"]])
    return records


def write_flat_image(root: str, rel_path: str, size: tuple[int, int], value: int) -> None:
    """A uniform grayscale JPEG (exact pixel values survive JPEG compression)."""
    Image.new("L", size, value).save(os.path.join(root, *rel_path.split("/")), quality=95)


# -------------------------------------------------------------- RadComDynamic

# (modulation, signal) pairs present in the real file.
RADCOM_PAIRS = (
    ("pulsed", "Airborne-detection"),
    ("pulsed", "Airborne-range"),
    ("pulsed", "Air-Ground-MTI"),
    ("pulsed", "Ground mapping"),
    ("fmcw", "Radar-Altimeter"),
    ("bpsk", "Satcom"),
    ("amdsb", "AM radio"),
    ("amssb", "AM radio"),
    ("ask", "short-range"),
)


def waveform(modulation: str, snr_db: float, rng: np.random.Generator, n: int = 128) -> np.ndarray:
    """A unit-power complex baseband snapshot of ``modulation`` with AWGN at ``snr_db``."""
    t = np.arange(n)
    if modulation == "pulsed":
        s = ((t % 32) < 6).astype(complex) * np.exp(2j * np.pi * 0.05 * t)
    elif modulation == "fmcw":
        s = np.exp(1j * np.pi * 0.002 * (t % 64) ** 2)
    elif modulation == "bpsk":
        s = np.repeat(rng.choice([-1.0, 1.0], n // 8), 8).astype(complex)
    elif modulation == "amdsb":
        s = (1 + 0.5 * np.cos(2 * np.pi * 0.02 * t)).astype(complex)
    elif modulation == "amssb":
        s = np.exp(2j * np.pi * 0.02 * t)
    elif modulation == "ask":
        s = np.repeat(rng.choice([0.2, 1.0], n // 8), 8).astype(complex)
    else:
        raise ValueError(modulation)
    # Random complex gain (a crude fading channel) and unit power.
    s = s * rng.normal() * np.exp(2j * np.pi * rng.uniform())
    s = s / np.sqrt(np.mean(np.abs(s) ** 2) + 1e-12)
    noise_std = np.sqrt(10 ** (-snr_db / 10) / 2)
    return s + noise_std * (rng.normal(size=n) + 1j * rng.normal(size=n))


def radcom_value(modulation: str, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """The stored layout: 256 floats, I = [0:128], Q = [128:256]."""
    s = waveform(modulation, snr_db, rng)
    return np.concatenate([s.real, s.imag])


def write_radcom(
    path: str,
    snrs: tuple[int, ...] = (-10, 0, 10, 18),
    per_snr: int = 2,
    seed: int = 0,
    dtype: type = np.float32,
    extra: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Writes a miniature RadComDynamic.hdf5.

    Args:
      path: the file to write.
      snrs: SNR levels (dB) per (modulation, signal) pair.
      per_snr: snapshots per (pair, SNR).
      seed: random seed.
      dtype: stored value dtype.
      extra: additional raw key -> value members (for malformed files).

    Returns:
      Key -> stored value (256 floats), for every member written.
    """
    rng = np.random.default_rng(seed)
    values = {}
    for modulation, signal in RADCOM_PAIRS:
        for snr in snrs:
            for index in range(per_snr):
                values[str((modulation, signal, snr, index))] = radcom_value(modulation, snr, rng).astype(dtype)
    values.update(extra or {})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in values.items():
            f.create_dataset(key, data=value)
    return values


# ------------------------------------------------------------------- helpers


def tree_digest(root: str) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (to show the source is untouched)."""
    out = {}
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {root: hashlib.sha256(f.read()).hexdigest()}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def leftovers(build_dir: str) -> list[str]:
    """Files or folders of unfinished TFDS builds (``incomplete.*``) under ``build_dir``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(build_dir):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if "incomplete" in n]
    return found
