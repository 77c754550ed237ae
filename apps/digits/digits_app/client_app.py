"""Client side of the digits app.

torch and the data pipeline are imported inside the functions that need them: in a
deployment every message starts a new ClientApp process, and the secure aggregation
stages (answered by the mod alone) then skip those imports.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from digits_app import he_keys
from digits_app.privacy import mechanisms
from flower_privacy import client_mods

# The mods of every privacy configuration, each passive for messages not its own; a
# node's node config `privacy-required` makes them refuse weaker requests. The digits
# app finds its HE secret context in the simulation key folder too, and in a run that
# names "he" refuses plaintext models.
MODS = client_mods(
    he_context=he_keys.locate_client_context,
    require_encryption=he_keys.requires_encryption,
)
app = ClientApp(mods=MODS)


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
    if "dp-sgd" in mechanisms(cfg):
        return _train_dp_sgd(msg, context, net, train_data)
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


# Where a node keeps its DP-SGD accountant's history between rounds.
DP_SGD_STATE = "dp-sgd-accountant"


def _train_dp_sgd(msg: Message, context: Context, net, train_data) -> Message:  # noqa: ANN001
    """Train with sample-level DP-SGD (Opacus); report this node's cumulative ε."""
    from flwr.app import ConfigRecord

    from digits_app import dp_sgd

    cfg = context.run_config
    config = dp_sgd.DpSgdConfig.from_run_config(cfg)
    history = ()
    if DP_SGD_STATE in context.state:
        history = dp_sgd.history_from_record(context.state[DP_SGD_STATE])
    # seed=None: noise and sampling are seeded from os.urandom, never from the run's seed.
    result = dp_sgd.train_dp_sgd(
        net,
        train_data,
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        lr=float(cfg["learning-rate"]),
        config=config,
        history=history,
    )
    context.state[DP_SGD_STATE] = ConfigRecord(dp_sgd.history_to_record(result.history))
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    metrics = {
        "train-loss": result.loss,
        "num-examples": len(train_data),
        dp_sgd.METRIC_EPSILON: result.epsilon,
        dp_sgd.METRIC_DELTA: config.delta,
    }
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
