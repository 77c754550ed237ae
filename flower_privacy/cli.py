"""The ``flower-privacy`` command."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from flower_privacy.audit.command import audit
from flower_privacy.harness.flwr_cli import RunOutcome
from flower_privacy.harness.presets import (
    GpuUnavailableError,
    check_gpu,
    find_preset,
    load_federation_preset,
    to_overrides,
)

app = typer.Typer(
    name="flower-privacy",
    help="Private federated learning on Flower: run apps, presets and local deployments.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(audit)  # flower_privacy/audit/command.py
_REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_APP = _REPO_ROOT / "apps" / "digits"


@contextmanager
def _user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the given errors into one red line and exit code 2."""
    try:
        yield
    except kinds as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def _echo(line: str) -> None:
    typer.echo(line)


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


@app.command()
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
    with _user_errors(GpuUnavailableError):
        check_gpu(federation, f"preset {preset_path.name}")  # before any process starts
    with _user_errors(GpuUnavailableError), LocalSimulation() as sim:
        outcome = sim.run(app_dir, federation, run_config=run_config, echo=_echo, timeout=timeout)
    _report(outcome, started)


@app.command()
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
        with _user_errors(GpuUnavailableError):
            result = run_demo(DEMO_APP, echo=_echo, timeout=timeout)
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


@app.command()
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
        outcome = deployment.run(app_dir, run_config=run_config, echo=_echo, timeout=timeout)
    _report(outcome, started)


@app.command()
def preset(
    name: Annotated[
        str, typer.Argument(help="Preset name under configs/federation/ or a .toml path.")
    ],
) -> None:
    """Print a federation preset as a `flwr run --federation-config` string."""
    typer.echo(to_overrides(load_federation_preset(find_preset(name))))


keys_app = typer.Typer(help="Keys for the privacy mechanisms.")
app.add_typer(keys_app, name="keys")


@keys_app.command("signing")
def keys_signing(
    nodes: Annotated[int, typer.Option(help="How many nodes get a signing key.")],
    out: Annotated[Path, typer.Option(help="Folder for node-<i>.key files and roster.txt.")],
) -> None:
    """Signing keys and a roster for secure aggregation's consistency check."""
    from flower_privacy.secagg.signing import write_signing_keys

    paths, roster = write_signing_keys(out, nodes)
    typer.echo(f"wrote {len(paths)} signing keys and {roster}")
    typer.echo(
        'give node i: --node-config "secagg-signing-key=<out>/node-i.key '
        'secagg-roster=<out>/roster.txt ..."; keep each key on its own node'
    )


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="Folder for client.ctx (secret) and server.ctx.")],
    preset: Annotated[str, typer.Option(help="bfv (default), ckks or nvflare.")] = "bfv",
    max_clients: Annotated[int, typer.Option(help="Most clients per round.")] = 100,
    max_weight: Annotated[int, typer.Option(help="Cap of a client's example count.")] = 1000,
    clip_range: Annotated[float, typer.Option(help="Model values clipped to ±this.")] = 4.0,
    precision_bits: Annotated[int, typer.Option(help="BFV step 2^-bits.")] = 16,
    force: Annotated[bool, typer.Option(help="Overwrite existing key files.")] = False,
) -> None:
    """A TenSEAL key pair for encrypted FedAvg, sized so that sums cannot wrap."""
    from flower_privacy import he

    with _user_errors(he.HEConfigError):
        limits = he.DeclaredLimits(max_clients, max_weight, clip_range, precision_bits)
        params = he.derive_parameters(preset, limits)
        client, server = he.generate_keys(out, params, overwrite=force)
    if params.scheme == "bfv":
        detail = f"plain modulus {params.plain_modulus}"
    else:
        detail = f"scale 2^{params.scale_bits}"
    typer.echo(
        f"{preset}: {params.scheme.upper()} N={params.poly_modulus_degree}, coefficient "
        f"modulus {list(params.coeff_mod_bit_sizes)} bits, {detail}; precision "
        f"{he.precision_bound(params, limits):.3g}"
    )
    typer.echo(f"wrote {client} (secret key, mode 0600: clients only) and {server} (public)")
    typer.echo(
        f"server: EncryptedFedAvg(..., server_context='{server}', max_clients={max_clients}, "
        f"max_weight={max_weight}, clip_range={clip_range}, precision_bits={precision_bits}); "
        f"each node: --node-config \"he-context='{client}'\""
    )


he_app = typer.Typer(help="Encrypted FedAvg: recover a model with the clients' key.")
app.add_typer(he_app, name="he")


