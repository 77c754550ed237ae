"""ε for Poisson-subsampled rounds of the Skellam and distributed discrete Gaussian sums.

Events are data, accountants interpret (as :mod:`flower_privacy.dp.accounting`). One
round releases ``Σ r_i + N`` over the surviving clients: ``r_i`` is client i's clipped,
scaled, randomly rounded update (:func:`~flower_privacy.dp.discrete.encode`), of L2 norm
≤ Δ₂ and L1 norm ≤ Δ₁ in integer units, and ``N`` is the summed integer noise. The
neighbouring outputs differ by one client's ``r_i`` with the noise at least the
calibrated total in both (the shift analysis of both papers). dp-accounting 0.6.0 has
no event for these mechanisms, so the accountant is Rényi DP only:

* Skellam, variance v: ``ε(α) = αΔ₂²/(2v) + min(((2α-1)Δ₂² + 6Δ₁)/(4v²), 3Δ₁/(2v))``,
  Agarwal, Kairouz, Liu (NeurIPS 2021) Theorem 3.5 with their ``Sk(μ, μ)``, ``v = 2μ``
  (their code: ``distributed_dp/accounting_utils.py::_skellam_rdp``).
* Sum of n discrete Gaussians of parameter σ² each (Kairouz, Liu, Steinke, ICML 2021,
  Theorem 1 / Proposition 14; their code ``compute_rdp_dgaussian``), with
  ``τ = 10 Σ_{k=1}^{n-1} exp(-2π²σ² k/(k+1))`` and scales ``a₂ = Δ₂/√(nσ²)``,
  ``a₁ = Δ₁/√(nσ²)``: ``ε(α) = min(α a₂²/2 + τd, α/2 (a₂² + 2a₁τ + τ²d),
  α/2 (a₂ + τ√d)²)``. The sum is not a discrete Gaussian and its RDP depends on n,
  so every survivor count from ``min_clients`` to ``max_clients`` is accounted and the
  worst kept, order by order.
* Poisson sampling of rate q < 1: the general upper bound of Zhu & Wang, "Poisson
  Subsampled Rényi Differential Privacy" (ICML 2019, Theorem 6), valid for any
  mechanism under add/remove neighbours at integer orders, as both papers' code uses
  it; the smaller of it and the unsampled ε(α) is kept.
* ``rounds`` rounds add up; RDP → (ε, δ) by dp-accounting's ``compute_epsilon``
  (Canonne–Kamath–Steinke / Asoodeh et al. conversion).

These bounds are proven for the ideal distributions; the samplers are float64 (see
:mod:`flower_privacy.dp.discrete`). RDP is looser than the PLD that
:mod:`flower_privacy.dp.accounting` uses for the Gaussian: at q = 1 the calibrated noise
is within 0.3% of the Gaussian's RDP calibration and about 8% above its PLD one; at
q < 1 Zhu & Wang's general bound is far looser than the tight subsampled-Gaussian RDP
(z = 3.02 against 1.80 for ε = 3, δ = 1e-5, q = 0.1, 100 rounds).

What the guarantee covers: the shift analysis treats a client's departure as its
vector leaving the sum while the noise stays at least the calibrated total. That is
exact when the survivor set is public and the departing client's data is replaced by
nothing while it still adds its noise share (zero-out neighbours); under add/remove,
removing a client also removes its noise share, which these papers' analyses do not
model either. Amplification by sampling assumes the adversary does not learn who was
sampled: a server that samples the clients, or sees who sends, learns it, so against
the server use q = 1 unless sampling is hidden from it (e.g. every client takes part
and includes its update with a secret coin of bias q).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from flower_privacy.dp.discrete import (
    MECHANISMS,
    _beta,
    _count,
    _positive,
    l1_sensitivity,
    l2_sensitivity,
    share_variance,
    wrap_probability,
)

__all__ = [
    "ORDERS",
    "DistributedDiscreteGaussianRounds",
    "DistributedPlan",
    "SkellamRounds",
    "calibrate_variance",
    "distributed_event",
    "ddg_rdp",
    "epsilon",
    "plan_distributed",
    "rdp",
    "skellam_rdp",
    "subsampled_rdp",
]

# numpy's Poisson sampler (PTRS, float64) loses accuracy for huge means: measured here,
# the variance of Poisson(λ) is off by 3.4% at λ = 1e15 and within sampling error up to
# 1e12. Shares stay at λ <= 1e11 (variance 2e11); the scale γ is still far above √d.
MAX_SHARE_VARIANCE = 2e11
ORDERS = np.arange(2, 257, dtype=np.int64)  # integer orders, as Zhu & Wang's bound needs


def _check_common(event: SkellamRounds | DistributedDiscreteGaussianRounds) -> None:
    _positive("clip", event.clip)
    _count("dim", event.dim)
    _positive("scale", event.scale)
    _positive("noise_variance", event.noise_variance)
    if not 0 < event.sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {event.sampling_rate}")
    _count("rounds", event.rounds)
    _beta(event.beta)


class _RoundedUpdate:
    """The sensitivities of a clipped, scaled, conditionally rounded update."""

    clip: float
    scale: float
    dim: int
    beta: float

    @property
    def l2_sensitivity(self) -> float:
        """Δ₂ in integer units."""
        return l2_sensitivity(self.clip, self.scale, self.dim, self.beta)

    @property
    def l1_sensitivity(self) -> float:
        """Δ₁ in integer units."""
        return l1_sensitivity(self.l2_sensitivity, self.dim)


@dataclass(frozen=True)
class SkellamRounds(_RoundedUpdate):
    """``rounds`` rounds of the distributed Skellam sum on a Poisson sample of rate ``q``.

    ``noise_variance`` is the total noise variance of the sum in integer units with
    ``min_clients`` survivors (more survivors add more); ``scale`` is γ (integer units
    per update unit), ``beta`` the conditional-rounding parameter (0: unconditional).
    """

    clip: float
    dim: int
    scale: float
    noise_variance: float
    sampling_rate: float
    rounds: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass(frozen=True)
class DistributedDiscreteGaussianRounds(_RoundedUpdate):
    """``rounds`` rounds of the distributed discrete Gaussian sum, Poisson rate ``q``.

    ``noise_variance`` is the sum of the σ² parameters with ``min_clients`` survivors;
    each client adds ``N_Z(0, share_variance(noise_variance, min_clients))``. Survivor
    counts up to ``max_clients`` are all accounted (the worst is kept).
    """

    clip: float
    dim: int
    scale: float
    noise_variance: float
    sampling_rate: float
    rounds: int
    min_clients: int
    max_clients: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        _check_common(self)
        _count("min_clients", self.min_clients)
        if int(self.max_clients) != self.max_clients or self.max_clients < self.min_clients:
            raise ValueError(
                f"max_clients must be an integer >= min_clients={self.min_clients}, "
                f"got {self.max_clients}"
            )

    @property
    def local_variance(self) -> float:
        """Each client's σ² parameter."""
        return share_variance(self.noise_variance, self.min_clients)


