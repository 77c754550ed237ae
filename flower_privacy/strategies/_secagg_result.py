"""What :class:`SecureAggregation` reveals of a round: the sum, its metrics and logs."""

from __future__ import annotations

from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import Message
from flwr.common import log

from flower_privacy.errors import RoundFailedError
from flower_privacy.secagg.multiround import GroupPlan
from flower_privacy.secagg.protocol import RoundResult
from flower_privacy.wire import secagg as wire


@dataclass(frozen=True)
class SecureSum:
    """A round's unmasked sum: all the server learns of the survivors' updates.

    ``total`` is the sum of their encoded updates in the ring (model coordinates);
    ``weight`` the sum of their weights; ``metrics`` the public participation counts,
    clipped values and, with groups, the audited T; ``envelope`` a survivor's reply,
    reused as the envelope of the inner strategy's step.
    """

    total: np.ndarray
    weight: int
    metrics: dict[str, int]
    envelope: Message


def sum_metrics(result: RoundResult, excluded: list[int]) -> dict[str, int]:
    """The round's participation counts and clipped coordinates (public to the server)."""
    return {
        wire.METRIC_CLIENTS: len(result.survivors),
        wire.METRIC_DROPPED: len(result.dropped),
        wire.METRIC_EXCLUDED: len(excluded),
        wire.METRIC_CLIPPED: result.clipped,
    }


def log_security_events(server_round: int, result: RoundResult) -> None:
    """Name the holders whose revealed shares failed their commitments."""
    if result.bad_holders:
        log(
            ERROR,
            "SECURITY round %d: nodes %s revealed shares that fail their commitments",
            server_round,
            result.bad_holders,
        )


def log_sum(server_round: int, result: RoundResult, clip_range: float) -> None:
    """Log how many clients were summed and how many values were clipped."""
    if result.clipped:
        log(
            WARNING,
            "round %d: %d update values were clipped to ±%s",
            server_round,
            result.clipped,
            clip_range,
        )
    log(
        INFO,
        "round %d: securely aggregated %d clients (%d dropped)",
        server_round,
        len(result.survivors),
        len(result.dropped),
    )


def record_participation(server_round: int, plan: GroupPlan, survivors: list[int]) -> int:
    """Record a revealed sum's survivors; T, the fewest clients any combination isolates.

    Fails the round when T fell below the group size (except for the unsafe baseline).
    """
    plan.record(survivors)
    checked = plan.audit()
    privacy_t = checked.exact if checked.exact is not None else checked.lower_bound
    if plan.rule != "random" and privacy_t < plan.group_size:
        raise RoundFailedError(
            server_round,
            f"the participation audit found T={privacy_t} < group_size={plan.group_size}: "
            "refusing to go on",
        )
    return privacy_t
