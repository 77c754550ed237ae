"""StrictRounds: failed rounds are recorded and halt the run; bad replies are named."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import initial_arrays, make_toy_client_app
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.errors import RunHaltedError
from flower_privacy.strategies import PrivacyResult, StrictRounds
from flower_privacy.testing import InProcessGrid


def _fedavg(n: int, min_train: int | None = None) -> FedAvg:
    return FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=min_train or n,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )


def _app_with(update_fn) -> ClientApp:
    """A ClientApp whose update is ``update_fn(partition_id, server_round, weights)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        arrays = update_fn(pid, rnd, msg.content["arrays"]["w"].numpy())
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval-acc": 1.0})}),
            reply_to=msg,
        )

    return app


def test_a_normal_run_matches_flower_start() -> None:
    ours = StrictRounds(_fedavg(3)).start(
        InProcessGrid(make_toy_client_app(), num_nodes=3), initial_arrays(), num_rounds=3, timeout=5
    )
    theirs = _fedavg(3).start(
        InProcessGrid(make_toy_client_app(), num_nodes=3), initial_arrays(), num_rounds=3, timeout=5
    )
    assert isinstance(ours, PrivacyResult) and not ours.failed_rounds and ours.halt_reason is None
    np.testing.assert_allclose(ours.arrays["w"].numpy(), theirs.arrays["w"].numpy(), rtol=1e-6)
    assert sorted(ours.evaluate_metrics_clientapp) == [1, 2, 3]


def test_a_round_with_only_errors_halts_the_run_instead_of_reusing_the_model() -> None:
    def update(pid: int, rnd: int, w: np.ndarray) -> dict:
        if rnd == 2:
            raise RuntimeError(f"node {pid} lost its data")
        return {"w": w + 1}

    strategy = StrictRounds(_fedavg(2))
    with pytest.raises(RunHaltedError, match="round 2 failed") as info:
        strategy.start(
            InProcessGrid(_app_with(update), num_nodes=2), initial_arrays(), num_rounds=4
        )
    result = info.value.result
    assert list(result.failed_rounds) == [2]
    assert "lost its data" in result.failed_rounds[2]
    assert "0 usable training replies of 2" in result.failed_rounds[2]
    # The model of round 1 is kept and reported; rounds 3 and 4 never ran.
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.ones(4, dtype=np.float32))
    assert sorted(result.train_metrics_clientapp) == [1]


def test_tolerated_failures_are_recorded_and_the_run_goes_on() -> None:
    def update(pid: int, rnd: int, w: np.ndarray) -> dict:
        if rnd == 2:
            raise RuntimeError("transient")
        return {"w": w + 1}

    result = StrictRounds(_fedavg(2), max_failed_rounds=1).start(
        InProcessGrid(_app_with(update), num_nodes=2), initial_arrays(), num_rounds=3
    )
    assert list(result.failed_rounds) == [2]
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.full(4, 2.0, dtype=np.float32))

    def always_fail_after_1(pid: int, rnd: int, w: np.ndarray) -> dict:
        if rnd >= 2:
            raise RuntimeError("gone")
        return {"w": w + 1}

    with pytest.raises(RunHaltedError, match="2 consecutive failed round"):
        StrictRounds(_fedavg(2), max_failed_rounds=1).start(
            InProcessGrid(_app_with(always_fail_after_1), num_nodes=2),
            initial_arrays(),
            num_rounds=5,
        )


@pytest.mark.parametrize(
    ("bad_update", "expected"),
    [
        (lambda w: {"w": np.full_like(w, np.nan)}, "array 'w' has NaN or inf"),
        (lambda w: {"w": np.zeros(7, dtype=np.float32)}, "wrong shape or dtype ['w']"),
        (lambda w: {"v": w}, "missing ['w'], unexpected ['v']"),
        (lambda w: {"w": w.astype(np.float64)}, "wrong shape or dtype ['w']"),
    ],
)
def test_malformed_replies_are_rejected_naming_node_and_problem(
    bad_update, expected, caplog
) -> None:
    def update(pid: int, rnd: int, w: np.ndarray) -> dict:
        return bad_update(w) if pid == 0 else {"w": w + 1}

    grid = InProcessGrid(_app_with(update), num_nodes=3)
    # Two good replies suffice: the bad one is dropped and logged.
    result = StrictRounds(_fedavg(3, min_train=2)).start(grid, initial_arrays(), num_rounds=1)
    np.testing.assert_array_equal(result.arrays["w"].numpy(), np.ones(4, dtype=np.float32))
    assert "rejected reply of node 1001" in caplog.text and expected in caplog.text
    # Requiring all three makes the round fail, with the reason in the history.
    with pytest.raises(RunHaltedError) as info:
        StrictRounds(_fedavg(3)).start(
            InProcessGrid(_app_with(update), num_nodes=3), initial_arrays(), num_rounds=1
        )
    assert expected in info.value.result.failed_rounds[1]


