"""ε accounting and noise calibration for Poisson-subsampled Gaussian rounds."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from conftest import run_cli
from dp_accounting.pld import PLDAccountant

from flower_privacy.dp.accounting import GaussianRounds, calibrate, epsilon

# Flower-free cores: run on the main Flower version only.
pytestmark = pytest.mark.once


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"),
    [(1.0, 0.01, 1000, 1e-5), (0.8, 0.05, 200, 1e-6), (2.0, 1.0, 10, 1e-5), (1.5, 0.2, 50, 1e-3)],
)
def test_pld_epsilon_matches_dp_accountings_reference(z, q, rounds, delta) -> None:  # noqa: ANN001
    reference = PLDAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    reference.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    ours = epsilon(GaussianRounds(z, q, rounds), delta)
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=1e-9)


def test_known_figures_and_accountant_order() -> None:
    # The reference figures for z=1, q=0.01, 1000 rounds, δ=1e-5 (shared/reference).
    mech = GaussianRounds(1.0, 0.01, 1000)
    pld, prv, rdp = (epsilon(mech, 1e-5, a) for a in ("pld", "prv", "rdp"))
    assert pld == pytest.approx(1.828, abs=0.005)
    assert prv == pytest.approx(1.838, abs=0.01)
    assert rdp == pytest.approx(2.101, abs=0.005)
    assert pld <= prv <= rdp  # PLD is the tightest upper bound here


@pytest.mark.parametrize(("target", "accountant"), [(3.0, "rdp"), (8.0, "rdp"), (3.0, "pld")])
def test_calibration_returns_the_smallest_sufficient_noise(target, accountant) -> None:  # noqa: ANN001
    q, rounds, delta = 0.1, 30, 1e-5
    z = calibrate(target, delta, q, rounds, accountant)
    assert epsilon(GaussianRounds(z, q, rounds), delta, accountant) <= target
    assert epsilon(GaussianRounds(0.99 * z, q, rounds), delta, accountant) > target


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="noise_multiplier must be > 0, got 0"):
        GaussianRounds(0, 0.1, 1)
    with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\], got 1.5"):
        GaussianRounds(1, 1.5, 1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        GaussianRounds(1, 0.5, 0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 0"):
        epsilon(GaussianRounds(1, 0.5, 1), 0)
    with pytest.raises(ValueError, match="accountant must be one of"):
        epsilon(GaussianRounds(1, 0.5, 1), 1e-5, "gdp")
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        calibrate(-1, 1e-5, 0.1, 10)


def test_cli_prints_one_json_object() -> None:
    args = ["dp", "epsilon", "--noise-multiplier", "1", "--delta", "1e-5"]
    res = run_cli(*args, "--sampling-rate", "0.01", "--rounds", "1000", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["epsilon"] == pytest.approx(1.828, abs=0.005)
    bad = run_cli(*args, "--sampling-rate", "2", "--rounds", "10")
    assert bad.returncode == 2 and "sampling_rate must be in (0, 1]" in bad.stderr
