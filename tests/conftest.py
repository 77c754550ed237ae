"""Shared fixtures: environment for Flower and Ray, toy apps, process hygiene."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_APP = REPO_ROOT / "apps" / "digits"

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The digits app is importable in-process, as `flwr run` would import it.
if str(DIGITS_APP) not in sys.path:
    sys.path.insert(0, str(DIGITS_APP))


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``flower-privacy ARGS`` with this interpreter; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "flower_privacy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_completed(outcome) -> None:  # noqa: ANN001 - a harness RunOutcome
    """Fail with the run's status and last log lines unless it finished completed."""
    assert outcome.completed, f"{outcome.status}: {outcome.details}\n" + "\n".join(
        outcome.log[-40:]
    )


def make_toy_client_app(
    dim: int = 4, mods: list | None = None, app: ClientApp | None = None
) -> ClientApp:
    """A ClientApp whose update is global + (partition-id + 1), weighted by the id + 1.

    With ``app``, the toy train and evaluate functions are registered on that app.

    It counts its training calls in ``context.state`` so tests can check that state
    persists per node.
    """
    app = app if app is not None else ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        calls = context.state.get("calls", MetricRecord({"n": 0}))
        calls["n"] = int(calls["n"]) + 1
        context.state["calls"] = calls
        weights = msg.content["arrays"]["w"].numpy()
        updated = weights + np.float32(pid + 1)
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(updated)}),
                    "metrics": MetricRecord({"num-examples": pid + 1, "calls": int(calls["n"])}),
                }
            ),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval-acc": float(pid)})}),
            reply_to=msg,
        )

    return app


def stage_filter(stage: str, rnd: int | None = None):  # noqa: ANN201
    """A grid message filter: secure aggregation messages of ``stage`` (in round ``rnd``)."""
    from flower_privacy.wire import secagg as wire

    def match(msg: Message) -> bool:
        if stage not in wire.stages_of(msg.content):
            return False
        return rnd is None or int(wire.payload_of(msg.content, stage).get("round", 0)) == rnd

    return match


def initial_arrays(dim: int = 4) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(dim, dtype=np.float32))})


@pytest.fixture
def no_leftover_processes():
    """Fail a test that leaves a SuperLink, SuperNode or Ray process behind (and kill it)."""
    from flower_privacy.harness.processes import flower_processes

    before = set(flower_processes())
    yield
    import signal
    import time

    deadline = time.monotonic() + 15
    leftover = {p: c for p, c in flower_processes().items() if p not in before}
    while leftover and time.monotonic() < deadline:
        time.sleep(0.5)
        leftover = {p: c for p, c in flower_processes().items() if p not in before}
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftover, f"processes left behind: {leftover}"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001, ANN201
    """Fast tests first: Ray and deployment tests run last."""
    slow = {"ray", "deployment"}
    items.sort(key=lambda item: any(m.name in slow for m in item.iter_markers()))


class NoModelFedAvg(FedAvg):
    """An inner strategy whose own step yields no model (after the sum was released)."""

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        super().aggregate_train(server_round, replies)
        return None, None


class RaisingFedAvg(FedAvg):
    """An inner strategy whose own step raises (a bug in the user's strategy)."""

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        raise ValueError("inner step broke")
