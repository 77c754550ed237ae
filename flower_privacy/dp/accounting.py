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

import math
from dataclasses import dataclass

ACCOUNTANTS = ("pld", "rdp", "prv")


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


def _fresh(accountant: str):  # noqa: ANN202
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    return PLDAccountant() if accountant == "pld" else RdpAccountant()


def epsilon(mechanism: GaussianRounds, delta: float, accountant: str = "pld") -> float:
    """The ε at which ``mechanism`` is (ε, δ)-DP, by ``accountant``."""
    _check(delta, accountant)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(mechanism.noise_multiplier, mechanism.sampling_rate, int(mechanism.rounds))]
        return float(prv.get_epsilon(delta=delta))
    acc = _fresh(accountant)
    acc.compose(mechanism.event())
    return float(acc.get_epsilon(delta))


def calibrate(
    target_epsilon: float, delta: float, sampling_rate: float, rounds: int, accountant: str = "pld"
) -> float:
    """The smallest noise multiplier whose ε is at most ``target_epsilon`` (bisection)."""
    _check(delta, accountant)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    GaussianRounds(1.0, sampling_rate, rounds)  # validates q and rounds

    def eps(z: float) -> float:
        return epsilon(GaussianRounds(z, sampling_rate, rounds), delta, accountant)

    low, high = 0.05, 1.0
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
