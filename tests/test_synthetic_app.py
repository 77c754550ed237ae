"""The synthetic app's training mode, in-process (the Ray run is in test_bench_ray.py)."""

from __future__ import annotations

import sys
import tomllib

import numpy as np
import pytest
from conftest import REPO_ROOT
from flwr.app import Context, RecordDict

from flower_privacy import _flwr_compat as compat
from flower_privacy.bench.app_logs import (
    ROUND_SECONDS,
    TRAIN_METRICS,
    exchange_medians,
    logged_json,
)
from flower_privacy.testing import InProcessGrid, capture_log_lines

SYNTHETIC_APP = REPO_ROOT / "apps" / "synthetic"
if str(SYNTHETIC_APP) not in sys.path:
    sys.path.insert(0, str(SYNTHETIC_APP))

from synthetic_app import apps, task  # noqa: E402

# Whole-app runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once

DEFAULTS = tomllib.loads((SYNTHETIC_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
    "config"
]


def _run(nodes: int, **overrides: object) -> list[str]:
    cfg = {**DEFAULTS, "client-mode": "train", "min-nodes": nodes, **overrides}
    grid = InProcessGrid(apps.client, nodes, run_config=cfg)
    context = Context(
        run_id=1,
        node_id=compat.SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=cfg,
    )
    with capture_log_lines() as lines:
        apps.server(grid, context)
    return lines


def test_generated_data_is_deterministic_per_partition_and_differs_between_them() -> None:
    x0, y0 = task.client_data(0, 3, 64)
    x1, y1 = task.client_data(0, 3, 64)
    x2, _ = task.client_data(0, 4, 64)
    np.testing.assert_array_equal(x0, x1)
    np.testing.assert_array_equal(y0, y1)
    assert not np.allclose(x0, x2)
    assert len(set(y0.tolist())) > 3  # a real classification task, not one label


def test_secagg_with_groups_and_dropouts_trains_the_mlp() -> None:
    lines = _run(
        10,
        **{
            "privacy": "secagg",
            "secagg-group-size": 2,
            "clients-per-round": 6,
            "min-train-replies": 2,
            "dropout-fraction": 0.2,
            "dropout-seed": 3,
            "num-server-rounds": 2,
            "local-epochs": 1,
            "train-examples": 64,
        },
    )
    metrics = logged_json(lines, TRAIN_METRICS)
    assert sorted(metrics) == ["1", "2"]
    for round_metrics in metrics.values():
        survivors = int(round_metrics["secagg-clients"])
        assert survivors % 2 == 0 and survivors + int(round_metrics["secagg-dropped"]) == 6
    assert sum(int(m["secagg-dropped"]) for m in metrics.values()) > 0
    assert len(logged_json(lines, ROUND_SECONDS)) == 2
    # Every exchange is logged: round 2 trains 6 nodes and unmasks (last round: no prepare).
    steady = exchange_medians(lines)
    assert set(steady) == {"train", "unmask"} and steady["train"]["messages"] == 6
    assert all(e["count"] == 1 and e["seconds"] >= 0 for e in steady.values())
    assert {"advertise", "prepare", "prepare+unmask"} <= set(exchange_medians(lines, 1))


def test_fedavg_training_lowers_the_loss() -> None:
    lines = _run(4, **{"num-server-rounds": 3, "local-epochs": 2, "train-examples": 64})
    loss = [float(m["train-loss"]) for m in logged_json(lines, TRAIN_METRICS).values()]
    assert loss[-1] < loss[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client-mode": "replay"}, "client-mode"),
        ({"privacy": "dp"}, "privacy"),
        ({"clients-per-round": 7}, "clients-per-round"),
    ],
)
def test_bad_run_config_is_refused_by_name(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apps.build_strategy({**DEFAULTS, "min-nodes": 6, **overrides})


def test_bad_training_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="local-epochs"):
        task.TrainConfig.from_run_config({**DEFAULTS, "local-epochs": 0})
    with pytest.raises(ValueError, match="device"):
        task.TrainConfig.from_run_config({**DEFAULTS, "device": "tpu"})
    assert task.pick_device("cpu").type == "cpu"


def test_bench_ray_options_are_checked_before_anything_runs() -> None:
    from conftest import run_cli

    res = run_cli("bench", "secagg", "--ray", "--ray-clients", "10", "--ray-per-round", "20")
    assert res.returncode == 2 and "--ray-per-round must be in [1, 10], got 20" in res.stderr
    res = run_cli("bench", "secagg", "--ray", "--ray-rounds", "1")
    assert res.returncode == 2 and "--ray-rounds must be >= 2" in res.stderr
    res = run_cli("bench", "secagg", "--ray", "--ray-repeats", "0")
    assert res.returncode == 2 and "--ray-repeats must be >= 1, got 0" in res.stderr
