"""``flower-privacy audit``: the command (flower_privacy/cli registers it) and its body.

Only typer is imported at module level: ``flower-privacy --help`` must not load torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flower_privacy.private.matrix import (
    DP_CENTRAL,
    DP_DISTRIBUTED,
    HE,
    NONE,
    SECAGG,
    SECAGG_GROUPS,
)

if TYPE_CHECKING:
    from flower_privacy.audit.hook import AuditHook

# Bare --compare: the configurations a security reviewer asks about first.
STANDARD = (NONE, SECAGG, SECAGG_GROUPS, DP_CENTRAL, DP_DISTRIBUTED, HE)
EXIT_VIOLATION = 1


def configured_name(hook: AuditHook, overrides: dict) -> str:
    """The configuration the app's run config (with ``overrides``) selects."""
    merged = {**hook.default_config, **overrides}
    matches = [
        (len(o), name)
        for name, o in hook.configs.items()
        if all(merged.get(k) == v for k, v in o.items())
    ]
    if not matches:
        raise ValueError(
            f"the run config selects none of this app's configurations {sorted(hook.configs)}"
        )
    return max(matches)[1]


def run(
    app_dir: Path,
    run_config: Sequence[str] | None,
    compare: bool,
    configs: Sequence[str] | None,
    out: Path | None,
    as_json: bool,
    rounds: int,
    echo: Callable[[str], None],
    only: Sequence[str] | None = None,
) -> int:
    """Audit the app; write/print the report; return the exit code (1: a DP violation)."""
    from flower_privacy._flwr_compat import parse_run_config
    from flower_privacy.audit import report
    from flower_privacy.audit.attacks import audit_config
    from flower_privacy.audit.findings import ATTACKS, AuditSettings
    from flower_privacy.audit.hook import load_hook

    started = time.monotonic()
    hook = load_hook(app_dir)
    overrides = parse_run_config(list(run_config or []))
    if configs and not compare:
        raise ValueError("configuration names need --compare (e.g. --compare secagg dp-central)")
    if compare:
        names = list(configs) if configs else [n for n in STANDARD if n in hook.configs]
    else:
        names = [configured_name(hook, overrides)]
    for name in names:
        hook.config(name)  # unknown names fail here, before any run
    settings = AuditSettings(rounds=rounds, attacks=frozenset(only or ATTACKS))
    audits = []
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # the runs' round logs would drown the progress
    try:
        for index, name in enumerate(names, 1):
            t0 = time.monotonic()

            def progress(line: str, index: int = index) -> None:
                echo(f"[{index}/{len(names)} {time.monotonic() - started:6.1f} s] {line}")

            found = audit_config(hook, name, overrides, settings, progress)
            found.seconds = time.monotonic() - t0
            audits.append(found)
    finally:
        flwr_logger.setLevel(level)
    document = report.to_json(
        audits,
        {
            "app": str(app_dir),
            "configs": names,
            "run_config_overrides": overrides,
            "rounds": rounds,
            "attacks_played": sorted(settings.attacks),
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    )
    if out is not None:
        report.write(out, document, audits, hook.image_shape)
        echo(f"report: {out / 'index.html'}")
    if as_json:
        print(json.dumps(document, indent=2, allow_nan=False))
    else:
        for row in document["attacks"]:
            echo(f"{row['config']:>15} | {row['attacker']} | {row['attack']}: {row['verdict']}")
    for violation in document["violations"]:
        echo(f"VIOLATION: {violation}")
    return EXIT_VIOLATION if document["violations"] else 0


def audit(
    app_dir: Annotated[Path, typer.Argument(help="Flower app folder with an audit hook.")],
    configs: Annotated[
        list[str] | None, typer.Argument(help="With --compare: configuration names.")
    ] = None,
    run_config: Annotated[
        list[str] | None,
        typer.Option("--run-config", "-c", help="Run config overrides ('k=v k=v') or TOML."),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Audit CONFIGS side by side (none: the standard set).")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Write index.html and audit.json here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print audit.json to stdout.")] = False,
    rounds: Annotated[int, typer.Option(help="Rounds of each audited run.")] = 3,
    attack: Annotated[
        list[str] | None,
        typer.Option(
            help="Play only these (repeatable): inversion, differencing, imprint, "
            "empirical-epsilon. Default: all."
        ),
    ] = None,
) -> None:
    """Show what attackers learn from the app's privacy configuration(s); exit 1 on a DP bug."""
    from flower_privacy.audit.hook import HookNotFoundError

    def echo(line: str) -> None:
        typer.echo(line, err=True)

    try:
        code = run(app_dir, run_config, compare, configs, out, as_json, rounds, echo, attack)
    except (HookNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    raise typer.Exit(code=code)
