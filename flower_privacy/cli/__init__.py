"""The ``flower-privacy`` command: one module per group of subcommands.

Each module imports only typer at module level (and what is as light): ``flower-privacy
--help`` must not load torch, Ray or TenSEAL; a command imports what it runs.
"""

from __future__ import annotations

import typer

from flower_privacy.audit.command import audit
from flower_privacy.cli.bench import bench_app
from flower_privacy.cli.dp import dp_app
from flower_privacy.cli.he import he_app
from flower_privacy.cli.keys import keys_app
from flower_privacy.cli.runs import DEMO_APP, demo, deploy, preset, simulate

__all__ = ["DEMO_APP", "app", "main"]

app = typer.Typer(
    name="flower-privacy",
    help="Private federated learning on Flower: run apps, presets and local deployments.",
    no_args_is_help=True,
    add_completion=False,
)
# In the order --help lists them.
app.command()(audit)  # flower_privacy/audit/command.py
app.command()(simulate)  # the run commands: flower_privacy/cli/runs.py
app.command()(demo)
app.command()(deploy)
app.command()(preset)
app.add_typer(keys_app, name="keys")
app.add_typer(he_app, name="he")
app.add_typer(dp_app, name="dp")
app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="flower-privacy")
