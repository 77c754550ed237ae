"""``flower-privacy dp``: ε of Gaussian rounds, and the noise for a target ε."""

from __future__ import annotations

from typing import Annotated

import typer

from flower_privacy.cli._common import AsJson, echo_json, user_errors

dp_app = typer.Typer(help="Differential privacy accounting.")

# The options both commands take: the rounds accounted and how.
SamplingRate = Annotated[float, typer.Option(help="Poisson rate q (1: every client).")]
Rounds = Annotated[int, typer.Option(help="Rounds composed.")]
Delta = Annotated[float, typer.Option(help="Target δ.")]
Accountant = Annotated[
    str, typer.Option(help="pld (tight, default), prv (Opacus) or rdp (looser bound).")
]


@dp_app.command("epsilon")
def dp_epsilon(
    noise_multiplier: Annotated[float, typer.Option(help="Noise std over the clipping norm.")],
    sampling_rate: SamplingRate,
    rounds: Rounds,
    delta: Delta,
    accountant: Accountant = "pld",
    as_json: AsJson = False,
) -> None:
    """ε of Poisson-subsampled Gaussian rounds (add/remove one client's data)."""
    from flower_privacy.dp.accounting import GaussianRounds, epsilon

    with user_errors(ValueError):
        value = epsilon(GaussianRounds(noise_multiplier, sampling_rate, rounds), delta, accountant)
    if not echo_json(as_json, {"epsilon": value, "delta": delta, "accountant": accountant}):
        typer.echo(f"epsilon = {value:.4f} at delta = {delta:g} ({accountant})")


@dp_app.command("calibrate")
def dp_calibrate(
    target_epsilon: Annotated[float, typer.Option(help="ε to meet.")],
    sampling_rate: SamplingRate,
    rounds: Rounds,
    delta: Delta,
    accountant: Accountant = "pld",
    as_json: AsJson = False,
) -> None:
    """The smallest noise multiplier that meets a target ε."""
    from flower_privacy.dp.accounting import calibrate

    with user_errors(ValueError):
        z = calibrate(target_epsilon, delta, sampling_rate, rounds, accountant)
    record = {
        "noise_multiplier": z,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "accountant": accountant,
    }
    if not echo_json(as_json, record):
        typer.echo(f"noise multiplier = {z:.4f} ({accountant})")
