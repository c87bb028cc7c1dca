"""Wireless uplink models for over-the-air (OTA) aggregation, vectorised over clients and clusters.

The system model of HOTA-FedGradNorm (Mortaheb, Vahapoglu, Ulukus,
"Personalized Federated Multi-Task Learning over Wireless Fading Channels",
Algorithms 15(11):421, 2022; arXiv 2212.07414) as reconstructed in
docs/hota.md from the standard AirComp models:

* truncated channel inversion, BAA (Zhu, Wang, Huang, arXiv 1812.11494):
  ``h_th^2 = -beta_ref ln q``, ``a = 1{|h| >= h_th}``;
* the peak-power precoder ``alpha = P0 d / max ||Delta||^2`` of COTAF (Sery,
  Shlezinger, Cohen, Eldar, TSP 2021), giving the IS estimate noise
  ``s_c = max ||Delta|| / (h_ref K_c sqrt(d SNR))``;
* phase-only correction, GBMA (Sery & Cohen, TSP 2020): ``a = |h| / E|h|``;
* blind multi-antenna combining at the PS (HOTAFL, Aygun, Kazemi, Gunduz,
  Duman, arXiv 2207.09232; Blind FEEL): ``b_c = ||g_c||^2 / (M beta_bar)``.

Every function is pure array math over a leading client axis ``[C]`` or
cluster axis ``[K]`` (no Python loop over either), so it runs inside the
jitted round. SNRs are linear powers per entry (``db_to_linear``); an
infinite SNR means no receiver noise at all (the noise is exactly zero).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FADINGS = ("none", "rayleigh", "rician")
POWER_CONTROLS = ("tci", "phase")


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
    """Static channel settings (they fix shapes and the program).

    The float knobs (``snr_db``, ``ps_snr_db``, ``truncation_q``,
    ``rician_k``) are :class:`fgn_jax.algorithms.HParams` leaves instead, so
    a sweep can vmap over them.

    Attributes:
      fading: small-scale fading of every link: ``none``, ``rayleigh``
        (``CN(0, beta)``) or ``rician`` (LoS + scatter, factor ``rician_k``).
      power_control: ``tci`` (truncated channel inversion) or ``phase``
        (phase-only correction).
      ps_antennas: M, receive antennas of the PS (hierarchical only).
      num_clusters: clusters (one intermediate server each); 1 for one hop.
      cluster_rounds: E, intra-cluster rounds per global round.
      path_loss_exponent: ``beta = distance^(-exponent)``.
      channel_aware: the weighting sees the effective channel gain (False:
        channel-unaware GradNorm, gain 1 in the weight step).
    """

    fading: str = "rayleigh"
    power_control: str = "tci"
    ps_antennas: int = 16
    num_clusters: int = 1
    cluster_rounds: int = 1
    path_loss_exponent: float = 2.0
    channel_aware: bool = True

    def __post_init__(self):
        if self.fading not in FADINGS:
            raise ValueError(f"unknown fading {self.fading!r}; choose one of {FADINGS}")
        if self.power_control not in POWER_CONTROLS:
            raise ValueError(f"unknown power control {self.power_control!r}; choose one of {POWER_CONTROLS}")
        if self.ps_antennas < 1 or self.num_clusters < 1 or self.cluster_rounds < 1:
            raise ValueError("ps_antennas, num_clusters and cluster_rounds must be >= 1")


def db_to_linear(db) -> jax.Array:
    """``10^(db/10)``; ``inf`` dB stays ``inf`` (no noise)."""
    return jnp.power(10.0, jnp.asarray(db, jnp.float32) / 10.0)


def path_gain(distance, exponent: float) -> jax.Array:
    """Large-scale gain ``beta = d^(-exponent)`` (``[C]`` from ``[C]`` distances)."""
    return jnp.power(jnp.asarray(distance, jnp.float32), -exponent)


def draw_fading(key, beta, fading: str, rician_k, extra_shape: tuple[int, ...] = ()) -> jax.Array:
    """Complex channel coefficients with ``E|h|^2 = beta``.

    Args:
      key: PRNG key.
      beta: ``[N]`` large-scale gains.
      fading: one of :data:`FADINGS`. ``none``: ``h = sqrt(beta)``;
        ``rayleigh``: ``CN(0, beta)``; ``rician``: a line-of-sight part of
        power ``beta K / (K + 1)`` (phase 0) plus ``CN(0, beta / (K + 1))``.
      rician_k: Rician K factor (linear, may be traced).
      extra_shape: trailing axes of independent draws (e.g. ``(M,)`` antennas).

    Returns:
      ``[N, *extra_shape]`` complex64.
    """
    beta = jnp.asarray(beta, jnp.float32)
    shape = beta.shape + tuple(extra_shape)
    scale = jnp.sqrt(beta).reshape(beta.shape + (1,) * len(extra_shape))
    if fading == "none":
        return jnp.broadcast_to(scale, shape).astype(jnp.complex64)
    kr, ki = jax.random.split(key)
    scatter = (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)) / jnp.sqrt(2.0)
    if fading == "rayleigh":
        return (scale * scatter).astype(jnp.complex64)
    k = jnp.asarray(rician_k, jnp.float32)
    los = jnp.sqrt(k / (k + 1.0))
    return (scale * (los + scatter / jnp.sqrt(k + 1.0))).astype(jnp.complex64)


def mean_abs(beta, fading: str, rician_k) -> jax.Array:
    """``E|h|`` of :func:`draw_fading`'s channel.

    ``none``: ``sqrt(beta)``; ``rayleigh``: ``sqrt(pi beta) / 2``; ``rician``:
    ``sqrt(pi beta / (4 (K+1))) L_{1/2}(-K)`` with the Laguerre polynomial
    ``L_{1/2}(-K) = e^{-K/2} [(1+K) I0(K/2) + K I1(K/2)]`` (written with the
    exponentially scaled Bessel functions, so it is stable for large K).
    """
    beta = jnp.asarray(beta, jnp.float32)
    if fading == "none":
        return jnp.sqrt(beta)
    if fading == "rayleigh":
        return jnp.sqrt(jnp.pi * beta) / 2.0
    k = jnp.asarray(rician_k, jnp.float32)
    laguerre = (1.0 + k) * jax.scipy.special.i0e(k / 2.0) + k * jax.scipy.special.i1e(k / 2.0)
    return jnp.sqrt(jnp.pi * beta / (4.0 * (k + 1.0))) * laguerre


def power_control_gains(h_abs, beta_ref, power_control: str, truncation_q, fading: str, rician_k):
    """Per-client effective gains ``a`` and the IS's reference amplitude ``h_ref``.

    Every client of a receiver aligns to one reference set by the reference
    large-scale gain ``beta_ref`` (the mean over the clients): with path
    loss, far clients are truncated more often (tci) or arrive weaker
    (phase), which is what a channel-aware weighting can compensate.

    * ``tci``: ``h_th^2 = -beta_ref ln q``; ``a = 1{|h| >= h_th}``; ``h_ref = h_th``
      (a client with ``beta = beta_ref`` under Rayleigh fading participates
      with probability q).
    * ``phase``: ``h_ref = E|h|`` at ``beta_ref``; ``a = |h| / h_ref``.

    Args:
      h_abs: ``[C]`` channel magnitudes.
      beta_ref: scalar reference gain.
      power_control: one of :data:`POWER_CONTROLS`.
      truncation_q: non-truncation probability q in (0, 1].
      fading, rician_k: as in :func:`draw_fading` (for ``E|h|``).

    Returns:
      ``(a [C], h_ref [])``.
    """
    if power_control == "tci":
        h_th = jnp.sqrt(-beta_ref * jnp.log(jnp.asarray(truncation_q, jnp.float32)))
        return (h_abs >= h_th).astype(jnp.float32), h_th
    h_ref = mean_abs(beta_ref, fading, rician_k)
    return h_abs / h_ref, h_ref


def _inv_sqrt(snr) -> jax.Array:
    # 1/sqrt(SNR), exactly 0 for SNR = inf (no noise).
    return jax.lax.rsqrt(jnp.asarray(snr, jnp.float32))


def is_noise_std(max_norm, h_ref, num_sent, dim: int, snr) -> jax.Array:
    """Std of the IS estimate noise, ``s_c = max||Delta|| / (h_ref K_c sqrt(d SNR))``.

    Zero where ``SNR = inf`` or no client was received (``K_c = 0``: the
    cluster skips its update).

    Args:
      max_norm: ``[K]`` largest transmitted update norm in each cluster.
      h_ref: reference amplitude (scalar or ``[K]``).
      num_sent: ``[K]`` K_c, clients received by each IS.
      dim: d, entries of one update.
      snr: linear per-entry SNR ``P0 / sigma^2`` (may be ``inf``).
    """
    inv = _inv_sqrt(snr)
    ok = (inv > 0) & (num_sent > 0)
    denom = jnp.where(ok, h_ref * jnp.maximum(num_sent, 1.0) * jnp.sqrt(float(dim)), 1.0)
    return jnp.where(ok, max_norm * inv / denom, 0.0)


def blind_gain(key, beta, beta_bar, num_antennas: int, fading: str, rician_k) -> jax.Array:
    """PS blind-combining gains ``b_c = ||g_c||^2 / (M beta_bar)``, ``g_c`` of ``E|g|^2 = beta_c`` per antenna.

    Under Rayleigh fading ``b_c ~ Gamma(M, beta_c / M) / beta_bar``: mean
    ``beta_c / beta_bar``, variance ``beta_c^2 / (M beta_bar^2)`` (channel
    hardening as M grows).

    Args:
      key: PRNG key.
      beta: ``[K]`` IS -> PS large-scale gains.
      beta_bar: scalar normalisation (the mean of ``beta``).
      num_antennas: M.
      fading, rician_k: as in :func:`draw_fading`.

    Returns:
      ``[K]`` float32.
    """
    g = draw_fading(key, beta, fading, rician_k, (num_antennas,))
    return jnp.sum(jnp.real(g * jnp.conj(g)), axis=-1) / (num_antennas * beta_bar)


def ps_noise_std(max_norm, num_clusters: int, num_antennas: int, beta_bar, dim: int, snr) -> jax.Array:
    """Std of the PS noise, ``max_c ||Delta_c|| / sqrt(C M beta_bar d SNR_PS)`` (0 for ``SNR_PS = inf``)."""
    inv = _inv_sqrt(snr)
    return jnp.where(inv > 0, max_norm * inv / jnp.sqrt(num_clusters * num_antennas * beta_bar * float(dim)), 0.0)


def cluster_of(client_id, mask, num_clusters: int) -> jax.Array:
    """``[C]`` cluster of each client slot: the real clients split into equal contiguous blocks of ids.

    Client ``j`` of ``n`` real ones is in cluster ``j K // n`` (with ``n = K T``
    and round-robin tasks that is client (c, i) = (j // T, j % T)). Padding
    slots (mask 0) are put in the last cluster; they never transmit.
    """
    n = jnp.maximum(jnp.sum(mask), 1.0).astype(jnp.int32)
    return jnp.minimum(client_id * num_clusters // n, num_clusters - 1)
