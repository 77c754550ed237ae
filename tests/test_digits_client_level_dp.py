"""The digits app with privacy="dp": every noise placement from the run config."""

from __future__ import annotations

import re

import pytest
from digits_app import server_app
from digits_app.client_app import app as client_app
from test_digits_app import DEFAULTS

from flower_privacy.testing import InProcessGrid

# Whole-app runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once


@pytest.mark.parametrize("placement", ["central", "client", "distributed"])
def test_each_placement_trains_within_its_budget(caplog, placement) -> None:  # noqa: ANN001
    cfg = {
        **DEFAULTS,
        "privacy": "dp",
        "dp-placement": placement,
        "dp-target-epsilon": 50.0,
        # Ten rounds: at five, clipping alone holds accuracy near 0.5 and the noise spreads it
        # over 0.34-0.62 (measured, distributed); at ten it spreads over 0.66-0.82.
        "num-server-rounds": 10,
    }
    grid = InProcessGrid(client_app, num_nodes=10, run_config=cfg)
    grid.run_server_app(server_app.app)
    spent = [float(e) for e in re.findall(r"ε=([0-9.]+) at δ=1e-05 after", caplog.text)]
    assert len(spent) == 10 and spent == sorted(spent) and spent[-1] <= 50.0
    accuracy = float(re.findall(r"final accuracy: ([0-9.]+)", caplog.text)[-1])
    assert accuracy > 0.4, accuracy  # chance is 0.1; DP noise costs accuracy at 10 clients
    # No federated evaluation: its metrics would come from clients' data without noise.
    sent = {e.message_type for e in grid.transcript if e.direction == "to-node"}
    assert "evaluate" not in sent
    if placement == "distributed":
        assert "securely aggregated 10 clients" in caplog.text
        assert "skellam noise" in caplog.text


def test_a_bad_placement_is_named() -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        cfg = {**DEFAULTS, "dp-placement": "x"}
        server_app.build_strategy("dp", server_app.make_fedavg(0, 10), cfg)
