"""The timeout given to ``start`` bounds every wait and every message TTL of a wrapped stack.

Checked on what the in-process grid records (the ``timeout`` of each
``send_and_receive`` and the TTL of each message), not on protocol internals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import initial_arrays, make_toy_client_app
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy import he
from flower_privacy.mods import EncryptionMod, secagg_mod
from flower_privacy.strategies import (
    ClientLevelDP,
    EncryptedFedAvg,
    SecureAggregation,
    StrictRounds,
)
from flower_privacy.testing import InProcessGrid

TIMEOUT = 30.0
LIMITS = he.DeclaredLimits(max_clients=10, max_weight=100, clip_range=16.0, precision_bits=16)


def _fedavg(n: int) -> FedAvg:
    return FedAvg(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_available_nodes=n
    )


def _assert_bounded(grid: InProcessGrid, rounds: int) -> None:
    assert grid.timeouts, "nothing was sent"
    assert all(t is not None and t <= TIMEOUT for t in grid.timeouts), grid.timeouts
    ttls = sorted({entry.ttl for entry in grid.transcript})
    assert ttls and max(ttls) <= TIMEOUT, f"TTLs on the grid: {ttls}"
    # Every train and evaluate wait of the loop is recorded, and nothing else may escape.
    assert len(grid.timeouts) >= 2 * rounds


def test_strict_rounds_sends_flowers_messages_with_the_round_timeout_as_ttl() -> None:
    grid = InProcessGrid(make_toy_client_app(), num_nodes=3)
    StrictRounds(_fedavg(3)).start(grid, initial_arrays(), num_rounds=2, timeout=TIMEOUT)
    _assert_bounded(grid, rounds=2)
    assert grid.timeouts == [TIMEOUT] * 4  # train and evaluate, two rounds


def test_the_timeout_reaches_secure_aggregation_under_client_level_dp() -> None:
    n, dim = 6, 64
    grid = InProcessGrid(make_toy_client_app(dim=dim, mods=[secagg_mod]), num_nodes=n)
    inner = SecureAggregation(_fedavg(n), weighting="uniform", min_train_replies=4, max_clients=20)
    strategy = ClientLevelDP(
        inner, target_epsilon=3.0, clip_norm=1.0, placement="distributed", accountant="rdp"
    )
    result = strategy.start(grid, initial_arrays(dim), num_rounds=2, timeout=TIMEOUT)
    assert not result.failed_rounds and result.halt_reason is None
    # Secure aggregation exchanges more than train and evaluate: those waits count too.
    assert len(grid.timeouts) > 4
    _assert_bounded(grid, rounds=2)
    assert inner.round_timeout == strategy.round_timeout == TIMEOUT


def test_a_later_start_with_another_timeout_reaches_the_inner_layers_again() -> None:
    n, dim = 6, 16
    inner = SecureAggregation(_fedavg(n), weighting="uniform", min_train_replies=4)
    strategy = ClientLevelDP(
        inner, target_epsilon=3.0, clip_norm=1.0, placement="distributed", accountant="rdp"
    )
    app = make_toy_client_app(dim=dim, mods=[secagg_mod])
    strategy.start(InProcessGrid(app, num_nodes=n), initial_arrays(dim), 1, timeout=300)
    grid = InProcessGrid(app, num_nodes=n)
    strategy.start(grid, initial_arrays(dim), num_rounds=1, timeout=TIMEOUT)
    _assert_bounded(grid, rounds=1)
    assert inner.round_timeout == TIMEOUT


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("he-keys")
    return he.generate_keys(folder, he.derive_parameters("bfv", LIMITS))


def _encrypted(keys: tuple[Path, Path]) -> tuple[EncryptedFedAvg, InProcessGrid]:
    client_ctx, server_ctx = keys
    app = make_toy_client_app(app=ClientApp(mods=[EncryptionMod(client_ctx)]))
    strategy = EncryptedFedAvg(_fedavg(3), server_context=server_ctx, **LIMITS.to_dict())
    return strategy, InProcessGrid(app, num_nodes=3)


def test_the_timeout_bounds_encrypted_fedavg(keys) -> None:
    strategy, grid = _encrypted(keys)
    result = strategy.start(grid, initial_arrays(), num_rounds=2, timeout=TIMEOUT)
    assert not result.failed_rounds
    _assert_bounded(grid, rounds=2)


def test_encrypted_fedavg_honours_should_stop(keys) -> None:
    strategy, grid = _encrypted(keys)
    seen: list[int] = []

    def should_stop(server_round: int, result) -> bool:  # noqa: ANN001
        seen.append(server_round)
        return server_round == 2

    result = strategy.start(grid, initial_arrays(), num_rounds=5, should_stop=should_stop)
    assert seen == [1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert "after round 2" in result.halt_reason
