"""A real deployment: SuperLink and SuperNodes over TLS on 127.0.0.1, driven by `flwr run`."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from conftest import DIGITS_APP, REPO_ROOT, assert_completed

from flower_privacy.harness.deployment import LocalDeployment

pytestmark = [pytest.mark.deployment, pytest.mark.timeout(600)]
SYNTHETIC_APP = REPO_ROOT / "apps" / "synthetic"


def _round_timer() -> tuple[list[float], Callable[[str, int | None], None]]:
    """Times at which the streamed log shows a round starting (and the run ending)."""
    marks: list[float] = []

    def watch(line: str, run_id: int | None) -> None:
        if "[ROUND " in line or "Strategy execution finished" in line:
            marks.append(time.monotonic())

    return marks, watch


def _print_round_times(label: str, marks: list[float], capsys, extra: str = "") -> None:  # noqa: ANN001
    """Show seconds per round in the test output (figures for the closing note)."""
    rounds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    with capsys.disabled():
        print(f"\n[{label}] seconds per round: {', '.join(f'{r:.1f}' for r in rounds)}{extra}")


def test_tls_deployment_runs_the_digits_app_with_encrypted_fedavg(  # noqa: ANN001
    tmp_path, no_leftover_processes, capsys
) -> None:
    # Keys made offline; each SuperNode finds client.ctx through its node config and
    # the server gets only server.ctx (run config). Encrypted FedAvg needs TLS.
    from conftest import run_cli

    keys = tmp_path / "keys"
    made = run_cli("keys", "generate", "--out", str(keys), "--max-clients", "100")
    assert made.returncode == 0, made.stderr
    client_ctx = keys / "client.ctx"
    round_started, watch = _round_timer()
    with LocalDeployment(2, node_config=lambda i: {"he-context": str(client_ctx)}) as deployment:
        outcome = deployment.run(
            DIGITS_APP,
            run_config=[
                f"num-server-rounds=2 min-nodes=2 privacy='he' round-timeout=120.0 "
                f"he-server-context='{keys / 'server.ctx'}'"
            ],
            timeout=420,
            on_line=watch,
        )
        superlink_log = deployment.log("superlink.log")
        assert deployment.tls_files is not None
    assert_completed(outcome)
    assert "insecure" not in superlink_log.lower()
    assert sum("added 2 encrypted updates" in line for line in outcome.log) == 2
    assert outcome.final_accuracy is not None and outcome.final_accuracy > 0.5
    # The server wrote the encrypted final model next to server.ctx; a key holder opens it.
    model = keys / "final-model.fphe"
    out = tmp_path / "model.npz"
    opened = run_cli("he", "decrypt", str(model), "--context", str(client_ctx), "--out", str(out))
    assert opened.returncode == 0, opened.stderr
    assert "2 contributions" in opened.stdout
    _print_round_times(
        "deployment he", round_started, capsys, f"; run wall time {outcome.wall_seconds:.1f} s"
    )


def test_a_killed_supernode_is_survived_within_a_bound(no_leftover_processes) -> None:
    killed_at: list[float] = []
    deployment = LocalDeployment(3)

    def kill_in_round_two(line: str, run_id: int | None) -> None:
        if "[ROUND 2/" in line and not killed_at:
            deployment.kill_supernode(2)
            killed_at.append(time.monotonic())

    with deployment:
        # The synthetic app starts fast: round 1 fits a short round timeout.
        outcome = deployment.run(
            SYNTHETIC_APP,
            run_config=["num-params=1000 num-server-rounds=3 min-nodes=2 round-timeout=20.0"],
            timeout=420,
            on_line=kill_in_round_two,
        )
    assert killed_at, (
        f"the run never reached round 2: {outcome.status}: {outcome.details}\n"
        + "\n".join(outcome.log[-60:])
    )
    assert_completed(outcome)
    # The strategy names the node that stopped answering, and the survivors finish.
    assert any("reply from node(s)" in line for line in outcome.log)
    assert time.monotonic() - killed_at[0] < 240


def test_secure_aggregation_through_a_real_deployment(no_leftover_processes, capsys) -> None:  # noqa: ANN001
    times, watch = _round_timer()

    # The synthetic app (no torch, no evaluation): the protocol's exchanges are measured.
    with LocalDeployment(3) as deployment:
        outcome = deployment.run(
            SYNTHETIC_APP,
            run_config=[
                "num-params=10000 num-server-rounds=2 privacy='secagg' secagg-group-size=3"
            ],
            timeout=540,
            on_line=watch,
        )
    assert_completed(outcome)
    assert sum("securely aggregated 3 clients" in line for line in outcome.log) == 2
    assert any("'secagg-privacy-t': 3" in line for line in outcome.log)
    _print_round_times("deployment secagg, round 1 includes key set-up", times, capsys)
