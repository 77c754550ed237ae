"""The in-process grid behaves like a SuperLink with SuperNodes, and injects faults."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import initial_arrays, make_toy_client_app
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.testing import InProcessGrid


def _fedavg(n: int) -> FedAvg:
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n,
        min_evaluate_nodes=n,
        min_available_nodes=n,
    )


def test_fedavg_runs_and_averages_exactly() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    result = _fedavg(3).start(grid, initial_arrays(), num_rounds=2, timeout=10)
    # Each round adds the weighted mean of (pid + 1) with weights (pid + 1): 14/6.
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2 * 14 / 6, rtol=1e-6)
    assert result.evaluate_metrics_clientapp[2]["eval-acc"] == pytest.approx(1.0)


def test_context_state_persists_per_node() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    _fedavg(2).start(grid, initial_arrays(), num_rounds=3, timeout=10)
    for context in grid.contexts.values():
        assert context.state["calls"]["n"] == 3


def test_each_node_gets_its_own_copy_of_a_shared_message() -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        seen = float(msg.content["config"]["x"])
        msg.content["config"]["x"] = seen + 100.0  # a mod or app mutating its input
        return Message(RecordDict({"config": ConfigRecord({"seen": seen})}), reply_to=msg)

    grid = InProcessGrid(app, num_nodes=3)
    shared = RecordDict({"config": ConfigRecord({"x": 1.0})})
    replies = grid.send_and_receive(
        [Message(shared, node, "train") for node in grid.get_node_ids()]
    )
    assert [r.content["config"]["seen"] for r in replies] == [1.0, 1.0, 1.0]
    assert shared["config"]["x"] == 1.0


def test_dropped_node_never_replies_and_can_stay_listed() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    first, second, third = grid.get_node_ids()
    grid.drop_node(first)
    grid.drop_node(second, unlist=False)
    assert list(grid.get_node_ids()) == [second, third]
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord()})
    replies = grid.send_and_receive([Message(content, n, "train") for n in (second, third)])
    assert [r.metadata.src_node_id for r in replies] == [third]
    grid.reconnect_node(first)
    assert first in grid.get_node_ids()


def test_drop_at_a_chosen_message() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    victim = list(grid.get_node_ids())[0]
    grid.drop_node(victim, when=lambda m: m.content["config"].get("server-round") == 2)
    strategy = FedAvg(
        fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0
    )
    result = strategy.start(grid, initial_arrays(), num_rounds=3, timeout=10)
    asked = [
        e.message.content["config"]["server-round"]
        for e in grid.transcript
        if e.direction == "to-node" and e.node_id == victim
    ]
    answered = [e for e in grid.transcript if e.direction == "from-node" and e.node_id == victim]
    assert asked == [1, 2] and len(answered) == 1  # offline from round 2: unlisted after
    assert result.arrays["w"].numpy()[0] > 0


def test_intercept_lets_a_test_play_a_malicious_server() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    target = list(grid.get_node_ids())[1]

    def tamper(msg: Message) -> Message:
        if msg.metadata.dst_node_id == target:
            msg.content["arrays"] = ArrayRecord({"w": Array(np.full(4, 50.0, dtype=np.float32))})
        return msg

    grid.intercept(tamper)
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord()})
    replies = {
        r.metadata.src_node_id: r
        for r in grid.send_and_receive([Message(content, n, "train") for n in grid.get_node_ids()])
    }
    assert replies[target].content["arrays"]["w"].numpy()[0] == 52.0
    to_target = [e for e in grid.transcript if e.direction == "to-node" and e.node_id == target]
    assert to_target[0].message.content["arrays"]["w"].numpy()[0] == 50.0


def test_client_app_exception_becomes_an_error_reply() -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        raise RuntimeError("disk on fire")

    grid = InProcessGrid(app, num_nodes=1)
    (reply,) = grid.send_and_receive([Message(RecordDict(), 1001, "train")])
    assert reply.has_error() and "disk on fire" in reply.error.reason


def test_unregistered_message_type_is_an_error_reply() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=1)
    (reply,) = grid.send_and_receive([Message(RecordDict(), 1001, "query")])
    assert reply.has_error() and "No query function registered" in reply.error.reason


def test_bad_arguments_are_named() -> None:
    app = make_toy_client_app()
    with pytest.raises(ValueError, match="num_nodes"):
        InProcessGrid(app, num_nodes=0)
    with pytest.raises(ValueError, match="reserved"):
        InProcessGrid(app, num_nodes=1, node_ids=[1])
    grid = InProcessGrid(app, num_nodes=1)
    with pytest.raises(KeyError, match="unknown node id 5"):
        grid.drop_node(5)


def test_a_node_can_miss_only_the_messages_that_match() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    grid.drop_node(1001, when=lambda m: m.metadata.message_type == "evaluate", only_matching=True)
    strategy = FedAvg(
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=2,
        fraction_evaluate=1.0,
        min_evaluate_nodes=1,
    )
    strategy.start(grid, initial_arrays(), num_rounds=2, timeout=10)
    answered = {(e.node_id, e.message_type) for e in grid.transcript if e.direction == "from-node"}
    assert (1001, "train") in answered and (1001, "evaluate") not in answered
    assert 1001 in grid.get_node_ids()
    with pytest.raises(ValueError, match="only_matching needs"):
        grid.drop_node(1001, only_matching=True)


def _pushed(grid: InProcessGrid) -> list[str]:
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord()})
    return list(grid.push_messages([Message(content, n, "train") for n in grid.get_node_ids()]))


def test_pull_messages_takes_the_141_and_the_143_spellings() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    first, second, third = _pushed(grid)
    # 1.41/1.42: positional; 1.43: reply_to_message_ids, message_ids a deprecated alias.
    (reply,) = grid.pull_messages([first])
    assert reply.metadata.reply_to_message_id == first
    (reply,) = grid.pull_messages(reply_to_message_ids=[second])
    assert reply.metadata.reply_to_message_id == second
    with pytest.warns(DeprecationWarning, match="message_ids"):
        (reply,) = grid.pull_messages(message_ids=iter([third]))
    assert reply.metadata.reply_to_message_id == third
    assert list(grid.pull_messages([first, second, third])) == []  # pulled once only
    with pytest.raises(TypeError, match="only one of"):
        grid.pull_messages([first], message_ids=[first])


def test_pull_messages_without_a_filter_takes_all_and_an_empty_one_nothing() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    ids = _pushed(grid)
    assert list(grid.pull_messages([])) == []
    assert list(grid.pull_messages(reply_to_message_ids=())) == []
    replies = grid.pull_messages()
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(ids)
    assert list(grid.pull_messages()) == []


def test_the_grid_records_timeouts_and_ttls() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    content = RecordDict({"arrays": initial_arrays(), "config": ConfigRecord()})
    grid.send_and_receive([Message(content, 1001, "train", ttl=12.0)], timeout=7.0)
    grid.send_and_receive([Message(content, 1002, "train")])
    assert grid.timeouts == [7.0, None]
    to_node = [e.ttl for e in grid.transcript if e.direction == "to-node"]
    assert to_node[0] == 12.0 and to_node[1] > 12.0  # Flower's default TTL
    replies = [e.ttl for e in grid.transcript if e.direction == "from-node"]
    assert 0 < replies[0] <= 12.0
