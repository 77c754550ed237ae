"""A strategy wrapper under which no round fails silently.

Flower's ``Strategy.start`` keeps the old model when ``aggregate_train`` returns
nothing and waits forever for nodes that never connect. ``StrictRounds`` wraps any
Message-API strategy and instead records every failed round in the history, halts
the run with :class:`~flower_privacy.errors.RunHaltedError` once it cannot make
progress, rejects replies whose arrays are malformed or not finite, and names the
nodes that did not answer. Every flower-privacy wrapper builds on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_privacy.errors import NotEnoughNodesError, RoundFailedError, RunHaltedError
from flower_privacy.strategies import _replies
from flower_privacy.strategies._round_loop import RoundLoop
from flower_privacy.strategies.result import PrivacyResult


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
        self._expected_shapes: _replies.Shapes = {}

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
        self._expected_shapes = _replies.shapes_of(arrays)
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
        bad = _replies.first_non_finite(arrays)
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
        silent = _replies.log_silent_nodes(server_round, "training", sent_to, replies)

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
        _replies.require_usable(
            server_round, len(usable), sent_to, problems, silent, minimum, "training replies"
        )
        return usable

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
        _replies.log_silent_nodes(
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
        initial_arrays = self._run_input(initial_arrays, evaluate_fn)
        try:
            loop = RoundLoop(
                self,
                grid,
                timeout,
                ConfigRecord() if train_config is None else train_config,
                ConfigRecord() if evaluate_config is None else evaluate_config,
                evaluate_fn,
            )
            result = loop.run(initial_arrays, num_rounds, should_stop)
        except RunHaltedError as err:
            self._run_output(err.result.arrays)
            raise
        self._run_output(result.arrays)
        return result

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

    def _run_input(
        self,
        initial_arrays: ArrayRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> ArrayRecord:
        """The model round 1 starts from (a layer may refuse ``evaluate_fn`` or encrypt).

        Passed down the stack of layers, like :meth:`prepare_run`.
        """
        if isinstance(self.strategy, StrictRounds):
            return self.strategy._run_input(initial_arrays, evaluate_fn)
        return initial_arrays

    def _run_output(self, arrays: ArrayRecord) -> None:
        """Called with the final model when the run ends, halted or not (down the stack)."""
        if isinstance(self.strategy, StrictRounds):
            self.strategy._run_output(arrays)

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
        return _replies.reply_problem(reply, self._expected_shapes)
