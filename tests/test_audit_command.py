"""``flower-privacy audit``: the empirical ε against the accountant, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flower_privacy import cli
from flower_privacy.dp import noise
from flower_privacy.strategies import _dp_clear, client_level_dp

# Whole-app attack runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once

ROWS = {"attacker", "attack", "config", "metric", "value"}


@pytest.fixture()
def toy_app_dir(tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001
    """An app folder naming the toy hook; ClientLevelDP's noise pinned (test only)."""
    monkeypatch.setattr(
        client_level_dp, "secure_generator", lambda seed=None: np.random.default_rng(7)
    )
    app_dir = tmp_path / "toy"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(
        '[tool.flower-privacy]\naudit-hook = "audit_toy_app:hook"\n'
    )
    return app_dir


def _audit(app_dir: Path, out: Path) -> tuple[int, dict, str]:
    # Only the canary run: the other attacks have their own tests.
    result = CliRunner().invoke(
        cli.app,
        [
            "audit",
            str(app_dir),
            "--compare",
            "dp-central",
            "--rounds",
            "3",
            "--json",
            "--out",
            str(out),
            "--attack",
            "empirical-epsilon",
        ],
    )
    document = json.loads(result.stdout[result.stdout.index("{") :])
    return result.exit_code, document, result.stderr


def test_the_empirical_epsilon_sits_within_the_accountant_and_the_report_is_written(
    toy_app_dir: Path, tmp_path: Path
) -> None:
    code, document, stderr = _audit(toy_app_dir, tmp_path / "report")
    assert code == 0, stderr
    assert document["attacks"] and all(ROWS <= set(row) for row in document["attacks"])
    (row,) = [r for r in document["attacks"] if r["metric"] == "empirical epsilon"]
    assert row["details"]["low"] <= row["details"]["accountant_epsilon"], row["verdict"]
    assert row["details"]["canaries"] == 20 and row["details"]["threat_model"] == "final model"
    page = (tmp_path / "report" / "index.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page
    assert json.loads((tmp_path / "report" / "audit.json").read_text())["attacks"]


def test_dp_with_noise_scaled_down_tenfold_is_caught(
    toy_app_dir: Path, tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    real = noise.add_gaussian_noise
    # Deliberately broken DP (test only): a tenth of the accounted noise.
    monkeypatch.setattr(
        _dp_clear, "add_gaussian_noise", lambda values, std, rng: real(values, std / 10, rng)
    )
    code, document, stderr = _audit(toy_app_dir, tmp_path / "report")
    assert code == 1
    assert document["violations"] and "exceeds the accountant" in document["violations"][0]
    assert "VIOLATION" in stderr


def test_an_app_without_a_hook_and_an_unknown_configuration_are_named(
    toy_app_dir: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pyproject.toml").write_text("[tool.flwr.app]\npublisher = 'x'\n")
    result = CliRunner().invoke(cli.app, ["audit", str(bare)])
    assert result.exit_code == 2 and "audit-hook" in result.stderr
    result = CliRunner().invoke(cli.app, ["audit", str(toy_app_dir), "--compare", "dp-typo"])
    assert result.exit_code == 2 and "unknown configuration 'dp-typo'" in result.stderr
    result = CliRunner().invoke(cli.app, ["audit", str(toy_app_dir), "secagg"])
    assert result.exit_code == 2 and "--compare" in result.stderr
