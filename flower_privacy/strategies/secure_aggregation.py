"""Secure aggregation as a strategy wrapper for Flower's Message API.

``SecureAggregation(FedAvg(...))`` on the server and ``ClientApp(mods=[secagg_mod])``
on the clients: the server learns only the sum of the clients' weighted updates and
the sum of their weights, and hands the mean to the inner strategy. The protocol
itself lives in :mod:`flower_privacy.secagg.protocol`; this module only moves records.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flower_privacy._arrays import add_flat
from flower_privacy.dp.distributed import DistributedNoiseEncoding
from flower_privacy.errors import RoundFailedError, revealed_on_failure
from flower_privacy.secagg import protocol
from flower_privacy.secagg.multiround import GroupPlan
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.strategies import _replies
from flower_privacy.strategies._secagg_checks import (
    MEAN_STRATEGIES,
    WEIGHTINGS,
    check_arguments,
    check_inner,
    check_one_content,
    check_revealed_weight,
    check_sum_settings,
    check_train_count,
)
from flower_privacy.strategies._secagg_result import (
    SecureSum,
    log_security_events,
    log_sum,
    record_participation,
    sum_metrics,
)
from flower_privacy.strategies._secagg_setup import (
    CohortSetup,
    expected_cohort,
    largest_cohort,
    run_quantizer,
)
from flower_privacy.strategies._stage_exchange import RefusalEvent, StageExchange
from flower_privacy.strategies.strict_rounds import StrictRounds
from flower_privacy.wire import secagg as wire

__all__ = ["MEAN_STRATEGIES", "WEIGHTINGS", "SecureAggregation"]


class SecureAggregation(StrictRounds):
    """Wrap a mean-based strategy so that the server sees only sums of masked updates.

    Every round uses fresh per-round keys and self-mask seeds (round-scoped secrets):
    a key rebuilt for a dropout unmasks that round only. ``SecureAggregation`` samples
    each round's cohort itself, one round ahead (from the inner strategy's
    ``fraction_train`` and ``min_train_nodes``, or the groups' rule), so that the next
    cohort prepares its secrets in the same exchange that unmasks the current round.

    Parameters
    ----------
    strategy : Strategy
        FedAvg, FedAvgM, FedProx, FedAdam, FedYogi or FedAdagrad (or a subclass that
        still aggregates by weighted mean; pass ``trust_inner_is_mean=True`` for your own).
        It must send every node the same content (per-node models or configs are refused).
    clip_range : float
        Each coordinate of a client's update (its new weights minus the global ones) is
        clipped to ``[-clip_range, clip_range]``; the clipped count is reported.
    max_weight : int
        A client's weight (``num-examples``) is capped here; it bounds the quantisation.
    max_clients : int | None
        Most clients in one round; with ``max_weight`` and ``clip_range`` it fixes a
        scale at which the sum cannot wrap. Default: derived when the run starts from
        the largest cohort the sampling can draw (the inner strategy's fraction of the
        connected nodes, whole groups, or every node for Poisson); cohorts are then
        sampled no larger (Poisson rounds that would be larger fail).
    max_mean_error : float | None
        Bound on the worst-case rounding error of each coordinate of the mean (default
        ``clip_range * 1e-3``). The ring is 32-bit words when that bound allows it and
        64-bit otherwise, derived once per run.
    max_colluders : int
        Clients of a neighbourhood that may collude with the server: the threshold is
        ``floor((k + c) / 2) + 1`` of k holders. Clients enforce their own (node config
        ``secagg-max-colluders``) and refuse less.
    degree : int | None
        Neighbours per node in each round's graph (default: all up to 8, else ~2·log2 n).
    weighting : str
        ``"weighted"`` (by the reply's ``num-examples``, capped) or ``"uniform"``.
    uniform_denominator : float | None
        In uniform mode, divide the sum by this fixed number instead of the number of
        survivors (a data-independent mean). Client-level DP refuses it: its release
        step divides by its own expected count.
    trust_inner_is_mean : bool
        Accept an inner strategy not known to aggregate by weighted mean.
    consistency_check : bool
        Against a server that shows different clients different views: clients sign
        their long-term keys (signing keys and a roster from ``flower-privacy keys
        signing``, named in each node's config) and the round view, and a holder reveals
        shares of a node only with a majority of that node's holders' signatures on the
        same view. One more exchange per round.
    group_size : int | None
        Multi-round privacy (So et al., AAAI-23): fixed groups of this size, recomputable
        by every client; each round takes whole groups, and a group with a member missing
        is left out whole, so that no combination of rounds' aggregates isolates fewer
        than ``group_size`` nodes. Clients keep the groups for the whole Flower run.
    selection : str
        With groups: ``"least-used"`` (fair), ``"poisson"`` (each group with probability
        ``sampling_rate``) or ``"random"`` (per node, the unsafe baseline).
    sampling_rate : float | None
        Group sampling probability for ``"poisson"``.
    selection_seed : int | None
        Reproducible groups and selection, for experiments; refused with ``"poisson"``.
    max_refusals : int
        How many distinct nodes may refuse a request (each refusal a security event,
        logged with the node id) before the run stops; one node alone never stops it.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip_range: float = 1.0,
        max_weight: int = 10_000,
        max_clients: int | None = None,
        max_mean_error: float | None = None,
        max_colluders: int = 0,
        degree: int | None = None,
        weighting: str = "weighted",
        uniform_denominator: float | None = None,
        trust_inner_is_mean: bool = False,
        consistency_check: bool = False,
        group_size: int | None = None,
        selection: str = "least-used",
        sampling_rate: float | None = None,
        selection_seed: int | None = None,
        max_refusals: int = 10,
        min_train_replies: int | None = None,
        max_failed_rounds: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        check_inner(strategy, trust_inner_is_mean)
        super().__init__(
            strategy,
            min_train_replies=min_train_replies,
            max_failed_rounds=max_failed_rounds,
            node_wait_timeout=node_wait_timeout,
        )
        check_arguments(
            weighting=weighting,
            uniform_denominator=uniform_denominator,
            max_refusals=max_refusals,
            clip_range=clip_range,
            max_weight=max_weight,
            max_clients=max_clients,
            max_mean_error=max_mean_error,
        )
        self.clip_range, self.max_weight = clip_range, max_weight
        self.max_clients, self.max_mean_error = max_clients, max_mean_error
        self._quantizer: Quantizer | None = None
        self.weighting = weighting
        self.uniform_denominator = uniform_denominator
        self.max_colluders, self.degree = max_colluders, degree
        self.consistency_check = consistency_check
        self.max_refusals = max_refusals
        if group_size is not None:
            GroupPlan(group_size, selection, b"", sampling_rate, selection_seed)  # validate
            if selection == "random":
                log(WARNING, "selection='random' gives no multi-round privacy: for baselines only")
        self.group_size, self.selection, self.sampling_rate = group_size, selection, sampling_rate
        self.selection_seed = selection_seed
        # Groups are fixed for the strategy's life: clients refuse a regrouping.
        self._group_seed = (
            os.urandom(32)
            if selection_seed is None
            else hashlib.sha256(b"flower-privacy/groups|%d" % selection_seed).digest()
        )
        self._rng = (
            random.Random(selection_seed) if selection_seed is not None else random.SystemRandom()
        )
        self.plan: GroupPlan | None = None
        self.protocol = self._new_protocol()
        self._exchanger: StageExchange | None = None
        self._setup: CohortSetup | None = None
        self._global: ArrayRecord | None = None
        # Per round: how clients encode (None: the quantiser), as an outer layer asked in
        # the train config (wire.SumSettings).
        self._encodings: dict[int, DistributedNoiseEncoding | None] = {}

    def _new_protocol(self) -> protocol.SecAggServer:
        self.plan = (
            GroupPlan(
                self.group_size,
                self.selection,
                self._group_seed,
                self.sampling_rate,
                self.selection_seed,
            )
            if self.group_size is not None
            else None
        )
        return protocol.SecAggServer(
            max_colluders=self.max_colluders, degree=self.degree, consistency=self.consistency_check
        )

    # -- Strategy ---------------------------------------------------------------------

    def prepare_run(self, grid: Grid, num_rounds: int) -> None:
        """Every run is a new protocol run (new nonce, new rounds; groups stay)."""
        plan = self.plan
        self.protocol = self._new_protocol()
        if plan is not None and self.plan is not None and plan.generations:
            self.plan = plan  # the clients keep the groups for the Flower run: so do we
        self._encodings = {}
        self._exchanger = StageExchange(grid, lambda: self.round_timeout, self.max_refusals)
        super().prepare_run(grid, num_rounds)
        self._wait_for_nodes(grid)
        population = len(list(grid.get_node_ids()))
        self._quantizer = run_quantizer(
            self.clip_range,
            self.max_weight,
            self.max_clients or largest_cohort(self.innermost, self.plan, population),
            self.max_mean_error,
            self.plan,
        )
        self._setup = CohortSetup(
            self.protocol,
            self._exchanger,
            self.innermost,
            self.plan,
            self._rng,
            cap=self._quantizer.max_clients,
            min_survivors=self.min_train_replies,
            num_rounds=num_rounds,
        )

    @property
    def quantizer(self) -> Quantizer:
        """This run's fixed-point encoding (derived when the run starts)."""
        if self._quantizer is None:
            raise RuntimeError("the quantiser is derived when the run starts (prepare_run)")
        return self._quantizer

    def expected_cohort_size(self) -> float:
        """Nodes a round is expected to sum, by the sampling rule, from the nodes connected.

        A public figure (the federation size is treated as public, as Opacus treats the
        dataset size): client-level DP divides by it.
        """
        assert self._exchanger is not None, "the run has not started (prepare_run)"
        population = len(list(self._exchanger.grid.get_node_ids()))
        return expected_cohort(self.innermost, self.plan, population, self.quantizer.max_clients)

    @property
    def refusals(self) -> list[RefusalEvent]:
        """Every structured refusal of this run (security events), oldest first."""
        return [] if self._exchanger is None else list(self._exchanger.refusals)

    def stop_reason(self, server_round: int) -> str | None:
        if self._exchanger is not None and self._exchanger.over_limit():
            return self._exchanger.limit_reason()
        return super().stop_reason(server_round)

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> SecureAggregation: clip ±%s, max weight %d, max clients %d "
            "(%d-bit words, mean error <= %.3g), colluders tolerated %d, %s weighting, "
            "round-scoped keys",
            self.quantizer.clip_range,
            self.quantizer.max_weight,
            self.quantizer.max_clients,
            self.quantizer.word_bits,
            self.quantizer.resolution,
            self.max_colluders,
            self.weighting,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._exchanger is None:
            self.prepare_run(grid, server_round)
        config, settings = wire.SumSettings.take(config)
        self._encodings[server_round] = check_sum_settings(settings, self.weighting)
        self._encodings.pop(server_round - 2, None)
        inner = list(super().configure_train(server_round, arrays, config, grid))
        if not inner:
            return []
        check_one_content(server_round, inner)
        assert self._setup is not None
        if not self.protocol.has_round(server_round):
            self._setup.prepare(server_round, len(inner))
        leave_out: list[int] = []
        if self.plan is not None:  # a group with a member that did not prepare sits out
            _kept, leave_out = self.plan.keep(self.protocol.prepared_nodes(server_round))
        requests = self.protocol.train_requests(server_round, leave_out)
        check_train_count(
            server_round,
            len(requests),
            len(self.protocol.cohort(server_round)),
            self.min_train_replies,
            self.quantizer.max_clients,
        )
        shared = wire.without_stages(inner[0].content)
        masking = self._masking(server_round).to_payload()
        messages = []
        for node, request in requests.items():
            content = RecordDict(dict(shared.items()))
            wire.put(content, wire.TRAIN, request)
            wire.put(content, wire.MASKING, masking)
            messages.append(
                Message(content, node, "train", ttl=self.round_timeout, group_id=str(server_round))
            )
        self._global = arrays
        self._sent_to[server_round] = list(requests)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the round's sum, divide it, and hand the mean to the inner strategy."""
        if self._encodings[server_round] is not None:  # refused before anything is unmasked
            raise RoundFailedError(
                server_round,
                "this round's sum carries a DP encoding: the layer that asked for it "
                "releases it (aggregate_sum, then step)",
            )
        secure_sum = self.aggregate_sum(server_round, replies)
        with revealed_on_failure(server_round):
            denominator = self.uniform_denominator or secure_sum.weight
            mean_delta = self.quantizer.decode_sum(secure_sum.total, denominator)
            return self.step(server_round, secure_sum, mean_delta)

    def aggregate_sum(self, server_round: int, replies: Iterable[Message]) -> SecureSum:
        """The round's unmasked sum (the aggregation; releasing it is the caller's).

        A failure once the sum is unmasked is a :class:`RoundFailedError` with
        ``revealed=True``.
        """
        assert self._global is not None and self._exchanger is not None and self._setup
        length = sum(int(np.prod(a.shape)) for a in self._global.values())
        replies = list(replies)
        _replies.log_silent_nodes(server_round, "training", self._sent_to[server_round], replies)
        uploads = self._exchanger.payloads(server_round, wire.UPLOAD, replies)
        by_node = {r.metadata.src_node_id: r for r in replies}
        excluded = self._setup.accept_uploads(
            server_round, uploads, length, self._word_bits(server_round)
        )
        survivors = self.protocol.survivors(server_round)
        if len(survivors) < self.min_train_replies:
            raise RoundFailedError(
                server_round,
                f"{len(survivors)} masked uploads of {len(self._sent_to[server_round])}, "
                f"at least {self.min_train_replies} needed",
            )
        shares = self._setup.unmask(server_round, self.consistency_check)
        try:
            result = self.protocol.unmask(
                server_round, shares, length, self._word_bits(server_round)
            )
        except protocol.ProtocolError as err:
            raise RoundFailedError(server_round, f"unmasking failed: {err}") from None
        with revealed_on_failure(server_round):
            return self._secure_sum(server_round, result, excluded, by_node[result.survivors[0]])

    def step(
        self, server_round: int, secure_sum: SecureSum, mean_delta: np.ndarray
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The inner strategy's own step (e.g. FedAdam's) on the released mean update."""
        assert self._global is not None
        arrays, metrics = self._aggregate_as_one_reply(
            server_round, add_flat(self._global, mean_delta), secure_sum.weight, secure_sum.envelope
        )
        return arrays, MetricRecord({**(metrics or {}), **secure_sum.metrics})

    # -- the round's result ----------------------------------------------------------

    def _masking(self, server_round: int) -> wire.Masking:
        encoding = self._encodings[server_round]
        return wire.Masking(
            arrays_key=self.arrays_key,
            weight_key=self.weight_key,
            weighting=self.weighting,
            clip_range=self.quantizer.clip_range,
            max_weight=self.quantizer.max_weight,
            max_clients=self.quantizer.max_clients,
            word_bits=self._word_bits(server_round),
            dp={} if encoding is None else encoding.request_fields(),
        )

    def _word_bits(self, server_round: int) -> int:
        """The ring's word width in a round: its encoding's (32 for distributed DP)."""
        return (self._encodings[server_round] or self.quantizer).word_bits

    def _secure_sum(
        self,
        server_round: int,
        result: protocol.RoundResult,
        excluded: list[int],
        envelope: Message,
    ) -> SecureSum:
        log_security_events(server_round, result)
        metrics = sum_metrics(result, excluded)
        if self.plan is not None:  # first: the server has seen this sum, valid or not
            metrics[wire.METRIC_PRIVACY_T] = record_participation(
                server_round, self.plan, result.survivors
            )
        check_revealed_weight(server_round, result, self.weighting, self.quantizer.max_weight)
        log_sum(server_round, result, self.quantizer.clip_range)
        return SecureSum(result.total, result.weight, metrics, envelope)
