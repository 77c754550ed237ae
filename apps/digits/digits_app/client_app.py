"""Client side of the digits app.

torch and the data pipeline are imported inside the functions that need them: in a
deployment every message starts a new ClientApp process, and the secure aggregation
stages (answered by the mod alone) then skip those imports.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_privacy.mods import secagg_mod

# secagg_mod answers secure aggregation stages and passes everything else through.
app = ClientApp(mods=[secagg_mod])


def _data(context: Context):  # noqa: ANN202
    from digits_app.task import load_partition

    cfg = context.run_config
    return load_partition(
        str(cfg["dataset"]),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        str(cfg["partitioner"]),
        float(cfg["dirichlet-alpha"]),
        int(cfg["seed"]),
    )


def _model(msg: Message, context: Context):  # noqa: ANN202
    import torch

    from digits_app.task import Net, model_shape

    torch.set_num_threads(1)  # virtual clients share the machine's cores
    net = Net(*model_shape(str(context.run_config["dataset"])))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return net


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition."""
    from digits_app.task import train

    train_data, _ = _data(context)
    net = _model(msg, context)
    cfg = context.run_config
    server_round = int(msg.content["config"].get("server-round", 0))
    loss = train(
        net,
        train_data,
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["learning-rate"]),
        seed=int(cfg["seed"]) * 100_003 + server_round * 1009 + context.node_id % 1009,
    )
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"train-loss": loss, "num-examples": len(train_data)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's test split."""
    from digits_app.task import evaluate

    _, test_data = _data(context)
    net = _model(msg, context)
    loss, accuracy = evaluate(net, test_data)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(test_data)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
