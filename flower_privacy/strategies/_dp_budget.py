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
from flower_privacy.dp.discrete_accounting import DistributedPlan, plan_distributed
from flower_privacy.dp.distributed import DistributedNoiseEncoding
from flower_privacy.dp.ledger import PrivacyLedger

# Conditional randomised rounding's β (Kairouz et al. 2021; their experiments' e^-1/2).
BETA = math.exp(-0.5)


def gaussian_budget(
    *,
    target_epsilon: float | None,
    fixed_noise_multiplier: float | None,
    delta: float,
    sampling_rate: float,
    rounds: int,
    accountant: str,
    resume: PrivacyLedger | None,
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
    if fixed_noise_multiplier is None:
        assert target_epsilon is not None
        z = calibrate(target_epsilon, delta, sampling_rate, rounds, accountant)
        log(
            INFO,
            "ClientLevelDP: noise multiplier %.4f calibrated for ε=%s, δ=%g, q=%s, %d rounds",
            z,
            target_epsilon,
            delta,
            sampling_rate,
            rounds,
        )
    else:
        z = fixed_noise_multiplier
    return z, PrivacyLedger(GaussianRounds(z, sampling_rate, 1), delta, accountant)


@dataclass(frozen=True)
class DistributedBudget:
    """The distributed placement's plan, its ledger and what clients are sent."""

    plan: DistributedPlan
    ledger: PrivacyLedger
    noise_multiplier: float  # Gaussian-equivalent: summed noise std over the L2 bound
    encoding: DistributedNoiseEncoding


def distributed_budget(
    mechanism: str,
    *,
    target_epsilon: float,
    delta: float,
    clip: float,
    dim: int,
    sampling_rate: float,
    rounds: int,
    min_clients: int,
    max_clients: int,
    accountant: str,
) -> DistributedBudget:
    """Calibrate each client's integer noise share for the target, before round 1."""
    plan = plan_distributed(
        mechanism,
        target_epsilon,
        delta,
        clip=clip,
        dim=dim,
        sampling_rate=sampling_rate,
        rounds=rounds,
        min_clients=min_clients,
        max_clients=max_clients,
        beta=BETA,
    )
    budget = DistributedBudget(
        plan,
        PrivacyLedger(plan.event, delta, accountant),
        math.sqrt(plan.noise_variance) / plan.l2_sensitivity,
        DistributedNoiseEncoding(mechanism, clip, plan.scale, plan.share_variance, BETA),
    )
    log(
        INFO,
        "ClientLevelDP: %s noise, scale %.4g, share variance %.4g per client (sum over "
        ">= %d survivors: noise multiplier >= %.4f), ε=%.4f after %d rounds, wrap-around "
        "probability <= %.2g per round",
        mechanism,
        plan.scale,
        plan.share_variance,
        min_clients,
        budget.noise_multiplier,
        plan.epsilon,
        rounds,
        plan.wrap_probability,
    )
    return budget


def budget_stop_reason(ledger: PrivacyLedger, target_epsilon: float, delta: float) -> str | None:
    """Why one more release would overspend ``target_epsilon``, or None."""
    released = ledger.released
    after_next = ledger.epsilon(released + 1)
    if after_next <= target_epsilon:
        return None
    spent = ledger.epsilon(released) if released else 0.0
    reason = (
        f"privacy budget spent: ε={spent:.4f} after {released} private round(s); "
        f"one more would reach ε={after_next:.4f} > target {target_epsilon} (δ={delta:g})"
    )
    log(WARNING, "ClientLevelDP: %s; keeping the last model", reason)
    return reason


def resumable_ledger(
    state: dict,
    *,
    placement: str,
    delta: float,
    accountant: str,
    sampling_rate: float,
    fixed_noise_multiplier: float | None,
) -> PrivacyLedger:
    """The ledger in ``state``, checked against the strategy that resumes it."""
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
            ("delta", ledger.delta, delta),
            ("accountant", ledger.accountant, accountant),
            ("sampling rate", event.sampling_rate, sampling_rate),
        )
        if theirs != ours
    ]
    if fixed_noise_multiplier not in (None, event.noise_multiplier):
        mismatch.append(f"noise multiplier {event.noise_multiplier} != {fixed_noise_multiplier}")
    if mismatch:
        raise ValueError(f"the saved ledger does not match this strategy: {mismatch}")
    return ledger
