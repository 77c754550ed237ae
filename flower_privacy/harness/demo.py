"""``flower-privacy demo``: the digits app private, beside its plain baseline.

Both runs use the same federation preset (``cpu-10``), data and seed: first the baseline
(``configs/run/demo-baseline.toml``, privacy none), then the private run
(``configs/run/demo.toml``: secure aggregation with groups plus distributed client-level
DP), of which only each round's figures, the noise plan and errors are echoed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flower_privacy.harness.flwr_cli import RunOutcome
from flower_privacy.harness.presets import find_preset, load_federation_preset

BASELINE, PRIVATE = "demo-baseline", "demo"
# The private run's lines worth showing: each round's figures, the noise plan, verdicts.
_SHOWN = re.compile(r"round \d+: accuracy|ClientLevelDP: \w+ noise, scale|ERROR|FAILED|halted")
_SUMMARY = re.compile(r"privacy: (.*)")


class DemoFailedError(Exception):
    """One of the demo's runs did not complete with an accuracy."""

    def __init__(self, name: str, outcome: RunOutcome) -> None:
        reason = outcome.fatal_reason or outcome.details or "no 'final accuracy' line"
        super().__init__(f"the {name} run ({outcome.run_id}) did not complete: {reason}")
        self.outcome = outcome


@dataclass(frozen=True)
class DemoResult:
    """The two final accuracies and the private run's privacy summary."""

    baseline_accuracy: float
    private_accuracy: float
    summary: str


def run_demo(app_dir: Path, echo: Callable[[str], None], timeout: float) -> DemoResult:
    """Run the baseline, then the private run; raise :class:`DemoFailedError` on failure."""
    from flower_privacy.harness.simulation import LocalSimulation

    federation = load_federation_preset(find_preset("cpu-10"))
    configs = {name: str(find_preset(name, kind="run")) for name in (BASELINE, PRIVATE)}

    def shown(line: str) -> None:
        if _SHOWN.search(line):
            echo(line)

    with LocalSimulation() as sim:
        echo("baseline: plain FedAvg (privacy none), same data and seed ...")
        baseline = _completed(
            BASELINE, sim.run(app_dir, federation, run_config=[configs[BASELINE]], timeout=timeout)
        )
        echo(f"baseline final accuracy: {baseline.final_accuracy:.3f}")
        echo("private: secure aggregation with groups + distributed client-level DP ...")
        private = _completed(
            PRIVATE,
            sim.run(
                app_dir, federation, run_config=[configs[PRIVATE]], echo=shown, timeout=timeout
            ),
        )
    summaries = [m.group(1) for line in private.log if (m := _SUMMARY.search(line))]
    assert baseline.final_accuracy is not None and private.final_accuracy is not None
    return DemoResult(
        baseline.final_accuracy,
        private.final_accuracy,
        summaries[-1] if summaries else "no privacy summary logged",
    )


def _completed(name: str, outcome: RunOutcome) -> RunOutcome:
    if not (outcome.completed and outcome.final_accuracy is not None):
        raise DemoFailedError(name, outcome)
    return outcome
