"""A minimal torch app with an audit hook, for fast pinned tests of the audit.

The digits model (Linear(64, 64) + ReLU first) and scikit-learn's digits, but each
node trains exactly one full-batch SGD step on its own ``toy-per-node`` rows (no
Dirichlet partitioning, no dataset download): the setting the issue pins. The mods and
the server strategies are the shipped ones (digits' ``build_strategy``).

With ``toy-fixed-update`` each node takes its step from the initial model, whatever it
receives, and uploads the received model plus that step: the same update every round
(so the differencing attacker's estimates have a true update to be scored against).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from digits_app import server_app, task
from digits_app.audit_hook import CONFIGS
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_privacy.audit.hook import AuditHook, LocalTraining
from flower_privacy.mods import client_clipping_mod, secagg_mod

LEARNING_RATE = 0.1
MODS = [secagg_mod, client_clipping_mod]
DEFAULTS = {
    "num-server-rounds": 1,
    "clients-per-round": 0,
    "min-nodes": 10,
    "privacy": "none",
    "toy-per-node": 24,
    "toy-fixed-update": False,
    "seed": 7,
    "secagg-clip-range": 1.0,
    "secagg-max-weight": 1000,
    "secagg-max-clients": 100,
    "secagg-group-size": 0,
    "secagg-selection": "least-used",
    "dp-placement": "central",
    "dp-target-epsilon": 8.0,
    "dp-noise-multiplier": 0.0,
    "dp-delta": 1e-5,
    "dp-clip-norm": 1.0,
    "dp-adaptive-clipping": False,
    "dp-sampling-rate": 0.0,
    "dp-min-clients": 5,
    "he-simulation-keys": True,
    "he-server-context": "",
}


def client_data(partition_id: int, num_partitions: int, cfg) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    per = int(cfg["toy-per-node"])
    train, _ = task._sklearn_digits()
    rows = slice(partition_id * per, (partition_id + 1) * per)
    return train.x[rows], train.y[rows]


def model(cfg) -> torch.nn.Module:  # noqa: ANN001
    torch.manual_seed(int(cfg["seed"]))
    return task.Net(64, 10)


app = ClientApp(mods=MODS)


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    received = msg.content["arrays"].to_torch_state_dict()
    fixed = bool(context.run_config["toy-fixed-update"])
    net = model(context.run_config) if fixed else task.Net(64, 10)
    if not fixed:
        net.load_state_dict(received)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x, y = client_data(int(context.node_config["partition-id"]), 0, context.run_config)
    optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    optimizer.step()
    new = {k: v.detach() for k, v in net.state_dict().items()}
    if fixed:
        new = {k: received[k] + (v - start[k]) for k, v in new.items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(new),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


def strategy(cfg, num_nodes: int):  # noqa: ANN001, ANN201
    random.seed(int(cfg["seed"]))
    inner = server_app.make_fedavg(int(cfg["clients-per-round"]), num_nodes)
    inner.fraction_evaluate = 0.0  # the audit attacks training; evaluation costs time
    return server_app.build_strategy(str(cfg["privacy"]), inner, dict(cfg), simulation=True)


def hook() -> AuditHook:
    return AuditHook(
        client_app=app,
        client_mods=MODS,
        strategy=strategy,
        model=model,
        loss=torch.nn.functional.cross_entropy,
        input_shape=(64,),
        image_shape=(8, 8),
        num_classes=10,
        client_data=client_data,
        public_data=lambda cfg: task._sklearn_digits()[1].x,
        local_training=lambda cfg: LocalTraining(1, int(cfg["toy-per-node"]), LEARNING_RATE),
        num_nodes=lambda cfg: int(cfg["min-nodes"]),
        default_config=DEFAULTS,
        configs=CONFIGS,
        fixed_updates=lambda cfg: bool(cfg["toy-fixed-update"]),
    )
