"""One-shot empirical privacy estimation (Andrew et al., "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR 2024).

``k`` canary clients each upload, in every round they take part in, the same random
unit direction (scaled to the clip norm). Threat model *final model*: the adversary
sees only the final model; for each canary it measures the cosine between the final
model's change and the canary's direction. Directions never inserted give the null
distribution. Both sets of cosines are fitted with Gaussians (here with one pooled
variance, see ``_fit_epsilon``) and the estimate is the ε (at δ) of the pair of
Gaussians: how well a membership test on the final model can tell whether a given
client took part. The 95% interval is a bootstrap over canaries
and null directions. An estimate is not a bound: an interval above the accountant's ε
means the release leaks more than accounted (a bug), one below means the accountant
is loose for this run (or the canaries are weak), never that the guarantee is weaker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

THREAT_MODEL = "final model"


def directions(count: int, dim: int, seed: int) -> np.ndarray:
    """``count`` independent uniformly random unit vectors of ``dim`` coordinates."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((count, dim))
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def cosines(change: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Cosine of the model change with each direction (rows of ``dirs``, unit norm)."""
    change = np.asarray(change, np.float64).reshape(-1)
    norm_change = np.linalg.norm(change)
    if norm_change == 0:
        raise ValueError("the model did not change: no canary can be measured")
    return dirs @ change / norm_change


def _positive_region(a: float, b: float, c: float) -> list[tuple[float, float]]:
    """Intervals where a x^2 + b x + c > 0 (stable roots)."""
    inf = float("inf")
    if a == 0:
        if b == 0:
            return [(-inf, inf)] if c > 0 else []
        root = -c / b
        return [(root, inf)] if b > 0 else [(-inf, root)]
    disc = b * b - 4 * a * c
    if disc <= 0:
        return [(-inf, inf)] if a > 0 else []
    q = -(b + math.copysign(math.sqrt(disc), b)) / 2
    r1, r2 = sorted((q / a, c / q if q != 0 else 0.0))
    return [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]


def _sf(x: float, mu: float, s: float) -> float:
    return 0.5 * math.erfc((x - mu) / (s * math.sqrt(2))) if math.isfinite(x) else float(x < 0)


def _mass(region: list[tuple[float, float]], mu: float, s: float) -> float:
    return sum(_sf(lo, mu, s) - _sf(hi, mu, s) for lo, hi in region)


def _delta_of(eps: float, mu1: float, s1: float, mu0: float, s0: float) -> float:
    """max over both orders of sup_S P(S) - e^eps Q(S) for two 1-D Gaussians.

    The optimal S is where the privacy loss log p/q exceeds eps: a quadratic in x.
    """
    worst = 0.0
    for (mp, sp), (mq, sq) in (((mu1, s1), (mu0, s0)), ((mu0, s0), (mu1, s1))):
        a = 1 / (2 * sq**2) - 1 / (2 * sp**2)
        b = mp / sp**2 - mq / sq**2
        c = mq**2 / (2 * sq**2) - mp**2 / (2 * sp**2) + math.log(sq / sp) - eps
        region = _positive_region(a, b, c)
        worst = max(worst, _mass(region, mp, sp) - math.exp(eps) * _mass(region, mq, sq))
    return float(worst)


def gaussian_pair_epsilon(mu1: float, s1: float, mu0: float, s0: float, delta: float) -> float:
    """Smallest ε with (ε, δ) indistinguishability of N(mu1, s1²) and N(mu0, s0²)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if _delta_of(0.0, mu1, s1, mu0, s0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _delta_of(hi, mu1, s1, mu0, s0) > delta:
        lo, hi = hi, hi * 2
        if hi > 512:  # e^eps overflows soon after; far beyond any accountant
            return float("inf")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _delta_of(mid, mu1, s1, mu0, s0) > delta else (lo, mid)
    return hi


def _fit_epsilon(observed: np.ndarray, null: np.ndarray, delta: float) -> float:
    # One pooled variance: under a Gaussian mechanism a canary shifts the cosine and
    # leaves its spread alone; with tens of canaries a separately fitted variance makes
    # the tails, and so ε at small δ, mostly sampling noise.
    pooled = (np.sum((observed - observed.mean()) ** 2) + np.sum((null - null.mean()) ** 2)) / (
        len(observed) + len(null) - 2
    )
    sigma = max(float(np.sqrt(pooled)), 1e-12)
    return gaussian_pair_epsilon(float(observed.mean()), sigma, float(null.mean()), sigma, delta)


@dataclass(frozen=True)
class EpsilonEstimate:
    """The estimate, its bootstrap interval and what it assumed."""

    epsilon: float
    low: float
    high: float
    confidence: float
    canaries: int
    null_directions: int
    delta: float
    threat_model: str = THREAT_MODEL


def estimate(
    observed: np.ndarray,
    null: np.ndarray,
    delta: float,
    *,
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
) -> EpsilonEstimate:
    """ε from canary cosines ``observed`` and null cosines, with a bootstrap interval."""
    observed, null = np.asarray(observed, np.float64), np.asarray(null, np.float64)
    if len(observed) < 3 or len(null) < 3:
        raise ValueError(
            f"need >= 3 canaries and null directions, got {len(observed)}, {len(null)}"
        )
    rng = np.random.default_rng(seed)
    point = _fit_epsilon(observed, null, delta)
    samples = [
        _fit_epsilon(rng.choice(observed, len(observed)), rng.choice(null, len(null)), delta)
        for _ in range(bootstrap)
    ]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return EpsilonEstimate(
        point, float(low), float(high), confidence, len(observed), len(null), delta
    )
