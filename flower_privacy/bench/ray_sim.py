"""``flower-privacy bench secagg --ray``: FedAvg against secure aggregation on Flower's Ray backend.

``flwr run`` of the synthetic app in training mode (a small torch MLP per client, about
0.2 s of local compute) on a private simulation SuperLink, twice: plain FedAvg and
secure aggregation with groups, with the same sampling (``per_round`` of ``clients``),
the same simulated dropouts and the same rounds. Round times come from the ServerApp's
own log (each round's seconds; round 1 carries Ray's start-up and secure aggregation's
key set-up, so the figure is the median of rounds 2..R). Peak RSS is the largest sum,
over one sampling instant, of the resident set of this process and all its descendants:
the ``flwr`` CLI, the SuperLink, the simulation process (ServerApp and Ray driver) and
Ray's GCS, raylet and worker processes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from flower_privacy._closing import ClosesOnExit
from flower_privacy.bench.app_logs import (
    ROUND_SECONDS,
    TRAIN_METRICS,
    exchange_medians,
    logged_json,
)
from flower_privacy.harness.flwr_cli import RunOutcome
from flower_privacy.harness.processes import descendants
from flower_privacy.wire import secagg as wire

SYNTHETIC_APP = Path(__file__).resolve().parents[2] / "apps" / "synthetic"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes(pid: int) -> int:
    """Resident set of ``pid`` (0 if it is gone): psutil if installed, else /proc."""
    try:
        import psutil
    except ImportError:
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def _process_name(pid: int) -> str:
    """The program of ``pid``: the script for a Python interpreter (e.g. flower-superlink)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    args = [a for a in argv if a]
    if not args:
        return ""
    if Path(args[0]).name.startswith("python") and len(args) > 1:
        script = next((a for a in args[1:] if not a.startswith("-")), args[1])
        return Path(script).name
    return Path(args[0].split(" ")[0]).name


