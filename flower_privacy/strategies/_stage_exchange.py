"""One secure aggregation exchange: push stages to nodes, triage what comes back.

Error replies are dropouts; structured refusals (``wire.REFUSED`` codes, never free
text) are security events: logged with the node id and counted against a limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import ERROR, WARNING

from flwr.app import Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flower_privacy.errors import RoundFailedError
from flower_privacy.secagg.protocol import Refusal
from flower_privacy.strategies._exchange import send_and_receive
from flower_privacy.wire import secagg as wire


@dataclass(frozen=True)
class RefusalEvent:
    """One structured refusal: which node refused which stage of which round, and why."""

    server_round: int
    node: int
    stage: str
    code: str
    detail: str


class StageExchange:
    """Runs stage exchanges over ``grid`` with the strategy's current round timeout."""

    def __init__(self, grid: Grid, timeout: Callable[[], float], max_refusals: int) -> None:
        self.grid, self._timeout, self.max_refusals = grid, timeout, max_refusals
        self.refusals: list[RefusalEvent] = []

    def run(
        self, server_round: int, stages: dict[int, dict[str, dict]]
    ) -> dict[int, dict[str, dict]]:
        """Send each node its stages in one message; return the usable payloads by node."""
        if not stages:
            return {}
        timeout = self._timeout()
        messages = []
        for node, payloads in stages.items():
            content = RecordDict()
            for stage, payload in payloads.items():
                wire.put(content, stage, payload)
            messages.append(
                Message(content, node, "train", ttl=timeout, group_id=str(server_round))
            )
        what = "+".join(sorted({s for p in stages.values() for s in p}))
        replies = send_and_receive(self.grid, messages, timeout, server_round, what)
        answers: dict[int, dict[str, dict]] = {}
        errors = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                errors.append(f"node {node}: {reply.error.reason}")
                log(
                    WARNING,
                    "round %d: node %s answered with an error: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            for stage in stages.get(node, {}):
                got = self._triage(server_round, node, stage, reply)
                if got is not None:
                    answers.setdefault(node, {})[stage] = got
        silent = sorted(set(stages) - {r.metadata.src_node_id for r in replies})
        if silent:
            log(WARNING, "round %d: no reply from node(s) %s", server_round, silent)
        setup = any(s in (wire.ADVERTISE, wire.PREPARE) for p in stages.values() for s in p)
        if setup and errors and not answers:
            # Every node failed the set-up: almost always a ClientApp without the mod.
            raise RoundFailedError(
                server_round,
                f"no node answered the secure aggregation set-up ({'; '.join(errors[:3])}): "
                f"is {wire.MOD_NAME} in the ClientApp, as ClientApp(mods=[secagg_mod, ...])?",
            )
        return answers

    def payloads(
        self, server_round: int, stage: str, replies: Iterable[Message]
    ) -> dict[int, dict]:
        """The usable ``stage`` payloads of replies to training messages, by node."""
        out = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(
                    WARNING,
                    "round %d: training on node %s failed: %s",
                    server_round,
                    node,
                    reply.error.reason,
                )
                continue
            got = self._triage(server_round, node, stage, reply)
            if got is not None:
                out[node] = got
        return out

    def over_limit(self) -> bool:
        """More distinct nodes refused than tolerated (one node alone cannot stop a run)."""
        return len({e.node for e in self.refusals}) > self.max_refusals

    def limit_reason(self) -> str:
        nodes = sorted({e.node for e in self.refusals})
        return (
            f"{len(nodes)} nodes refused secure aggregation requests (max_refusals="
            f"{self.max_refusals}) by nodes {nodes}; last: {self.refusals[-1].code} "
            f"({self.refusals[-1].detail})"
        )

    def _triage(self, server_round: int, node: int, stage: str, reply: Message) -> dict | None:
        name = wire.REPLY_STAGE.get(stage, stage)
        if name not in wire.stages_of(reply.content):
            log(WARNING, "round %d: node %s sent no %s reply", server_round, node, name)
            return None
        payload = wire.payload_of(reply.content, name)
        refusal = wire.refusal_of(payload)
        if refusal is None:
            return payload
        if refusal[0] not in Refusal.CODES:  # not what an honest node says: a bad reply
            log(
                WARNING,
                "round %d: node %s sent an unknown refusal %r",
                server_round,
                node,
                refusal[0],
            )
            return None
        self.refusals.append(RefusalEvent(server_round, node, stage, *refusal))
        log(
            ERROR,
            "SECURITY round %d: node %s refused %s: %s (%s)",
            server_round,
            node,
            stage,
            *refusal,
        )
        return None
