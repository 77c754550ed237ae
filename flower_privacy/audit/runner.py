"""Run an app in-process and extract what each party saw.

One :func:`run` is one federation on :class:`~flower_privacy.testing.InProcessGrid`,
driven by the app's own strategy. The server's views come from the grid's transcript
(every message, as it crossed) and from the global models the strategy produced (read
through ``evaluate_fn``, which Flower calls with each round's global model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Strategy

from flower_privacy.audit.hook import AuditHook
from flower_privacy.testing import InProcessGrid

State = dict[str, np.ndarray]
ROUND_TIMEOUT = 600.0
FIRST_NODE_ID = 1001  # node i of the federation has id FIRST_NODE_ID + i


def to_state(arrays: ArrayRecord) -> State:
    """An ArrayRecord as name -> numpy array."""
    return {k: np.array(v.numpy(), copy=True) for k, v in arrays.items()}


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """name -> numpy array as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def difference(after: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> State:
    """after - before, per array."""
    return {k: np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64) for k in before}


def flatten(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in ``state``'s order."""
    return np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in state.values()])


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> State:
    """``vector`` cut into arrays shaped (and typed) like ``like``."""
    out, start = {}, 0
    for k, v in like.items():
        size = int(np.prod(v.shape))
        out[k] = vector[start : start + size].reshape(v.shape).astype(np.asarray(v).dtype)
        start += size
    return out


@dataclass
class Federation:
    """One run: the global models, the per-client updates the server saw in the clear,
    and who took part in each round."""

    config: UserConfig
    node_ids: list[int]
    globals: list[State]  # index r: the global model after round r (0: initial)
    clear_updates: dict[int, dict[int, State]]  # round -> node id -> update, if in the clear
    participants: dict[int, list[int]]  # round -> nodes that answered the round's model
    train_metrics: dict[int, dict] = field(default_factory=dict)
    halt_reason: str | None = None

    @property
    def rounds(self) -> int:
        return len(self.globals) - 1

    def release(self, server_round: int) -> State:
        """Change of the global model in ``server_round``: what every client sees."""
        return difference(self.globals[server_round], self.globals[server_round - 1])

    def participation(self) -> np.ndarray:
        """Rounds x nodes 0/1 matrix."""
        matrix = np.zeros((self.rounds, len(self.node_ids)), dtype=np.int64)
        column = {node: j for j, node in enumerate(self.node_ids)}
        for rnd, nodes in self.participants.items():
            for node in nodes:
                matrix[rnd - 1, column[node]] = 1
        return matrix


def _plain_model(message: Message, like: Mapping[str, np.ndarray]) -> State | None:
    """The message's model if it carries one in the clear (same names and shapes)."""
    if not message.has_content():
        return None
    for record in message.content.array_records.values():
        if list(record.keys()) == list(like) and all(
            tuple(record[k].shape) == tuple(np.shape(like[k])) for k in like
        ):
            return to_state(record)
    return None


