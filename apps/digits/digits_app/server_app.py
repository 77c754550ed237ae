"""Server side of the digits app."""

from __future__ import annotations

import random
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from digits_app.task import Net, evaluate, load_server_test, model_shape
from flower_privacy.strategies import PrivacyResult, SecureAggregation, StrictRounds

# Later issues add "he", "dp" and "dp-sgd".
PRIVACY_MODES = ("none", "secagg")
# Modes in which the server may see the global model (and so evaluate it centrally):
# secure aggregation hides each client's update, not the aggregate model.
SERVER_SEES_MODEL = {"none", "secagg"}

app = ServerApp()


def build_strategy(privacy: str, inner: Strategy, cfg: dict | None = None) -> StrictRounds:
    """Wrap ``inner`` in the privacy mechanism named by the run config."""
    cfg = cfg or {}
    if privacy == "none":
        return StrictRounds(inner)
    if privacy == "secagg":
        group_size = int(cfg.get("secagg-group-size", 0))
        selection = str(cfg.get("secagg-selection", "least-used"))
        return SecureAggregation(
            inner,
            clip_range=float(cfg.get("secagg-clip-range", 1.0)),
            max_weight=int(cfg.get("secagg-max-weight", 1000)),
            max_clients=int(cfg.get("secagg-max-clients", 100)),
            group_size=group_size or None,
            selection=selection,
            # Reproducible experiments; poisson sampling always uses the OS CSPRNG.
            selection_seed=None if selection == "poisson" else int(cfg.get("seed", 0)),
        )
    raise ValueError(f"run config 'privacy' must be one of {PRIVACY_MODES}, got {privacy!r}")


def make_fedavg(clients_per_round: int, min_nodes: int) -> FedAvg:
    """FedAvg that trains ``clients_per_round`` nodes (0 = all) out of ``min_nodes``."""
    if clients_per_round < 0:
        raise ValueError(f"clients-per-round must be >= 0, got {clients_per_round}")
    if min_nodes < 1:
        raise ValueError(f"min-nodes must be >= 1, got {min_nodes}")
    if clients_per_round > min_nodes:
        raise ValueError(f"clients-per-round ({clients_per_round}) exceeds min-nodes ({min_nodes})")
    if clients_per_round == 0:
        # Every connected node trains; a round needs two replies (or one, alone).
        fraction, minimum = 1.0, min(2, min_nodes)
    else:
        # FedAvg samples max(int(n * fraction), min_train_nodes): a tiny fraction
        # makes the count exactly clients_per_round.
        fraction, minimum = 1e-9, clients_per_round
    return FedAvg(
        fraction_train=fraction,
        min_train_nodes=minimum,
        fraction_evaluate=1.0,
        min_evaluate_nodes=min(2, min_nodes),
        min_available_nodes=min_nodes,
    )


def final_accuracy(result: PrivacyResult) -> float | None:
    """Central accuracy after the last round, else the federated one."""
    for history, key in (
        (result.evaluate_metrics_serverapp, "accuracy"),
        (result.evaluate_metrics_clientapp, "eval-acc"),
    ):
        rounds = [r for r in history if r > 0]
        if rounds:
            return float(history[max(rounds)][key])
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` rounds and log the final accuracy."""
    cfg = context.run_config
    # Flower's FedAvg samples with the global `random`: seeded, runs are reproducible.
    random.seed(int(cfg["seed"]))
    privacy = str(cfg["privacy"])
    dataset = str(cfg["dataset"])
    torch.manual_seed(int(cfg["seed"]))
    net = Net(*model_shape(dataset))
    strategy = build_strategy(
        privacy, make_fedavg(int(cfg["clients-per-round"]), int(cfg["min-nodes"])), cfg
    )

    evaluate_fn = None
    if privacy in SERVER_SEES_MODEL:
        server_test = load_server_test(dataset)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = Net(*model_shape(dataset))
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = evaluate(model, server_test)
            return MetricRecord({"loss": loss, "accuracy": accuracy})

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    accuracy = final_accuracy(result)
    if accuracy is None:
        raise RuntimeError("the run produced no accuracy: no evaluation succeeded")
    log(INFO, "final accuracy: %.3f", accuracy)
