"""Server side of the digits app."""

from __future__ import annotations

import random
from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from digits_app import he_keys
from digits_app.dp_sgd import METRIC_DELTA, METRIC_EPSILON, DpSgdConfig
from digits_app.task import Net, evaluate, load_server_test, model_shape
from flower_privacy.strategies import (
    ClientLevelDP,
    PrivacyResult,
    SecureAggregation,
    StrictRounds,
)

PRIVACY_MODES = ("none", "secagg", "dp-sgd", "dp", "he")
# Modes in which the server may see the global model (and so evaluate it centrally):
# secure aggregation hides each client's update, not the aggregate model; client-level
# DP makes the model itself private.
# DP-SGD protects each client's examples inside its own update (client-side noise).
# "he" is absent: the server holds only the encrypted model (federated evaluation only).
SERVER_SEES_MODEL = {"none", "secagg", "dp-sgd", "dp"}

app = ServerApp()


def build_strategy(
    privacy: str,
    inner: Strategy,
    cfg: dict | None = None,
    run_id: int = 0,
    *,
    simulation: bool = False,
) -> StrictRounds:
    """Wrap ``inner`` in the privacy mechanism named by the run config.

    ``simulation``: the ServerApp runs on a simulation grid (``he`` may then deal keys).
    """
    cfg = cfg or {}
    if privacy == "he":
        return he_keys.build_strategy(inner, cfg, run_id, simulation=simulation)
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
    if privacy == "dp":
        return build_client_level_dp(inner, cfg)
    if privacy == "dp-sgd":
        # Client-side DP: the server aggregates as usual. Bad keys fail here, before round 1.
        DpSgdConfig.from_run_config(cfg)
        if not hasattr(inner, "train_metrics_aggr_fn"):
            raise TypeError(f"dp-sgd needs a FedAvg-like strategy, got {type(inner).__name__}")
        inner.train_metrics_aggr_fn = max_epsilon(inner.train_metrics_aggr_fn)
        return StrictRounds(inner)
    raise ValueError(f"run config 'privacy' must be one of {PRIVACY_MODES}, got {privacy!r}")


def build_client_level_dp(inner: FedAvg, cfg: dict) -> ClientLevelDP:
    """Client-level DP-FedAvg; the noise placement comes from ``dp-placement``.

    Federated evaluation is switched off: its metrics come from clients' data without
    noise. The server evaluates on its own held-out data instead.
    """
    placement = str(cfg.get("dp-placement", "central"))
    rate = float(cfg.get("dp-sampling-rate", 0.0))
    target = float(cfg.get("dp-target-epsilon", 0.0))
    z = float(cfg.get("dp-noise-multiplier", 0.0))
    inner.fraction_evaluate = 0.0
    strategy: Strategy = inner
    if placement == "distributed":
        strategy = SecureAggregation(
            inner,
            weighting="uniform",
            max_clients=int(cfg.get("secagg-max-clients", 100)),
            min_train_replies=int(cfg.get("dp-min-clients", 2)),
        )
    return ClientLevelDP(
        strategy,
        target_epsilon=target or None,
        noise_multiplier=z or None,
        delta=float(cfg.get("dp-delta", 1e-5)),
        clip_norm=float(cfg.get("dp-clip-norm", 0.1)),
        adaptive_clipping=bool(cfg.get("dp-adaptive-clipping", False)),
        placement=placement,
        sampling_rate=rate or None,
        min_train_replies=1,
    )


MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def max_epsilon(aggregate: MetricsAggregation) -> MetricsAggregation:
    """``aggregate``, but DP-SGD's ε and δ become the max over the replies (and are logged).

    A weighted mean of ε would understate every client's loss: the round reports the worst.
    """

    def aggregate_with_max_epsilon(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        metrics = aggregate(records, weighting_key)
        for key in (METRIC_EPSILON, METRIC_DELTA):
            values = [float(m[key]) for r in records for m in r.metric_records.values() if key in m]
            if values:
                metrics[key] = max(values)
        if METRIC_EPSILON in metrics:
            log(
                INFO,
                "DP-SGD: sample-level ε = %.4f at δ = %g (max over %d clients)",
                metrics[METRIC_EPSILON],
                metrics[METRIC_DELTA],
                len(records),
            )
        return metrics

    return aggregate_with_max_epsilon


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
        privacy,
        make_fedavg(int(cfg["clients-per-round"]), int(cfg["min-nodes"])),
        cfg,
        run_id=context.run_id,
        simulation=he_keys.is_simulation(grid),
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