def run(
    hook: AuditHook,
    cfg: UserConfig,
    *,
    rounds: int,
    initial: State | None = None,
    extra_nodes: int = 0,
    extra_app: ClientApp | None = None,
    rewrite: Callable[[Message], Message] | None = None,
    strategy: Strategy | None = None,
) -> Federation:
    """Run ``rounds`` rounds of the app for ``cfg``; the server starts from ``initial``.

    ``extra_nodes`` more nodes (e.g. canaries) run ``extra_app`` instead of the app's
    ClientApp; the real nodes keep the partitioning of ``hook.num_nodes(cfg)`` nodes.
    ``rewrite`` sees every server-to-node message before delivery (a malicious server).
    The transcript records messages as delivered, so the attacker's own rewrites count.
    ``strategy`` replaces the app's (e.g. a plain FedAvg to see every true update).
    """
    real = hook.num_nodes(cfg)
    total = real + extra_nodes
    node_ids = list(range(FIRST_NODE_ID, FIRST_NODE_ID + total))
    extra_ids = set(node_ids[real:])
    node_configs = [{"num-partitions": real} for _ in range(total)]

    def dispatch(message: Message, context: Context) -> Message:
        app = extra_app if context.node_id in extra_ids else hook.client_app
        return app(message, context)

    if extra_nodes and extra_app is None:
        raise ValueError("extra_nodes needs extra_app")
    grid = InProcessGrid(
        dispatch, total, run_config=cfg, node_ids=node_ids, node_configs=node_configs
    )
    if rewrite is not None:
        grid.intercept(rewrite)
    if initial is None:
        initial = {k: v.detach().cpu().numpy() for k, v in hook.model(cfg).state_dict().items()}
    globals_: list[State] = []
    marks: list[int] = []

    def record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        globals_.append(to_state(arrays))
        marks.append(len(grid.transcript))
        return None

    if strategy is None:
        strategy = hook.strategy(cfg, total)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(initial),
        num_rounds=rounds,
        timeout=ROUND_TIMEOUT,
        train_config=ConfigRecord(),
        evaluate_fn=record,
    )
    failed = getattr(result, "failed_rounds", {})
    if failed:
        # Rounds are told apart by the global model after each: a round without one
        # would shift every later round's view.
        raise RuntimeError(f"the audited run had failed rounds {failed}: audit a clean run")
    clear: dict[int, dict[int, State]] = {}
    participants: dict[int, list[int]] = {}
    for rnd in range(1, len(globals_)):
        sent: dict[int, State] = {}
        for entry in grid.transcript[marks[rnd - 1] : marks[rnd]]:
            if entry.message_type.split(".")[0] != "train":
                continue
            model = _plain_model(entry.message, initial)
            if entry.direction == "to-node" and model is not None:
                sent[entry.node_id] = model
            elif entry.direction == "from-node" and entry.node_id in sent:
                # The reply to the model is the node's (plain, masked or encrypted) upload.
                got = sent.pop(entry.node_id)
                if entry.message.has_error():
                    continue
                participants.setdefault(rnd, []).append(entry.node_id)
                if model is not None:
                    clear.setdefault(rnd, {})[entry.node_id] = difference(model, got)
    return Federation(
        config=cfg,
        node_ids=node_ids,
        globals=globals_,
        clear_updates=clear,
        participants=participants,
        train_metrics={r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        halt_reason=getattr(result, "halt_reason", None),
    )


def fixed_updates(hook: AuditHook, cfg: UserConfig, initial: State) -> dict[int, np.ndarray]:
    """Each node's (flattened) update, seen in the clear on a plain FedAvg run of every
    node from ``initial``; the second of its two rounds checks the updates are fixed."""
    n = hook.num_nodes(cfg)
    plain = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    fed = run(hook, cfg, rounds=2, initial=initial, strategy=plain)
    first, second = fed.clear_updates.get(1, {}), fed.clear_updates.get(2, {})
    true = {}
    for node in fed.node_ids:
        if node not in first or node not in second:
            raise RuntimeError(f"node {node} sent no clear update in the plain reference run")
        a, b = flatten(first[node]), flatten(second[node])
        if not np.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(a).max()))):
            raise ValueError(
                f"the hook declares fixed updates, but node {node}'s update changed "
                f"between rounds (max difference {np.abs(a - b).max():.3g})"
            )
        true[node] = a
    return true


def replace_model(message: Message, state: Mapping[str, np.ndarray]) -> Message:
    """``message`` with its plain model (if it carries one) replaced by ``state``."""
    if message.has_content():
        for key, record in list(message.content.array_records.items()):
            if list(record.keys()) == list(state):
                message.content[key] = to_record(state)
    return message


def canary_app(mods: Sequence, directions: Mapping[int, np.ndarray], norm: float) -> ClientApp:
    """A ClientApp whose node ``i`` always uploads global + ``norm`` x ``directions[i]``."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        state = to_state(arrays)
        step = unflatten(norm * directions[context.node_id], state)
        moved = {k: (state[k] + step[k]).astype(state[k].dtype) for k in state}
        content = RecordDict(
            {"arrays": to_record(moved), "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content=content, reply_to=msg)

    return app


Factory = Callable[[], ClientApp]
