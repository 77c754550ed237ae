"""A strategy wrapper under which no round fails silently.

Flower's ``Strategy.start`` keeps the old model when ``aggregate_train`` returns
nothing and waits forever for nodes that never connect. ``StrictRounds`` wraps any
Message-API strategy and instead records every failed round in the history, halts
the run with :class:`~flower_privacy.errors.RunHaltedError` once it cannot make
progress, rejects replies whose arrays are malformed or not finite, and names the
nodes that did not answer. Every flower-privacy wrapper builds on it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_privacy.errors import NotEnoughNodesError, RoundFailedError, RunHaltedError
from flower_privacy.strategies.result import PrivacyResult

_ARRAYS_KEY = "arrays"


class StrictRounds(Strategy):
    """Wrap ``strategy`` so that failed rounds are recorded and halt the run.

    Parameters
    ----------
    strategy : Strategy
        The inner Message-API strategy (e.g. ``FedAvg``) that selects nodes and
        aggregates.
    min_train_replies : int | None
        Fewest usable training replies a round accepts. Defaults to the inner
        strategy's ``min_train_nodes`` (or 1 if it has none).
    max_failed_rounds : int
        How many consecutive failed rounds the run tolerates before it halts.
        The default 0 halts at the first failure.
    node_wait_timeout : float
        Seconds to wait for the inner strategy's ``min_available_nodes`` nodes
        before a round; then :class:`NotEnoughNodesError` ends the run (Flower
        alone would wait forever).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        min_train_replies: int | None = None,
        max_failed_rounds: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                "strategy must be a flwr.serverapp.strategy.Strategy, "
                f"got {type(strategy).__name__}"
            )
        if min_train_replies is None:
            min_train_replies = int(getattr(strategy, "min_train_nodes", 1))
        if min_train_replies < 1:
            raise ValueError(f"min_train_replies must be >= 1, got {min_train_replies}")
        if max_failed_rounds < 0:
            raise ValueError(f"max_failed_rounds must be >= 0, got {max_failed_rounds}")
        if not node_wait_timeout > 0:
            raise ValueError(f"node_wait_timeout must be > 0 seconds, got {node_wait_timeout}")
        self.strategy = strategy
        # Where the inner strategy puts the model and the weight in its messages.
        self.arrays_key = str(getattr(strategy, "arrayrecord_key", "arrays"))
        self.weight_key = str(getattr(strategy, "weighted_by_key", "num-examples"))
        self.min_train_replies = min_train_replies
        self.max_failed_rounds = max_failed_rounds
        self.node_wait_timeout = node_wait_timeout
        self._sent_to: dict[int, list[int]] = {}
        self._evaluated_by: dict[int, list[int]] = {}
        self.round_timeout = 3600.0
        self._expected_shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    # -- the five Strategy methods -------------------------------------------------

    def summary(self) -> None:
        """Log this wrapper's settings, then the inner strategy's summary."""
        log(
            INFO,
            "\t├──> %s: min train replies %d, tolerated consecutive failed rounds %d",
            type(self).__name__,
            self.min_train_replies,
            self.max_failed_rounds,
        )
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Wait (bounded) for enough nodes, then let the inner strategy configure."""
        self._wait_for_nodes(grid)
        self._expected_shapes = _shapes_of(arrays)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent_to[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop unusable replies (naming the node), aggregate, fail loudly if too few."""
        usable = self._usable_replies(server_round, replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, usable)
        if arrays is None:
            raise RoundFailedError(
                server_round,
                f"{type(self.strategy).__name__} aggregated no model from {len(usable)} replies",
            )
        self._check_finite(server_round, arrays)
        return arrays, metrics

    def _aggregate_as_one_reply(
        self, server_round: int, arrays: ArrayRecord, weight: int, reply: Message | None = None
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        """The inner strategy's aggregate of a single reply carrying ``arrays``.

        For wrappers that compute the mean themselves: the inner strategy's own step
        (e.g. FedAdam's) still applies. ``reply`` is reused as the envelope if given.
        """
        if reply is None:
            reply = Message(RecordDict(), dst_node_id=0, message_type="train")
        reply.content = RecordDict(
            {self.arrays_key: arrays, "metrics": MetricRecord({self.weight_key: weight})}
        )
        aggregated, metrics = self.strategy.aggregate_train(server_round, [reply])
        if aggregated is None:
            raise RoundFailedError(
                server_round, f"{type(self.strategy).__name__} returned no model"
            )
        return aggregated, metrics

    @staticmethod
    def _check_finite(server_round: int, arrays: ArrayRecord) -> None:
        """Fail the round if an aggregated array holds NaN or inf."""
        bad = _first_non_finite(arrays)
        if bad is not None:
            raise RoundFailedError(server_round, f"aggregated array '{bad}' has NaN or inf values")

    def _usable_replies(
        self, server_round: int, replies: Iterable[Message], minimum: int | None = None
    ) -> list[Message]:
        """The replies that can be aggregated; the others are logged by node.

        Raises :class:`RoundFailedError` if fewer than ``minimum`` (default
        ``min_train_replies``) remain.
        """
        minimum = self.min_train_replies if minimum is None else minimum
        replies = list(replies)
        sent_to = self._sent_to.get(server_round, [])
        silent = self._log_silent_nodes(server_round, "training", sent_to, replies)

        usable: list[Message] = []
        problems: list[str] = []
        for reply in replies:
            problem = self._reply_problem(reply)
            if problem is None:
                usable.append(reply)
            else:
                problems.append(f"node {reply.metadata.src_node_id}: {problem}")
                log(
                    ERROR,
                    "round %d: rejected reply of node %s: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    problem,
                )
        self._require_usable(
            server_round, len(usable), sent_to, problems, silent, minimum, "training replies"
        )
        return usable

    @staticmethod
    def _require_usable(
        server_round: int,
        usable_count: int,
        sent_to: list[int],
        problems: list[str],
        silent: list[int],
        minimum: int,
        what: str,
    ) -> None:
        """Raise :class:`RoundFailedError` if fewer than ``minimum`` ``what`` are usable."""
        if usable_count < minimum:
            detail = "; ".join(problems) if problems else "no errors reported"
            if silent:
                detail += f"; no reply from {len(silent)} node(s)"
            raise RoundFailedError(
                server_round,
                f"{usable_count} usable {what} of {len(sent_to)} requested, "
                f"at least {minimum} needed ({detail})",
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to the inner strategy, remembering whom it asked."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._evaluated_by[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate to the inner strategy, logging error replies by node."""
        replies = list(replies)
        self._log_silent_nodes(
            server_round, "evaluation", self._evaluated_by.get(server_round, []), replies
        )
        for reply in replies:
            if reply.has_error():
                log(
                    WARNING,
                    "round %d: evaluation failed on node %s: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
        return self.strategy.aggregate_evaluate(server_round, replies)

    # -- the loop ------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        should_stop: Callable[[int, Result], bool] | None = None,
    ) -> PrivacyResult:
        """Run ``num_rounds`` rounds like ``Strategy.start``, but never fail silently.

        A round that yields no model is recorded in ``result.failed_rounds`` and
        logged; more than ``max_failed_rounds`` consecutive failures raise
        :class:`RunHaltedError` carrying the partial result. ``timeout`` bounds every
        exchange of every wrapped layer and is the TTL of every message sent (see
        :meth:`set_round_timeout`). ``should_stop(round, result)``, as in Flower 1.43,
        is called after each round (not round 0); True ends the run cleanly with what
        was collected, noted in ``result.halt_reason``. Returns a :class:`PrivacyResult`.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        self.set_round_timeout(timeout)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        log(INFO, "Starting %s strategy for %d rounds:", type(self).__name__, num_rounds)
        self.prepare_run(grid, num_rounds)
        self.summary()

        result = PrivacyResult(arrays=initial_arrays)
        t_start = time.time()
        if evaluate_fn:
            self._evaluate_centrally(evaluate_fn, 0, initial_arrays, result)
        arrays = initial_arrays
        consecutive_failures = 0
        for server_round in range(1, num_rounds + 1):
            stop = self.stop_reason(server_round)
            if stop is not None:
                result.halt_reason = stop
                log(WARNING, "Run stopped before round %d: %s", server_round, stop)
                break
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            try:
                new_arrays, train_metrics = self._train_round(
                    grid, server_round, arrays, train_config, timeout
                )
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
                    self._evaluate_round(
                        grid, server_round, arrays, evaluate_config, timeout, result
                    )
                except RoundFailedError as err:
                    # The nodes refused the new model (e.g. it failed their checks): roll back.
                    arrays = result.arrays = previous
                    consecutive_failures += 1
                    self._record_failure(
                        result, server_round, err, consecutive_failures, "evaluation refused"
                    )
                else:
                    consecutive_failures = 0
                    if evaluate_fn:
                        self._evaluate_centrally(evaluate_fn, server_round, arrays, result)
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
        if isinstance(err, NotEnoughNodesError) or consecutive > self.max_failed_rounds:
            result.halt_reason = (
                f"round {server_round} failed ({reason}) after {consecutive} consecutive "
                f"failed round(s); max_failed_rounds={self.max_failed_rounds}"
            )
            log(ERROR, "Run halted: %s", result.halt_reason)
            raise RunHaltedError(result.halt_reason, result) from err

    def _evaluate_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
        result: PrivacyResult,
    ) -> None:
        messages = list(self.configure_evaluate(server_round, arrays, config, grid))
        if not messages:
            return
        _limit_ttl(messages, timeout)
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        metrics = self.aggregate_evaluate(server_round, replies)
        if metrics is None:
            log(WARNING, "round %d: federated evaluation returned no metrics", server_round)
        else:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
            result.evaluate_metrics_clientapp[server_round] = metrics

    # -- seams for wrappers ----------------------------------------------------------

    def set_round_timeout(self, timeout: float) -> None:
        """Bound every exchange of this layer and of every wrapper beneath by ``timeout``.

        :meth:`start` calls it on the outermost layer; each layer passes it on to the
        StrictRounds-derived strategy it wraps, whose own exchanges (e.g. secure
        aggregation's key set-up and unmasking) use ``round_timeout`` as their wait and
        their messages' TTL.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.round_timeout = float(timeout)
        if isinstance(self.strategy, StrictRounds):
            self.strategy.set_round_timeout(timeout)

    def prepare_run(self, grid: Grid, num_rounds: int) -> None:
        """Called by :meth:`start` before round 1; wrappers set up per-run state here."""
        if isinstance(self.strategy, StrictRounds):
            self.strategy.prepare_run(grid, num_rounds)

    @property
    def innermost(self) -> Strategy:
        """The Flower strategy at the bottom of a stack of wrappers (it selects nodes)."""
        inner = self.strategy
        while isinstance(inner, StrictRounds):
            inner = inner.strategy
        return inner

    @property
    def empty_rounds_aggregate(self) -> bool:
        """Whether a round in which no node was selected still aggregates (e.g. DP noise)."""
        return False

    def stop_reason(self, server_round: int) -> str | None:
        """Why the run must end cleanly before ``server_round`` (kept model), or None."""
        return None

    # -- helpers -------------------------------------------------------------------

    def _train_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[ArrayRecord, MetricRecord | None]:
        messages = list(self.configure_train(server_round, arrays, config, grid))
        if not messages and not self.empty_rounds_aggregate:
            raise RoundFailedError(server_round, "no node was selected for training")
        _limit_ttl(messages, timeout)
        replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
        new_arrays, metrics = self.aggregate_train(server_round, replies)
        if new_arrays is None:  # a subclass may override aggregate_train
            raise RoundFailedError(server_round, "aggregation returned no model")
        return new_arrays, metrics

    @staticmethod
    def _log_silent_nodes(
        server_round: int, stage: str, asked: list[int], replies: list[Message]
    ) -> list[int]:
        replied = {m.metadata.src_node_id for m in replies}
        silent = [node for node in asked if node not in replied]
        if silent:
            log(
                WARNING,
                "round %d: no %s reply from node(s) %s before the timeout (node down or too slow)",
                server_round,
                stage,
                silent,
            )
        return silent

    def _wait_for_nodes(self, grid: Grid) -> None:
        needed = int(getattr(self.innermost, "min_available_nodes", 1))
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                raise NotEnoughNodesError(
                    f"only {connected} node(s) connected after waiting "
                    f"{self.node_wait_timeout:.0f} s; the strategy needs "
                    f"min_available_nodes={needed}"
                )
            log(INFO, "Waiting for nodes: %d connected, %d needed", connected, needed)
            time.sleep(min(1.0, self.node_wait_timeout))

    def _reply_problem(self, reply: Message) -> str | None:
        """Why a training reply cannot be aggregated, or None if it can."""
        if reply.has_error():
            return f"error reply ({reply.error.reason})"
        records = [r for r in reply.content.array_records.values()]
        if len(records) != 1:
            return f"expected exactly one ArrayRecord, found {len(records)}"
        received = _shapes_of(records[0])
        if self._expected_shapes and received != self._expected_shapes:
            missing = sorted(set(self._expected_shapes) - set(received))
            extra = sorted(set(received) - set(self._expected_shapes))
            wrong = sorted(
                key
                for key in set(received) & set(self._expected_shapes)
                if received[key] != self._expected_shapes[key]
            )
            return (
                "arrays do not match the global model "
                f"(missing {missing}, unexpected {extra}, wrong shape or dtype {wrong})"
            )
        bad = _first_non_finite(records[0])
        if bad is not None:
            return f"array '{bad}' has NaN or inf values"
        return None

    @staticmethod
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


def _limit_ttl(messages: list[Message], timeout: float) -> None:
    # Inner Flower strategies (FedAvg) send Flower's default TTL of 12 hours: a message
    # still queued after the round gave up on it must not be delivered later.
    for message in messages:
        message.metadata.ttl = min(message.metadata.ttl, timeout)


def _shapes_of(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    return {key: (tuple(arr.shape), str(arr.dtype)) for key, arr in arrays.items()}


def _first_non_finite(arrays: ArrayRecord) -> str | None:
    for key, arr in arrays.items():
        values = arr.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return key
    return None
