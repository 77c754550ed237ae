"""The digits app, run in-process: accuracy with the defaults, partitions, clear errors."""

from __future__ import annotations

import re
import tomllib

import numpy as np
import pytest
from conftest import DIGITS_APP
from digits_app import server_app, task
from digits_app.client_app import app as client_app

from flower_privacy.testing import InProcessGrid

# Whole-app runs: on the main Flower version only (the seams have their own tests).
pytestmark = pytest.mark.once

DEFAULTS = tomllib.loads((DIGITS_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
    "config"
]


def _run(caplog, **overrides) -> float:
    cfg = {**DEFAULTS, **overrides}
    grid = InProcessGrid(client_app, num_nodes=int(cfg["min-nodes"]), run_config=cfg)
    grid.run_server_app(server_app.app)
    lines = [r.getMessage() for r in caplog.records if "final accuracy" in r.getMessage()]
    assert lines, "the server logged no final accuracy"
    return float(lines[-1].split(":")[1])


def test_defaults_reach_the_accuracy_bar(caplog) -> None:
    assert DEFAULTS["partitioner"] == "dirichlet" and DEFAULTS["privacy"] == "none"
    assert _run(caplog) >= 0.90


def test_secure_aggregation_matches_plain_fedavg_accuracy(caplog) -> None:  # noqa: ANN001
    plain = _run(caplog, privacy="none", seed=7)
    caplog.clear()
    secure = _run(caplog, privacy="secagg", seed=7)
    assert "securely aggregated 10 clients" in caplog.text
    assert abs(secure - plain) <= 0.02, f"secagg {secure:.3f} vs plain {plain:.3f}"


def test_group_selection_matches_random_selection_accuracy(caplog) -> None:  # noqa: ANN001
    common = {"privacy": "secagg", "clients-per-round": 6, "seed": 42}
    randomly = _run(caplog, **common, **{"secagg-group-size": 0})
    caplog.clear()
    grouped = _run(caplog, **common, **{"secagg-group-size": 2})
    # The audit reaches the group size (and never goes below it).
    audited = [int(t) for t in re.findall(r"'secagg-privacy-t': (\d+)", caplog.text)]
    assert audited and min(audited) == 2
    assert abs(grouped - randomly) <= 0.02, f"groups {grouped:.3f} vs random {randomly:.3f}"


def test_clients_per_round_samples_exactly_that_many(caplog) -> None:
    cfg = {**DEFAULTS, "clients-per-round": 3, "num-server-rounds": 2}
    grid = InProcessGrid(client_app, num_nodes=10, run_config=cfg)
    grid.run_server_app(server_app.app)
    per_round: dict[int, int] = {}
    for entry in grid.transcript:
        if entry.direction == "to-node" and entry.message_type == "train":
            rnd = int(entry.message.content["config"]["server-round"])
            per_round[rnd] = per_round.get(rnd, 0) + 1
    assert per_round == {1: 3, 2: 3}


def test_dirichlet_partitions_are_non_iid_and_cover_the_data() -> None:
    sizes, label_shares = [], []
    for pid in range(10):
        train, test = task.load_partition(task.SKLEARN_DIGITS, pid, 10, "dirichlet", 0.5, 42)
        sizes.append(len(train) + len(test))
        label_shares.append(np.bincount(train.y, minlength=10) / len(train))
    train_all, _ = task._sklearn_digits()
    assert sum(sizes) == len(train_all)
    # Non-IID: the label mix differs a lot between clients (IID would be ~0.1 each).
    assert np.max(np.abs(np.array(label_shares) - 0.1)) > 0.2
    iid = [task.load_partition(task.SKLEARN_DIGITS, p, 10, "iid", 0.5, 42)[0] for p in range(10)]
    assert max(np.max(np.abs(np.bincount(s.y, minlength=10) / len(s) - 0.1)) for s in iid) < 0.15


def test_unknown_privacy_mode_is_refused_by_name() -> None:
    cfg = {**DEFAULTS, "privacy": "magic"}
    grid = InProcessGrid(client_app, num_nodes=2, run_config=cfg)
    with pytest.raises(
        ValueError, match=r"privacy 'magic': unknown mechanism.*choose 'none' or .*'dp-sgd'"
    ):
        grid.run_server_app(server_app.app)


def test_bad_partitioner_and_partition_id_are_named() -> None:
    with pytest.raises(ValueError, match="partitioner must be one of"):
        task.load_partition(task.SKLEARN_DIGITS, 0, 2, "sorted", 0.5, 1)
    with pytest.raises(ValueError, match=r"partition-id must be in \[0, 2\), got 2"):
        task.load_partition(task.SKLEARN_DIGITS, 2, 2, "iid", 0.5, 1)
    with pytest.raises(ValueError, match="clients-per-round .* exceeds min-nodes"):
        server_app.make_fedavg(5, 2)


def test_a_downloadable_dataset_offline_gives_a_clear_error(monkeypatch) -> None:
    # HF_HUB_OFFLINE makes the hub fail at once, as it eventually does without network.
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    task.load_partition.cache_clear()
    with pytest.raises(task.DatasetUnavailableError, match="offline, use dataset='sklearn-digits'"):
        task.load_partition("flower-privacy-test/no-such-dataset", 0, 2, "iid", 0.5, 1)
    with pytest.raises(task.DatasetUnavailableError, match="no-such-dataset"):
        task.load_server_test("flower-privacy-test/no-such-dataset")


def test_model_uses_cuda_only_when_present() -> None:
    import torch

    assert task.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
