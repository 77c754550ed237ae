"""ε for Poisson-subsampled Gaussian rounds, and the noise multiplier for a target ε.

Events are data, accountants interpret (dp-accounting's design): one round is a Gaussian
mechanism with noise multiplier z (noise std / clipping norm) applied to a Poisson sample
of rate q; ``rounds`` rounds compose. Neighbouring datasets differ by adding or removing
one client's whole data. Amplification by sampling holds only if the sampling really is
Poisson with rate q (``q = 1``: every client every round, no amplification).

Accountants: ``pld`` (dp-accounting's privacy-loss distributions, tight: the default),
``rdp`` (Rényi DP, a looser upper bound), ``prv`` (Opacus's PRV accountant).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

ACCOUNTANTS = ("pld", "rdp", "prv")
_PLD_MIN_NOISE = 0.25


@dataclass(frozen=True)
class GaussianRounds:
    """``rounds`` compositions of a Gaussian mechanism on a Poisson sample of rate ``q``."""

    noise_multiplier: float
    sampling_rate: float
    rounds: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if int(self.rounds) != self.rounds or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds}")

    def event(self):  # noqa: ANN201 - a dp_accounting.DpEvent
        """The dp-accounting event of these rounds."""
        import dp_accounting

        one = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1:
            one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, one)
        return dp_accounting.SelfComposedDpEvent(one, int(self.rounds))


def _check(delta: float, accountant: str) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(mechanism: GaussianRounds, delta: float, accountant: str = "pld") -> float:
    """The ε at which ``mechanism`` is (ε, δ)-DP, by ``accountant``."""
    _check(delta, accountant)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(mechanism.noise_multiplier, mechanism.sampling_rate, int(mechanism.rounds))]
        return float(prv.get_epsilon(delta=delta))
    if accountant == "pld":
        if mechanism.sampling_rate == 1:
            return _gaussian_epsilon(
                mechanism.noise_multiplier / math.sqrt(mechanism.rounds), delta
            )
        if mechanism.noise_multiplier < _PLD_MIN_NOISE:
            # dp-accounting's PLD discretisation needs memory and time that grow without
            # bound as z -> 0 (38 GiB at z = 0.001); ε is in the hundreds there anyway.
            raise ValueError(
                f"noise_multiplier {mechanism.noise_multiplier:g} is below {_PLD_MIN_NOISE} "
                "where the PLD accountant's discretisation blows up: use accountant='rdp'"
            )
        one = _one_round_pld(mechanism.noise_multiplier, mechanism.sampling_rate)
        return float(one.self_compose(int(mechanism.rounds)).get_epsilon_for_delta(delta))
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(mechanism.event())
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=16)
def _one_round_pld(noise_multiplier: float, sampling_rate: float):  # noqa: ANN202
    """One round's PLD, exactly as dp-accounting's PLDAccountant builds it (cached: a
    run asks for ε after every round, and building it is the expensive part)."""
    from dp_accounting.pld.privacy_loss_distribution import from_gaussian_mechanism

    return from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=1e-4,
        sampling_prob=sampling_rate,
    )


def _gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """ε of one Gaussian mechanism from its exact privacy profile (Balle & Wang, 2018).

    ``rounds`` unsampled rounds of noise z are one Gaussian of noise z/√rounds, so this
    is the tight value that a PLD approximates from above, in microseconds:
    δ(ε) = Φ(1/2z - εz) - e^ε Φ(-1/2z - εz), solved for ε by bisection.
    """
    from scipy.special import log_ndtr

    z = noise_multiplier

    def delta_at(eps: float) -> float:
        a, b = 1 / (2 * z) - eps * z, -1 / (2 * z) - eps * z
        return math.exp(log_ndtr(a)) - math.exp(eps + log_ndtr(b))

    if delta_at(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_at(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        if delta_at(mid) > delta:
            low = mid
        else:
            high = mid
    return high


def calibrate(
    target_epsilon: float, delta: float, sampling_rate: float, rounds: int, accountant: str = "pld"
) -> float:
    """The smallest noise multiplier whose ε is at most ``target_epsilon`` (bisection)."""
    _check(delta, accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    GaussianRounds(1.0, sampling_rate, rounds)  # validates q and rounds

    @functools.cache  # the bracketing loops revisit their end points
    def eps(z: float) -> float:
        return epsilon(GaussianRounds(z, sampling_rate, rounds), delta, accountant)

    low, high = 0.05, 1.0
    if accountant == "pld" and sampling_rate < 1:
        # RDP is an upper bound on the PLD's ε: its z is enough, and the PLD's lies
        # within ~20% below it. A tight bracket saves most of the slow PLD evaluations.
        high = calibrate(target_epsilon, delta, sampling_rate, rounds, "rdp")
        low = max(_PLD_MIN_NOISE, 0.8 * high)
        while low > _PLD_MIN_NOISE and eps(low) <= target_epsilon:
            low, high = max(_PLD_MIN_NOISE, 0.8 * low), low
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches ε={target_epsilon}")
    if eps(low) <= target_epsilon:
        raise ValueError(f"ε={target_epsilon} is met even at z={low}: use a smaller target")
    # Invariant: eps(low) > target >= eps(high). Stop within 0.1% of z.
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def adaptive_update_noise(noise_multiplier: float, count_noise_std: float) -> float:
    """The update's noise multiplier z_Δ when the clip count takes its share of ``z``.

    Andrew et al. (2021), Theorem 1: releasing the noisy update sum (noise ``z_Δ·C``)
    and the noisy count of unclipped clients (noise ``σ_b``, sensitivity 1/2) is one
    Gaussian mechanism with ``z = (z_Δ^-2 + (2σ_b)^-2)^(-1/2)``. Solved for ``z_Δ``.
    """
    if not (math.isfinite(count_noise_std) and count_noise_std > 0):
        raise ValueError(f"count_noise_std must be > 0, got {count_noise_std}")
    spare = noise_multiplier**-2 - (2 * count_noise_std) ** -2
    if spare <= 0:
        raise ValueError(
            f"the clip count's noise (std {count_noise_std:.3g}) needs more privacy than the "
            f"whole budget allows at noise multiplier {noise_multiplier:.3g} (it needs "
            f"2·count_noise_std > {noise_multiplier:.3g}); pass count_noise_std >= "
            f"{1.2 * noise_multiplier:.3g} (update noise then grows by at most 10%), or train "
            "more clients per round"
        )
    return spare**-0.5
