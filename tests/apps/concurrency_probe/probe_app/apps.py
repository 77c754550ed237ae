"""One training round in which every client sleeps and records its time window."""

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_privacy.strategies import StrictRounds

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    start = time.time()
    time.sleep(float(context.run_config["sleep-seconds"]))
    end = time.time()
    out = Path(str(context.run_config["probe-dir"])) / f"{context.node_id}.txt"
    out.write_text(f"{start} {end} {os.getpid()}\n")
    return Message(
        RecordDict(
            {
                "arrays": msg.content["arrays"],
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
        reply_to=msg,
    )


@server.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["min-nodes"])
    strategy = StrictRounds(
        FedAvg(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)
    )
    strategy.start(
        grid, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), num_rounds=1, timeout=300
    )
