"""Client-level DP's budget: the noise planned before round 1, the ledger it charges.

Functions of :class:`~flower_privacy.strategies.client_level_dp.ClientLevelDP`'s
settings that return what it then holds: a noise multiplier and a
:class:`~flower_privacy.dp.ledger.PrivacyLedger` (Gaussian placements), or the
distributed placement's plan, ledger and client encoding. The maths is in
:mod:`flower_privacy.dp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO, WARNING

from flwr.common import log

from flower_privacy.dp.accounting import GaussianRounds, calibrate
from flower_privacy.dp.discrete_planning import DistributedPlan
from flower_privacy.dp.distributed import DistributedNoiseEncoding
from flower_privacy.dp.ledger import PrivacyLedger

# Conditional randomised rounding's β (Kairouz et al. 2021; their experiments' e^-1/2).
BETA = math.exp(-0.5)


@dataclass(frozen=True)
class BudgetSettings:
    """What a run's budget is planned from, fixed when the strategy is built."""

    target_epsilon: float | None
    noise_multiplier: float | None  # a fixed z; None: calibrated for the target
    delta: float
    sampling_rate: float  # q in the accounting (1: no amplification claimed)
    accountant: str


def gaussian_budget(
    settings: BudgetSettings, rounds: int, resume: PrivacyLedger | None
) -> tuple[float, PrivacyLedger]:
    """(noise multiplier, ledger) of the central and client placements for ``rounds``."""
    if resume is not None:
        log(
            INFO,
            "ClientLevelDP: resumed after %d released round(s) (ε=%.4f), noise multiplier "
            "%.4f kept",
            resume.released,
            resume.epsilon(),
            resume.event.noise_multiplier,
        )
        return resume.event.noise_multiplier, resume
    q = settings.sampling_rate
    z = settings.noise_multiplier
    if z is None:
        assert settings.target_epsilon is not None
        z = calibrate(settings.target_epsilon, settings.delta, q, rounds, settings.accountant)
        log(
            INFO,
            "ClientLevelDP: noise multiplier %.4f calibrated for ε=%s, δ=%g, q=%s, %d rounds",
            z,
            settings.target_epsilon,
            settings.delta,
            q,
            rounds,
        )
    return z, PrivacyLedger(GaussianRounds(z, q, 1), settings.delta, settings.accountant)


@dataclass(frozen=True)
class DistributedBudget:
    """The distributed placement's plan, its ledger and what clients are sent."""

    plan: DistributedPlan
    ledger: PrivacyLedger
    noise_multiplier: float  # Gaussian-equivalent: summed noise std over the L2 bound
    encoding: DistributedNoiseEncoding

    @classmethod
    def of(
        cls, plan: DistributedPlan, settings: BudgetSettings, clip: float, min_clients: int
    ) -> DistributedBudget:
        """Wrap ``plan`` (from :func:`~flower_privacy.dp.discrete_planning.plan_distributed`)."""
        budget = cls(
            plan,
            PrivacyLedger(plan.event, settings.delta, settings.accountant),
            math.sqrt(plan.noise_variance) / plan.l2_sensitivity,
            DistributedNoiseEncoding(plan.mechanism, clip, plan.scale, plan.share_variance, BETA),
        )
        log(
            INFO,
            "ClientLevelDP: %s noise, scale %.4g, share variance %.4g per client (sum over "
            ">= %d survivors: noise multiplier >= %.4f), ε=%.4f after %d rounds, wrap-around "
            "probability <= %.2g per round",
            plan.mechanism,
            plan.scale,
            plan.share_variance,
            min_clients,
            budget.noise_multiplier,
            plan.epsilon,
            plan.event.rounds,
            plan.wrap_probability,
        )
        return budget


def budget_stop_reason(ledger: PrivacyLedger, target_epsilon: float) -> str | None:
    """Why one more release would overspend ``target_epsilon``, or None."""
    released = ledger.released
    after_next = ledger.epsilon(released + 1)
    if after_next <= target_epsilon:
        return None
    spent = ledger.epsilon(released) if released else 0.0
    reason = (
        f"privacy budget spent: ε={spent:.4f} after {released} private round(s); "
        f"one more would reach ε={after_next:.4f} > target {target_epsilon} "
        f"(δ={ledger.delta:g})"
    )
    log(WARNING, "ClientLevelDP: %s; keeping the last model", reason)
    return reason


def resumable_ledger(state: dict, settings: BudgetSettings, placement: str) -> PrivacyLedger:
    """The ledger in ``state``, checked against the settings of the strategy resuming it."""
    if placement == "distributed":
        raise ValueError(
            "resuming the distributed placement is not supported yet: its noise shares "
            "are planned for a fixed number of rounds at round 1"
        )
    ledger = PrivacyLedger.from_state_dict(state)
    event = ledger.event
    if not isinstance(event, GaussianRounds):
        raise ValueError(f"a {type(event).__name__} ledger cannot resume {placement!r}")
    mismatch = [
        f"{name} {theirs} != {ours}"
        for name, theirs, ours in (
            ("delta", ledger.delta, settings.delta),
            ("accountant", ledger.accountant, settings.accountant),
            ("sampling rate", event.sampling_rate, settings.sampling_rate),
        )
        if theirs != ours
    ]
    if settings.noise_multiplier not in (None, event.noise_multiplier):
        mismatch.append(f"noise multiplier {event.noise_multiplier} != {settings.noise_multiplier}")
    if mismatch:
        raise ValueError(f"the saved ledger does not match this strategy: {mismatch}")
    return ledger
