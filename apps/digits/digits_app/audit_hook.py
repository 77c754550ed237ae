"""The digits app's hook for ``flower-privacy audit``.

``CONFIGS`` maps the audit's configuration names (``make_private``'s) to this app's
run config.
"""

from __future__ import annotations

import random
import tomllib
from pathlib import Path

import torch
from flwr.app import UserConfig

from digits_app import client_app, server_app, task
from flower_privacy.audit.hook import AuditHook, LocalTraining
from flower_privacy.private.config import PRIVACY, SECAGG_GROUP_SIZE
from flower_privacy.private.matrix import (
    DP_CENTRAL,
    DP_CLIENT,
    DP_DISTRIBUTED,
    DP_SGD,
    HE,
    NONE,
    SECAGG,
    SECAGG_GROUPS,
)

# Every configuration the audit compares, by its make_private name; groups of 2 so that
# the toy federation fits whole groups.
CONFIGS: dict[str, UserConfig] = {
    name: {PRIVACY: name, **({SECAGG_GROUP_SIZE: 2} if name == SECAGG_GROUPS else {})}
    for name in (NONE, SECAGG, SECAGG_GROUPS, DP_CENTRAL, DP_CLIENT, DP_DISTRIBUTED, HE, DP_SGD)
}


def _strategy(cfg: UserConfig, num_nodes: int):  # noqa: ANN202
    # As the ServerApp does: Flower's FedAvg samples with the global `random`.
    random.seed(int(cfg["seed"]))
    inner = server_app.make_fedavg(int(cfg["clients-per-round"]), num_nodes)
    inner.fraction_evaluate = 0.0  # the audit attacks training; evaluation costs time
    return server_app.build_strategy(str(cfg[PRIVACY]), inner, dict(cfg), simulation=True)


def _model(cfg: UserConfig) -> torch.nn.Module:
    torch.manual_seed(int(cfg["seed"]))
    return task.Net(*task.model_shape(str(cfg["dataset"])))


def _client_data(partition_id: int, num_partitions: int, cfg: UserConfig):  # noqa: ANN202
    train, _ = task.load_partition(
        str(cfg["dataset"]),
        partition_id,
        num_partitions,
        str(cfg["partitioner"]),
        float(cfg["dirichlet-alpha"]),
        int(cfg["seed"]),
    )
    return train.x, train.y


def hook() -> AuditHook:
    """The audit hook (named in this app's pyproject.toml)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    return AuditHook(
        client_app=client_app.app,
        client_mods=client_app.MODS,  # the ClientApp's own
        strategy=_strategy,
        model=_model,
        loss=torch.nn.functional.cross_entropy,
        input_shape=(64,),
        image_shape=(8, 8),
        num_classes=10,
        client_data=_client_data,
        public_data=lambda cfg: task.load_server_test(str(cfg["dataset"])).x,
        local_training=lambda cfg: LocalTraining(
            int(cfg["local-epochs"]), int(cfg["batch-size"]), float(cfg["learning-rate"]), 0.9
        ),
        num_nodes=lambda cfg: int(cfg["min-nodes"]),
        default_config=defaults,
        configs=CONFIGS,
    )
