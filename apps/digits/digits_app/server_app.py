"""Server side of the digits app."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from digits_app import he_keys
from digits_app.dp_sgd import METRIC_DELTA, METRIC_EPSILON, DpSgdConfig
from digits_app.privacy import mechanisms, privacy_config, privacy_name
from digits_app.task import Net, evaluate, load_server_test, model_shape
from flower_privacy import make_private
from flower_privacy.private.config import ROUND_TIMEOUT
from flower_privacy.private.matrix import (
    CLIENT_LEVEL_DP,
    DP_DISTRIBUTED,
    DP_SGD,
    HE,
    MECHANISMS,
    SECAGG,
    SECAGG_GROUPS,
    SEPARATOR,
)
from flower_privacy.strategies import PrivacyResult, StrictRounds
from flower_privacy.wire import dp as dp_wire
from flower_privacy.wire import secagg as secagg_wire

# Mechanisms under which the server may see the global model (and so evaluate it
# centrally): secure aggregation hides each client's update, not the aggregate model;
# client-level DP makes the model itself private; DP-SGD protects each client's
# examples inside its own update. "he" is absent: the server holds only the encrypted
# model (federated evaluation only). "none" stands for no mechanism.
SERVER_SEES_MODEL = {"none", *MECHANISMS} - {HE}

app = ServerApp()


def build_strategy(
    privacy: str,
    inner: Strategy,
    cfg: dict | None = None,
    run_id: int = 0,
    *,
    simulation: bool = False,
) -> StrictRounds:
    """``make_private(inner, ...)`` for the run config, ``privacy`` its privacy name.

    ``simulation``: the ServerApp runs on a simulation grid (``he`` may then deal keys).
    """
    cfg = {**(cfg or {}), "privacy": privacy}
    if HE in mechanisms(cfg):  # the ServerApp may deal the keys first
        return he_keys.build_strategy(inner, cfg, run_id, simulation=simulation)
    config = privacy_config(cfg)
    if config.mechanisms & CLIENT_LEVEL_DP:
        # Federated evaluation metrics come from clients' data without noise: off. The
        # server evaluates on its own held-out data instead.
        inner.fraction_evaluate = 0.0
    if DP_SGD in config.mechanisms:
        # Client-side DP: bad keys fail here, before round 1.
        DpSgdConfig.from_run_config(cfg)
        if not hasattr(inner, "train_metrics_aggr_fn"):
            raise TypeError(f"dp-sgd needs a FedAvg-like strategy, got {type(inner).__name__}")
        inner.train_metrics_aggr_fn = max_epsilon(inner.train_metrics_aggr_fn)
    # Reproducible experiments; poisson sampling always uses the OS CSPRNG.
    if config.selection != "poisson":
        config = dataclasses.replace(config, selection_seed=int(cfg.get("seed", 0)))
    return make_private(inner, config)


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
    if (mechanisms(cfg) or {"none"}) <= SERVER_SEES_MODEL:
        server_test = load_server_test(dataset)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = Net(*model_shape(dataset))
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = evaluate(model, server_test)
            return MetricRecord({"loss": loss, "accuracy": accuracy})

    def report_round(server_round: int, result: Result) -> bool:
        log(INFO, "%s", round_line(server_round, result))
        return False  # report only; the strategies stop the run themselves

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg[ROUND_TIMEOUT]),
        train_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
        should_stop=report_round,
    )
    log(INFO, "privacy: %s", privacy_summary(privacy_name(cfg), result))
    accuracy = final_accuracy(result)
    if accuracy is None:
        raise RuntimeError("the run produced no accuracy: no evaluation succeeded")
    log(INFO, "final accuracy: %.3f", accuracy)


def round_line(server_round: int, result: Result) -> str:
    """``round r: accuracy A, ε E, T t``: what one round cost and gave (absent: "-")."""
    central = result.evaluate_metrics_serverapp.get(server_round, {})
    federated = result.evaluate_metrics_clientapp.get(server_round, {})
    accuracy = central.get("accuracy", federated.get("eval-acc"))
    train = result.train_metrics_clientapp.get(server_round, {})
    epsilon = train.get(dp_wire.METRIC_EPSILON)
    privacy_t = train.get(secagg_wire.METRIC_PRIVACY_T)
    return (
        f"round {server_round}: accuracy {_figure(accuracy, '.3f')}, "
        f"ε {_figure(epsilon, '.3f')}, T {_figure(privacy_t, 'd')}"
    )


def _figure(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def privacy_summary(name: str, result: Result) -> str:
    """One line: the configuration and what it guarantees after the run."""
    parts = [name]
    # The participation audit's T after the last aggregated round (reported by the strategy).
    audited = [
        m[secagg_wire.METRIC_PRIVACY_T]
        for _, m in sorted(result.train_metrics_clientapp.items())
        if secagg_wire.METRIC_PRIVACY_T in m
    ]
    privacy_t = audited[-1] if audited else None
    names = set(name.split(SEPARATOR))
    rounds = [
        r
        for r in result.train_metrics_clientapp
        if dp_wire.METRIC_EPSILON in result.train_metrics_clientapp[r]
    ]
    if rounds:
        last = result.train_metrics_clientapp[max(rounds)]
        parts.append(
            f"client-level (ε={last[dp_wire.METRIC_EPSILON]:.3f}, "
            f"δ={last[dp_wire.METRIC_DELTA]:g})-DP after {len(rounds)} round(s), noise "
            f"multiplier {last[dp_wire.METRIC_NOISE_MULTIPLIER]:.3f}"
        )
    if names & {SECAGG, SECAGG_GROUPS, DP_DISTRIBUTED}:
        parts.append("the server saw only sums of masked updates")
    if privacy_t is not None:
        parts.append(f"no combination of rounds isolates fewer than T={privacy_t} clients")
    if HE in names:
        parts.append("the server held only ciphertexts")
    if DP_SGD in names:
        parts.append("each client's examples protected by DP-SGD (its ε is in the log)")
    if len(parts) == 1:
        parts.append("none: the server saw every client's update")
    return "; ".join(parts)
