"""privacy=dp-sgd in the digits app: Opacus DP-SGD on clients, cumulative ε per round."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch
from digits_app import dp_sgd, server_app, task
from digits_app.client_app import app as client_app
from flwr.app import MetricRecord, RecordDict
from opacus.accountants import RDPAccountant
from test_digits_app import DEFAULTS

from flower_privacy.dp.accounting import GaussianRounds, epsilon
from flower_privacy.testing import InProcessGrid, capture_log_lines

# Whole-app runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once

# Measured (5 rounds, 10 IID nodes, noise multiplier 1.0): final central accuracy
# 0.84-0.86, max client ε 20.2 at δ = 1e-5; plain FedAvg reaches 0.95.
ACCURACY_RUN = {
    "privacy": "dp-sgd",
    "num-server-rounds": 5,
    "partitioner": "iid",
    "learning-rate": 0.3,
    "dp-sgd-noise-multiplier": 1.0,
    "dp-sgd-max-grad-norm": 1.0,
    "dp-sgd-delta": 1e-5,
}
EPSILON_LINE = re.compile(r"DP-SGD: sample-level ε = ([0-9.]+) at δ = (\S+) \(max over (\d+)")


def _run(cfg: dict) -> tuple[InProcessGrid, list[str]]:
    grid = InProcessGrid(client_app, num_nodes=int(cfg["min-nodes"]), run_config=cfg)
    with capture_log_lines() as lines:
        grid.run_server_app(server_app.app)
    return grid, lines


def _train_replies(grid: InProcessGrid) -> dict[int, dict[int, MetricRecord]]:
    """Round -> node -> the metrics of its train reply (asked rounds read from the requests)."""
    round_of: dict[str, int] = {}
    per_round: dict[int, dict[int, MetricRecord]] = {}
    for entry in grid.transcript:
        if entry.message_type != "train":
            continue
        if entry.direction == "to-node":
            rnd = int(entry.message.content["config"]["server-round"])
            round_of[entry.message.metadata.message_id] = rnd
        else:
            assert not entry.message.has_error(), entry.message.error.reason
            rnd = round_of[entry.message.metadata.reply_to_message_id]
            per_round.setdefault(rnd, {})[entry.node_id] = entry.message.content["metrics"]
    return per_round


def _expected_history(grid: InProcessGrid, node_id: int, cfg: dict, times_trained: int):
    """The accountant history of a node, derived from its partition size alone."""
    pid = int(grid.contexts[node_id].node_config["partition-id"])
    train, _ = task.load_partition(
        str(cfg["dataset"]), pid, len(grid.contexts), str(cfg["partitioner"]),
        float(cfg["dirichlet-alpha"]), int(cfg["seed"]),
    )  # fmt: skip
    batches = math.ceil(len(train) / int(cfg["batch-size"]))
    steps = times_trained * int(cfg["local-epochs"]) * batches
    return float(cfg["dp-sgd-noise-multiplier"]), 1 / batches, steps


@functools.cache
def _opacus_epsilon(history: tuple[float, float, int], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [history]
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def accuracy_run() -> tuple[dict, InProcessGrid, list[str]]:
    cfg = {**DEFAULTS, **ACCURACY_RUN}
    grid, lines = _run(cfg)
    return cfg, grid, lines


def test_dp_sgd_accuracy_is_well_above_chance(accuracy_run) -> None:  # noqa: ANN001
    _, _, lines = accuracy_run
    accuracy = [float(line.split(":")[1]) for line in lines if "final accuracy" in line]
    # Chance is 0.1; the noise is unseeded (OS CSPRNG), and 0.78-0.86 was measured over six runs.
    assert accuracy and accuracy[-1] > 0.6, accuracy


def test_every_client_reports_a_growing_finite_epsilon_every_round(accuracy_run) -> None:  # noqa: ANN001
    cfg, grid, _ = accuracy_run
    replies = _train_replies(grid)
    assert sorted(replies) == list(range(1, int(cfg["num-server-rounds"]) + 1))
    for rnd, by_node in replies.items():
        assert len(by_node) == 10, f"round {rnd}: {sorted(by_node)}"
        for metrics in by_node.values():
            assert (
                math.isfinite(metrics[dp_sgd.METRIC_EPSILON]) and metrics[dp_sgd.METRIC_EPSILON] > 0
            )
            assert metrics[dp_sgd.METRIC_DELTA] == cfg["dp-sgd-delta"]
    for node_id in grid.contexts:
        series = [replies[rnd][node_id][dp_sgd.METRIC_EPSILON] for rnd in sorted(replies)]
        assert all(b > a for a, b in zip(series, series[1:], strict=False)), (node_id, series)


def test_reported_epsilon_matches_an_independent_accountant(accuracy_run) -> None:  # noqa: ANN001
    cfg, grid, _ = accuracy_run
    delta = float(cfg["dp-sgd-delta"])
    replies = _train_replies(grid)
    for rnd, by_node in replies.items():
        for node_id, metrics in by_node.items():
            history = _expected_history(grid, node_id, cfg, times_trained=rnd)
            reported = metrics[dp_sgd.METRIC_EPSILON]
            # Opacus's own RDP accountant, fed the history implied by the partition size.
            assert reported == pytest.approx(_opacus_epsilon(history, delta), rel=1e-9)
    # dp-accounting's RDP (another implementation) agrees to within its choice of orders.
    last = max(grid.contexts)
    z, q, steps = _expected_history(grid, last, cfg, int(cfg["num-server-rounds"]))
    independent = epsilon(GaussianRounds(z, q, steps), delta, accountant="rdp")
    reported = replies[int(cfg["num-server-rounds"])][last][dp_sgd.METRIC_EPSILON]
    assert reported == pytest.approx(independent, rel=0.02)


def test_server_logs_the_max_epsilon_over_clients_each_round(accuracy_run) -> None:  # noqa: ANN001
    cfg, grid, lines = accuracy_run
    logged = [EPSILON_LINE.search(line) for line in lines]
    logged = [m for m in logged if m]
    replies = _train_replies(grid)
    assert len(logged) == len(replies)
    for match, rnd in zip(logged, sorted(replies), strict=True):
        worst = max(m[dp_sgd.METRIC_EPSILON] for m in replies[rnd].values())
        assert float(match.group(1)) == pytest.approx(worst, abs=1e-4)
        assert float(match.group(2)) == cfg["dp-sgd-delta"] and int(match.group(3)) == 10


def test_max_epsilon_aggregation_keeps_other_metrics_weighted() -> None:
    seen = []

    def mean(records: list[RecordDict], key: str) -> MetricRecord:
        seen.append(key)
        return MetricRecord({"train-loss": 1.5, dp_sgd.METRIC_EPSILON: 2.0})

    records = [
        RecordDict({"metrics": MetricRecord({dp_sgd.METRIC_EPSILON: e, dp_sgd.METRIC_DELTA: 1e-5})})
        for e in (1.0, 4.0, 2.5)
    ]
    metrics = server_app.max_epsilon(mean)(records, "num-examples")
    assert seen == ["num-examples"] and metrics["train-loss"] == 1.5
    assert metrics[dp_sgd.METRIC_EPSILON] == 4.0 and metrics[dp_sgd.METRIC_DELTA] == 1e-5


def test_accountant_persists_across_rounds_a_node_skips() -> None:
    cfg = {
        **DEFAULTS,
        **ACCURACY_RUN,
        "num-server-rounds": 4,
        "clients-per-round": 1,
        "min-nodes": 3,
        "local-epochs": 1,
    }
    grid, _ = _run(cfg)
    replies = _train_replies(grid)
    times: dict[int, int] = {}
    for rnd in sorted(replies):
        ((node_id, metrics),) = replies[rnd].items()
        times[node_id] = times.get(node_id, 0) + 1
        history = _expected_history(grid, node_id, cfg, times_trained=times[node_id])
        expected = _opacus_epsilon(history, float(cfg["dp-sgd-delta"]))
        assert metrics[dp_sgd.METRIC_EPSILON] == pytest.approx(expected, rel=1e-9)
    # With 4 rounds and 3 nodes some node trained twice: its ε covers both rounds.
    assert max(times.values()) >= 2
    for node_id, n in times.items():
        stored = dp_sgd.history_from_record(grid.contexts[node_id].state["dp-sgd-accountant"])
        assert stored == (_expected_history(grid, node_id, cfg, n),)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dp-sgd-noise-multiplier", 0.0, "dp-sgd-noise-multiplier must be a finite number > 0"),
        ("dp-sgd-noise-multiplier", -1.0, "dp-sgd-noise-multiplier must be a finite number > 0"),
        ("dp-sgd-noise-multiplier", float("nan"), "dp-sgd-noise-multiplier must be a finite"),
        ("dp-sgd-max-grad-norm", 0.0, "dp-sgd-max-grad-norm must be a finite number > 0"),
        ("dp-sgd-delta", 0.0, r"dp-sgd-delta must be in \(0, 1\), got 0.0"),
        ("dp-sgd-delta", 1.0, r"dp-sgd-delta must be in \(0, 1\), got 1.0"),
        ("dp-sgd-delta", "tiny", "dp-sgd-delta must be a number, got 'tiny'"),
    ],
)
def test_bad_dp_sgd_config_is_refused_by_name(key: str, value: object, message: str) -> None:
    cfg = {**DEFAULTS, "privacy": "dp-sgd", key: value}
    grid = InProcessGrid(client_app, num_nodes=2, run_config=cfg)
    with pytest.raises(ValueError, match=message):
        grid.run_server_app(server_app.app)
    assert not grid.transcript, "the server sent messages before refusing the config"


def test_a_missing_key_is_named() -> None:
    cfg = {k: v for k, v in DEFAULTS.items() if k != "dp-sgd-delta"}
    with pytest.raises(ValueError, match="needs the run-config key 'dp-sgd-delta'"):
        dp_sgd.DpSgdConfig.from_run_config(cfg)


# -- the noise source -----------------------------------------------------------------


def _train_once(seed: int | None = None, check_global_rng: bool = False) -> np.ndarray:
    data, _ = task.load_partition(task.SKLEARN_DIGITS, 0, 10, "iid", 0.5, 42)
    torch.manual_seed(0)  # the same initial model, and the same global generator state
    net = task.Net(*task.model_shape(task.SKLEARN_DIGITS))
    config = dp_sgd.DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    state = torch.get_rng_state()
    dp_sgd.train_dp_sgd(net, data, epochs=1, batch_size=32, lr=0.1, config=config, seed=seed)
    if check_global_rng:
        assert torch.equal(torch.get_rng_state(), state), "training drew from torch's global RNG"
    return torch.cat([p.detach().cpu().flatten() for p in net.parameters()]).numpy()


def test_noise_does_not_come_from_the_global_generator() -> None:
    first = _train_once(check_global_rng=True)
    second = _train_once(check_global_rng=True)
    # Same global seed, same model: only the OS-seeded generators can make them differ.
    assert not np.allclose(first, second)
    # Guards the guard: drawing from the global generator does change its state.
    state = torch.get_rng_state()
    torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), state)


def test_generators_are_seeded_from_os_urandom(monkeypatch) -> None:  # noqa: ANN001
    calls = []

    def fixed_urandom(n: int) -> bytes:
        calls.append(n)
        return bytes(range(n))

    monkeypatch.setattr(dp_sgd.os, "urandom", fixed_urandom)
    first, second = _train_once(), _train_once()
    assert calls and all(n == 8 for n in calls)
    np.testing.assert_array_equal(first, second)  # fixed OS bytes: identical noise


def test_the_test_only_seed_is_reproducible() -> None:
    np.testing.assert_array_equal(_train_once(seed=5), _train_once(seed=5))
    assert not np.allclose(_train_once(seed=5), _train_once(seed=6))


def test_the_app_path_uses_fresh_noise_every_run() -> None:
    cfg = {**DEFAULTS, **ACCURACY_RUN, "num-server-rounds": 1, "min-nodes": 2, "local-epochs": 1}
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        grid, _ = _run(cfg)
        reply = next(
            e.message for e in grid.transcript if e.direction == "from-node" and e.node_id == 1001
        )
        updates.append(reply.content["arrays"]["layers.0.weight"].numpy())
    assert not np.allclose(updates[0], updates[1])


# -- the model and the stored history ----------------------------------------------------


def test_the_digits_model_is_opacus_compatible_and_batchnorm_is_refused() -> None:
    dp_sgd.check_opacus_compatible(task.Net(64, 10))
    with pytest.raises(ValueError, match="not compatible with Opacus"):
        dp_sgd.check_opacus_compatible(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))


def test_history_record_round_trips_and_refuses_another_mechanism() -> None:
    history = ((1.0, 0.25, 20), (0.8, 0.2, 5))
    record = dp_sgd.history_to_record(history)
    assert dp_sgd.history_from_record(record) == history
    with pytest.raises(ValueError, match="mechanism must be 'rdp', got 'prv'"):
        dp_sgd.history_from_record({**record, "mechanism": "prv"})
    assert dp_sgd.epsilon_of((), 1e-5) == 0.0
