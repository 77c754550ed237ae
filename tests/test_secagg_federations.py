"""Secure aggregation in ordinary federations: client sampling and dropouts every round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from test_secure_aggregation import SHAPES, _updates_app, _zeros

from flower_privacy.mods import secagg_mod
from flower_privacy.strategies import SecureAggregation
from flower_privacy.testing import InProcessGrid
from flower_privacy.testing.dropout import DROPOUT_FRACTION, DROPOUT_SEED, dropout_mod, drops

# Federation-scale runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once


def _expected(seed: int, nodes: list[int]) -> np.ndarray:
    parts, weights = [], []
    for node in nodes:
        rng = np.random.default_rng([seed, node])
        parts.append(
            np.concatenate([rng.uniform(-0.5, 0.5, s).reshape(-1) for s in SHAPES.values()])
        )
        weights.append(int(rng.integers(1, 50)))
    return sum(w * p for w, p in zip(weights, parts, strict=True)) / sum(weights)


@pytest.mark.parametrize("group_size", [None, 3])
def test_24_nodes_half_sampled_10_percent_dropping_complete_every_round(group_size) -> None:  # noqa: ANN001
    rounds, seed = 40, 5
    grid = InProcessGrid(
        _updates_app(3, mods=[dropout_mod, secagg_mod]),
        num_nodes=24,
        run_config={DROPOUT_FRACTION: 0.1, DROPOUT_SEED: seed},
    )
    inner = FedAvg(fraction_train=0.5, min_available_nodes=24, fraction_evaluate=0.0)
    # With groups of 3 a dropout costs its whole group: one complete group of the four
    # sampled is enough (the round fails only if every group loses a member).
    strategy = SecureAggregation(
        inner,
        max_weight=100,
        min_train_replies=3 if group_size else 6,
        group_size=group_size,
        selection_seed=1,
    )
    deltas = []
    previous = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))

    def record(server_round: int, arrays) -> None:  # noqa: ANN001
        nonlocal previous
        flat = np.concatenate([arrays[k].numpy().reshape(-1) for k in SHAPES])
        deltas.append(flat - previous)
        previous = flat

    result = strategy.start(grid, _zeros(), num_rounds=rounds, evaluate_fn=record)
    assert not result.failed_rounds and sorted(result.train_metrics_clientapp) == list(
        range(1, rounds + 1)
    )
    dropped = sum(result.train_metrics_clientapp[r]["secagg-dropped"] for r in range(1, rounds + 1))
    assert dropped > 0  # the dropouts happened
    for server_round, members in enumerate(strategy_history(strategy, grid, rounds), start=1):
        # Each round's model change is the weighted mean of exactly its survivors.
        np.testing.assert_allclose(deltas[server_round], _expected(3, members), atol=2e-3)
        assert not any(drops(seed, n, server_round, 0.1) for n in members)


def strategy_history(
    strategy: SecureAggregation, grid: InProcessGrid, rounds: int
) -> list[list[int]]:
    """The survivors of each round, from what the server sent at unmasking."""
    from flower_privacy.wire import secagg as wire

    seen: dict[int, list[int]] = {}
    for entry in grid.transcript:
        if entry.direction == "to-node" and wire.UNMASK in wire.stages_of(entry.message.content):
            payload = wire.payload_of(entry.message.content, wire.UNMASK)
            seen[int(payload["round"])] = [int(n) for n in payload["survivors"]]
    return [seen[r] for r in range(1, rounds + 1)]


@pytest.mark.timeout(900)  # about 45 s alone; several times that on a loaded machine
def test_a_cohort_of_1000_sums_within_the_stated_error() -> None:
    n, dim = 1000, 16
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng(context.node_id)
        arrays = msg.content["arrays"]
        update = rng.uniform(-1, 1, dim).astype(np.float32)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(arrays["w"].numpy() + update)}),
                    "metrics": MetricRecord({"num-examples": int(rng.integers(1, 100))}),
                }
            ),
            reply_to=msg,
        )

    grid = InProcessGrid(app, num_nodes=n, serialize=False)
    inner = FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)
    strategy = SecureAggregation(inner, max_weight=100, max_clients=n)
    result = strategy.start(
        grid, ArrayRecord({"w": Array(np.zeros(dim, np.float32))}), num_rounds=1
    )
    updates, weights = [], []
    for node in grid.contexts:
        rng = np.random.default_rng(node)
        updates.append(rng.uniform(-1, 1, dim).astype(np.float32).astype(np.float64))
        weights.append(int(rng.integers(1, 100)))
    expected = np.average(updates, axis=0, weights=weights)
    # Each client's weighted update is rounded by less than one step of the quantiser: the
    # mean is off by less than n steps over the total weight (the card's bound), plus
    # float32 storage of the result.
    bound = n * strategy.quantizer.resolution / sum(weights) + 1e-6
    error = np.abs(result.arrays["w"].numpy() - expected).max()
    assert result.train_metrics_clientapp[1]["secagg-clients"] == n
    assert error <= bound, (error, bound)


def test_the_scaling_bench_runs_both_floors_and_checks_its_mean() -> None:
    from flower_privacy.bench import scaling

    rows = scaling.run(sizes=(30,), params=1000, log=lambda line: None)
    assert [r["floors"] for r in rows] == ["hbc", "malicious"]
    hbc, malicious = rows
    assert malicious["degree"] >= hbc["degree"] and malicious["threshold"] > hbc["threshold"]
    for row in rows:
        assert row["bytes_per_param"] == pytest.approx(4.0, abs=0.01)
        assert row["server_s"] > 0 and row["client_s"] > 0 and row["setup_bytes_per_node"] > 0
        assert 0 < row["server_cpu_s"]
