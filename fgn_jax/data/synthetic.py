"""Synthetic stand-ins for MTFL and RadComDynamic, generated from a seed.

Both are the default data, so a new user can run everything at once; their
labels are really learnable from the inputs (tests/test_learnable.py trains a
trunk and head on each task and beats chance on held-out data).

``synthetic_mtfl``: 40x40 grayscale faces drawn from five landmarks and four
attributes. Head pose (5 classes) sets the yaw: the face outline narrows and
shifts, eyes, nose and mouth move toward the turned side. Smiling bends the
mouth into a U and lifts its corners; glasses draw dark rings around the eyes
and a bridge; gender sets the hair (short on top vs long down both sides).
Scale, position, in-plane rotation, skin and background brightness, lighting
gradient and pixel noise vary per face. Landmarks are in MTFL's order (x1..x5,
y1..y5: left eye, right eye, nose, left and right mouth corner), normalised
by the image size to [0, 1].

``synthetic_radcom``: 128-sample complex baseband bursts (10 MS/s) of the six
RadComDynamic modulation kinds and eight signal classes, with parameters set
by the class (pulse width and repetition interval per radar, chirp rate of
the altimeter, symbol rates and message tones of the communication signals),
then a Rician multipath channel (K = 3, taps at 0, 1, 2 samples with
magnitudes 1, 0.5, 0.5), a random carrier frequency offset and phase, and
AWGN at an SNR drawn from -20..18 dB in 2 dB steps. The derived ``anomaly``
task labels a burst anomalous when its SNR is at least ``anomaly_snr_db``
(default 10 dB: an unusually strong emitter), the same rule as the real
loader.
"""

from __future__ import annotations

import numpy as np

from fgn_jax.data import mtfl, radcom
from fgn_jax.data import pool as pool_lib

IMAGE_SIZE = 40

MTFL_TASKS = mtfl.TASKS

MODULATIONS = radcom.MODULATIONS
SIGNALS = radcom.SIGNALS
# (modulation, signal) pairs that exist, as in RadComDynamic.
WAVEFORMS = (
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
SNRS_DB = tuple(range(-20, 20, 2))
DEFAULT_ANOMALY_SNR_DB = radcom.DEFAULT_ANOMALY_SNR_DB
RADCOM_TASKS = radcom.TASKS


# ---------------------------------------------------------------------- MTFL
# Frontal landmark template (pixels, relative to the face centre) and the
# depth of each point, which makes it move sideways with the yaw.
_TEMPLATE = np.array([[-7.0, -5.0], [7.0, -5.0], [0.0, 2.0], [-6.0, 8.5], [6.0, 8.5]])
_DEPTH = np.array([2.0, 2.0, 7.0, 3.0, 3.0])
_YAW_DEG = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])
_POSE_PRIOR = np.array([0.15, 0.2, 0.3, 0.2, 0.15])


def _blob(xx, yy, cx, cy, sigma):
    return np.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / (2 * sigma**2))


def _segment(xx, yy, x0, y0, x1, y1, sag, sigma, points=9):
    """A dark stroke: blobs along a quadratic curve from (x0,y0) to (x1,y1)."""
    out = np.zeros(xx.shape, xx.dtype)
    for t in np.linspace(-1.0, 1.0, points):
        cx = (x0 + x1) / 2 + t * (x1 - x0) / 2
        cy = (y0 + y1) / 2 + t * (y1 - y0) / 2 + sag * (1 - t**2)
        out = np.maximum(out, _blob(xx, yy, cx, cy, sigma))
    return out


