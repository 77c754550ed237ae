"""The audit's attacks, each in a pinned one-step setting on the shipped strategies and mods.

The toy app (tests/audit_toy_app.py) trains one full-batch SGD step per node. Secure
aggregation rounds stochastically with OS randomness; its error is at most one unit
(2^-31 of the declared range) per client and coordinate, far below what separates the
asserted thresholds. Client-level DP's server noise is seeded here (test only).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from audit_toy_app import hook

from flower_privacy.audit import attacks, empirical_eps, findings, inversion, metrics, report
from flower_privacy.strategies import client_level_dp

# Whole-app attack runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once


@pytest.fixture()
def seeded_dp_noise(monkeypatch):  # noqa: ANN201
    """ClientLevelDP draws its noise from a pinned generator (reproducible, test only)."""
    monkeypatch.setattr(
        client_level_dp, "secure_generator", lambda seed=None: np.random.default_rng(2024)
    )


def _audit(name: str, overrides: dict, chosen: set[str], rounds: int = 1) -> findings.ConfigAudit:
    settings = findings.AuditSettings(rounds=rounds, attacks=frozenset(chosen))
    return attacks.audit_config(hook(), name, overrides, settings)


def _finding(
    audit: findings.ConfigAudit, attacker: str, attack: str, metric: str = "images above 20 dB"
) -> findings.Finding:
    found = [
        f
        for f in audit.findings
        if f.attacker.startswith(attacker) and f.attack == attack and f.metric == metric
    ]
    assert len(found) == 1, [(f.attacker, f.attack) for f in audit.findings]
    return found[0]


def test_analytic_attack_on_a_linear_layer_gradient_is_exact_without_flower() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    x = torch.rand(1, 64)
    torch.nn.functional.cross_entropy(layer(x), torch.tensor([3])).backward()
    update = {"0.weight": -layer[0].weight.grad.numpy(), "0.bias": -layer[0].bias.grad.numpy()}
    candidates = inversion.analytic_first_layer(update, "0.weight", "0.bias")
    assert metrics.match(x.numpy(), candidates, (8, 8)).best_psnr > 60


def test_analytic_recovery_from_one_step_of_plain_fedavg_is_exact() -> None:
    audit = _audit("none", {"toy-per-node": 1, "min-nodes": 2}, {"inversion"})
    found = _finding(audit, "honest-but-curious server (client", "analytic first layer")
    assert found.details["inputs"] == 1
    assert found.details["best_psnr_db"] > 40, found.verdict


@pytest.fixture(scope="module")
def secagg_imprint() -> findings.ConfigAudit:
    return _audit("secagg", {}, {"imprint"})


def test_imprint_recovers_inputs_from_a_secure_aggregation_sum_of_10_clients(
    secagg_imprint,
) -> None:  # noqa: ANN001
    found = _finding(
        secagg_imprint, "malicious server (sum of 10 clients)", "imprint (Robbing the Fed)"
    )
    assert found.details["inputs"] == 240
    assert found.details["above_30db"] >= 5, found.verdict


def test_client_level_dp_brings_the_imprint_to_the_random_baseline(seeded_dp_noise) -> None:  # noqa: ANN001
    audit = _audit("dp-central", {"dp-target-epsilon": 8.0}, {"imprint"})
    # The central server sees clear updates (it is trusted with them) ...
    clear = _finding(audit, "malicious server (each client's update)", "imprint (Robbing the Fed)")
    assert clear.details["above_30db"] >= 5
    # ... but the noisy release at ε = 8 yields nothing beyond random images (measured
    # baseline: best PSNR of 64 uniform random images matched to the 240 inputs, 8.3 dB).
    release = _finding(audit, "malicious server (the noisy release)", "imprint (Robbing the Fed)")
    baseline = release.details["random_baseline_psnr_db"]
    assert 6.0 < baseline < 11.0
    assert release.details["best_psnr_db"] <= baseline + 3.0, release.verdict


def test_differencing_isolates_clients_under_random_selection_and_none_with_groups() -> None:
    common = {"clients-per-round": 6, "secagg-group-size": 2}
    randomly = _audit("secagg", {**common, "secagg-selection": "random"}, {"differencing"}, 12)
    grouped = _audit("secagg", {**common, "secagg-selection": "least-used"}, {"differencing"}, 12)
    isolation = "isolation from participation"
    isolated = _finding(randomly, "server, multi-round", isolation, "isolated clients")
    assert isolated.value >= 1
    assert randomly.privacy_t[-1] == 1
    none = _finding(grouped, "server, multi-round", isolation, "isolated clients")
    assert none.value == 0 and min(grouped.privacy_t) >= 2


def test_the_gaussian_pair_epsilon_matches_the_accountant_for_a_gaussian_mechanism() -> None:
    from flower_privacy.dp.accounting import GaussianRounds, epsilon

    accountant = epsilon(GaussianRounds(0.5, 1.0, 1), 1e-5)
    assert empirical_eps.gaussian_pair_epsilon(2.0, 1.0, 0.0, 1.0, 1e-5) == pytest.approx(
        accountant, rel=1e-3
    )


def test_model_inconsistency_under_secure_aggregation_is_refused(secagg_imprint) -> None:  # noqa: ANN001
    attack = "model inconsistency (imprint to one client)"
    found = _finding(secagg_imprint, "malicious server", attack)
    assert found.value == 0 and found.verdict.startswith("refused"), found.verdict
    assert "inconsistent" in found.verdict or "unmask" in found.verdict


def test_differencing_estimates_a_true_update_under_random_selection_not_with_groups(
    monkeypatch,
) -> None:  # noqa: ANN001
    # Pinned draws (the digits strategy also seeds selection and the partition from "seed").
    monkeypatch.setattr(random, "SystemRandom", lambda: random.Random(0))
    common = {"clients-per-round": 6, "secagg-group-size": 2, "toy-fixed-update": True}
    metric = "best cosine to a true update"
    audits, found = {}, {}
    for rule in ("random", "least-used"):
        audits[rule] = _audit("secagg", {**common, "secagg-selection": rule}, {"differencing"}, 12)
        found[rule] = _finding(audits[rule], "server, multi-round", "differencing", metric)
    # Per-client sampling: a client's column is isolated, its estimate is its update.
    assert found["random"].value > 0.999, found["random"].verdict
    # Groups of two, chosen whole: every estimate mixes a group's two (correlated) one-step
    # updates; measured 0.916 (the mean release alone: 0.647).
    assert found["least-used"].value < 0.95, found["least-used"].verdict
    assert found["least-used"].details["mean_release_cosine"] < found["least-used"].value
    # The row reaches the JSON and the page.
    document = report.to_json([audits["least-used"]], {"configs": ["secagg"]})
    assert [r["value"] for r in document["attacks"] if r["metric"] == metric] == [
        found["least-used"].value
    ]
    assert metric in report._html(document, [])


def test_a_hook_claiming_fixed_updates_it_does_not_have_is_caught() -> None:
    liar = dataclasses.replace(hook(), fixed_updates=lambda cfg: True)
    settings = findings.AuditSettings(rounds=2, attacks=frozenset({"differencing"}))
    with pytest.raises(ValueError, match="declares fixed updates"):
        attacks.audit_config(liar, "secagg", {"toy-per-node": 4}, settings)
