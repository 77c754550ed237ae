"""Run a Flower app on Flower's Ray simulation backend, offline, start to finish.

``flwr run`` against the default ``:local:`` connection starts a SuperLink that runs
``uv sync`` of the app's dependencies, which fails offline while ``flwr run`` still
exits 0. This starts its own SuperLink in simulation mode on a free port with
runtime dependency installation disabled (the app runs in this environment), under a
private ``FLWR_HOME``, and stops everything it started.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from flower_privacy._closing import ClosesOnExit
from flower_privacy.harness.flwr_cli import FlowerCli, RunOutcome
from flower_privacy.harness.presets import check_gpu, for_existing_ray_cluster, to_overrides
from flower_privacy.harness.processes import command, free_port, stop_process_tree, wait_for_port

logger = logging.getLogger(__name__)
CONNECTION = "flower-privacy-sim"


class LocalSimulation(ClosesOnExit):
    """A private simulation SuperLink; use as a context manager.

    Example
    -------
    >>> with LocalSimulation() as sim:                      # doctest: +SKIP
    ...     outcome = sim.run("apps/digits", {"num-supernodes": 10})
    """

    def __init__(
        self,
        workdir: Path | None = None,
        startup_timeout: float = 60.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="flower-privacy-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.cli = FlowerCli(self.workdir / "flwr-home", extra_env=extra_env)
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "superlink.log"

    def __enter__(self) -> LocalSimulation:
        self.cli.add_connection(CONNECTION, f"127.0.0.1:{self.port}")
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                command("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.cli.env,
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, timeout=self.startup_timeout, process=self.process)
        except Exception:
            self.close()
            raise RuntimeError(
                f"the simulation SuperLink did not start; its log:\n{self.log_path.read_text()}"
            ) from None
        return self

    def close(self) -> None:
        """Stop the SuperLink and everything it started; remove a temporary workdir."""
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def run(
        self,
        app_dir: str | Path,
        federation: dict[str, object],
        *,
        run_config: list[str] | None = None,
        echo: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
        on_line: Callable[[str, int | None], None] | None = None,
    ) -> RunOutcome:
        """Run ``app_dir`` with the federation settings ``federation``.

        Refuses a GPU preset on a GPU-less machine before starting anything. With
        ``RAY_ADDRESS`` set, the run joins that Ray cluster and ``init-args-*`` keys
        are dropped (Ray refuses them when joining).
        """
        check_gpu(federation, "the federation config")
        if self.cli.env.get("RAY_ADDRESS"):
            dropped = sorted(set(federation) - set(for_existing_ray_cluster(federation)))
            if dropped:
                logger.warning("RAY_ADDRESS is set: joining that cluster, ignoring %s", dropped)
            federation = for_existing_ray_cluster(federation)
        return self.cli.run(
            Path(app_dir),
            CONNECTION,
            federation_config=to_overrides(federation),
            run_config=run_config,
            echo=echo,
            timeout=timeout,
            on_line=on_line,
        )
