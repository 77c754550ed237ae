"""The one round loop every flower-privacy strategy runs (``StrictRounds.start``).

It owns the timeout (every exchange and every message's TTL), the failed-round
record and the halt rule; the layers it drives only configure and aggregate.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flower_privacy.errors import NotEnoughNodesError, RoundFailedError, RunHaltedError
from flower_privacy.strategies._exchange import send_and_receive
from flower_privacy.strategies.result import PrivacyResult

if TYPE_CHECKING:
    from flower_privacy.strategies.strict_rounds import StrictRounds


@dataclass
class RoundLoop:
    """One run of ``layer``: the rounds, their exchanges and the result."""

    layer: StrictRounds
    grid: Grid
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None

    def run(
        self,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        should_stop: Callable[[int, Result], bool] | None,
    ) -> PrivacyResult:
        """Run ``num_rounds`` rounds (see :meth:`StrictRounds.start`)."""
        layer = self.layer
        log(INFO, "Starting %s strategy for %d rounds:", type(layer).__name__, num_rounds)
        layer.prepare_run(self.grid, num_rounds)
        layer.summary()

        result = PrivacyResult(arrays=initial_arrays)
        t_start = time.time()
        self._evaluate_centrally(0, initial_arrays, result)
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
                new_arrays, train_metrics = self._train(server_round, arrays)
            except (RoundFailedError, NotEnoughNodesError) as err:
                consecutive_failures += 1
                self._record_failure(result, server_round, err, consecutive_failures)
            else:
                previous, arrays = arrays, new_arrays
                result.arrays = arrays
                if train_metrics is not None:
                    log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                    result.train_metrics_clientapp[server_round] = train_metrics
                try:
                    self._evaluate(server_round, arrays, result)
                except RoundFailedError as err:
                    # The nodes refused the new model (e.g. it failed their checks): roll back.
                    arrays = result.arrays = previous
                    consecutive_failures += 1
                    self._record_failure(
                        result, server_round, err, consecutive_failures, "evaluation refused"
                    )
                else:
                    consecutive_failures = 0
                    self._evaluate_centrally(server_round, arrays, result)
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

    def _exchange(self, server_round: int, what: str, messages: list[Message]) -> list[Message]:
        if not messages:
            return []
        limit_ttl(messages, self.timeout)
        return send_and_receive(self.grid, messages, self.timeout, server_round, what)

    def _train(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        layer = self.layer
        messages = list(layer.configure_train(server_round, arrays, self.train_config, self.grid))
        if not messages and not layer.empty_rounds_aggregate:
            raise RoundFailedError(server_round, "no node was selected for training")
        new_arrays, metrics = layer.aggregate_train(
            server_round, self._exchange(server_round, "train", messages)
        )
        if new_arrays is None:  # a subclass may override aggregate_train
            raise RoundFailedError(server_round, "aggregation returned no model")
        return new_arrays, metrics

    def _evaluate(self, server_round: int, arrays: ArrayRecord, result: PrivacyResult) -> None:
        layer = self.layer
        messages = list(
            layer.configure_evaluate(server_round, arrays, self.evaluate_config, self.grid)
        )
        if not messages:
            return
        metrics = layer.aggregate_evaluate(
            server_round, self._exchange(server_round, "evaluate", messages)
        )
        if metrics is None:
            log(WARNING, "round %d: federated evaluation returned no metrics", server_round)
        else:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            result.evaluate_metrics_clientapp[server_round] = metrics

    def _record_failure(
        self,
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
        tolerated = self.layer.max_failed_rounds
        if isinstance(err, NotEnoughNodesError) or consecutive > tolerated:
            result.halt_reason = (
                f"round {server_round} failed ({reason}) after {consecutive} consecutive "
                f"failed round(s); max_failed_rounds={tolerated}"
            )
            log(ERROR, "Run halted: %s", result.halt_reason)
            raise RunHaltedError(result.halt_reason, result) from err

    def _evaluate_centrally(
        self, server_round: int, arrays: ArrayRecord, result: PrivacyResult
    ) -> None:
        if self.evaluate_fn is None:
            return
        metrics = self.evaluate_fn(server_round, arrays)
        log(INFO, "Global evaluation (round %d): %s", server_round, metrics)
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics


def limit_ttl(messages: list[Message], timeout: float) -> None:
    """Cap every message's TTL at ``timeout``.

    Inner Flower strategies (FedAvg) send Flower's default TTL of 12 hours: a message
    still queued after the round gave up on it must not be delivered later.
    """
    for message in messages:
        message.metadata.ttl = min(message.metadata.ttl, timeout)
