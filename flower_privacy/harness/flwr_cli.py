"""Drive Flower's ``flwr`` CLI from a private ``FLWR_HOME`` and read runs' outcomes.

``flwr run`` exits 0 even when a run fails, so success is read from
``flwr ls --format json``. Everything here keeps ``FLWR_HOME`` outside the app
folder (``flwr run`` packs every file in it into the FAB).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flower_privacy.harness.processes import command, venv_environ

_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_FINAL_ACCURACY = re.compile(r"final accuracy: ([0-9]*\.?[0-9]+)")
# How often ``status`` asks a briefly unreachable SuperLink, two seconds apart.
_STATUS_ATTEMPTS = 5
# Log lines after which a run can never finish; the run is stopped at once.
FATAL_LOG_MARKERS = {
    "ActorPool is empty": (
        "the simulation backend could not place a single client: the requested "
        "client resources (CPUs/GPUs) exceed what the machine or Ray cluster offers"
    ),
}


class RunFailedError(RuntimeError):
    """A Flower run did not finish as ``finished:completed``."""

    def __init__(self, message: str, outcome: RunOutcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class RunOutcome:
    """What one ``flwr run`` produced."""

    run_id: int | None
    status: str
    details: str = ""
    final_accuracy: float | None = None
    wall_seconds: float = 0.0
    log: list[str] = field(default_factory=list)
    fatal_reason: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed" and self.fatal_reason is None


class FlowerCli:
    """The ``flwr`` CLI bound to one private ``FLWR_HOME``."""

    def __init__(self, flwr_home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.flwr_home = Path(flwr_home)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = venv_environ({"FLWR_HOME": str(self.flwr_home), **(extra_env or {})})
        self._connections: dict[str, dict[str, object]] = {}

    def add_connection(
        self, name: str, address: str, *, root_certificates: Path | None = None
    ) -> None:
        """Write a ``[superlink.NAME]`` connection into this home's config.toml."""
        entry: dict[str, object] = {"address": address}
        if root_certificates is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(root_certificates)
        self._connections[name] = entry
        lines = ["[superlink]", f'default = "{name}"', ""]
        for conn, values in self._connections.items():
            lines.append(f"[superlink.{conn}]")
            for key, value in values.items():
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        (self.flwr_home / "config.toml").write_text("\n".join(lines))

    def run(
        self,
        app_dir: Path,
        connection: str,
        *,
        federation_config: str | None = None,
        run_config: list[str] | None = None,
        echo: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
        on_line: Callable[[str, int | None], None] | None = None,
    ) -> RunOutcome:
        """Start ``app_dir`` with ``flwr run --stream``; wait for and return its outcome.

        Streamed lines go to ``echo``. A line with a fatal marker (e.g. Flower's
        "ActorPool is empty") stops the run immediately instead of letting it wait
        for a strategy timeout. ``on_line(line, run_id)`` sees every line (tests use
        it to act mid-run).
        """
        cmd = [command("flwr"), "run", str(app_dir), connection, "--stream"]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        for item in run_config or []:
            cmd += ["--run-config", item]
        t_start = time.monotonic()
        outcome = RunOutcome(run_id=None, status="not-started")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                outcome.log.append(line)
                if echo:
                    echo(line)
                if outcome.run_id is None and (match := _RUN_STARTED.search(line)):
                    outcome.run_id = int(match.group(1))
                if match := _FINAL_ACCURACY.search(line):
                    outcome.final_accuracy = float(match.group(1))
                if on_line:
                    on_line(line, outcome.run_id)
                for marker, reason in FATAL_LOG_MARKERS.items():
                    if marker in line and outcome.fatal_reason is None:
                        outcome.fatal_reason = f"{reason} (Flower logged: {marker!r})"
                        self.stop(outcome.run_id, connection)
                        proc.terminate()
                if time.monotonic() - t_start > timeout:
                    outcome.fatal_reason = (
                        f"the run exceeded the harness timeout of {timeout:.0f} s"
                    )
                    self.stop(outcome.run_id, connection)
                    proc.terminate()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if outcome.run_id is None:
            outcome.status = "not-started"
            outcome.details = "flwr run did not start a run:\n" + "\n".join(outcome.log[-20:])
        else:
            outcome.status, outcome.details = self.wait_finished(outcome.run_id, connection)
        outcome.wall_seconds = time.monotonic() - t_start
        return outcome

    def status(self, run_id: int, connection: str) -> tuple[str, str]:
        """(status, status-details) of a run from ``flwr ls --format json``.

        A SuperLink that is briefly unreachable (a busy machine) is asked again, up to
        ``_STATUS_ATTEMPTS`` times two seconds apart.
        """
        for attempt in range(_STATUS_ATTEMPTS):
            res = subprocess.run(
                [command("flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
            )
            try:
                payload = json.loads(res.stdout)
            except json.JSONDecodeError as err:
                raise RuntimeError(f"flwr ls gave no JSON: {res.stdout!r} {res.stderr!r}") from err
            message = str(payload.get("error-message", payload))
            if (
                payload.get("success")
                or "unavailable" not in message
                or attempt == _STATUS_ATTEMPTS - 1
            ):
                break
            time.sleep(2.0)
        if not payload.get("success"):
            raise RuntimeError(f"flwr ls failed: {message}")
        runs = [r for r in payload["runs"] if int(r["run-id"]) == run_id]
        if not runs:
            raise RuntimeError(f"flwr ls does not know run {run_id}")
        return str(runs[0]["status"]), str(runs[0].get("status-details", ""))

    def wait_finished(
        self, run_id: int, connection: str, timeout: float = 120.0
    ) -> tuple[str, str]:
        """Poll until the run's status is ``finished:*`` (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        status, details = self.status(run_id, connection)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1.0)
            status, details = self.status(run_id, connection)
        return status, details

    def stop(self, run_id: int | None, connection: str) -> None:
        """``flwr stop`` a run (no-op without a run id)."""
        if run_id is None:
            return
        subprocess.run(
            [command("flwr"), "stop", str(run_id), connection],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