def test_silent_nodes_are_named_and_survivors_carry_the_round(caplog) -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    grid.drop_node(1003, unlist=False)  # listed but dead, as right after a crash
    result = StrictRounds(_fedavg(3, min_train=2)).start(grid, initial_arrays(), num_rounds=2)
    assert not result.failed_rounds
    assert "no training reply from node(s) [1003]" in caplog.text
    assert "no evaluation reply from node(s) [1003]" in caplog.text


def test_too_few_nodes_ends_the_run_within_the_wait_bound() -> None:
    strategy = StrictRounds(FedAvg(min_train_nodes=2, min_available_nodes=5), node_wait_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(RunHaltedError, match="only 2 node"):
        strategy.start(InProcessGrid(make_toy_client_app(), num_nodes=2), initial_arrays())
    assert time.monotonic() - t0 < 5


def test_central_evaluation_is_recorded_for_round_zero_and_each_round() -> None:
    seen = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        seen.append(rnd)
        return MetricRecord({"accuracy": float(arrays["w"].numpy()[0])})

    result = StrictRounds(_fedavg(2)).start(
        InProcessGrid(make_toy_client_app(), num_nodes=2),
        initial_arrays(),
        num_rounds=2,
        evaluate_fn=evaluate_fn,
    )
    assert seen == [0, 1, 2] and sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]


def test_constructor_errors_name_parameter_and_value() -> None:
    with pytest.raises(TypeError, match="got dict"):
        StrictRounds({})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_train_replies must be >= 1, got 0"):
        StrictRounds(FedAvg(), min_train_replies=0)
    with pytest.raises(ValueError, match="max_failed_rounds must be >= 0, got -1"):
        StrictRounds(FedAvg(), max_failed_rounds=-1)
    with pytest.raises(ValueError, match="num_rounds must be >= 1, got 0"):
        StrictRounds(FedAvg()).start(InProcessGrid(make_toy_client_app(), 2), initial_arrays(), 0)


def test_a_model_refused_at_evaluation_is_rolled_back_and_recorded() -> None:
    from flower_privacy.errors import RoundFailedError

    class RefusedInRoundTwo(StrictRounds):
        def aggregate_evaluate(self, server_round, replies):  # noqa: ANN001, ANN201
            if server_round == 2:
                raise RoundFailedError(server_round, "the nodes refused the model")
            return super().aggregate_evaluate(server_round, replies)

    grid = InProcessGrid(make_toy_client_app(), num_nodes=2)
    result = RefusedInRoundTwo(_fedavg(2), max_failed_rounds=1).start(
        grid, initial_arrays(), num_rounds=3
    )
    assert result.failed_rounds == {2: "evaluation refused: the nodes refused the model"}
    # Each kept round moves the weights by the same weighted mean (1·1 + 2·2) / 3.
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2 * 5 / 3, rtol=1e-6)
    with pytest.raises(RunHaltedError, match="evaluation refused") as info:
        RefusedInRoundTwo(_fedavg(2)).start(grid, initial_arrays(), num_rounds=3)
    np.testing.assert_allclose(info.value.result.arrays["w"].numpy(), 5 / 3, rtol=1e-6)


def test_should_stop_ends_the_run_after_the_round_it_returns_true() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    seen: list[tuple[int, list[int]]] = []

    def should_stop(server_round: int, result) -> bool:  # noqa: ANN001
        seen.append((server_round, sorted(result.train_metrics_clientapp)))
        return server_round == 2

    result = StrictRounds(_fedavg(3)).start(
        grid, initial_arrays(), num_rounds=5, timeout=5, should_stop=should_stop
    )
    # Called after each round (never for round 0) with what was collected so far.
    assert seen == [(1, [1]), (2, [1, 2])]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert result.halt_reason == "should_stop returned True after round 2"
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2 * 14 / 6, rtol=1e-6)
    sent = [e.message for e in grid.transcript if e.direction == "to-node"]
    assert {m.content["config"]["server-round"] for m in sent} == {1, 2}


def test_should_stop_sees_tolerated_failed_rounds_and_false_runs_to_the_end() -> None:
    failing = _app_with(
        lambda pid, rnd, w: {"w": w + 1} if rnd != 2 else {"w": np.full_like(w, np.nan)}
    )
    seen: list[tuple[int, list[int]]] = []

    def never(server_round: int, result) -> bool:  # noqa: ANN001
        seen.append((server_round, sorted(result.failed_rounds)))
        return False

    result = StrictRounds(_fedavg(2), max_failed_rounds=1).start(
        InProcessGrid(failing, num_nodes=2), initial_arrays(), num_rounds=3, should_stop=never
    )
    assert seen == [(1, []), (2, [2]), (3, [2])]
    assert result.halt_reason is None and sorted(result.failed_rounds) == [2]