@he_app.command("decrypt")
def he_decrypt(
    model: Annotated[Path, typer.Argument(help="Encrypted model saved by EncryptedFedAvg.")],
    context: Annotated[Path, typer.Option(help="client.ctx (the secret context).")],
    out: Annotated[Path, typer.Option(help="Output .npz of the model's arrays (mode 0600).")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing output file.")] = False,
) -> None:
    """Decrypt a saved encrypted model (every canary and bound is checked first)."""
    import io
    import os

    import numpy as np

    from flower_privacy import he
    from flower_privacy.he.keys import write_private_file

    with _user_errors(he.HEConfigError, he.KeyRoleError, he.InvalidCiphertext, OSError):
        if not force and (out.exists() or out.is_symlink()):
            raise FileExistsError(f"{out} exists already (pass --force to overwrite it)")
        ctx = he.HEContext.load(context)
        decrypted = he.decrypt_model(ctx, model.read_bytes())
        buffer = io.BytesIO()
        np.savez(buffer, **decrypted.arrays)
        if force:
            write_private_file(out, buffer.getvalue())  # atomic replace, 0600 from the start
        else:  # O_EXCL: never follows or replaces a file that appeared meanwhile
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
    typer.echo(
        f"wrote {out}: {len(decrypted.arrays)} arrays, the weighted mean of "
        f"{decrypted.contributors} contributions (total weight {decrypted.total_weight})"
    )


dp_app = typer.Typer(help="Differential privacy accounting.")
app.add_typer(dp_app, name="dp")
_ACCOUNTANT_HELP = "pld (tight, default), prv (Opacus) or rdp (looser bound)."


@dp_app.command("epsilon")
def dp_epsilon(
    noise_multiplier: Annotated[float, typer.Option(help="Noise std over the clipping norm.")],
    sampling_rate: Annotated[float, typer.Option(help="Poisson rate q (1: every client).")],
    rounds: Annotated[int, typer.Option(help="Rounds composed.")],
    delta: Annotated[float, typer.Option(help="Target δ.")],
    accountant: Annotated[str, typer.Option(help=_ACCOUNTANT_HELP)] = "pld",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """ε of Poisson-subsampled Gaussian rounds (add/remove one client's data)."""
    import json

    from flower_privacy.dp.accounting import GaussianRounds, epsilon

    with _user_errors(ValueError):
        value = epsilon(GaussianRounds(noise_multiplier, sampling_rate, rounds), delta, accountant)
    typer.echo(
        json.dumps({"epsilon": value, "delta": delta, "accountant": accountant})
        if as_json
        else f"epsilon = {value:.4f} at delta = {delta:g} ({accountant})"
    )


@dp_app.command("calibrate")
def dp_calibrate(
    target_epsilon: Annotated[float, typer.Option(help="ε to meet.")],
    sampling_rate: Annotated[float, typer.Option(help="Poisson rate q (1: every client).")],
    rounds: Annotated[int, typer.Option(help="Rounds composed.")],
    delta: Annotated[float, typer.Option(help="Target δ.")],
    accountant: Annotated[str, typer.Option(help=_ACCOUNTANT_HELP)] = "pld",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The smallest noise multiplier that meets a target ε."""
    import json

    from flower_privacy.dp.accounting import calibrate

    with _user_errors(ValueError):
        z = calibrate(target_epsilon, delta, sampling_rate, rounds, accountant)
    typer.echo(
        json.dumps(
            {
                "noise_multiplier": z,
                "target_epsilon": target_epsilon,
                "delta": delta,
                "accountant": accountant,
            }
        )
        if as_json
        else f"noise multiplier = {z:.4f} ({accountant})"
    )


bench_app = typer.Typer(help="Benchmarks that print figures measured in one run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("secagg")
def bench_secagg(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(help="Small cases that fit in about a minute.")] = False,
    deployment: Annotated[bool, typer.Option(help="Also time a real SuperLink deployment.")] = True,
    scaling: Annotated[
        bool, typer.Option(help="Add the protocol alone at 100, 1,000 and 10,000 clients.")
    ] = False,
    scaling_sizes: Annotated[
        str, typer.Option(help="Client counts for --scaling, comma-separated.")
    ] = "100,1000,10000",
    ray: Annotated[
        bool,
        typer.Option(
            help="Add a Ray simulation (flwr run, training clients): FedAvg against secure "
            "aggregation with groups, 10% dropping."
        ),
    ] = False,
    ray_clients: Annotated[int, typer.Option(help="Virtual clients of the --ray run.")] = 1000,
    ray_per_round: Annotated[
        int, typer.Option(help="Clients sampled a round in --ray (0 = a tenth of them).")
    ] = 0,
    ray_rounds: Annotated[int, typer.Option(help="Rounds of each --ray run.")] = 5,
) -> None:
    """Secure aggregation against FedAvg and Flower's SecAgg+, same process, same data."""
    import json

    from flower_privacy.bench import ray_sim, secagg
    from flower_privacy.bench import scaling as scaling_bench

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    with _user_errors(ValueError):
        try:
            sizes = tuple(int(x) for x in scaling_sizes.split(",") if x.strip())
        except ValueError:
            raise ValueError(
                f"--scaling-sizes must be comma-separated integers, got {scaling_sizes!r}"
            ) from None
        per_round = ray_per_round or max(1, ray_clients // 10)
        if ray and not 1 <= per_round <= ray_clients:
            raise ValueError(f"--ray-per-round must be in [1, {ray_clients}], got {per_round}")
        if ray and ray_rounds < 2:
            raise ValueError(
                f"--ray-rounds must be >= 2 (round 1 holds start-up), got {ray_rounds}"
            )
    result = secagg.run(quick=quick, with_deployment=deployment, log=progress)
    if scaling:
        result["scaling"] = scaling_bench.run(sizes=sizes, log=progress)
    if ray:
        result["ray"] = ray_sim.run(
            clients=ray_clients, per_round=per_round, rounds=ray_rounds, log=progress
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    for row in result["cases"]:
        typer.echo(
            f"{row['clients']:>3} clients x {row['params']:>9,} params, dropout "
            f"{row['dropout']:.0%}: FedAvg {row['fedavg_s']:.3f} s, Flower SecAgg+ "
            f"{row['flower_secaggplus_s']:.3f} s, ours {row['secagg_s']:.3f} s per round"
        )
    for key, value in result.items():
        if key != "cases":
            typer.echo(f"{key}: {value}")


@bench_app.command("multiround")
def bench_multiround(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    trials: Annotated[int, typer.Option(help="Trials averaged per row.")] = 20,
    rounds: Annotated[int, typer.Option(help="Rounds per trial.")] = 200,
) -> None:
    """So et al.'s simulation: N=120, K=12, 30% unavailable; T, clients per round, fairness."""
    import json

    from flower_privacy.bench import multiround

    result = multiround.run(trials=trials, rounds=rounds, log=lambda x: typer.echo(x, err=True))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for row in result["rows"]:
        typer.echo(
            f"{row['selection']:>10} T={row['group_size']}: privacy T {row['privacy_t']}, "
            f"{row['avg_clients']:.2f} clients per round, fairness gap {row['fairness_gap']:.3f}"
        )


@bench_app.command("dp")
def bench_dp(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(help="5 rounds, ε 3 and ∞, 100k parameters.")] = False,
) -> None:
    """Client-level DP: digits accuracy per ε (100 clients), round-time overhead, ε vs Flower's."""
    import json

    from flower_privacy.bench import dp

    result = dp.run(quick=quick)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for row in result["utility"]:
        typer.echo(f"ε = {row['epsilon']}: accuracy {row['accuracy']:.3f}")
    for row in result["overhead"]:
        typer.echo(f"{row['placement']}: {row['ratio']:.2f}x plain FedAvg's round time")
    typer.echo(
        f"ε of the ε=3 run: Flower 1.41's accountant {result['flower_epsilon']:.1f}, "
        f"ours {result['our_epsilon']:.3f}"
    )


@bench_app.command("he")
def bench_he(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    workers: Annotated[int, typer.Option(help="Encryption processes (0: CPUs, max 4).")] = 0,
    quick: Annotated[bool, typer.Option(help="A 10x smaller model (for tests).")] = False,
) -> None:
    """Encrypted FedAvg (BFV and CKKS presets) against NVFlare-style CKKS, 1M params, 10 clients."""
    import json

    from flower_privacy.bench import he as bench

    result = bench.run(workers=workers or None, quick=quick, log=lambda x: typer.echo(x, err=True))
    if as_json:
        typer.echo(json.dumps(result))
        return
    for name in ("ours", "ckks", "nvflare_style"):
        row = result[name]
        typer.echo(
            f"{name:>13}: {row['expansion']:.2f}x float32, encrypt {row['encrypt_s']:.3f} s, "
            f"aggregate {row['aggregate_s']:.3f} s, decrypt {row['decrypt_s']:.3f} s, "
            f"max error {row['max_abs_error']:.2g}"
        )
    typer.echo(f"pool start-up: {result['pool_start_s']:.2f} s; ratios: {result['ratios']}")
    typer.echo(f"targets met: {result['targets_met']}")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="flower-privacy")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
