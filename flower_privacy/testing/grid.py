"""An in-process Flower ``Grid`` for fast, deterministic tests of strategies and mods.

It calls a ``ClientApp`` synchronously for every message, with one persistent
``Context`` per node, exactly as a SuperNode would across rounds. It can take nodes
offline at a chosen point, let a test rewrite server-to-node messages (to play a
malicious server), and keeps the full transcript, the timeouts it was asked to wait
and the TTL of every message pushed. No Ray, no processes, no sockets.

It accepts both Flower 1.41/1.42's ``pull_messages(message_ids)`` and 1.43's
``pull_messages(reply_to_message_ids=None, *, message_ids=None)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from flwr.app import Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flower_privacy import _flwr_compat as compat

MessageFilter = Callable[[Message], bool]
MessageRewriter = Callable[[Message], Message]


@dataclass(frozen=True)
class TranscriptEntry:
    """One message as it crossed the grid (a deep copy, safe to inspect)."""

    direction: Literal["to-node", "from-node"]
    node_id: int
    message_type: str
    message: Message
    ttl: float
    """The message's TTL in seconds, as pushed (to-node) or as replied (from-node)."""


@dataclass
class _Drop:
    when: MessageFilter | None
    unlist: bool
    active: bool = False
    only_matching: bool = False