class TreeRss(ClosesOnExit):
    """Samples the summed RSS of this process and its descendants every ``interval`` s."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        """One sample now; updates the peak."""
        pids = [os.getpid(), *descendants(os.getpid())]
        total = sum(_rss_bytes(p) for p in pids)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_processes = sorted({_process_name(p) for p in pids} - {""})
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeRss:
        self.sample()
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def _federation(clients: int) -> dict[str, object]:
    """``clients`` virtual nodes, one CPU each, two at a time (Ray gets 2 CPUs)."""
    import torch

    return {
        "num-supernodes": clients,
        "client-resources-num-cpus": 1,
        # Two clients share a GPU if there is one (Ray hides GPUs from 0-GPU actors).
        "client-resources-num-gpus": 0.5 if torch.cuda.is_available() else 0.0,
        "init-args-num-cpus": 2,
    }


_SOLO = """
import sys, tomllib
sys.path.insert(0, sys.argv[1])
from synthetic_app import task
cfg = tomllib.load(open(sys.argv[1] + "/pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
if sys.argv[2]:
    cfg["local-epochs"] = int(sys.argv[2])
cfg["device"] = "cpu"
print(task.solo_seconds(task.TrainConfig.from_run_config(cfg)))
"""


def solo_train_s(local_epochs: int | None = None) -> float:
    """One client's training alone (one torch thread), in a fresh interpreter.

    The Ray runs' ``client_train_s`` is the same training inside the simulation (sharing
    the cores with the engine and Ray); this is the workload itself, so a ratio can be
    read against the compute it was measured for.
    """
    epochs = "" if local_epochs is None else str(local_epochs)
    args = [sys.executable, "-c", _SOLO, str(SYNTHETIC_APP), epochs]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"timing one client's training failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def run(
    *,
    clients: int = 1000,
    per_round: int = 100,
    rounds: int = 5,
    dropout: float = 0.1,
    group_size: int = 5,
    local_epochs: int | None = None,
    repeats: int = 1,
    timeout: float = 3600.0,
    log: Callable[[str], None] = print,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """The ``ray`` entry: both runs' steady round times and the peak summed RSS.

    ``repeats`` pairs of runs alternate their order (FedAvg first, then secure
    aggregation first, ...; an even count balances them), so that a machine whose load
    drifts during the bench biases neither side. ``fedavg_round_s`` and
    ``secagg_round_s`` are medians over the pairs and ``ratio`` is their quotient; each
    pair keeps its own figures and the 1-minute load average before each run. The
    per-round lists, wall times and survivor counts are the first pair's. ``echo``
    receives every line the runs stream (for profiling).
    """
    from flower_privacy.harness.simulation import LocalSimulation

    if not 1 <= per_round <= clients:
        raise ValueError(f"per_round must be in [1, clients={clients}], got {per_round}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (round 1 holds the start-up), got {rounds}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    common = (
        f"client-mode='train' min-nodes={clients} clients-per-round={per_round} "
        f"num-server-rounds={rounds} dropout-fraction={dropout} dropout-seed=1 "
        # A round needs one usable reply: the survivors are reported, not assumed.
        "min-train-replies=1"
    )
    if local_epochs is not None:
        common += f" local-epochs={local_epochs}"
    privacy = {
        "fedavg": "privacy='none'",
        "secagg": f"privacy='secagg' secagg-group-size={group_size}",
    }
    out: dict[str, object] = {"clients": clients, "per_round": per_round, "rounds": rounds}
    out["client_solo_train_s"] = solo_train_s(local_epochs)
    pairs: list[dict[str, float]] = []
    with TreeRss() as rss, LocalSimulation() as sim:
        for repeat in range(repeats):
            order = ["fedavg", "secagg"] if repeat % 2 == 0 else ["secagg", "fedavg"]
            pair: dict[str, float] = {}
            for name in order:
                log(
                    f"ray: {name} (pair {repeat + 1}/{repeats}), {clients} clients, "
                    f"{per_round} a round, {rounds} rounds ..."
                )
                pair[f"{name}_load_1min"] = os.getloadavg()[0]
                outcome = sim.run(
                    SYNTHETIC_APP,
                    _federation(clients),
                    run_config=[f"{common} {privacy[name]}"],
                    timeout=timeout,
                    echo=echo,
                )
                if not outcome.completed:
                    reason = outcome.fatal_reason or outcome.details
                    tail = "\n".join(outcome.log[-30:])
                    raise RuntimeError(
                        f"the {name} Ray run failed: {outcome.status}: {reason}\n{tail}"
                    )
                seconds = [float(s) for s in logged_json(outcome.log, ROUND_SECONDS)]
                pair[f"{name}_round_s"] = _steady(seconds)
                if repeat == 0:
                    _first_run_details(out, name, seconds, outcome)
            pair["ratio"] = pair["secagg_round_s"] / pair["fedavg_round_s"]
            pairs.append(pair)
    for name in privacy:
        out[f"{name}_round_s"] = statistics.median(p[f"{name}_round_s"] for p in pairs)
    out["pairs"] = pairs
    out["ratio"] = out["secagg_round_s"] / out["fedavg_round_s"]
    out["peak_rss_mib"] = rss.peak_bytes / 2**20
    out["peak_rss_processes"] = rss.peak_processes
    out.update({"dropout": dropout, "group_size": group_size})
    return out


def _first_run_details(out: dict, name: str, seconds: list[float], outcome: RunOutcome) -> None:
    """Each round's seconds, the wall time and the clients' figures of a first run."""
    metrics = logged_json(outcome.log, TRAIN_METRICS)
    out[f"{name}_rounds_s"] = seconds
    # Where a steady round's time goes: each kind of exchange, rounds 2.. (medians).
    out[f"{name}_exchanges"] = exchange_medians(outcome.log)
    out[f"{name}_wall_s"] = outcome.wall_seconds
    if name == "fedavg":
        out["client_train_s"] = statistics.mean(float(m["train-seconds"]) for m in metrics.values())
    else:
        out["secagg_survivors"] = [int(m[wire.METRIC_CLIENTS]) for m in metrics.values()]
        out["secagg_dropped"] = [int(m[wire.METRIC_DROPPED]) for m in metrics.values()]
        out["secagg_excluded"] = [int(m[wire.METRIC_EXCLUDED]) for m in metrics.values()]
