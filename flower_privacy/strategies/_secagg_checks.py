"""What SecureAggregation refuses: inner strategies, per-node content, sums it cannot trust."""

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

from flower_privacy.dp.distributed import ENCODING, DistributedNoiseEncoding
from flower_privacy.errors import RoundFailedError
from flower_privacy.secagg.protocol import RoundResult
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.wire import secagg as wire

WEIGHTINGS = ("weighted", "uniform")

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


def check_sum_settings(
    settings: wire.SumSettings, weighting: str
) -> DistributedNoiseEncoding | None:
    """The round's encoding an outer layer asked for (None: the quantiser), checked."""
    if not settings.encoding:
        return None
    if settings.encoding.get("encoding") != ENCODING:
        raise ValueError(f"unknown encoding {settings.encoding.get('encoding')!r}")
    if weighting != "uniform":
        raise ValueError(
            "a DP encoding needs weighting='uniform' (example counts are data): build "
            "SecureAggregation(..., weighting='uniform')"
        )
    return DistributedNoiseEncoding.from_request(settings.encoding)


def check_revealed_weight(
    server_round: int, result: RoundResult, weighting: str, max_weight: int
) -> None:
    """Fail a round whose unmasked weight no honest set of survivors could produce."""
    survivors = len(result.survivors)
    if not 1 <= result.weight <= max_weight * survivors:
        raise RoundFailedError(
            server_round,
            f"the unmasked total weight {result.weight} is impossible for {survivors} "
            "survivors (a client cheated, or masks did not cancel)",
        )
    if weighting == "uniform" and result.weight != survivors:
        raise RoundFailedError(
            server_round,
            f"uniform weighting, but the revealed weight {result.weight} is not the "
            f"survivor count {survivors}: a client lied about its weight",
        )


def check_arguments(
    *,
    weighting: str,
    uniform_denominator: float | None,
    max_refusals: int,
    clip_range: float,
    max_weight: int,
    max_clients: int | None,
    max_mean_error: float | None,
) -> None:
    """Refuse SecureAggregation settings that cannot work, naming the setting."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if uniform_denominator is not None and (weighting != "uniform" or not uniform_denominator > 0):
        raise ValueError(
            f"uniform_denominator needs weighting='uniform' and a value > 0, got "
            f"{uniform_denominator!r} with weighting={weighting!r}"
        )
    if max_refusals < 1:
        raise ValueError(
            f"max_refusals must be >= 1 (one node alone never stops a run), got {max_refusals}"
        )
    if max_clients is not None and max_clients < 1:
        raise ValueError(f"max_clients must be >= 1, got {max_clients}")
    # Validates the limits now; the run's quantiser is derived when the run starts.
    Quantizer.for_cohort(clip_range, max_weight, max_clients or 1, max_mean_error)


def check_train_count(
    server_round: int, selected: int, cohort: int, min_replies: int, max_clients: int
) -> None:
    """Fail a round whose prepared cohort is too small to sum or too large to encode."""
    if selected < min_replies:
        raise RoundFailedError(
            server_round,
            f"{selected} of {cohort} cohort nodes prepared, at least {min_replies} needed",
        )
    if selected > max_clients:
        raise RoundFailedError(
            server_round,
            f"{selected} nodes selected but max_clients={max_clients}: the quantised sum "
            "could wrap (Poisson sampled more nodes than the run's derived maximum): set "
            "max_clients",
        )