Event = SkellamRounds | DistributedDiscreteGaussianRounds


def skellam_rdp(orders: np.ndarray, l1: float, l2: float, variance: float) -> np.ndarray:
    """Skellam RDP ε(α) per order (Agarwal et al. 2021, Theorem 3.5; integer units)."""
    a = np.asarray(orders, dtype=np.float64)
    extra = np.minimum(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return a * l2**2 / (2 * variance) + extra


def ddg_tau(local_variance: float, clients: int) -> float:
    """Kairouz et al.'s τ for the sum of ``clients`` discrete Gaussians of parameter σ²."""
    k = np.arange(1, clients, dtype=np.float64)
    return float(10 * np.sum(np.exp(-2 * math.pi**2 * local_variance * k / (k + 1))))


def ddg_rdp(
    orders: np.ndarray, l1: float, l2: float, local_variance: float, clients: int, dim: int
) -> np.ndarray:
    """RDP ε(α) of the sum of ``clients`` discrete Gaussians (Kairouz et al., Prop. 14)."""
    a = np.asarray(orders, dtype=np.float64)
    tau = ddg_tau(local_variance, clients)
    std = math.sqrt(clients * local_variance)
    a1, a2 = l1 / std, l2 / std
    return np.minimum.reduce(
        [
            a * a2**2 / 2 + tau * dim,
            a / 2 * (a2**2 + 2 * a1 * tau + tau**2 * dim),
            a / 2 * (a2 + math.sqrt(dim) * tau) ** 2,
        ]
    )


def subsampled_rdp(base: np.ndarray, q: float) -> np.ndarray:
    """Zhu & Wang's general Poisson-subsampled RDP bound at orders ``2 .. len(base) + 1``.

    ``base[j]`` is the mechanism's ε at order ``j + 2``. For integer α ≥ 2:
    ``ε'(α) = log((1-q)^(α-1)(1 + (α-1)q) + C(α,2) q² (1-q)^(α-2) e^{ε(2)}
    + 3 Σ_{l=3..α} C(α,l) q^l (1-q)^(α-l) e^{(l-1)ε(l)}) / (α-1)``, and
    ``min(ε', ε)`` is returned (sampling never hurts). ``q = 1`` returns ``base``.
    """
    base = np.asarray(base, dtype=np.float64)
    if q == 1:
        return base.copy()
    alphas = np.arange(2, base.size + 2, dtype=np.float64)[:, None]  # rows: α
    ells = np.arange(2, base.size + 2, dtype=np.float64)[None, :]  # columns: l
    log_comb = gammaln(alphas + 1) - gammaln(ells + 1) - gammaln(alphas - ells + 1)
    with np.errstate(invalid="ignore"):
        terms = (
            log_comb
            + ells * math.log(q)
            + (alphas - ells) * math.log1p(-q)
            + (ells - 1) * base[None, :]
        )
    terms[:, 1:] += math.log(3)  # l ≥ 3 carry the factor 3; l = 2 does not
    terms = np.where(ells <= alphas, terms, -np.inf)
    first = (alphas[:, 0] - 1) * math.log1p(-q) + np.log1p((alphas[:, 0] - 1) * q)
    total = logsumexp(np.column_stack([first, terms]), axis=1)
    return np.minimum(total / (alphas[:, 0] - 1), base)


def rdp(event: Event) -> np.ndarray:
    """The RDP ε(α) of all ``event.rounds`` rounds at :data:`ORDERS`."""
    if isinstance(event, SkellamRounds):
        base = skellam_rdp(ORDERS, event.l1_sensitivity, event.l2_sensitivity, event.noise_variance)
    elif isinstance(event, DistributedDiscreteGaussianRounds):
        local, l1, l2 = event.local_variance, event.l1_sensitivity, event.l2_sensitivity
        base = np.max(
            [
                ddg_rdp(ORDERS, l1, l2, local, n, event.dim)
                for n in range(event.min_clients, event.max_clients + 1)
            ],
            axis=0,
        )
    else:
        raise TypeError(
            f"event must be SkellamRounds or DistributedDiscreteGaussianRounds, "
            f"got {type(event).__name__}"
        )
    return subsampled_rdp(base, event.sampling_rate) * int(event.rounds)


def epsilon(event: Event, delta: float) -> float:
    """The ε at which ``event`` is (ε, δ)-DP, by Rényi DP."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    eps, _ = compute_epsilon(ORDERS, rdp(event), delta)
    return float(eps)


def distributed_event(
    mechanism: str,
    *,
    clip: float,
    dim: int,
    scale: float,
    noise_variance: float,
    sampling_rate: float,
    rounds: int,
    min_clients: int,
    max_clients: int,
    beta: float = math.exp(-0.5),
) -> Event:
    """The event of ``mechanism`` (``"skellam"`` or ``"ddg"``) for these parameters."""
    if mechanism == "skellam":
        return SkellamRounds(clip, dim, scale, noise_variance, sampling_rate, rounds, beta)
    return DistributedDiscreteGaussianRounds(
        clip, dim, scale, noise_variance, sampling_rate, rounds, min_clients, max_clients, beta
    )


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

    def evaluate(scale: float) -> tuple[float, float]:
        v = calibrate_variance(
            mechanism,
            target_epsilon,
            delta,
            clip=clip,
            dim=dim,
            scale=scale,
            sampling_rate=sampling_rate,
            rounds=rounds,
            min_clients=min_clients,
            max_clients=max_clients,
            beta=beta,
        )
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
    event = distributed_event(
        mechanism,
        clip=clip,
        dim=dim,
        scale=scale,
        noise_variance=v,
        sampling_rate=sampling_rate,
        rounds=rounds,
        min_clients=min_clients,
        max_clients=max_clients,
        beta=beta,
    )
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
