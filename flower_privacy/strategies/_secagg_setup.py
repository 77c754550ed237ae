"""The exchanges around :class:`SecureAggregation`'s rounds: who takes part, set-up, unmasking.

The cohort rules are functions of the inner strategy's sampling settings, the groups and
the population; :class:`CohortSetup` drives one protocol run's advertise, prepare,
consistency and unmask exchanges (it is built per run around that run's protocol
server and stage exchanger).
"""

from __future__ import annotations

import random
from logging import WARNING

from flwr.common import log
from flwr.serverapp.strategy import Strategy

from flower_privacy.errors import RoundFailedError
from flower_privacy.secagg import protocol
from flower_privacy.secagg.multiround import GroupPlan
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.strategies._stage_exchange import StageExchange
from flower_privacy.wire import secagg as wire


def cohort_size(inner: Strategy, population: int) -> int:
    """How many nodes the inner strategy would sample (its fraction and minimum)."""
    fraction = float(getattr(inner, "fraction_train", 1.0))
    return max(int(population * fraction), int(getattr(inner, "min_train_nodes", 1)))


def largest_cohort(inner: Strategy, plan: GroupPlan | None, population: int) -> int:
    """The most nodes the sampling can draw from ``population`` nodes."""
    if plan is not None and plan.rule == "poisson":
        return max(population, 1)
    largest = cohort_size(inner, population)
    if plan is not None and plan.rule == "least-used":
        largest = max(largest, plan.group_size)  # at least one whole group
    return max(min(largest, population), 1)


