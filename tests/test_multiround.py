"""Multi-round privacy: groups, selection, the participation audit, differencing attacks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.mods import secagg_mod
from flower_privacy.secagg import audit, groups, selection
from flower_privacy.secagg.protocol import Refusal
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.wire import secagg as wire

DIM = 6


def test_partition_is_deterministic_whole_and_keyed() -> None:
    nodes = list(range(100, 111))
    a = groups.partition(nodes, 3, b"seed")
    assert a == groups.partition(list(reversed(nodes)), 3, b"seed")
    assert len(a) == 3 and all(len(g) == 3 for g in a)  # 2 nodes wait for more
    assert a != groups.partition(nodes, 3, b"other")
    gens = [list(range(1, 7)), list(range(7, 10))]
    assert groups.groups_from_generations(gens, 3, b"s")[:2] == groups.partition(
        gens[0], 3, b"s" + (0).to_bytes(4, "little")
    )
    with pytest.raises(ValueError, match="multiple of the group size"):
        groups.groups_from_generations([[1, 2, 3, 4]], 3, b"s")


@pytest.mark.parametrize(
    ("matrix", "lower", "exact"),
    [
        (np.eye(4), 1, 1),
        (np.array([[1, 1, 0, 0], [0, 0, 1, 1]]), 2, 2),
        (np.array([[1, 1, 0], [0, 1, 1]]), 1, 2),  # singletons, yet no single node isolable
        (np.array([[1, 1, 1, 1], [1, 1, 1, 0]]), 1, 1),  # differencing isolates the 4th
        (np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]), 3, 3),
        (np.zeros((3, 5)), 0, 0),
    ],
)
def test_audit_on_hand_made_matrices(matrix, lower, exact) -> None:  # noqa: ANN001
    result = audit.audit(matrix)
    assert (result.lower_bound, result.exact) == (lower, exact)


def test_least_used_takes_whole_available_groups_fairly() -> None:
    parts = [[1, 2], [3, 4], [5, 6], [7, 8]]
    usage = {0: 5, 1: 0, 2: 1, 3: 0}
    chosen = selection.select(
        "least-used", parts, {1, 2, 3, 4, 5, 6, 7}, 4, usage, random.Random(1)
    )
    assert chosen == [3, 4, 5, 6]  # group 3 is incomplete (8 missing); 1 then 2 least used


def test_poisson_samples_each_group_with_the_rate() -> None:
    parts = [[i, i + 100] for i in range(50)]
    rng = random.Random(7)
    counts = np.zeros(50)
    for _ in range(2000):
        chosen = selection.select("poisson", parts, set(range(200)), 0, {}, rng, rate=0.2)
        for node in chosen:
            if node < 50:
                counts[node] += 1
    assert abs(counts.mean() / 2000 - 0.2) < 0.01 and counts.std() / 2000 < 0.03


# -- through the strategy ----------------------------------------------------------------


def _secret(node_id: int) -> np.ndarray:
    return np.random.default_rng(node_id).uniform(-1, 1, DIM)


def _fixed_secret_app() -> ClientApp:
    """Every round, each node's update is the same secret vector (weight 1)."""
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        w = msg.content["arrays"]["w"].numpy()
        new = (w + _secret(context.node_id)).astype(np.float32)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(new)}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=msg,
        )

    return app


def _inner(n: int, per_round: int) -> FedAvg:
    # A tiny fraction makes FedAvg sample exactly per_round nodes.
    return FedAvg(
        fraction_train=1e-9, min_train_nodes=per_round, min_available_nodes=n, fraction_evaluate=0.0
    )


def _run(strategy: SecureAggregation, grid: InProcessGrid, rounds: int):  # noqa: ANN202
    models: list[np.ndarray] = []
    result = strategy.start(
        grid,
        ArrayRecord({"w": Array(np.zeros(DIM, dtype=np.float32))}),
        num_rounds=rounds,
        evaluate_fn=lambda r, a: models.append(a["w"].numpy().astype(np.float64)),
    )
    return result, models


