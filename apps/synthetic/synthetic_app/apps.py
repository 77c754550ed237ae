"""The synthetic benchmark app: fixed updates (protocol costs) or real local training.

``client-mode = "fixed"``: a client returns global + a fixed per-node update (no torch).
``client-mode = "train"``: a client trains a small torch MLP on data generated from its
partition id (:mod:`synthetic_app.task`). The server logs every round's seconds at the
end (``round-seconds: [...]``, round 1 first, start-up excluded).
"""

from __future__ import annotations

import json
import random
import time
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.bench.app_logs import ROUND_SECONDS, TRAIN_METRICS
from flower_privacy.mods import secagg_mod
from flower_privacy.strategies import SecureAggregation, StrictRounds
from flower_privacy.testing.dropout import dropout_mod

# dropout_mod first: a simulated dropout never reaches secure aggregation's mod.
client = ClientApp(mods=[dropout_mod, secagg_mod])
server = ServerApp()
TRAIN_SECONDS = "train-seconds"
CLIENT_MODES = ("fixed", "train")
PRIVACY_MODES = ("none", "secagg", "secagg-consistency")


def synthetic_update(node_id: int, size: int) -> np.ndarray:
    """The fixed update of one node (not secret: benchmarks only)."""
    return np.random.default_rng(node_id % 2**32).uniform(-0.01, 0.01, size).astype(np.float32)


def _reply(msg: Message, arrays: ArrayRecord, metrics: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Fixed update or local training, as the run config's ``client-mode`` says."""
    if str(context.run_config["client-mode"]) == "train":
        return _train_mlp(msg, context)
    weights = msg.content["arrays"]["w"].numpy()
    updated = weights + synthetic_update(context.node_id, weights.size)
    return _reply(msg, ArrayRecord({"w": Array(updated)}), {"num-examples": 10})


def _train_mlp(msg: Message, context: Context) -> Message:
    import torch

    from synthetic_app import task

    torch.set_num_threads(1)  # virtual clients share the machine's cores
    started = time.perf_counter()
    config = task.TrainConfig.from_run_config(context.run_config)
    partition = int(context.node_config["partition-id"])
    x, y = task.client_data(config.seed, partition, config.examples)
    model = task.make_model(config.seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"].get("server-round", 0))
    loss = task.train(
        model, x, y, config, seed=config.seed * 100_003 + server_round * 1009 + partition
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    metrics = {
        "num-examples": config.examples,
        "train-loss": loss,
        TRAIN_SECONDS: time.perf_counter() - started,
    }
    return _reply(msg, ArrayRecord(state), metrics)


def _initial_arrays(cfg: dict) -> ArrayRecord:
    if str(cfg["client-mode"]) == "train":
        from synthetic_app import task

        return ArrayRecord(task.make_model(int(cfg["seed"])).state_dict())
    return ArrayRecord({"w": Array(np.zeros(int(cfg["num-params"]), np.float32))})


def build_strategy(cfg: dict) -> StrictRounds:
    """FedAvg over ``clients-per-round`` of ``min-nodes`` nodes, wrapped per ``privacy``."""
    n, per_round = int(cfg["min-nodes"]), int(cfg["clients-per-round"])
    mode, privacy = str(cfg["client-mode"]), str(cfg["privacy"])
    if mode not in CLIENT_MODES:
        raise ValueError(f"run config 'client-mode' must be one of {CLIENT_MODES}, got {mode!r}")
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"run config 'privacy' must be one of {PRIVACY_MODES}, got {privacy!r}")
    if not 0 <= per_round <= n:
        raise ValueError(f"clients-per-round must be in [0, min-nodes={n}], got {per_round}")
    # FedAvg samples max(int(n * fraction), min_train_nodes): a tiny fraction makes the
    # count exactly clients-per-round (0: every node).
    fraction, sampled = (1.0, n) if per_round == 0 else (1e-9, per_round)
    inner = FedAvg(
        fraction_train=fraction,
        min_train_nodes=sampled,
        min_available_nodes=n,
        fraction_evaluate=0.0,
    )
    # 0: the wrappers' default (every sampled node must answer).
    min_replies = int(cfg["min-train-replies"]) or None
    if privacy == "none":
        return StrictRounds(inner, min_train_replies=min_replies)
    group_size = int(cfg["secagg-group-size"])
    return SecureAggregation(
        inner,
        # Weights are example counts: the fixed mode reports 10.
        max_weight=int(cfg["train-examples"]) if mode == "train" else 100,
        max_clients=max(100, sampled),
        consistency_check=privacy == "secagg-consistency",
        group_size=group_size or None,
        selection_seed=int(cfg["seed"]) if group_size else None,
        min_train_replies=min_replies,
    )


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds; log each round's seconds and the train metrics."""
    cfg = context.run_config
    random.seed(int(cfg["seed"]))  # FedAvg samples with the global `random`
    strategy = build_strategy(cfg)
    marks: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())

    result = strategy.start(
        grid=grid,
        initial_arrays=_initial_arrays(cfg),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        evaluate_fn=stamp,
    )
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    log(INFO, "%s %s", ROUND_SECONDS, json.dumps(seconds))
    metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    log(INFO, "%s %s", TRAIN_METRICS, json.dumps(metrics))
