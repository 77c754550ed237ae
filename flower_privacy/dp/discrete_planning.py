"""Noise and scale for a target ε: the distributed placement's calibration and plan.

Built on the accountant of :mod:`flower_privacy.dp.discrete_accounting` (whose names
these functions remain importable from): :func:`calibrate_variance` bisects the summed
noise variance for a target ε; :func:`plan_distributed` picks the largest scale γ whose
calibrated noise keeps modular wrap-around rare enough.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from flower_privacy.dp.discrete import MECHANISMS, share_variance, wrap_probability
from flower_privacy.dp.discrete_accounting import Event, distributed_event, epsilon

__all__ = ["MAX_SHARE_VARIANCE", "DistributedPlan", "calibrate_variance", "plan_distributed"]

# numpy's Poisson sampler (PTRS, float64) loses accuracy for huge means: measured here,
# the variance of Poisson(λ) is off by 3.4% at λ = 1e15 and within sampling error up to
# 1e12. Shares stay at λ <= 1e11 (variance 2e11); the scale γ is still far above √d.
MAX_SHARE_VARIANCE = 2e11


def calibrate_variance(
    mechanism: str,
    target_epsilon: float,
    delta: float,
    *,
    clip: float,
    dim: int,
    scale: float,
    sampling_rate: float,
    rounds: int,
    min_clients: int = 1,
    max_clients: int | None = None,
    beta: float = math.exp(-0.5),
) -> float:
    """The smallest total noise variance (integer units, ``min_clients`` survivors) whose
    ε is at most ``target_epsilon``, by bisection: ``ε(v) ≤ target < ε(0.99 v)``.

    Each client's share is ``share_variance(v, min_clients)``. The search covers
    ``v/Δ₂²`` (the squared Gaussian-equivalent noise multiplier) in ``[0.05², 1e4²]``.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def event(v: float) -> Event:
        return distributed_event(
            mechanism,
            clip=clip,
            dim=dim,
            scale=scale,
            noise_variance=v,
            sampling_rate=sampling_rate,
            rounds=rounds,
            min_clients=min_clients,
            max_clients=min_clients if max_clients is None else max_clients,
            beta=beta,
        )

    @functools.cache  # the bracketing loop revisits its end points
    def eps(v: float) -> float:
        return epsilon(event(v), delta)

    unit = event(1.0).l2_sensitivity ** 2  # validates every parameter
    low, high = 0.05**2 * unit, unit
    while eps(high) > target_epsilon:
        low, high = high, high * 4
        if high > 1e8 * unit:
            raise ValueError(f"no noise variance up to 1e8·Δ₂² reaches ε={target_epsilon}")
    if eps(low) <= target_epsilon:
        raise ValueError(
            f"ε={target_epsilon} is met even at variance {low:g}: use a smaller target"
        )
    # Invariant: ε(low) > target ≥ ε(high); ε decreases in v. Stop within 0.1%.
    while high - low > 1e-3 * high:
        mid = math.sqrt(low * high)
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class DistributedPlan:
    """Parameters for the distributed placement, from :func:`plan_distributed`.

    ``noise_variance`` is the summed noise with ``min_clients`` survivors and
    ``share_variance`` each client's (integer units; σ² parameters for the DDG);
    ``event`` is what was accounted for the planned rounds (``dataclasses.replace`` its
    ``rounds`` for ε after fewer).
    """

    mechanism: str
    scale: float
    noise_variance: float
    share_variance: float
    epsilon: float
    wrap_probability: float
    l2_sensitivity: float
    event: Event


def plan_distributed(
    mechanism: str,
    target_epsilon: float,
    delta: float,
    *,
    clip: float,
    dim: int,
    sampling_rate: float,
    rounds: int,
    min_clients: int,
    max_clients: int,
    beta: float = math.exp(-0.5),
    modulus_bits: int = 32,
    max_wrap_probability: float = 1e-9,
    max_share_variance: float = MAX_SHARE_VARIANCE,
) -> DistributedPlan:
    """The largest scale γ (within 2%) whose calibrated noise keeps wraps rare enough.

    For each γ the noise variance is calibrated to ``target_epsilon``; the wrap-around
    bound (:func:`~flower_privacy.dp.discrete.wrap_probability`) is evaluated with
    ``max_clients`` survivors carrying ``max_clients/min_clients`` times that noise. A
    larger γ means less rounding error, so the largest γ meeting
    ``max_wrap_probability`` (per round) and keeping each client's share variance at
    most ``max_share_variance`` (where the samplers are accurate) is kept. Raises
    ValueError if even
    ``γ = 1/C`` (one integer unit per clip norm) wraps too often.
    """
    if not 0 < max_wrap_probability < 1:
        raise ValueError(f"max_wrap_probability must be in (0, 1), got {max_wrap_probability}")
    if int(max_clients) != max_clients or max_clients < min_clients:
        raise ValueError(
            f"max_clients must be an integer >= min_clients={min_clients}, got {max_clients}"
        )

    # What is accounted, the same for every scale tried and for the plan's event.
    accounted: dict[str, Any] = {
        "clip": clip,
        "dim": dim,
        "sampling_rate": sampling_rate,
        "rounds": rounds,
        "min_clients": min_clients,
        "max_clients": max_clients,
        "beta": beta,
    }

    def evaluate(scale: float) -> tuple[float, float]:
        v = calibrate_variance(mechanism, target_epsilon, delta, scale=scale, **accounted)
        at_max = share_variance(v, min_clients) * max_clients
        wrap = wrap_probability(
            mechanism,
            dim=dim,
            clip=clip,
            scale=scale,
            beta=beta,
            max_clients=max_clients,
            noise_variance=at_max,
            modulus_bits=modulus_bits,
        )
        return v, wrap

    low = 1.0 / clip
    v_low, wrap_low = evaluate(low)
    if wrap_low > max_wrap_probability:
        raise ValueError(
            f"no scale works: even γ={low:g} (1 integer unit per clip norm) wraps mod "
            f"2^{modulus_bits} with probability up to {wrap_low:.3g} > {max_wrap_probability:g}; "
            f"use more modulus bits, fewer clients or a larger target ε"
        )
    high = 2.0 ** (modulus_bits - 1) / clip  # one update alone would fill half the range
    best = (low, v_low, wrap_low)
    # Invariant: γ = low passes; γ = high fails. Bisect in log γ to 2%.
    while high > 1.02 * low:
        mid = math.sqrt(low * high)
        v, wrap = evaluate(mid)
        if wrap <= max_wrap_probability and share_variance(v, min_clients) <= max_share_variance:
            low, best = mid, (mid, v, wrap)
        else:
            high = mid
    scale, v, wrap = best
    event = distributed_event(mechanism, scale=scale, noise_variance=v, **accounted)
    return DistributedPlan(
        mechanism=mechanism,
        scale=scale,
        noise_variance=v,
        share_variance=share_variance(v, min_clients),
        epsilon=epsilon(event, delta),
        wrap_probability=wrap,
        l2_sensitivity=event.l2_sensitivity,
        event=event,
    )