def _participation(grid: InProcessGrid, rounds: list[int], nodes: list[int]) -> np.ndarray:
    """Rows: which nodes' uploads were unmasked, for each of ``rounds`` (that succeeded)."""
    matrix = np.zeros((len(rounds), len(nodes)))
    for entry in grid.transcript:
        if entry.direction == "to-node" and wire.UNMASK in wire.stages_of(entry.message.content):
            payload = wire.payload_of(entry.message.content, wire.UNMASK)
            if int(payload["round"]) in rounds:
                row = rounds.index(int(payload["round"]))
                for node in payload["survivors"]:
                    matrix[row, nodes.index(int(node))] = 1
    return matrix


def test_each_round_aggregates_whole_groups_and_t_holds() -> None:
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=9)
    strategy = SecureAggregation(_inner(9, 6), group_size=3, selection="least-used")
    result, _ = _run(strategy, grid, rounds=6)
    parts = strategy.plan.groups
    assert len(parts) == 3
    for members in strategy.plan.history:
        assert groups.is_union_of_groups(parts, sorted(members)) and len(members) == 6
    audited = [result.train_metrics_clientapp[r]["secagg-privacy-t"] for r in range(1, 7)]
    # Two groups always together at first (T=6), then told apart: never below 3.
    assert min(audited) == 3 and all(t >= 3 for t in audited) and audited[-1] == 3


def test_a_group_with_a_dropout_is_left_out_whole() -> None:
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=9)
    strategy = SecureAggregation(_inner(9, 9), group_size=3, min_train_replies=3)
    victim = 1004

    def before_upload(msg: Message) -> bool:
        return wire.TRAIN in wire.stages_of(msg.content)

    grid.drop_node(victim, when=before_upload, only_matching=True)
    result, models = _run(strategy, grid, rounds=1)
    metrics = result.train_metrics_clientapp[1]
    assert metrics["secagg-clients"] == 6 and metrics["secagg-excluded"] == 2
    kept = sorted(strategy.plan.history[0])
    assert victim not in kept
    np.testing.assert_allclose(
        models[1] - models[0], np.mean([_secret(n) for n in kept], axis=0), atol=1e-3
    )


def _lying_prepare(grid: InProcessGrid, change) -> None:  # noqa: ANN001
    def lie(msg: Message) -> Message:
        if wire.PREPARE in wire.stages_of(msg.content) and msg.metadata.dst_node_id == 1001:
            payload = wire.payload_of(msg.content, wire.PREPARE)
            update = change(payload)
            if update is not None:
                payload.update(update)
                wire.put(msg.content, wire.PREPARE, payload)
        return msg

    grid.intercept(lie)


@pytest.mark.parametrize(
    ("change", "code", "from_round"),
    [
        ({"group-size": 1}, Refusal.BELOW_FLOOR, 1),  # every node alone
        ({"generation-sizes": [4, 5]}, Refusal.GROUPS, 1),  # not of the declared size
        ("regroup", Refusal.GROUPS, 2),
        ({"group-seed": b"another partition seed"}, Refusal.GROUPS, 2),
    ],
)
def test_a_client_catches_a_server_lying_about_the_groups(change, code, from_round) -> None:  # noqa: ANN001
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=9)

    def lie(payload: dict) -> dict | None:
        if payload["round"] < from_round:
            return None
        if change == "regroup":
            nodes = list(payload["generation-nodes"])
            return {"generation-nodes": nodes[3:] + nodes[:3], "generation-sizes": [6, 3]}
        return change

    _lying_prepare(grid, lie)
    strategy = SecureAggregation(
        _inner(9, 9), group_size=3, min_train_replies=3, max_failed_rounds=2
    )
    _run(strategy, grid, rounds=2)
    assert (1001, code) in {(e.node, e.code) for e in strategy.refusals}
    # The lied-to node (and so its group) sat out every round from the lie on.
    assert all(1001 not in members for members in strategy.plan.history[from_round - 1 :])


