"""Secure aggregation as a strategy wrapper for Flower's Message API.

``SecureAggregation(FedAvg(...))`` on the server and ``ClientApp(mods=[secagg_mod])``
on the clients: the server learns only the sum of the clients' weighted updates and
the sum of their weights, and hands the mean to the inner strategy. The protocol
itself lives in :mod:`flower_privacy.secagg.protocol`; this module only moves records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
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
from flower_privacy._arrays import add_flat
from flower_privacy.dp.distributed import DistributedNoiseEncoding
from flower_privacy.errors import RoundFailedError
from flower_privacy.secagg import protocol
from flower_privacy.secagg.multiround import GroupPlan
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.strategies.strict_rounds import StrictRounds

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
WEIGHTINGS = ("weighted", "uniform")
_SETUP_ATTEMPTS = 3


class SecureAggregation(StrictRounds):
    """Wrap a mean-based strategy so that the server sees only sums of masked updates.

    Parameters
    ----------
    strategy : Strategy
        FedAvg, FedAvgM, FedProx, FedAdam, FedYogi or FedAdagrad (or a subclass that
        still aggregates by weighted mean; pass ``trust_inner_is_mean=True`` for your own).
    clip_range : float
        Each coordinate of a client's update (its new weights minus the global ones) is
        clipped to ``[-clip_range, clip_range]``; the clipped count is reported.
    max_weight : int
        A client's weight (``num-examples``) is capped here; it bounds the quantisation.
    max_clients : int
        Most clients in one round; with ``max_weight`` and ``clip_range`` it fixes a
        scale at which the sum cannot wrap around 2^32.
    threshold_fraction : float
        A secret is shared so that more than this fraction of a node's neighbours can
        rebuild it; unmasking needs that many survivors among them.
    degree : int | None
        Neighbours per node (default: all nodes up to 8, else about 2·log2 n).
    weighting : str
        ``"weighted"`` (by the reply's ``num-examples``, capped) or ``"uniform"``.
    uniform_denominator : float | None
        In uniform mode, divide the sum by this fixed number instead of the number of
        survivors (client-level DP needs a data-independent denominator).
    trust_inner_is_mean : bool
        Accept an inner strategy not known to aggregate by weighted mean.
    consistency_check : bool
        Bonawitz et al.'s check against a server that shows different clients different
        survivor lists: clients sign their keys and the lists (signing keys and a roster
        from ``flower-privacy keys signing``, named in each node's config) and unmask
        only with enough neighbours' signatures on the same lists. One more exchange
        per round.
    group_size : int | None
        Multi-round privacy (So et al., AAAI-23): nodes are partitioned into fixed groups
        of this size, recomputable by every client from the run seed; each round takes
        whole groups, and a group with a member missing is left out whole, so that no
        combination of rounds' aggregates isolates fewer than ``group_size`` nodes.
        None: the inner strategy samples (no multi-round protection).
    selection : str
        With groups: ``"least-used"`` (fair), ``"poisson"`` (each group with probability
        ``sampling_rate``: Poisson sampling of every node) or ``"random"`` (per node,
        the unsafe baseline, for comparisons only).
    sampling_rate : float | None
        Group sampling probability for ``"poisson"``.
    selection_seed : int | None
        Reproducible groups, ``least-used`` tie-breaks and ``random`` selection, for
        experiments; refused with ``"poisson"`` (its sampling always comes from the OS
        CSPRNG).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip_range: float = 1.0,
        max_weight: int = 10_000,
        max_clients: int = 100,
        threshold_fraction: float = 0.5,
        degree: int | None = None,
        weighting: str = "weighted",
        uniform_denominator: float | None = None,
        trust_inner_is_mean: bool = False,
        consistency_check: bool = False,
        group_size: int | None = None,
        selection: str = "least-used",
        sampling_rate: float | None = None,
        selection_seed: int | None = None,
        min_train_replies: int | None = None,
        max_failed_rounds: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        _check_inner(strategy, trust_inner_is_mean)
        super().__init__(
            strategy,
            min_train_replies=min_train_replies,
            max_failed_rounds=max_failed_rounds,
            node_wait_timeout=node_wait_timeout,
        )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if uniform_denominator is not None and (
            weighting != "uniform" or not uniform_denominator > 0
        ):
            raise ValueError(
                f"uniform_denominator needs weighting='uniform' and a value > 0, got "
                f"{uniform_denominator!r} with weighting={weighting!r}"
            )
        self.quantizer = Quantizer(
            clip_range=clip_range, max_weight=max_weight, max_clients=max_clients
        )
        self.weighting = weighting
        self.uniform_denominator = uniform_denominator
        self.threshold_fraction, self.degree = threshold_fraction, degree
        self.consistency_check = consistency_check
        if group_size is not None:
            # Validate now (the plan is rebuilt with each run's seed).
            GroupPlan(group_size, selection, b"", sampling_rate, selection_seed)
            if selection == "random":
                log(WARNING, "selection='random' gives no multi-round privacy: for baselines only")
        self.group_size, self.selection, self.sampling_rate = group_size, selection, sampling_rate
        self.selection_seed = selection_seed
        self.plan: GroupPlan | None = None
        self.protocol = self._new_protocol()
        self._grid: Grid | None = None
        self._stage_notes: list[str] = []
        self._global: ArrayRecord | None = None
        self._cohort: list[int] = []
        # Seam for ClientLevelDP: how clients encode their update (None: the
        # fixed-point quantiser), and the last round whose sum the server unmasked.
        self.encoding: DistributedNoiseEncoding | None = None
        self.unmasked_round: int | None = None

    # -- seams for multi-round privacy (node selection, which survivors to unmask) --------

    def _new_protocol(self) -> protocol.SecAggServer:
        server = protocol.SecAggServer(
            threshold_fraction=self.threshold_fraction,
            degree=self.degree,
            consistency=self.consistency_check,
        )
        self.plan = (
            GroupPlan(
                self.group_size,
                self.selection,
                self._group_seed(server.run),
                self.sampling_rate,
                self.selection_seed,
            )
            if self.group_size is not None
            else None
        )
        return server

    def _group_seed(self, run: bytes) -> bytes:
        """The public seed of the partition: the run nonce, or fixed by ``selection_seed``.

        Both are chosen by the server and sent to every client, so a fixed seed gives the
        server no more say over the groups; it only makes experiments repeatable.
        """
        if self.selection_seed is None:
            return run
        return hashlib.sha256(b"flower-privacy/groups|%d" % self.selection_seed).digest()

    def select_nodes(
        self, server_round: int, sampled: list[int], population: list[int]
    ) -> list[int]:
        """The round's cohort among the keyed ``population``.

        With groups, whole groups chosen by the selection rule (as many nodes as the
        inner strategy sampled); without, the nodes the inner strategy sampled.
        """
        if self.plan is None:
            return sorted(n for n in sampled if n in population)
        self.plan.update(population)
        return self.plan.select(population, len(sampled))

    # -- Strategy ---------------------------------------------------------------------

    def prepare_run(self, grid: Grid, num_rounds: int) -> None:
        """Every run is a new protocol run (fresh keys)."""
        self.protocol = self._new_protocol()
        self.unmasked_round = None
        super().prepare_run(grid, num_rounds)

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> SecureAggregation: clip ±%s, max weight %d, max clients %d, "
            "threshold > %.0f%% of neighbours, %s weighting",
            self.quantizer.clip_range,
            self.quantizer.max_weight,
            self.quantizer.max_clients,
            100 * self.protocol.threshold_fraction,
            self.weighting,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        inner = list(super().configure_train(server_round, arrays, config, grid))
        if not inner:
            return []
        population = self._ensure_keys(server_round, sorted(grid.get_node_ids()))
        cohort = self.select_nodes(
            server_round, [m.metadata.dst_node_id for m in inner], population
        )
        if len(cohort) > self.quantizer.max_clients:
            raise RoundFailedError(
                server_round,
                f"{len(cohort)} nodes selected but max_clients={self.quantizer.max_clients}: "
                "the quantised sum could wrap; raise max_clients",
            )
        if len(cohort) < 3:
            raise RoundFailedError(
                server_round, f"secure aggregation needs at least 3 keyed nodes, cohort {cohort}"
            )
        try:
            request = self.protocol.train_request(server_round, cohort)
        except protocol.ProtocolError as err:
            raise RoundFailedError(server_round, str(err)) from None
        if self.plan is not None and self.plan.rule != "random":
            request.update(self.plan.request_fields())
        request.update(
            {
                "arrays-key": self.arrays_key,
                "weight-key": self.weight_key,
                "weighting": self.weighting,
                "clip-range": self.quantizer.clip_range,
                "max-weight": self.quantizer.max_weight,
                "max-clients": self.quantizer.max_clients,
                # Clients refuse to unmask with fewer survivors (a distributed DP noise
                # share is calibrated for this many).
                "min-survivors": self.min_train_replies,
            }
        )
        if self.encoding is not None:
            request.update(self.encoding.request_fields())
        content = RecordDict({k: v for k, v in inner[0].content.items()})
        content[wire.RECORD] = wire.to_record(wire.TRAIN, request)
        self._global, self._cohort = arrays, cohort
        self._sent_to[server_round] = cohort
        return [
            Message(content, node, "train", ttl=self.round_timeout, group_id=str(server_round))
            for node in cohort
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        try:
            return self._secure_aggregate(server_round, list(replies))
        except RoundFailedError:
            # Uploaders not unmasked as survivors refuse to mask under their keys again.
            self.protocol.abandon_round()
            raise

    def _secure_aggregate(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None and self._grid is not None
        length = sum(int(np.prod(a.shape)) for a in self._global.values())
        self._log_silent_nodes(server_round, "training", self._cohort, replies)
        survivors_replies = []
        for reply in replies:
            node = reply.metadata.src_node_id
            problem = self._stage_problem(reply, wire.UPLOAD, server_round)
            if problem is None:
                problem = self.protocol.accept_upload(node, wire.payload_of(reply.content), length)
            if problem is None:
                survivors_replies.append(reply)
            else:
                log(
                    WARNING, "round %d: upload of node %s unusable: %s", server_round, node, problem
                )
        excluded: list[int] = []
        if self.plan is not None:
            kept, excluded = self.plan.keep(self.protocol.survivors())
            if excluded:
                log(
                    WARNING,
                    "round %d: nodes %s left out: their groups are incomplete",
                    server_round,
                    excluded,
                )
                self.protocol.exclude(excluded)
                survivors_replies = [
                    r for r in survivors_replies if r.metadata.src_node_id in set(kept)
                ]
        if len(survivors_replies) < self.min_train_replies:
            raise RoundFailedError(
                server_round,
                f"{len(survivors_replies)} masked uploads of {len(self._cohort)}, "
                f"at least {self.min_train_replies} needed",
            )
        if self.consistency_check:
            signed = self._exchange(
                server_round, wire.CONSISTENCY, self.protocol.consistency_requests()
            )
            self.protocol.accept_consistency(signed)
        unmask_replies = self._exchange(server_round, wire.UNMASK, self.protocol.unmask_requests())
        try:
            result = self.protocol.unmask(unmask_replies, length)
        except protocol.ProtocolError as err:
            raise RoundFailedError(server_round, f"unmasking failed: {err}") from None
        self.unmasked_round = server_round
        if result.weight < 1:
            raise RoundFailedError(server_round, "the survivors' total weight is zero")
        denominator = self.uniform_denominator or result.weight
        decoder = self.encoding if self.encoding is not None else self.quantizer
        mean_delta = decoder.decode_sum(result.total, denominator)
        arrays, metrics = self._aggregate_as_one_reply(
            server_round,
            add_flat(self._global, mean_delta),
            result.weight,
            survivors_replies[0],
        )
        metrics = MetricRecord(dict(metrics or {}))
        metrics.update(
            {
                "secagg-clients": len(result.survivors),
                "secagg-dropped": len(result.dropped),
                "secagg-excluded": len(excluded),
                "secagg-clipped": result.clipped,
            }
        )
        if self.plan is not None:
            self.plan.record(result.survivors)
            checked = self.plan.audit()
            privacy_t = checked.exact if checked.exact is not None else checked.lower_bound
            metrics["secagg-privacy-t"] = privacy_t
            if self.plan.rule != "random" and privacy_t < self.plan.group_size:
                raise RoundFailedError(
                    server_round,
                    f"the participation audit found T={privacy_t} < group_size="
                    f"{self.plan.group_size}: refusing to go on",
                )
        if result.clipped:
            log(
                WARNING,
                "round %d: %d update values were clipped to ±%s",
                server_round,
                result.clipped,
                self.quantizer.clip_range,
            )
        log(
            INFO,
            "round %d: securely aggregated %d clients (%d dropped)",
            server_round,
            len(result.survivors),
            len(result.dropped),
        )
        return arrays, metrics

    # -- internals ---------------------------------------------------------------------

    def _ensure_keys(self, server_round: int, population: list[int]) -> list[int]:
        """Key set-up for new or re-keyed nodes; returns the keyed population."""
        for _ in range(_SETUP_ATTEMPTS):
            to_key = self.protocol.nodes_to_key(population)
            if to_key:
                request = self.protocol.advertise_request()
                replies = self._exchange(server_round, wire.ADVERTISE, {n: request for n in to_key})
                accepted, problems = set(), []
                for node in to_key:
                    if node not in replies:
                        continue
                    try:
                        self.protocol.accept_advertisement(node, replies[node])
                        accepted.add(node)
                    except protocol.ProtocolError as err:
                        problems.append(str(err))
                        log(WARNING, "round %d: %s", server_round, err)
                if problems and not accepted:
                    raise RoundFailedError(server_round, f"key set-up: {problems[0]}")
                population = [n for n in population if n in accepted or n not in to_key]
            if not self.protocol.needs_distribution(population):
                return population
            if len(population) < 3:
                break
            request = self.protocol.distribute_request(population)
            replies = self._exchange(
                server_round, wire.DISTRIBUTE, {n: request for n in population}
            )
            if all(n in replies for n in population):
                try:
                    self.protocol.accept_distributions(replies)
                except protocol.ProtocolError as err:
                    raise RoundFailedError(server_round, f"key set-up: {err}") from None
                log(INFO, "secure aggregation keys set up for %d nodes", len(population))
                return population
            population = [n for n in population if n in replies]
        raise RoundFailedError(
            server_round,
            f"key set-up did not complete: {len(population)} nodes left "
            f"({'; '.join(self._stage_notes[-3:]) or 'no details'})",
        )

    def _exchange(
        self, server_round: int, stage: str, requests: dict[int, dict]
    ) -> dict[int, dict]:
        """Send one stage to several nodes; return the payloads of the good replies."""
        assert self._grid is not None
        messages = [
            Message(
                RecordDict({wire.RECORD: wire.to_record(stage, payload)}),
                node,
                "train",
                ttl=self.round_timeout,
                group_id=str(server_round),
            )
            for node, payload in requests.items()
        ]
        replies = list(self._grid.send_and_receive(messages, timeout=self.round_timeout))
        good, problems = {}, []
        self._stage_notes = []
        for reply in replies:
            problem = self._stage_problem(reply, stage, server_round)
            if problem is None:
                good[reply.metadata.src_node_id] = wire.payload_of(reply.content)
            else:
                problems.append(f"node {reply.metadata.src_node_id}: {problem}")
                log(
                    WARNING,
                    "round %d: node %s, %s stage: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    stage,
                    problem,
                )
        if problems and not good and stage in (wire.ADVERTISE, wire.DISTRIBUTE):
            # Every node failed the set-up: almost always a ClientApp without the mod.
            raise RoundFailedError(
                server_round,
                f"no node completed the {stage} stage ({'; '.join(problems[:3])}): is "
                f"{wire.MOD_NAME} in the ClientApp, as ClientApp(mods=[secagg_mod, ...])?",
            )
        silent = sorted(set(requests) - {r.metadata.src_node_id for r in replies})
        if silent:
            log(WARNING, "round %d: no %s reply from node(s) %s", server_round, stage, silent)
        self._stage_notes = problems + ([f"no {stage} reply from {silent}"] if silent else [])
        return good

    def _stage_problem(self, reply: Message, stage: str, server_round: int) -> str | None:
        """None if ``reply`` carries ``stage``, else the problem; a refusal fails the round.

        An honest node refuses only when the server's request fails one of its checks,
        so a refusal is never treated as a mere dropout.
        """
        if reply.has_error():
            reason = reply.error.reason
            if f"{wire.MOD_NAME} refused" in reason:
                raise RoundFailedError(server_round, f"node {reply.metadata.src_node_id} {reason}")
            return f"error reply ({reason})"
        if wire.stage_of(reply.content) != stage:
            return "a reply without secure aggregation content"
        return None


def _check_inner(strategy: Strategy, trusted: bool) -> None:
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
