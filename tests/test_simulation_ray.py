"""`flwr run` on Flower's Ray backend, offline, through flower-privacy's harness."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DIGITS_APP, REPO_ROOT, assert_completed

from flower_privacy.harness.presets import find_preset, load_federation_preset, to_overrides
from flower_privacy.harness.processes import (
    command,
    flower_processes,
    free_port,
    venv_environ,
)
from flower_privacy.harness.simulation import CONNECTION, LocalSimulation

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]
PROBE_APP = REPO_ROOT / "tests" / "apps" / "concurrency_probe"


def _max_concurrency(probe_dir: Path) -> tuple[int, int, int]:
    """(clients recorded, most running at once, distinct worker processes)."""
    windows = [tuple(map(float, f.read_text().split()[:2])) for f in probe_dir.glob("*.txt")]
    pids = {f.read_text().split()[2] for f in probe_dir.glob("*.txt")}
    events = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return len(windows), peak, len(pids)


def test_digits_runs_with_flwr_run_on_ray(no_leftover_processes) -> None:
    federation = load_federation_preset(find_preset("cpu-10"))
    with LocalSimulation() as sim:
        outcome = sim.run(DIGITS_APP, federation, run_config=["num-server-rounds=2"], timeout=300)
    assert_completed(outcome)
    assert outcome.final_accuracy is not None and outcome.final_accuracy > 0.3
    assert sum("[ROUND" in line for line in outcome.log) == 2


def test_encrypted_fedavg_runs_on_ray(no_leftover_processes) -> None:  # noqa: ANN001
    # The ServerApp generates the keys into a private temp folder; clients find them.
    federation = load_federation_preset(find_preset("cpu-10"))
    with LocalSimulation() as sim:
        outcome = sim.run(
            DIGITS_APP, federation, run_config=["num-server-rounds=2 privacy='he'"], timeout=300
        )
    assert_completed(outcome)
    assert sum("added 10 encrypted updates" in line for line in outcome.log) == 2
    assert outcome.final_accuracy is not None and outcome.final_accuracy > 0.3
    from digits_app.he_keys import simulation_key_dir

    key_dir = simulation_key_dir(outcome.run_id)  # private, outside the app folder
    try:
        assert (key_dir / "final-model.fphe").exists() and DIGITS_APP not in key_dir.parents
    finally:
        shutil.rmtree(key_dir, ignore_errors=True)


@pytest.mark.parametrize(("cpus_per_client", "expected"), [(1, 2), (2, 1)])
def test_ray_honours_the_cpu_share(
    tmp_path, cpus_per_client, expected, no_leftover_processes
) -> None:
    federation = {
        "num-supernodes": 6,
        "client-resources-num-cpus": cpus_per_client,
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": 2,
    }
    with LocalSimulation() as sim:
        outcome = sim.run(
            PROBE_APP, federation, run_config=[f'probe-dir="{tmp_path}" min-nodes=6'], timeout=300
        )
    assert_completed(outcome)
    clients, peak, workers = _max_concurrency(tmp_path)
    assert clients == 6
    assert peak == expected, f"{peak} clients ran at once, expected {expected}"
    assert workers <= expected


def test_a_gpu_run_on_a_gpu_less_machine_ends_fast_with_the_reason(no_leftover_processes) -> None:
    # Skip the harness's pre-flight check to reach Flower itself: the harness must
    # still notice "ActorPool is empty" and stop the run instead of waiting an hour.
    federation = load_federation_preset(find_preset("gpu-quarter"))
    with LocalSimulation(extra_env={"CUDA_VISIBLE_DEVICES": ""}) as sim:
        outcome = sim.cli.run(
            DIGITS_APP,
            CONNECTION,
            federation_config=to_overrides(federation),
            run_config=["num-server-rounds=1 min-nodes=20"],
            timeout=240,
        )
    assert not outcome.completed
    assert outcome.status.startswith("finished:")
    assert "ActorPool is empty" in (outcome.fatal_reason or "")
    assert outcome.wall_seconds < 90


def test_simulation_joins_an_existing_ray_cluster(tmp_path, no_leftover_processes) -> None:
    port = free_port()
    env = venv_environ()
    ray = command("ray")
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    try:
        cluster = {p for p, c in flower_processes().items() if "gcs_server" in c}
        assert cluster, "ray start --head started no GCS server"
        gcs_during_run: list[set[int]] = []

        def watch(line: str, run_id: int | None) -> None:
            if "[ROUND 1/1]" in line:
                gcs_during_run.append(
                    {p for p, c in flower_processes().items() if "gcs_server" in c}
                )

        federation = load_federation_preset(find_preset("cpu-10"))  # has init-args-num-cpus
        federation["num-supernodes"] = 6
        with LocalSimulation(extra_env={"RAY_ADDRESS": f"127.0.0.1:{port}"}) as sim:
            outcome = sim.run(
                PROBE_APP,
                federation,
                timeout=300,
                on_line=watch,
                run_config=[f'probe-dir="{tmp_path}" min-nodes=6 sleep-seconds=0.2'],
            )
        assert_completed(outcome)
        assert _max_concurrency(tmp_path)[0] == 6
        # The run used the cluster's GCS rather than starting a Ray of its own.
        assert gcs_during_run and gcs_during_run[0] == cluster
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
