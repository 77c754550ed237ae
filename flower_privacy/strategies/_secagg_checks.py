"""What SecureAggregation refuses before a round: inner strategies and per-node content."""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from flower_privacy import _secagg_wire as wire
from flower_privacy.errors import RoundFailedError

# Aggregation is a (weighted) mean of the replies: a sum is all they need.
MEAN_STRATEGIES = (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad)
# These need each client's update (robust statistics, per-client losses, trees).
INDIVIDUAL_UPDATE_STRATEGIES = (
    Krum,
    MultiKrum,
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    QFedAvg,
    FedXgbBagging,
    FedXgbCyclic,
)


def check_one_content(server_round: int, messages: list[Message]) -> None:
    """Refuse an inner strategy that sends nodes different content (Pasquini et al.)."""
    first = messages[0].content
    others = [m for m in messages[1:] if m.content is not first]  # FedAvg shares one record
    if not others:
        return
    reference = {k: wire.content_digest(RecordDict({k: v})) for k, v in first.items()}
    for message in others:
        content = message.content
        digests = {k: wire.content_digest(RecordDict({k: v})) for k, v in content.items()}
        if digests != reference:
            keys = sorted(
                k for k in set(digests) | set(reference) if digests.get(k) != reference.get(k)
            )
            raise RoundFailedError(
                server_round,
                f"the inner strategy sent node {message.metadata.dst_node_id} other content "
                f"than node {messages[0].metadata.dst_node_id} (records {keys}): secure "
                "aggregation needs one model and config for all (per-node content can "
                "isolate a client's update)",
            )


def check_inner(strategy: Strategy, trusted: bool) -> None:
    if isinstance(strategy, INDIVIDUAL_UPDATE_STRATEGIES):
        raise TypeError(
            f"{type(strategy).__name__} needs each client's update, which secure aggregation "
            "hides; use a mean-based strategy (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, "
            "FedAdagrad)"
        )
    if not (trusted or type(strategy) in MEAN_STRATEGIES):
        raise TypeError(
            f"{type(strategy).__name__} is not known to aggregate by weighted mean; pass "
            "trust_inner_is_mean=True if its aggregate_train is a weighted mean of the replies"
        )
