"""The commands that run an app: ``simulate``, ``demo``, ``deploy``, and ``preset``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flower_privacy.cli._common import echo, user_errors
from flower_privacy.harness.flwr_cli import RunOutcome
from flower_privacy.harness.presets import (
    GpuUnavailableError,
    check_gpu,
    find_preset,
    load_federation_preset,
    to_overrides,
)

_REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_APP = _REPO_ROOT / "apps" / "digits"


def _report(outcome: RunOutcome, started: float) -> None:
    """Print the verdict; exit non-zero unless the run completed."""
    wall = time.monotonic() - started
    if not outcome.completed:
        reason = outcome.fatal_reason or outcome.details or "no details"
        typer.secho(
            f"run {outcome.run_id} did not complete: status {outcome.status!r}: {reason}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)
    if outcome.final_accuracy is None:
        typer.secho("run completed but logged no 'final accuracy' line", fg="red", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"run {outcome.run_id}: {outcome.status} in {wall:.1f} s")
    typer.echo(f"final accuracy: {outcome.final_accuracy:.3f}")


def simulate(
    app_dir: Annotated[Path, typer.Argument(help="Flower app folder (with pyproject.toml).")],
    preset: Annotated[
        str, typer.Option(help="Federation preset: name under configs/federation/ or a .toml path.")
    ] = "cpu-10",
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            "-c",
            help="Run config overrides ('k=v k=v') or a TOML file; repeatable.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 1800.0,
) -> None:
    """Run an app on Flower's Ray simulation backend, offline, and report the outcome."""
    from flower_privacy.harness.simulation import LocalSimulation

    started = time.monotonic()
    preset_path = find_preset(preset)
    federation = load_federation_preset(preset_path)
    typer.echo(f"federation preset {preset_path.name}: {to_overrides(federation)}")
    with user_errors(GpuUnavailableError):
        check_gpu(federation, f"preset {preset_path.name}")  # before any process starts
    with user_errors(GpuUnavailableError), LocalSimulation() as sim:
        outcome = sim.run(app_dir, federation, run_config=run_config, echo=echo, timeout=timeout)
    _report(outcome, started)


def demo(
    timeout: Annotated[float, typer.Option(help="Seconds before each run is stopped.")] = 900.0,
) -> None:
    """Secure aggregation with groups plus distributed client-level DP on the digits app.

    Two runs on 10 non-IID virtual clients, offline, with the same data and seed: the
    plain FedAvg baseline (configs/run/demo-baseline.toml), then the private run
    (configs/run/demo.toml), printing each round's accuracy, ε and T.
    """
    from flower_privacy.harness.demo import DemoFailedError, run_demo

    if not DEMO_APP.is_dir():
        typer.secho(f"the demo app is not at {DEMO_APP}: run from a checkout", fg="red", err=True)
        raise typer.Exit(code=2)
    started = time.monotonic()
    try:
        with user_errors(GpuUnavailableError):
            result = run_demo(DEMO_APP, echo=echo, timeout=timeout)
    except DemoFailedError as err:
        typer.echo("\n".join(err.outcome.log[-40:]))
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"both runs completed in {time.monotonic() - started:.1f} s")
    typer.echo(
        f"accuracy: private {result.private_accuracy:.3f} vs plain baseline "
        f"{result.baseline_accuracy:.3f}"
    )
    typer.echo(f"privacy: {result.summary}")
    typer.echo(f"final accuracy: {result.private_accuracy:.3f}")


def deploy(
    app_dir: Annotated[Path, typer.Argument(help="Flower app folder (with pyproject.toml).")],
    supernodes: Annotated[int, typer.Option(help="SuperNodes to start.")] = 2,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", "-c", help="Run config overrides; repeatable."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="Plain HTTP instead of TLS with a local CA.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds before the run is stopped.")] = 1800.0,
) -> None:
    """Start a SuperLink and SuperNodes on 127.0.0.1 (TLS), run an app, stop them all."""
    from flower_privacy.harness.deployment import LocalDeployment

    started = time.monotonic()
    with LocalDeployment(supernodes, tls=not insecure) as deployment:
        outcome = deployment.run(app_dir, run_config=run_config, echo=echo, timeout=timeout)
    _report(outcome, started)


def preset(
    name: Annotated[
        str, typer.Argument(help="Preset name under configs/federation/ or a .toml path.")
    ],
) -> None:
    """Print a federation preset as a `flwr run --federation-config` string."""
    typer.echo(to_overrides(load_federation_preset(find_preset(name))))