def mtfl_pool(num_examples: int, seed: int) -> pool_lib.ExamplePool:
    """``num_examples`` synthetic faces with all five MTFL task labels."""
    rng = np.random.default_rng(seed)
    n = num_examples
    gender = rng.integers(0, 2, n)  # 0 male, 1 female (MTFL: 1 male, 2 female)
    smile = (rng.random(n) >= 0.45).astype(np.int64)  # 0 yes, 1 no
    glasses = (rng.random(n) >= 0.3).astype(np.int64)  # 0 yes, 1 no
    pose = rng.choice(5, size=n, p=_POSE_PRIOR)

    yaw = np.deg2rad(_YAW_DEG[pose] + rng.normal(0, 6, n))
    roll = np.deg2rad(rng.normal(0, 7, n))
    scale = rng.uniform(0.85, 1.15, n)
    centre = IMAGE_SIZE / 2 + rng.normal(0, 1.5, (n, 2))

    pts = np.repeat(_TEMPLATE[None], n, axis=0).copy()
    is_smile = smile == 0
    pts[is_smile, 3, 0] -= 1.2  # a smile widens the mouth ...
    pts[is_smile, 4, 0] += 1.2
    pts[is_smile, 3:5, 1] -= 1.5  # ... and lifts its corners
    pts[:, :, 0] = pts[:, :, 0] * np.cos(yaw)[:, None] + _DEPTH[None] * np.sin(yaw)[:, None]
    cos_r, sin_r = np.cos(roll)[:, None], np.sin(roll)[:, None]
    rx = pts[:, :, 0] * cos_r - pts[:, :, 1] * sin_r
    ry = pts[:, :, 0] * sin_r + pts[:, :, 1] * cos_r
    lx = centre[:, :1] + scale[:, None] * rx
    ly = centre[:, 1:] + scale[:, None] * ry

    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    xx = np.broadcast_to(xx, (n, IMAGE_SIZE, IMAGE_SIZE))
    yy = np.broadcast_to(yy, (n, IMAGE_SIZE, IMAGE_SIZE))

    # Background: random level plus a lighting gradient.
    grad_dir = rng.uniform(0, 2 * np.pi, n)
    bg = (
        rng.uniform(0.15, 0.55, n)[:, None, None]
        + 0.15 * (np.cos(grad_dir)[:, None, None] * (xx - 20) + np.sin(grad_dir)[:, None, None] * (yy - 20)) / 20
    )
    # Face: an ellipse that narrows with |yaw| and shifts to the turned side.
    fcx = centre[:, 0] + scale * 3.0 * np.sin(yaw)
    fcy = centre[:, 1] + scale * 1.5
    half_w = scale * 11.5 * (0.75 + 0.25 * np.cos(yaw))
    half_h = scale * 15.0
    u = (xx - fcx[:, None, None]) / half_w[:, None, None]
    v = (yy - fcy[:, None, None]) / half_h[:, None, None]
    face = 1.0 / (1.0 + np.exp((u**2 + v**2 - 1.0) * 12))
    skin = rng.uniform(0.55, 0.9, n)[:, None, None]
    img = bg * (1 - face) + skin * face

    # Hair: short on top (male) or long down both sides (female).
    hairline = fcy - half_h * 0.55
    top = 1.0 / (1.0 + np.exp((yy - hairline[:, None, None]) * 1.5)) * (np.abs(u) < 1.15)
    sides = (gender == 1)[:, None, None] * (np.abs(u) > 0.8) * (np.abs(u) < 1.45) * (v < 0.9)
    hair = np.clip(np.maximum(top * (v > -1.25), sides), 0, 1)
    hair_tone = rng.uniform(0.02, 0.25, n)[:, None, None]
    img = img * (1 - 0.9 * hair) + hair_tone * 0.9 * hair

    ink = np.zeros_like(img)
    ink = np.maximum(ink, _blob(xx, yy, lx[:, 0], ly[:, 0], 1.3 * scale[:, None, None]))
    ink = np.maximum(ink, _blob(xx, yy, lx[:, 1], ly[:, 1], 1.3 * scale[:, None, None]))
    ink = np.maximum(ink, 0.6 * _blob(xx, yy, lx[:, 2], ly[:, 2], 1.1 * scale[:, None, None]))
    sag = np.where(is_smile, 2.2, 0.3) * scale
    ink = np.maximum(ink, 0.9 * _segment(xx, yy, lx[:, 3], ly[:, 3], lx[:, 4], ly[:, 4], sag, 0.9))
    # Glasses: rings around both eyes and a bridge between them.
    has_glasses = (glasses == 0)[:, None, None]
    for e in (0, 1):
        r = np.sqrt((xx - lx[:, e, None, None]) ** 2 + (yy - ly[:, e, None, None]) ** 2)
        ring = np.exp(-(((r - 3.6 * scale[:, None, None]) / 0.55) ** 2))
        ink = np.maximum(ink, has_glasses * 0.85 * ring)
    bridge = _segment(xx, yy, lx[:, 0] + 3.2, ly[:, 0], lx[:, 1] - 3.2, ly[:, 1], 0.0, 0.5, points=5)
    ink = np.maximum(ink, has_glasses * 0.7 * bridge)
    img = img * (1 - 0.85 * ink)

    img = img + rng.normal(0, rng.uniform(0.02, 0.08, n)[:, None, None], img.shape)
    x = np.clip(img, 0, 1).astype(np.float32)[..., None]
    landmarks = (np.concatenate([lx, ly], axis=1) / IMAGE_SIZE).astype(np.float32)
    targets = {
        "landmarks": landmarks,
        "gender": gender[:, None].astype(np.float32),
        "smile": smile[:, None].astype(np.float32),
        "glasses": glasses[:, None].astype(np.float32),
        "pose": pose[:, None].astype(np.float32),
    }
    return pool_lib.ExamplePool(x=x, targets=targets, tasks=MTFL_TASKS)