def expected_cohort(inner: Strategy, plan: GroupPlan | None, population: int, cap: int) -> float:
    """Nodes a round is expected to draw (a public figure), cohorts capped at ``cap``."""
    wanted = min(cohort_size(inner, population), population, cap)
    if plan is None or plan.rule == "random":
        return float(wanted)
    size = plan.group_size
    if plan.rule == "poisson":
        assert plan.rate is not None
        return plan.rate * (population - population % size)
    return float(max(1, wanted // size) * size)


def run_quantizer(
    clip_range: float,
    max_weight: int,
    max_clients: int,
    max_mean_error: float | None,
    plan: GroupPlan | None,
) -> Quantizer:
    """The run's encoding for cohorts of up to ``max_clients`` (at least one whole group)."""
    quantizer = Quantizer.for_cohort(clip_range, max_weight, max_clients, max_mean_error)
    if plan is not None and quantizer.max_clients < plan.group_size:
        raise ValueError(
            f"max_clients={quantizer.max_clients} is below group_size={plan.group_size}: no "
            "whole group fits in a round"
        )
    return quantizer


class CohortSetup:
    """One protocol run's sampling and its exchanges before and after each round's upload."""

    def __init__(
        self,
        server: protocol.SecAggServer,
        exchanger: StageExchange,
        inner: Strategy,
        plan: GroupPlan | None,
        rng: random.Random,
        *,
        cap: int,
        min_survivors: int,
        num_rounds: int,
    ) -> None:
        self.server, self.exchanger, self.inner, self.plan = server, exchanger, inner, plan
        self.rng, self.cap, self.min_survivors = rng, cap, min_survivors
        self.num_rounds = num_rounds

    def prepare(self, server_round: int, per_round: int) -> None:
        """A prepare exchange of its own (round 1, or after a failed round)."""
        cohort = self._sample(server_round, per_round, advertise_now=True)
        try:
            requests = self.server.prepare_requests(server_round, cohort, self._fields())
        except protocol.ProtocolError as err:
            raise RoundFailedError(server_round, f"secure aggregation set-up: {err}") from None
        answers = self.exchanger.run(
            server_round, {n: {wire.PREPARE: r} for n, r in requests.items()}
        )
        self.accept_prepares(server_round, answers)

    def accept_uploads(
        self, server_round: int, uploads: dict[int, dict], length: int, word_bits: int
    ) -> list[int]:
        """Keep the usable masked uploads; with groups, leave incomplete groups out.

        Returns the nodes left out with their incomplete groups.
        """
        for node, payload in uploads.items():
            problem = self.server.accept_upload(server_round, node, payload, length, word_bits)
            if problem is not None:
                log(
                    WARNING, "round %d: upload of node %s unusable: %s", server_round, node, problem
                )
        if self.plan is None:
            return []
        _kept, excluded = self.plan.keep(self.server.survivors(server_round))
        if excluded:
            log(WARNING, "round %d: nodes %s left out: incomplete groups", server_round, excluded)
            self.server.exclude(server_round, excluded)
        return excluded

    def unmask(self, server_round: int, consistency: bool) -> dict[int, dict]:
        """The (optional) consistency exchange, then the unmask exchange: the shares.

        The unmask exchange also carries the next cohort's set-up (advertise, prepare).
        """
        if consistency:
            requests = self.server.consistency_requests(server_round)
            answers = self.exchanger.run(
                server_round, {n: {wire.CONSISTENCY: r} for n, r in requests.items()}
            )
            self.server.accept_consistency(
                server_round,
                {n: a[wire.CONSISTENCY] for n, a in answers.items() if wire.CONSISTENCY in a},
            )
        stages = self.next_round_stages(server_round)
        for node, request in self.server.unmask_requests(server_round).items():
            stages.setdefault(node, {})[wire.UNMASK] = request
        answers = self.exchanger.run(server_round, stages)
        self.accept_prepares(server_round + 1, answers)
        return {n: a[wire.UNMASK] for n, a in answers.items() if wire.UNMASK in a}

    def next_round_stages(self, server_round: int) -> dict[int, dict[str, dict]]:
        """Stages for the unmask exchange: advertise new nodes, prepare the next cohort."""
        stages: dict[int, dict[str, dict]] = {}
        if server_round >= self.num_rounds:
            return stages
        population = sorted(self.exchanger.grid.get_node_ids())
        request = self.server.advertise_request()
        for node in self.server.nodes_to_advertise(population):
            stages[node] = {wire.ADVERTISE: request}
        per_round = cohort_size(self.inner, len(population))
        cohort = self._sample(server_round + 1, per_round, advertise_now=False)
        try:
            prepares = self.server.prepare_requests(server_round + 1, cohort, self._fields())
        except protocol.ProtocolError as err:
            log(
                WARNING,
                "round %d: cannot prepare round %d yet: %s",
                server_round,
                server_round + 1,
                err,
            )
            return stages
        for node, prepare in prepares.items():
            stages.setdefault(node, {})[wire.PREPARE] = prepare
        return stages

    def accept_prepares(self, prepared_round: int, answers: dict[int, dict[str, dict]]) -> None:
        """Keep the advertisements and the prepare replies of ``prepared_round``."""
        self._accept_advertisements(prepared_round - 1, answers)
        if not self.server.has_round(prepared_round):
            return
        for node, payloads in answers.items():
            if wire.PREPARE in payloads:
                problem = self.server.accept_prepare(prepared_round, node, payloads[wire.PREPARE])
                if problem is not None:
                    log(
                        WARNING,
                        "round %d: prepare of node %s unusable: %s",
                        prepared_round,
                        node,
                        problem,
                    )

    def _sample(self, server_round: int, per_round: int, *, advertise_now: bool) -> list[int]:
        """The cohort of ``server_round`` among nodes with a long-term key."""
        population = sorted(self.exchanger.grid.get_node_ids())
        new = self.server.nodes_to_advertise(population)
        if new and advertise_now:
            request = self.server.advertise_request()
            answers = self.exchanger.run(server_round, {n: {wire.ADVERTISE: request} for n in new})
            problems = self._accept_advertisements(server_round, answers)
            if problems and not any(n in self.server.lt_keys for n in new):
                raise RoundFailedError(server_round, f"key set-up: {problems[0]}")
        keyed = [n for n in population if n in self.server.lt_keys]
        per_round = min(per_round, self.cap)
        if self.plan is not None:
            self.plan.update(keyed)
            return self.plan.select(keyed, per_round)
        return sorted(self.rng.sample(keyed, min(per_round, len(keyed))))

    def _fields(self) -> dict:
        fields: dict = {"min_survivors": self.min_survivors}
        if self.plan is not None and self.plan.rule != "random":
            fields.update(self.plan.request_fields())
        return fields

    def _accept_advertisements(
        self, server_round: int, answers: dict[int, dict[str, dict]]
    ) -> list[str]:
        problems = []
        for node, payloads in answers.items():
            if wire.ADVERTISE in payloads:
                try:
                    self.server.accept_advertisement(node, payloads[wire.ADVERTISE])
                except protocol.ProtocolError as err:
                    problems.append(str(err))
                    log(WARNING, "round %d: %s", server_round, err)
        return problems
