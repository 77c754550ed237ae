"""What :class:`SecureAggregation` reports of a round's unmasked sum: metrics and logs."""

from __future__ import annotations

from logging import ERROR, INFO, WARNING

from flwr.common import log

from flower_privacy.secagg.protocol import RoundResult
from flower_privacy.wire import secagg as wire


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
