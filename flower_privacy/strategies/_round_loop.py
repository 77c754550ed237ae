"""The one round loop every flower-privacy strategy runs (``StrictRounds.start``).

It owns the timeout (every exchange and every message's TTL), the failed-round
record and the halt rule; the layers it drives only configure and aggregate.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flower_privacy.errors import NotEnoughNodesError, RoundFailedError, RunHaltedError
from flower_privacy.strategies.result import PrivacyResult

if TYPE_CHECKING:
    from flower_privacy.strategies.strict_rounds import StrictRounds


def run_rounds(
    layer: StrictRounds,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    should_stop: Callable[[int, Result], bool] | None,
) -> PrivacyResult:
    """Run ``num_rounds`` rounds of ``layer`` (see :meth:`StrictRounds.start`)."""
    log(INFO, "Starting %s strategy for %d rounds:", type(layer).__name__, num_rounds)
    layer.prepare_run(grid, num_rounds)
    layer.summary()

    result = PrivacyResult(arrays=initial_arrays)
    t_start = time.time()
    if evaluate_fn:
        _evaluate_centrally(evaluate_fn, 0, initial_arrays, result)
    arrays = initial_arrays
    consecutive_failures = 0
    for server_round in range(1, num_rounds + 1):
        stop = layer.stop_reason(server_round)
        if stop is not None:
            result.halt_reason = stop
            log(WARNING, "Run stopped before round %d: %s", server_round, stop)
            break
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        try:
            new_arrays, train_metrics = _train_round(
                layer, grid, server_round, arrays, train_config, timeout
            )
        except (RoundFailedError, NotEnoughNodesError) as err:
            consecutive_failures += 1
            _record_failure(layer, result, server_round, err, consecutive_failures)
        else:
            previous, arrays = arrays, new_arrays
            result.arrays = arrays
            if train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[server_round] = train_metrics
            try:
                _evaluate_round(layer, grid, server_round, arrays, evaluate_config, timeout, result)
            except RoundFailedError as err:
                # The nodes refused the new model (e.g. it failed their checks): roll back.
                arrays = result.arrays = previous
                consecutive_failures += 1
                _record_failure(
                    layer, result, server_round, err, consecutive_failures, "evaluation refused"
                )
            else:
                consecutive_failures = 0
                if evaluate_fn:
                    _evaluate_centrally(evaluate_fn, server_round, arrays, result)
        # Called after a tolerated failed round too: the caller sees it in the result.
        if should_stop is not None and should_stop(server_round, result):
            if server_round < num_rounds:  # after the last round it stops nothing
                result.halt_reason = f"should_stop returned True after round {server_round}"
                log(INFO, "Stopping early after round %d (should_stop)", server_round)
            break

    log(INFO, "")
    log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
    for line in io.StringIO(str(result)):
        log(INFO, "\t%s", line.rstrip("\n"))
    return result


def limit_ttl(messages: list[Message], timeout: float) -> None:
    """Cap every message's TTL at ``timeout``.

    Inner Flower strategies (FedAvg) send Flower's default TTL of 12 hours: a message
    still queued after the round gave up on it must not be delivered later.
    """
    for message in messages:
        message.metadata.ttl = min(message.metadata.ttl, timeout)


def _exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    limit_ttl(messages, timeout)
    return list(grid.send_and_receive(messages=messages, timeout=timeout)) if messages else []


def _train_round(
    layer: StrictRounds,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    timeout: float,
) -> tuple[ArrayRecord, MetricRecord | None]:
    messages = list(layer.configure_train(server_round, arrays, config, grid))
    if not messages and not layer.empty_rounds_aggregate:
        raise RoundFailedError(server_round, "no node was selected for training")
    new_arrays, metrics = layer.aggregate_train(server_round, _exchange(grid, messages, timeout))
    if new_arrays is None:  # a subclass may override aggregate_train
        raise RoundFailedError(server_round, "aggregation returned no model")
    return new_arrays, metrics


def _evaluate_round(
    layer: StrictRounds,
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    timeout: float,
    result: PrivacyResult,
) -> None:
    messages = list(layer.configure_evaluate(server_round, arrays, config, grid))
    if not messages:
        return
    metrics = layer.aggregate_evaluate(server_round, _exchange(grid, messages, timeout))
    if metrics is None:
        log(WARNING, "round %d: federated evaluation returned no metrics", server_round)
    else:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
        result.evaluate_metrics_clientapp[server_round] = metrics


def _record_failure(
    layer: StrictRounds,
    result: PrivacyResult,
    server_round: int,
    err: RoundFailedError | NotEnoughNodesError,
    consecutive: int,
    stage: str = "",
) -> None:
    """Record a failed round; raise RunHaltedError once the run cannot go on."""
    reason = err.reason if isinstance(err, RoundFailedError) else str(err)
    if stage:
        reason = f"{stage}: {reason}"
    result.failed_rounds[server_round] = reason
    log(ERROR, "[ROUND %s] FAILED: %s (global model not updated)", server_round, reason)
    if isinstance(err, NotEnoughNodesError) or consecutive > layer.max_failed_rounds:
        result.halt_reason = (
            f"round {server_round} failed ({reason}) after {consecutive} consecutive "
            f"failed round(s); max_failed_rounds={layer.max_failed_rounds}"
        )
        log(ERROR, "Run halted: %s", result.halt_reason)
        raise RunHaltedError(result.halt_reason, result) from err


def _evaluate_centrally(
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    server_round: int,
    arrays: ArrayRecord,
    result: PrivacyResult,
) -> None:
    metrics = evaluate_fn(server_round, arrays)
    log(INFO, "Global evaluation (round %d): %s", server_round, metrics)
    if metrics is not None:
        result.evaluate_metrics_serverapp[server_round] = metrics
