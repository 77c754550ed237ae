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

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import gammaln, logsumexp

from flower_privacy.dp.discrete import (
    _beta,
    _count,
    _positive,
    l1_sensitivity,
    l2_sensitivity,
    share_variance,
)

__all__ = [
    "ORDERS",
    "DistributedDiscreteGaussianRounds",
    "SkellamRounds",
    "distributed_event",
    "ddg_rdp",
    "epsilon",
    "rdp",
    "skellam_rdp",
    "subsampled_rdp",
]
# Calibration and planning (the inverse problem) live in discrete_planning.

ORDERS = np.arange(2, 257, dtype=np.int64)  # integer orders, as Zhu & Wang's bound needs


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
class _DistributedRounds(_RoundedUpdate):
    """The fields both events start with (``beta``, with its default, each ends with)."""

    clip: float
    dim: int
    scale: float
    noise_variance: float
    sampling_rate: float
    rounds: int

    def __post_init__(self) -> None:
        _positive("clip", self.clip)
        _count("dim", self.dim)
        _positive("scale", self.scale)
        _positive("noise_variance", self.noise_variance)
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        _count("rounds", self.rounds)
        _beta(self.beta)


@dataclass(frozen=True)
class SkellamRounds(_DistributedRounds):
    """``rounds`` rounds of the distributed Skellam sum on a Poisson sample of rate ``q``.

    ``noise_variance`` is the total noise variance of the sum in integer units with
    ``min_clients`` survivors (more survivors add more); ``scale`` is γ (integer units
    per update unit), ``beta`` the conditional-rounding parameter (0: unconditional).
    """

    beta: float = math.exp(-0.5)


@dataclass(frozen=True)
class DistributedDiscreteGaussianRounds(_DistributedRounds):
    """``rounds`` rounds of the distributed discrete Gaussian sum, Poisson rate ``q``.

    ``noise_variance`` is the sum of the σ² parameters with ``min_clients`` survivors;
    each client adds ``N_Z(0, share_variance(noise_variance, min_clients))``. Survivor
    counts up to ``max_clients`` are all accounted (the worst is kept).
    """

    min_clients: int
    max_clients: int
    beta: float = math.exp(-0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
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
