"""``flower-privacy bench dp``: utility against ε, round-time overhead, ε against Flower's.

* Utility: the digits app (scikit-learn's 1,797 8x8 images; 20% held out by the server
  for central evaluation, the rest split IID into 100 partitions with flwr-datasets'
  ``IidPartitioner``, about 14 images per client, 80% of them for training) on 100
  in-process virtual clients, Poisson sampling of rate q, the central placement,
  calibrated for each ε; ε = ∞ is plain FedAvg on q·100 clients per round.
* Overhead: time per round of each placement over plain FedAvg at 1M parameters,
  10 in-process clients returning a fixed update, measured in the same run.
* Accounting: for the ε = 3 run's noise multiplier, sampling and rounds, ε by Flower
  1.41's fixed-clipping accountant (no amplification) and by ours (PLD, Poisson).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from flower_privacy import _flwr_compat as compat
from flower_privacy.bench.secagg import fixed_update_app
from flower_privacy.dp.accounting import GaussianRounds, epsilon
from flower_privacy.mods import client_clipping_mod, secagg_mod
from flower_privacy.private.config import (
    DP_CLIP_NORM,
    DP_DELTA,
    DP_SAMPLING_RATE,
    DP_TARGET_EPSILON,
)
from flower_privacy.strategies import ClientLevelDP, SecureAggregation, StrictRounds
from flower_privacy.testing import InProcessGrid, capture_log_lines

_DIGITS = Path(__file__).resolve().parents[2] / "apps" / "digits"
DELTA = 1e-5


def _digits_config(**overrides: object) -> dict:
    cfg = tomllib.loads((_DIGITS / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**cfg, **overrides}


def _digits_accuracy(cfg: dict) -> tuple[float, list[str]]:
    if str(_DIGITS) not in sys.path:
        sys.path.insert(0, str(_DIGITS))
    from digits_app import server_app
    from digits_app.client_app import app as client_app

    with capture_log_lines() as lines:
        grid = InProcessGrid(client_app, num_nodes=int(cfg["min-nodes"]), run_config=cfg)
        grid.run_server_app(server_app.app)
    finals = [line for line in lines if line.startswith("final accuracy:")]
    if not finals:
        raise RuntimeError("the digits run logged no final accuracy")
    return float(finals[-1].split(":")[1]), lines


def utility(
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0, math.inf),
    *,
    clients: int = 100,
    rounds: int = 20,
    sampling_rate: float = 0.3,
    clip_norm: float = 1.0,
) -> list[dict]:
    """Final central accuracy on digits for each ε (and the noise multiplier used)."""
    common = {
        "min-nodes": clients,
        "partitioner": "iid",
        "num-server-rounds": rounds,
        "local-epochs": 5,
        "batch-size": 4,
    }
    rows = []
    for eps in epsilons:
        if math.isinf(eps):
            per_round = round(sampling_rate * clients)
            cfg = _digits_config(privacy="none", **common, **{"clients-per-round": per_round})
        else:
            cfg = _digits_config(
                privacy="dp",
                **common,
                **{
                    DP_TARGET_EPSILON: eps,
                    DP_SAMPLING_RATE: sampling_rate,
                    DP_CLIP_NORM: clip_norm,
                    DP_DELTA: DELTA,
                },
            )
        accuracy, lines = _digits_accuracy(cfg)
        z = [ln for ln in lines if "calibrated for" in ln]
        rows.append(
            {
                "epsilon": "inf" if math.isinf(eps) else eps,
                "accuracy": accuracy,
                "noise_multiplier": float(z[-1].split()[3]) if z else None,
            }
        )
    return rows


def _round_time(make_strategy, mods: list, params: int, clients: int) -> float:  # noqa: ANN001
    """Steady-state seconds per round: (time of 3 rounds - time of 1 round) / 2."""
    times = []
    for rounds in (1, 3):
        grid = InProcessGrid(fixed_update_app(mods), num_nodes=clients)
        arrays = ArrayRecord({"w": Array(np.zeros(params, dtype=np.float32))})
        start = time.perf_counter()
        make_strategy().start(grid, arrays, num_rounds=rounds)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 2


def overhead(params: int = 1_000_000, clients: int = 10) -> dict:
    """Round time of each placement over plain FedAvg's, measured here and now."""

    def fedavg() -> FedAvg:
        return FedAvg(min_available_nodes=clients, fraction_evaluate=0.0)

    def secure() -> SecureAggregation:
        return SecureAggregation(fedavg(), weighting="uniform", min_train_replies=clients // 2)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        base = _round_time(lambda: StrictRounds(fedavg()), [], params, clients)
        cases = {
            "central": (lambda: ClientLevelDP(fedavg(), noise_multiplier=1.0), []),
            "client": (
                lambda: ClientLevelDP(fedavg(), noise_multiplier=1.0, placement="client"),
                [client_clipping_mod],
            ),
            "distributed": (
                lambda: ClientLevelDP(secure(), target_epsilon=3.0, placement="distributed"),
                [secagg_mod],
            ),
        }
        rows = [
            {"placement": name, "ratio": _round_time(make, mods, params, clients) / base}
            for name, (make, mods) in cases.items()
        ]
        secagg_alone = _round_time(secure, [secagg_mod], params, clients)
    finally:
        logging.getLogger("flwr").setLevel(logging.INFO)
    return {"rows": rows, "fedavg_round_s": base, "secagg_alone_ratio": secagg_alone / base}


def epsilon_comparison(
    noise_multiplier: float, sampling_rate: float, rounds: int, clients: int
) -> dict:
    """The same run configuration under Flower 1.41's accountant and ours."""
    flower = compat.flower_fixed_clipping_epsilon(
        noise_multiplier, rounds, DELTA, round(sampling_rate * clients), clients
    )
    ours = epsilon(GaussianRounds(noise_multiplier, sampling_rate, rounds), DELTA)
    return {"flower_epsilon": flower, "our_epsilon": ours}


def run(*, quick: bool = False) -> dict:
    """All three parts as one JSON-ready dict (``quick``: fewer rounds, two ε)."""
    rounds, sampling_rate, clients = (5, 0.3, 100) if quick else (20, 0.3, 100)
    epsilons = (3.0, math.inf) if quick else (1.0, 3.0, 8.0, math.inf)
    rows = utility(epsilons, clients=clients, rounds=rounds, sampling_rate=sampling_rate)
    at_three = next(r for r in rows if r["epsilon"] == 3.0)
    spent = overhead(params=100_000 if quick else 1_000_000)
    return {
        "utility": [{"epsilon": r["epsilon"], "accuracy": r["accuracy"]} for r in rows],
        "overhead": spent["rows"],
        **epsilon_comparison(at_three["noise_multiplier"], sampling_rate, rounds, clients),
        "setting": {
            "clients": clients,
            "sampling_rate": sampling_rate,
            "rounds": rounds,
            "delta": DELTA,
            "placement": "central",
            "clip_norm": 1.0,
            "noise_multipliers": {str(r["epsilon"]): r["noise_multiplier"] for r in rows},
            "fedavg_round_s_1m": spent["fedavg_round_s"],
            "secagg_alone_ratio": spent["secagg_alone_ratio"],
            "partitioning": (
                "sklearn digits (1,797 images): 20% held out by the server for central "
                "evaluation; the rest split IID into 100 partitions (flwr-datasets "
                "IidPartitioner), ~14 images per client, 80/20 train/test per client"
            ),
            "epsilon_inf": "plain FedAvg, q*clients clients per round",
            "overhead": "round time over plain FedAvg, 1M float32 parameters, 10 in-process "
            "clients, steady state",
        },
    }