class InProcessGrid(Grid):
    """A ``Grid`` that runs ``client_app`` in this process for ``num_nodes`` nodes.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of nodes. Node ``i`` gets ``node_config`` ``{"partition-id": i,
        "num-partitions": num_nodes}`` as in Flower's simulation.
    run_config : UserConfig | None
        The ``context.run_config`` every node (and a ServerApp run with
        :meth:`run_server_app`) sees.
    node_ids : Sequence[int] | None
        Node ids to use; by default ``1001, 1002, ...``.
    serialize : bool
        Pass every message through Flower's protobuf encoding, as a SuperLink would
        (catches values that only work in memory). On by default.
    node_configs : Sequence[UserConfig] | None
        Extra ``node_config`` entries per node (e.g. key file paths), in node order.

    Attributes
    ----------
    transcript : list[TranscriptEntry]
        Every message that crossed the grid, in order, with its TTL.
    timeouts : list[float | None]
        The ``timeout`` of every :meth:`send_and_receive` call, in order (None when
        the caller gave none, i.e. wait forever).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: UserConfig | None = None,
        node_ids: Sequence[int] | None = None,
        run_id: int = 1,
        serialize: bool = True,
        node_configs: Sequence[UserConfig] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        ids = list(node_ids) if node_ids is not None else list(range(1001, 1001 + num_nodes))
        if len(ids) != num_nodes or len(set(ids)) != num_nodes:
            raise ValueError(f"node_ids must be {num_nodes} distinct ids, got {ids}")
        if compat.SUPERLINK_NODE_ID in ids:
            raise ValueError(f"node id {compat.SUPERLINK_NODE_ID} is reserved for the SuperLink")
        self.client_app = client_app
        self.serialize = serialize
        self.run_config: UserConfig = dict(run_config or {})
        extra = list(node_configs) if node_configs is not None else [{}] * num_nodes
        if len(extra) != num_nodes:
            raise ValueError(f"node_configs must have {num_nodes} entries, got {len(extra)}")
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": index, "num-partitions": num_nodes, **extra[index]},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for index, node_id in enumerate(ids)
        }
        self.transcript: list[TranscriptEntry] = []
        self.timeouts: list[float | None] = []
        self._run = compat.empty_run(run_id)
        self._replies: dict[str, Message] = {}
        self._drops: dict[int, _Drop] = {}
        self._rewriters: list[MessageRewriter] = []
        compat.set_task_identity(run_id=run_id, node_id=compat.SUPERLINK_NODE_ID)

    # -- test controls ---------------------------------------------------------------

    def drop_node(
        self,
        node_id: int,
        *,
        when: MessageFilter | None = None,
        unlist: bool = True,
        only_matching: bool = False,
    ) -> None:
        """Take ``node_id`` offline, now or at the first message matching ``when``.

        An offline node never replies (as after a timeout). With ``unlist`` it also
        disappears from :meth:`get_node_ids`; without, the grid still lists it, as a
        SuperLink does for about a minute after a SuperNode dies. With
        ``only_matching`` the node stays online and just never answers the messages
        that match ``when`` (a node that keeps dropping out at one stage).
        """
        self._check_node(node_id)
        if only_matching and when is None:
            raise ValueError("only_matching needs a `when` filter")
        self._drops[node_id] = _Drop(
            when=when,
            unlist=unlist and not only_matching,
            active=when is None,
            only_matching=only_matching,
        )

    def reconnect_node(self, node_id: int) -> None:
        """Bring a dropped node back, with its context (state) intact."""
        self._check_node(node_id)
        self._drops.pop(node_id, None)

    def intercept(self, rewrite: MessageRewriter) -> None:
        """Pass every server-to-node message through ``rewrite`` before delivery.

        ``rewrite`` receives the node's own deep copy and returns the message to
        deliver (possibly modified): the hook for playing a malicious server.
        """
        self._rewriters.append(rewrite)

    def offline_nodes(self) -> list[int]:
        """Nodes currently offline."""
        return [node for node, drop in self._drops.items() if drop.active]

    def run_server_app(self, server_app: ServerApp, run_config: UserConfig | None = None) -> None:
        """Run a ``ServerApp`` against this grid, with ``run_config`` as its context."""
        context = Context(
            run_id=self._run.run_id,
            node_id=compat.SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config=dict(run_config if run_config is not None else self.run_config),
        )
        server_app(self, context)

    # -- Grid API ---------------------------------------------------------------------

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [
            node_id
            for node_id in self.contexts
            if not (
                node_id in self._drops
                and self._drops[node_id].active
                and self._drops[node_id].unlist
            )
        ]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for shared in messages:
            # Strategies reuse one RecordDict for all nodes and mods may mutate it:
            # every node gets its own copy, as over a real network.
            message = copy.deepcopy(shared)
            message_id = compat.assign_message_id(message)
            if self.serialize:
                message = compat.wire_roundtrip(message)
            message_ids.append(message_id)
            node_id = message.metadata.dst_node_id
            self._check_node(node_id)
            for rewrite in self._rewriters:
                message = rewrite(message)
            self._record("to-node", node_id, message)
            if self._is_offline(node_id, message):
                continue
            reply = self._deliver(message, self.contexts[node_id])
            self._record("from-node", node_id, reply)
            self._replies[message_id] = reply
        return message_ids

    def pull_messages(
        self,
        reply_to_message_ids: Iterable[str] | None = None,
        *,
        message_ids: Iterable[str] | None = None,
    ) -> Iterable[Message]:
        """Replies to the given message ids (all pending replies if None), as in 1.43.

        ``message_ids`` is the deprecated 1.43 alias (a positional call, as 1.41/1.42
        make it, fills ``reply_to_message_ids``); giving both raises ``TypeError``.
        An empty iterable matches nothing. Pulled replies are not returned again.
        """
        if message_ids is not None:
            if reply_to_message_ids is not None:
                raise TypeError("Specify only one of `reply_to_message_ids` and `message_ids`.")
            warnings.warn(
                "`message_ids` is deprecated. Use `reply_to_message_ids` instead.",
                DeprecationWarning,
                stacklevel=2,
            )
            reply_to_message_ids = message_ids
        wanted = list(self._replies) if reply_to_message_ids is None else reply_to_message_ids
        return [self._replies.pop(mid) for mid in list(wanted) if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.timeouts.append(timeout)
        # Delivery is synchronous: every reply that will ever come is already here.
        return self.pull_messages(self.push_messages(messages))

    # -- internals --------------------------------------------------------------------

    def _check_node(self, node_id: int) -> None:
        if node_id not in self.contexts:
            raise KeyError(f"unknown node id {node_id}; nodes are {sorted(self.contexts)}")

    def _is_offline(self, node_id: int, message: Message) -> bool:
        drop = self._drops.get(node_id)
        if drop is None:
            return False
        if drop.only_matching:
            return bool(drop.when(message))
        if not drop.active and drop.when is not None and drop.when(message):
            drop.active = True
        return drop.active

    def _deliver(self, message: Message, context: Context) -> Message:
        try:
            reply = self.client_app(message, context)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            reply = Message(
                Error(code=compat.ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
        compat.assign_message_id(reply)
        return compat.wire_roundtrip(reply) if self.serialize else reply

    def _record(
        self, direction: Literal["to-node", "from-node"], node_id: int, message: Message
    ) -> None:
        self.transcript.append(
            TranscriptEntry(
                direction,
                node_id,
                message.metadata.message_type,
                copy.deepcopy(message),
                float(message.metadata.ttl),
            )
        )
