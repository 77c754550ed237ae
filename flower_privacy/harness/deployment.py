"""A real Flower deployment on this machine: one SuperLink and N SuperNodes over TLS."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from flower_privacy._closing import ClosesOnExit
from flower_privacy.harness.flwr_cli import FlowerCli, RunOutcome
from flower_privacy.harness.processes import (
    command,
    descendants,
    free_port,
    stop_process_tree,
    wait_for_port,
)
from flower_privacy.harness.tls import TlsFiles, make_tls_files

CONNECTION = "flower-privacy-deployment"


class LocalDeployment(ClosesOnExit):
    """``flower-superlink`` plus ``num_supernodes`` ``flower-supernode`` processes.

    TLS with a fresh local CA by default. Node ``i`` gets ``node-config``
    ``partition-id=i num-partitions=num_supernodes`` plus ``node_config(i)``. Use as a
    context manager: every
    process is stopped on exit, even after a failure.
    """

    def __init__(
        self,
        num_supernodes: int,
        *,
        tls: bool = True,
        workdir: Path | None = None,
        startup_timeout: float = 60.0,
        node_config: Callable[[int], dict[str, str]] | None = None,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="flower-privacy-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.node_config = node_config
        self.port = free_port()
        self.cli = FlowerCli(self.workdir / "flwr-home")
        self.tls_files: TlsFiles | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self._logs: list = []

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = (self.workdir / log_name).open("w")
        self._logs.append(log)
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.cli.env, start_new_session=True
        )

    def __enter__(self) -> LocalDeployment:
        try:
            security = ["--insecure"]
            if self.tls:
                self.tls_files = make_tls_files(self.workdir / "tls")
                security = [
                    "--ssl-certfile",
                    str(self.tls_files.server_certificate),
                    "--ssl-keyfile",
                    str(self.tls_files.server_key),
                    "--ssl-ca-certfile",
                    str(self.tls_files.ca_certificate),
                ]
            self.superlink = self._spawn(
                [
                    command("flower-superlink"),
                    *security,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                ],
                "superlink.log",
            )
            wait_for_port(self.port, timeout=self.startup_timeout, process=self.superlink)
            node_security = (
                ["--root-certificates", str(self.tls_files.ca_certificate)]
                if self.tls_files
                else ["--insecure"]
            )
            for index in range(self.num_supernodes):
                self.supernodes.append(
                    self._spawn(
                        [
                            command("flower-supernode"),
                            *node_security,
                            "--superlink",
                            f"127.0.0.1:{self.port}",
                            "--port",
                            str(free_port()),
                            "--node-config",
                            self._node_config_text(index),
                        ],
                        f"supernode-{index}.log",
                    )
                )
            self.cli.add_connection(
                CONNECTION,
                f"127.0.0.1:{self.port}",
                root_certificates=self.tls_files.ca_certificate if self.tls_files else None,
            )
        except BaseException:
            self.close()
            raise
        return self

    def _node_config_text(self, index: int) -> str:
        text = f"partition-id={index} num-partitions={self.num_supernodes}"
        for key, value in (self.node_config(index) if self.node_config else {}).items():
            text += f' {key}="{value}"'
        return text

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode ``index`` and its ClientApp processes (a crash, no goodbye)."""
        process = self.supernodes[index]
        if process is None:
            raise ValueError(f"SuperNode {index} is already gone")
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)
        self.supernodes[index] = None

    def log(self, name: str) -> str:
        """Text of one process log (``superlink.log``, ``supernode-0.log``, ...)."""
        return (self.workdir / name).read_text(errors="replace")

    def close(self) -> None:
        """Stop every SuperNode and the SuperLink; remove a temporary workdir."""
        for process in self.supernodes:
            if process is not None:
                stop_process_tree(process)
        self.supernodes = [None] * len(self.supernodes)
        if self.superlink is not None:
            stop_process_tree(self.superlink)
            self.superlink = None
        for log in self._logs:
            log.close()
        self._logs = []
        if self._tmp is not None:
            self._tmp.cleanup()

    def run(
        self,
        app_dir: str | Path,
        *,
        run_config: list[str] | None = None,
        echo: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
        on_line: Callable[[str, int | None], None] | None = None,
    ) -> RunOutcome:
        """Run ``app_dir`` on this deployment; returns the outcome read from ``flwr ls``."""
        return self.cli.run(
            Path(app_dir),
            CONNECTION,
            run_config=run_config,
            echo=echo,
            timeout=timeout,
            on_line=on_line,
        )
