"""Integer noise and encoding for distributed DP through secure aggregation (mod 2^b).

Each client clips its update to L2 norm ``C``, multiplies it by the scale ``γ``, rounds
it to integers, adds its share of integer noise and reduces mod ``2^b``; secure
aggregation sums the vectors mod ``2^b``; the server reads the sum as a centred integer
in ``[-2^(b-1), 2^(b-1))`` and divides by ``γ``. This module holds that arithmetic
(numpy only); the privacy accounting is in :mod:`flower_privacy.dp.discrete_accounting`.

Papers:

* Skellam: Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
  Federated Learning", NeurIPS 2021, https://arxiv.org/abs/2110.04995.
* Distributed discrete Gaussian (DDG), conditional randomised rounding: Kairouz, Liu,
  Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021, https://arxiv.org/abs/2102.06387.
* Discrete Gaussian sampler: Canonne, Kamath, Steinke, "The Discrete Gaussian for
  Differential Privacy", NeurIPS 2020, https://arxiv.org/abs/2004.00010.

Units: every variance and sensitivity here is in integer units (after scaling by ``γ``);
a noise variance ``v`` is ``v / γ²`` in the units of the update.

What is exact and what is not:

* The samplers compute in float64 (numpy's Poisson and geometric samplers, a float
  acceptance test). Their output is an integer, so Mironov's attack on the low bits of
  floating-point noise does not apply, but their pmf equals the ideal one only up to
  float64 rounding; the accounting assumes the ideal pmf.
* Generators are numpy ``PCG64DXSM`` seeded with 256 bits from the OS CSPRNG
  (:func:`secure_generator`): a statistical generator with a secret seed, not a
  cryptographic one. Each client's noise is seen only summed with the other clients'
  noise and updates; use a fresh generator per client and round.
* Wrap-around probabilities are rigorous upper bounds (Chernoff for the noise tails, a
  union bound over coordinates, the worst-case placement of the updates): no random
  rotation is assumed, so an update may put its whole norm in one coordinate.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from flower_privacy.dp.clipping import clip_l2
from flower_privacy.dp.noise import secure_generator

__all__ = [
    "MECHANISMS",
    "centred",
    "discrete_gaussian_noise",
    "discrete_gaussian_variance",
    "encode",
    "l1_sensitivity",
    "l2_sensitivity",
    "randomized_round",
    "secure_generator",
    "share_variance",
    "skellam_noise",
    "to_modular",
    "wrap_probability",
]

MECHANISMS = ("skellam", "ddg")
# numpy's Poisson sampler refuses lam above about 9.2e18; stay well below.
_MAX_POISSON_LAM = 1e18


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value: int, low: int = 1) -> int:
    if int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _bits(modulus_bits: int) -> int:
    if int(modulus_bits) != modulus_bits or not 2 <= modulus_bits <= 62:
        raise ValueError(f"modulus_bits must be an integer in [2, 62], got {modulus_bits!r}")
    return int(modulus_bits)


def _beta(beta: float) -> float:
    if not (math.isfinite(beta) and 0 <= beta < 1):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return float(beta)


# --------------------------------------------------------------------------- samplers


def skellam_noise(
    shape: int | tuple[int, ...], variance: float, rng: np.random.Generator
) -> np.ndarray:
    """Skellam noise ``Poisson(v/2) - Poisson(v/2)`` of variance ``v``, as int64.

    Sums of independent Skellam variables are Skellam: ``k`` shares of variance ``v/m``
    sum to exactly the Skellam of variance ``k·v/m``. numpy's Poisson sampler (PTRS
    transformed rejection for λ ≥ 10, multiplication below) computes in float64.
    """
    lam = _positive("variance", variance) / 2
    if lam > _MAX_POISSON_LAM:
        raise ValueError(f"variance must be <= {2 * _MAX_POISSON_LAM:g}, got {variance!r}")
    return rng.poisson(lam, shape).astype(np.int64) - rng.poisson(lam, shape).astype(np.int64)


def discrete_gaussian_noise(
    shape: int | tuple[int, ...], sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Discrete Gaussian ``N_Z(0, σ²)`` noise (pmf ∝ exp(-x²/2σ²) on the integers), int64.

    Canonne–Kamath–Steinke Algorithm 3, vectorised: draw discrete Laplace candidates of
    scale ``t = ⌊σ⌋ + 1`` (difference of two geometrics) and keep each with probability
    ``exp(-(|y| - σ²/t)² / 2σ²)``; 1.3 to 1.9 candidates per output for σ ≥ 1. Their
    exact version uses rational arithmetic; this one uses float64 (see the module
    docstring). ``σ`` is the parameter: the variance is slightly below ``σ²``
    (:func:`discrete_gaussian_variance`).
    """
    sigma = _positive("sigma", sigma)
    if sigma > 1e9:
        raise ValueError(f"sigma must be <= 1e9, got {sigma!r}")
    size = int(np.prod(shape, dtype=np.int64))
    out = np.empty(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # success probability of each geometric
    filled = 0
    while filled < size:
        n = int((size - filled) * 2) + 64
        y = rng.geometric(p, n) - rng.geometric(p, n)  # discrete Laplace of scale t
        keep = rng.random(n) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        accepted = y[keep][: size - filled]
        out[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return out.reshape(shape)


def discrete_gaussian_variance(sigma: float) -> float:
    """The variance of ``N_Z(0, σ²)``, by summing its pmf (``σ²`` itself above σ = 100).

    It is below ``σ²`` by a relative ``O(exp(-2π²σ²))``: under 1e-300 above σ = 100.
    """
    sigma = _positive("sigma", sigma)
    if sigma > 100:
        return sigma**2
    x = np.arange(-math.ceil(40 * sigma) - 10, math.ceil(40 * sigma) + 11, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * sigma**2))
    return float(np.sum(x**2 * w) / np.sum(w))


def share_variance(total_variance: float, min_clients: int) -> float:
    """Each client's noise variance so that ``min_clients`` shares sum to ``total_variance``.

    Rounded up to the next double if needed, so that ``k · share ≥ total_variance``
    holds exactly (in rational arithmetic) for every ``k ≥ min_clients``: more survivors
    add more noise, never less, and ``min_clients`` survivors give the total (to one
    ulp). For the DDG it applies to the σ² parameter.
    """
    total = _positive("total_variance", total_variance)
    m = _count("min_clients", min_clients)
    share = total / m
    while Fraction(share) * m < Fraction(total):
        share = math.nextafter(share, math.inf)
    return share


# --------------------------------------------------------------------------- encoding


def l2_sensitivity(clip: float, scale: float, dim: int, beta: float) -> float:
    """L2 norm bound (integer units) of a clipped, scaled, randomly rounded update.

    ``β = 0``: unconditional randomised rounding moves each coordinate by less than 1,
    so the bound is ``γC + √d``. ``β > 0``: conditional randomised rounding (Kairouz et
    al. 2021, Theorem 1 / Proposition 22, as in their code ``rounded_l2_norm_bound``)
    re-rounds until the norm is at most ``sqrt(c² + d/4 + sqrt(2 ln(1/β))·(c + √d/2))``
    with ``c = γC``; one rounding fails with probability at most ``β``. The smaller
    bound is returned; :func:`randomized_round` enforces it.
    """
    c = _positive("clip", clip) * _positive("scale", scale)
    d = _count("dim", dim)
    bound = c + math.sqrt(d)
    if _beta(beta) > 0:
        squared = c**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
        bound = min(bound, math.sqrt(squared))
    return bound


def l1_sensitivity(l2: float, dim: int) -> float:
    """L1 norm bound of an integer vector of L2 norm ≤ ``l2``: ``l2 · min(√d, l2)``.

    ``||r||₁ ≤ √d ||r||₂`` always, and ``||r||₁ ≤ ||r||₂²`` for integer vectors.
    """
    return _positive("l2", l2) * min(math.sqrt(_count("dim", dim)), l2)


def randomized_round(
    values: np.ndarray,
    rng: np.random.Generator,
    l2_bound: float | None = None,
    max_tries: int = 1000,
) -> np.ndarray:
    """Unbiased randomised rounding to int64, conditioned on ``||r||₂ ≤ l2_bound``.

    Each coordinate goes to ``⌊x⌋ + Bernoulli(x - ⌊x⌋)``. With ``l2_bound`` (from
    :func:`l2_sensitivity`) the rounding is redrawn until the integer norm, computed
    exactly, is within the bound; conditioning adds a small bias (Kairouz et al.,
    Proposition 22). Raises after ``max_tries`` failures (the bound does not fit).
    """
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("values have NaN or inf entries")
    floor = np.floor(x)
    frac = x - floor
    floor = floor.astype(np.int64)
    for _ in range(_count("max_tries", max_tries)):
        r = floor + (rng.random(x.shape) < frac)
        if l2_bound is None or _squared_norm(r) <= l2_bound**2:
            return r
    raise ValueError(f"no rounding within l2_bound={l2_bound} after {max_tries} tries")


def _squared_norm(r: np.ndarray) -> int:
    """``Σ r_i²`` exactly: int64 when a float64 estimate shows it cannot overflow."""
    flat = r.ravel()
    if flat.size == 0:
        return 0
    if int(np.max(np.abs(flat))) < 2**31:
        squares = flat * flat  # each < 2^62
        if float(np.sum(squares, dtype=np.float64)) < 2**62:  # so the int64 sum cannot wrap
            return int(np.sum(squares, dtype=np.int64))
    return sum(int(v) * int(v) for v in flat)


def encode(
    update: np.ndarray, clip: float, scale: float, beta: float, rng: np.random.Generator
) -> np.ndarray:
    """A client's integer vector: clip to ``C``, multiply by ``γ``, round conditionally.

    The result has L2 norm at most ``l2_sensitivity(C, γ, d, β)``, checked in integer
    arithmetic (so float error in the clipping cannot exceed the sensitivity). Add the
    client's noise share, then :func:`to_modular`.
    """
    clipped, _ = clip_l2(update, clip)
    bound = l2_sensitivity(clip, scale, clipped.size, beta)
    return randomized_round(clipped * _positive("scale", scale), rng, l2_bound=bound)


def to_modular(values: np.ndarray, modulus_bits: int = 32) -> np.ndarray:
    """Integers reduced mod ``2^b`` (uint32 for b ≤ 32, uint64 otherwise)."""
    bits = _bits(modulus_bits)
    reduced = np.mod(np.asarray(values, dtype=np.int64), np.int64(2**bits))
    return reduced.astype(np.uint32 if bits <= 32 else np.uint64)


def centred(values: np.ndarray, modulus_bits: int = 32) -> np.ndarray:
    """Residues mod ``2^b`` read as signed integers in ``[-2^(b-1), 2^(b-1))``, int64."""
    bits = _bits(modulus_bits)
    v = np.mod(np.asarray(values).astype(np.int64), np.int64(2**bits))
    return np.where(v >= 2 ** (bits - 1), v - np.int64(2**bits), v)


# ------------------------------------------------------------------------ wrap-around


def _log_tail(mechanism: str, variance: float, threshold: float) -> float:
    """log of a Chernoff bound on ``P(N ≥ threshold)`` for the summed noise ``N``.

    Skellam of variance v (two Poissons of mean λ = v/2): ``E e^{sN} = exp(2λ(cosh s - 1))``,
    minimised at ``s = asinh(T/2λ)``. Sum of discrete Gaussians with σ² parameters
    adding to v: each is σ²-subgaussian (Canonne et al. 2020), so ``exp(-T²/2v)``.
    """
    if mechanism == "skellam":
        lam = variance / 2
        u = threshold / (2 * lam)
        return 2 * lam * (math.sqrt(1 + u * u) - 1) - threshold * math.asinh(u)
    return -(threshold**2) / (2 * variance)


def wrap_probability(
    mechanism: str,
    *,
    dim: int,
    clip: float,
    scale: float,
    beta: float,
    max_clients: int,
    noise_variance: float,
    modulus_bits: int = 32,
) -> float:
    """Upper bound on P(some coordinate of the sum leaves ``[-2^(b-1), 2^(b-1))``).

    ``noise_variance``: the summed noise at ``max_clients`` survivors (integer units;
    for the DDG the sum of the σ² parameters), the largest the sum can carry. Each
    client's integer vector has every coordinate within ``min(⌊γC⌋ + 1, ⌊Δ₂⌋)`` of zero
    (rounding moves a coordinate by less than 1, ``encode`` enforces ``||r||₂ ≤ Δ₂``), so
    the updates add at most ``B = max_clients ·`` that to a coordinate; a wrap
    needs ``|noise| ≥ 2^(b-1) - B``. Bound: ``2 d · P(N ≥ 2^(b-1) - B)`` (both tails, union
    over coordinates), capped at 1. Fewer survivors carry less noise and less signal,
    so the bound holds for every survivor count up to ``max_clients``.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    d = _count("dim", dim)
    n = _count("max_clients", max_clients)
    variance = _positive("noise_variance", noise_variance)
    half = 2 ** (_bits(modulus_bits) - 1)
    l2 = l2_sensitivity(clip, scale, d, beta)
    per_client = min(math.floor(clip * scale) + 1, math.floor(l2))
    threshold = half - n * per_client
    if threshold <= 0:
        return 1.0
    log_p = math.log(2 * d) + _log_tail(mechanism, variance, threshold)
    return 1.0 if log_p >= 0 else math.exp(log_p)
