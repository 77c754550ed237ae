"""The privacy ledger: released rounds in, ε out, and a run resumed with ε intact."""

from __future__ import annotations

import pytest
from conftest import initial_arrays, make_toy_client_app
from flwr.serverapp.strategy import FedAvg

from flower_privacy.dp.accounting import GaussianRounds, epsilon
from flower_privacy.dp.ledger import PrivacyLedger
from flower_privacy.strategies import ClientLevelDP, SecureAggregation
from flower_privacy.testing import InProcessGrid


def test_the_ledger_composes_its_rounds_and_round_trips() -> None:
    ledger = PrivacyLedger(GaussianRounds(1.2, 0.5, 99), delta=1e-5)
    assert ledger.epsilon() == 0.0 and ledger.event.rounds == 1
    ledger.charge(3)
    ledger.charge()
    assert ledger.released == 4
    assert ledger.epsilon() == pytest.approx(epsilon(GaussianRounds(1.2, 0.5, 4), 1e-5))
    again = PrivacyLedger.from_state_dict(ledger.state_dict())
    assert again.released == 4 and again.epsilon() == ledger.epsilon()
    for released in (-1, 1.5, True, None, float("inf")):
        with pytest.raises(ValueError, match="released"):
            PrivacyLedger.from_state_dict({**ledger.state_dict(), "released": released})
    with pytest.raises(ValueError, match="lacks 'kind'"):
        PrivacyLedger.from_state_dict({"version": 1})
    with pytest.raises(ValueError, match="unknown mechanism kind"):
        PrivacyLedger.from_state_dict({**ledger.state_dict(), "kind": "laplace"})
    with pytest.raises(ValueError, match="rounds must be"):
        ledger.charge(0)


def _fedavg(n: int = 4) -> FedAvg:
    return FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)


def _run(strategy: ClientLevelDP, rounds: int):  # noqa: ANN202
    grid = InProcessGrid(make_toy_client_app(dim=16), num_nodes=4)
    return strategy.start(grid, initial_arrays(16), num_rounds=rounds)


def test_a_resumed_run_counts_the_earlier_rounds_and_stops_at_the_target() -> None:
    first = ClientLevelDP(_fedavg(), target_epsilon=3.0, clip_norm=1.0, seed=1)
    _run(first, 2)  # calibrated for 2 rounds: the whole budget
    state = first.state_dict()
    assert state["released"] == 2
    resumed = ClientLevelDP(_fedavg(), target_epsilon=3.0, clip_norm=1.0, seed=2)
    resumed.load_state_dict(state)
    result = _run(resumed, 3)
    # No round fits: the earlier two spent the budget, and ε is not reset to zero.
    assert resumed.released == 2 and not result.train_metrics_clientapp
    assert "privacy budget spent" in (result.halt_reason or "")
    generous = ClientLevelDP(_fedavg(), target_epsilon=50.0, clip_norm=1.0, seed=3)
    generous.load_state_dict(state)
    result = _run(generous, 1)
    z = state["event"]["noise_multiplier"]
    assert generous.noise_multiplier == z  # kept, not recalibrated
    assert result.train_metrics_clientapp[1]["dp-epsilon"] == pytest.approx(
        epsilon(GaussianRounds(z, 1.0, 3), 1e-5)
    )


def test_a_ledger_of_another_setting_is_refused() -> None:
    first = ClientLevelDP(_fedavg(), noise_multiplier=1.0, clip_norm=1.0, seed=1)
    _run(first, 1)
    other = ClientLevelDP(_fedavg(), noise_multiplier=1.0, delta=1e-6, seed=1)
    with pytest.raises(ValueError, match="delta"):
        other.load_state_dict(first.state_dict())
    quieter = ClientLevelDP(_fedavg(), noise_multiplier=2.0, clip_norm=1.0, seed=1)
    with pytest.raises(ValueError, match="noise multiplier 1.0 != 2.0"):
        quieter.load_state_dict(first.state_dict())
    secure = SecureAggregation(_fedavg(), weighting="uniform")
    distributed = ClientLevelDP(secure, target_epsilon=3.0, placement="distributed")
    with pytest.raises(ValueError, match="not supported yet"):
        distributed.load_state_dict(first.state_dict())
    with pytest.raises(RuntimeError, match="nothing to resume"):
        other.state_dict()