# -------------------------------------------------------------------- RadCom
NUM_SAMPLES = 128
# Pulse width and repetition interval (samples) of each pulsed radar.
_PULSED = {
    "Airborne-detection": (10, 64),
    "Airborne-range": (3, 16),
    "Air-Ground-MTI": (6, 32),
    "Ground mapping": (20, 48),
}


def _waveform(rng: np.random.Generator, modulation: str, signal: str) -> np.ndarray:
    t = np.arange(NUM_SAMPLES)
    if modulation == "pulsed":
        width, pri = _PULSED[signal]
        width = max(1, width + rng.integers(-1, 2))
        on = ((t + rng.integers(0, pri)) % pri) < width
        return on * np.exp(2j * np.pi * rng.uniform(-0.02, 0.02) * t)
    if modulation == "fmcw":
        period = 64
        phase_t = (t + rng.integers(0, period)) % period
        rate = rng.uniform(0.004, 0.006)  # cycles/sample^2: a 0.25-0.4 bandwidth sweep per period
        return np.exp(2j * np.pi * (-0.15 * phase_t + 0.5 * rate * phase_t**2))
    if modulation == "bpsk":
        sps = 4
        bits = rng.integers(0, 2, NUM_SAMPLES // sps + 2) * 2 - 1
        return np.repeat(bits, sps)[rng.integers(0, sps) :][:NUM_SAMPLES].astype(complex)
    if modulation == "ask":
        sps = 8
        levels = rng.integers(0, 2, NUM_SAMPLES // sps + 2).astype(float)
        return np.repeat(levels, sps)[rng.integers(0, sps) :][:NUM_SAMPLES] + 0j
    # AM radio: a message of a few tones.
    freqs = rng.uniform(0.01, 0.05, 3)
    msg = np.sum(np.cos(2 * np.pi * freqs[:, None] * t + rng.uniform(0, 2 * np.pi, (3, 1))), axis=0) / 3
    if modulation == "amdsb":
        return (1.0 + 0.8 * msg) + 0j
    # Single sideband: the analytic signal of the message (upper sideband).
    spectrum = np.fft.fft(msg)
    h = np.zeros(NUM_SAMPLES)
    h[0] = 1
    h[1 : NUM_SAMPLES // 2] = 2
    h[NUM_SAMPLES // 2] = 1
    return np.fft.ifft(spectrum * h)


def _channel(rng: np.random.Generator, s: np.ndarray, snr_db: float) -> np.ndarray:
    k = 3.0  # Rician K factor
    taps = np.array([1.0, 0.5, 0.5])
    los = np.sqrt(k / (k + 1))
    scatter = np.sqrt(1 / (2 * (k + 1))) * (rng.normal(size=3) + 1j * rng.normal(size=3))
    h = taps * (los * np.exp(1j * rng.uniform(0, 2 * np.pi)) * np.array([1, 0, 0]) + scatter)
    y = np.convolve(s, h)[:NUM_SAMPLES]
    t = np.arange(NUM_SAMPLES)
    y = y * np.exp(2j * np.pi * rng.uniform(-0.005, 0.005) * t)  # carrier frequency offset
    y = y / np.sqrt(np.mean(np.abs(y) ** 2) + 1e-12)
    noise_std = np.sqrt(10 ** (-snr_db / 10) / 2)
    return y + noise_std * (rng.normal(size=NUM_SAMPLES) + 1j * rng.normal(size=NUM_SAMPLES))


def radcom_pool(num_examples: int, seed: int, anomaly_snr_db: float = DEFAULT_ANOMALY_SNR_DB) -> pool_lib.ExamplePool:
    """``num_examples`` synthetic bursts with modulation, signal and anomaly labels."""
    rng = np.random.default_rng(seed)
    waveform = rng.integers(0, len(WAVEFORMS), num_examples)
    snr = rng.choice(SNRS_DB, num_examples)
    x = np.zeros((num_examples, NUM_SAMPLES, 2), np.float32)
    for i in range(num_examples):
        mod, sig = WAVEFORMS[waveform[i]]
        y = _channel(rng, _waveform(rng, mod, sig), snr[i])
        x[i, :, 0], x[i, :, 1] = y.real, y.imag
    mod_idx = np.array([MODULATIONS.index(WAVEFORMS[w][0]) for w in waveform])
    sig_idx = np.array([SIGNALS.index(WAVEFORMS[w][1]) for w in waveform])
    targets = {
        "modulation": mod_idx[:, None].astype(np.float32),
        "signal": sig_idx[:, None].astype(np.float32),
        "anomaly": radcom.anomaly_label(snr, anomaly_snr_db)[:, None].astype(np.float32),
    }
    return pool_lib.ExamplePool(x=x, targets=targets, tasks=RADCOM_TASKS)


POOLS = {"synthetic_mtfl": mtfl_pool, "synthetic_radcom": radcom_pool}
