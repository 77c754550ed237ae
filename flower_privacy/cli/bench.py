"""``flower-privacy bench``: benchmarks that print figures measured in one run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from flower_privacy.cli._common import AsJson, echo_json, user_errors

bench_app = typer.Typer(help="Benchmarks that print figures measured in one run.")


def _progress(line: str) -> None:
    typer.echo(line, err=True)  # stderr: stdout carries the result (one JSON object with --json)


def _echo_result(result: dict, as_json: bool, lines: Callable[[dict], Iterator[str]]) -> None:
    """The result as one JSON object (``--json``), or as the lines a person reads."""
    if not echo_json(as_json, result):
        for line in lines(result):
            typer.echo(line)


@bench_app.command("secagg")
def bench_secagg(
    as_json: AsJson = False,
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
    ray_repeats: Annotated[
        int,
        typer.Option(help="Pairs of --ray runs, in alternating order (the ratio is their median)."),
    ] = 1,
) -> None:
    """Secure aggregation against FedAvg and Flower's SecAgg+, same process, same data."""
    from flower_privacy.bench import ray_sim, secagg
    from flower_privacy.bench import scaling as scaling_bench

    with user_errors(ValueError):
        try:
            sizes = tuple(int(x) for x in scaling_sizes.split(",") if x.strip())
        except ValueError:
            raise ValueError(
                f"--scaling-sizes must be comma-separated integers, got {scaling_sizes!r}"
            ) from None
        per_round = ray_per_round or max(1, ray_clients // 10)
        if ray and not 1 <= per_round <= ray_clients:
            raise ValueError(f"--ray-per-round must be in [1, {ray_clients}], got {per_round}")
        if ray and ray_repeats < 1:
            raise ValueError(f"--ray-repeats must be >= 1, got {ray_repeats}")
        if ray and ray_rounds < 2:
            raise ValueError(
                f"--ray-rounds must be >= 2 (round 1 holds start-up), got {ray_rounds}"
            )
    result = secagg.run(quick=quick, with_deployment=deployment, log=_progress)
    if scaling:
        result["scaling"] = scaling_bench.run(sizes=sizes, log=_progress)
    if ray:
        result["ray"] = ray_sim.run(
            clients=ray_clients,
            per_round=per_round,
            rounds=ray_rounds,
            repeats=ray_repeats,
            log=_progress,
        )
    _echo_result(result, as_json, _secagg_lines)


@bench_app.command("multiround")
def bench_multiround(
    as_json: AsJson = False,
    trials: Annotated[int, typer.Option(help="Trials averaged per row.")] = 20,
    rounds: Annotated[int, typer.Option(help="Rounds per trial.")] = 200,
) -> None:
    """So et al.'s simulation: N=120, K=12, 30% unavailable; T, clients per round, fairness."""
    from flower_privacy.bench import multiround

    result = multiround.run(trials=trials, rounds=rounds, log=_progress)
    _echo_result(result, as_json, _multiround_lines)


@bench_app.command("dp")
def bench_dp(
    as_json: AsJson = False,
    quick: Annotated[bool, typer.Option(help="5 rounds, ε 3 and ∞, 100k parameters.")] = False,
) -> None:
    """Client-level DP: digits accuracy per ε (100 clients), round-time overhead, ε vs Flower's."""
    from flower_privacy.bench import dp

    result = dp.run(quick=quick)
    _echo_result(result, as_json, _dp_lines)


@bench_app.command("he")
def bench_he(
    as_json: AsJson = False,
    workers: Annotated[int, typer.Option(help="Encryption processes (0: CPUs, max 4).")] = 0,
    quick: Annotated[bool, typer.Option(help="A 10x smaller model (for tests).")] = False,
) -> None:
    """Encrypted FedAvg (BFV and CKKS presets) against NVFlare-style CKKS, 1M params, 10 clients."""
    from flower_privacy.bench import he as bench

    result = bench.run(workers=workers or None, quick=quick, log=_progress)
    _echo_result(result, as_json, _he_lines)


# -- each result as the lines a person reads (--json prints the result itself)


def _secagg_lines(result: dict) -> Iterator[str]:
    for row in result["cases"]:
        yield (
            f"{row['clients']:>3} clients x {row['params']:>9,} params, dropout "
            f"{row['dropout']:.0%}: FedAvg {row['fedavg_s']:.3f} s, Flower SecAgg+ "
            f"{row['flower_secaggplus_s']:.3f} s, ours {row['secagg_s']:.3f} s per round"
        )
    for key, value in result.items():
        if key != "cases":
            yield f"{key}: {value}"


def _multiround_lines(result: dict) -> Iterator[str]:
    for row in result["rows"]:
        yield (
            f"{row['selection']:>10} T={row['group_size']}: privacy T {row['privacy_t']}, "
            f"{row['avg_clients']:.2f} clients per round, fairness gap {row['fairness_gap']:.3f}"
        )


def _dp_lines(result: dict) -> Iterator[str]:
    for row in result["utility"]:
        yield f"ε = {row['epsilon']}: accuracy {row['accuracy']:.3f}"
    for row in result["overhead"]:
        yield f"{row['placement']}: {row['ratio']:.2f}x plain FedAvg's round time"
    yield (
        f"ε of the ε=3 run: Flower 1.41's accountant {result['flower_epsilon']:.1f}, "
        f"ours {result['our_epsilon']:.3f}"
    )


def _he_lines(result: dict) -> Iterator[str]:
    for name in ("ours", "ckks", "nvflare_style"):
        row = result[name]
        yield (
            f"{name:>13}: {row['expansion']:.2f}x float32, encrypt {row['encrypt_s']:.3f} s, "
            f"aggregate {row['aggregate_s']:.3f} s, decrypt {row['decrypt_s']:.3f} s, "
            f"max error {row['max_abs_error']:.2g}"
        )
    yield f"pool start-up: {result['pool_start_s']:.2f} s; ratios: {result['ratios']}"
    yield f"targets met: {result['targets_met']}"