def test_clients_refuse_to_unmask_an_incomplete_group() -> None:
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=9)
    strategy = SecureAggregation(_inner(9, 9), group_size=3, min_train_replies=3)

    def split_group(msg: Message) -> Message:
        if wire.UNMASK in wire.stages_of(msg.content) and msg.metadata.dst_node_id == 1001:
            payload = wire.payload_of(msg.content, wire.UNMASK)
            other = next(g for g in strategy.plan.groups if 1001 not in g)
            keep = [i for i, v in enumerate(payload["tags-from"]) if v != other[0]]
            payload["survivors"] = [n for n in payload["survivors"] if n != other[0]]
            payload["dropped"] = sorted([*payload["dropped"], other[0]])
            payload["tags-from"] = [payload["tags-from"][i] for i in keep]
            payload["tags"] = [payload["tags"][i] for i in keep]
            wire.put(msg.content, wire.UNMASK, payload)
        return msg

    grid.intercept(split_group)
    _run(strategy, grid, rounds=1)
    assert (1001, Refusal.GROUPS) in {(e.node, e.code) for e in strategy.refusals}


@pytest.mark.parametrize(
    ("selection_rule", "recoverable"),
    [(None, True), ("least-used", False), ("poisson", False)],
)
def test_differencing_recovers_a_client_only_without_groups(
    selection_rule, recoverable, monkeypatch
) -> None:  # noqa: ANN001
    n, rounds, target = 12, 16, 1002
    # Pinned draws: some cohort sequences (about 1 in 180) leave a node's column outside
    # the participation matrix's row space, or a Poisson draw leaves a group unidentified.
    monkeypatch.setattr(random, "SystemRandom", lambda: random.Random(0))
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=n)
    # Some dropouts: node 1007 misses every third round's upload.
    grid.drop_node(
        1007,
        when=lambda m: (
            wire.TRAIN in wire.stages_of(m.content)
            and int(wire.payload_of(m.content, wire.TRAIN)["round"]) % 3 == 0
        ),
        only_matching=True,
    )
    kwargs = {} if selection_rule is None else {"group_size": 3, "selection": selection_rule}
    if selection_rule == "poisson":
        kwargs["sampling_rate"] = 0.75
    # A complete neighbour graph: thin neighbourhoods would only add failed rounds.
    strategy = SecureAggregation(
        _inner(n, 9), min_train_replies=3, max_failed_rounds=rounds, degree=n - 1, **kwargs
    )
    strategy._group_seed = b"\x07" * 32  # the partition, pinned with the draws
    result, models = _run(strategy, grid, rounds)
    done = sorted(result.train_metrics_clientapp)  # failed rounds are recorded, not used
    assert len(done) >= rounds // 2
    nodes = sorted(grid.contexts)
    participation = _participation(grid, done, nodes)
    # What the server sees: each round's mean update (the change of the global model).
    means = np.diff(np.array(models), axis=0)
    rows = participation / participation.sum(axis=1, keepdims=True)
    estimate, *_ = np.linalg.lstsq(rows, means, rcond=None)
    error = np.abs(estimate[nodes.index(target)] - _secret(target)).max()
    if recoverable:
        assert error < 1e-2, "random selection should let least squares isolate the client"
    else:
        assert error > 0.1
        # The best estimate mixes the target's whole group.
        group = next(g for g in strategy.plan.groups if target in g)
        np.testing.assert_allclose(
            estimate[nodes.index(target)],
            np.mean([_secret(m) for m in group], axis=0),
            atol=1e-2,
        )


@pytest.mark.parametrize("stage", [wire.ADVERTISE, wire.PREPARE, wire.TRAIN, wire.UNMASK])
def test_aggregates_stay_unions_of_whole_groups_with_a_dropout_at_each_stage(stage) -> None:  # noqa: ANN001
    grid = InProcessGrid(_fixed_secret_app(), num_nodes=12)
    victim = 1005
    grid.drop_node(
        victim,
        when=lambda m: (
            stage in wire.stages_of(m.content)
            and int(wire.payload_of(m.content, stage).get("round", 1)) == 1
        ),
        only_matching=True,
    )
    strategy = SecureAggregation(
        _inner(12, 12), group_size=3, min_train_replies=3, degree=11, max_failed_rounds=3
    )
    result, _ = _run(strategy, grid, rounds=3)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    for members in strategy.plan.history:
        assert groups.is_union_of_groups(strategy.plan.groups, sorted(members))
    first = strategy.plan.history[0]
    # Missing before or at the upload: the victim (and its group) is not in round 1's sum;
    # silent only at unmasking: its upload counts.
    assert (victim in first) == (stage == wire.UNMASK)
