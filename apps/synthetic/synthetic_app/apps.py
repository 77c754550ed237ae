"""Clients return global + a fixed per-node update; the server logs round times."""

from __future__ import annotations

import json
import time
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.mods import secagg_mod
from flower_privacy.strategies import SecureAggregation, StrictRounds

client = ClientApp(mods=[secagg_mod])
server = ServerApp()
ROUND_SECONDS = "round-seconds:"


def synthetic_update(node_id: int, size: int) -> np.ndarray:
    """The fixed update of one node (not secret: benchmarks only)."""
    return np.random.default_rng(node_id % 2**32).uniform(-0.01, 0.01, size).astype(np.float32)


@client.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"]["w"].numpy()
    updated = weights + synthetic_update(context.node_id, weights.size)
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(updated)}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        ),
        reply_to=msg,
    )


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n = int(cfg["min-nodes"])
    inner = FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)
    privacy = str(cfg["privacy"])
    if privacy in ("secagg", "secagg-consistency"):
        consistency = privacy == "secagg-consistency"
        group_size = int(cfg.get("secagg-group-size", 0))
        strategy = SecureAggregation(
            inner, max_weight=100, consistency_check=consistency, group_size=group_size or None
        )
    elif privacy == "none":
        strategy = StrictRounds(inner)
    else:
        raise ValueError(
            "run config 'privacy' must be 'none', 'secagg' or 'secagg-consistency', "
            f"got {privacy!r}"
        )
    marks: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(int(cfg["num-params"]), np.float32))}),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        evaluate_fn=stamp,
    )
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    log(INFO, "%s %s", ROUND_SECONDS, json.dumps(seconds))
