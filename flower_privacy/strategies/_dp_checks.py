"""What ClientLevelDP refuses at construction: bad settings and inner strategies it cannot bound."""

from __future__ import annotations

import math

from flwr.serverapp.strategy import Strategy

from flower_privacy.dp.accounting import ACCOUNTANTS, GaussianRounds
from flower_privacy.dp.discrete import MECHANISMS
from flower_privacy.strategies.secure_aggregation import MEAN_STRATEGIES, SecureAggregation

PLACEMENTS = ("central", "client", "distributed")


def check_arguments(
    *,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    clip_norm: float,
    placement: str,
    sampling_rate: float | None,
    accountant: str,
    mechanism: str,
    count_noise_std: float | None,
    expected_clients: float | None,
) -> None:
    """Raise ``ValueError`` naming the first setting out of range."""
    if target_epsilon is None and noise_multiplier is None:
        raise ValueError("give target_epsilon (calibrated noise) or noise_multiplier")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if noise_multiplier is not None:
        GaussianRounds(noise_multiplier, 1.0, 1)  # validates z
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if sampling_rate is not None and not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if placement == "distributed" and target_epsilon is None:
        raise ValueError(
            "placement='distributed' calibrates its integer noise for a target: give target_epsilon"
        )
    if count_noise_std is not None and not count_noise_std > 0:
        raise ValueError(f"count_noise_std must be > 0, got {count_noise_std}")
    if expected_clients is not None and not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")


def check_inner(
    strategy: Strategy,
    secure: SecureAggregation | None,
    placement: str,
    adaptive: bool,
    sampling_rate: float | None,
) -> None:
    if secure is None:
        if placement == "distributed":
            raise TypeError(
                "placement='distributed' needs a SecureAggregation(..., weighting='uniform') "
                "as the inner strategy: the noise shares only add up inside secure aggregation"
            )
        if type(strategy) not in MEAN_STRATEGIES:
            raise TypeError(
                f"ClientLevelDP needs a mean-based inner strategy (FedAvg, FedAvgM, FedProx, "
                f"FedAdam, FedYogi, FedAdagrad), got {type(strategy).__name__}: the noise "
                "bounds a mean of clipped updates"
            )
        return
    if placement != "distributed":
        raise TypeError(
            f"SecureAggregation inside ClientLevelDP needs placement='distributed', got "
            f"{placement!r}: the server cannot clip masked updates, and secure aggregation's "
            "fixed-point rounding adds up to sqrt(d)/scale to each update's norm beyond the "
            "clip norm server noise would be calibrated for; the distributed encoding bounds "
            "the rounded norm exactly"
        )
    if secure.weighting != "uniform":
        raise ValueError(
            "client-level DP needs uniform client weights (example counts are data and break "
            "the sensitivity bound): build SecureAggregation(..., weighting='uniform')"
        )
    if secure.uniform_denominator is not None:
        raise ValueError(
            "client-level DP divides the noisy sum by its own expected client count m: build "
            "SecureAggregation(..., weighting='uniform') without uniform_denominator"
        )
    if adaptive:
        raise ValueError(
            "adaptive clipping with distributed noise needs a noisy count of unclipped "
            "clients summed inside secure aggregation, which is not supported yet: use fixed "
            "clipping (adaptive_clipping=False)"
        )
    if sampling_rate is not None:
        raise ValueError(
            "placement='distributed' protects against the server, which picks the cohort "
            "and sees who answers: amplification by sampling does not hold against it, so "
            "the accounting takes q=1. Leave sampling_rate=None (the inner strategy's "
            "cohort trains)"
        )
