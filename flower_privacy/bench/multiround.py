"""``flower-privacy bench multiround``: So et al.'s multi-round privacy simulation.

N nodes, K per round, each node unavailable with probability p each round, R rounds,
averaged over trials. For each selection rule: privacy T after R rounds (the audit's
exact value where found, else its lower bound), clients per round, and the fairness
gap (largest minus smallest participation rate over nodes).
"""

from __future__ import annotations

import random
import statistics

import numpy as np

from flower_privacy.secagg import audit, groups, selection


def simulate(
    rule: str,
    group_size: int,
    *,
    nodes: int = 120,
    per_round: int = 12,
    unavailable: float = 0.3,
    rounds: int = 200,
    seed: int = 0,
) -> dict:
    """One trial: returns privacy T, mean clients per round and the fairness gap."""
    rng = random.Random(seed)  # a simulation: no secret depends on it
    availability = np.random.default_rng(seed).random((rounds, nodes)) >= unavailable
    ids = list(range(nodes))
    parts = (
        groups.partition(ids, group_size, seed.to_bytes(8, "little")) if rule != "random" else []
    )
    rate = None
    if rule == "poisson":
        # Expected participants = per_round, given that a group needs all members available.
        rate = min(1.0, per_round / (nodes * (1 - unavailable) ** group_size))
    usage: dict[int, int] = {}
    member_of = groups.group_of(parts)
    participation = np.zeros((rounds, nodes), dtype=np.int8)
    for r in range(rounds):
        available = {i for i in ids if availability[r, i]}
        chosen = selection.select(rule, parts, available, per_round, usage, rng, rate)
        participation[r, chosen] = 1
        for g in {member_of[n] for n in chosen if n in member_of}:
            usage[g] = usage.get(g, 0) + 1
    result = audit.audit(participation)
    rates = participation.mean(axis=0)
    return {
        "privacy_t": result.exact if result.exact is not None else result.lower_bound,
        "avg_clients": float(participation.sum(axis=1).mean()),
        "fairness_gap": float(rates.max() - rates.min()),
    }


def run(trials: int = 20, rounds: int = 200, log=print) -> dict:  # noqa: ANN001
    """All rows: random, least-used with groups of 3, 4, 6, and poisson with groups of 4."""
    configs = [
        ("random", 1),
        ("least-used", 3),
        ("least-used", 4),
        ("least-used", 6),
        ("poisson", 4),
    ]
    rows = []
    for rule, size in configs:
        log(f"{rule}, group size {size}: {trials} trials of {rounds} rounds ...")
        runs = [simulate(rule, size, rounds=rounds, seed=t) for t in range(trials)]
        rows.append(
            {
                "selection": rule,
                "group_size": size,
                "privacy_t": min(r["privacy_t"] for r in runs),
                "privacy_t_mean": statistics.mean(r["privacy_t"] for r in runs),
                "avg_clients": statistics.mean(r["avg_clients"] for r in runs),
                "fairness_gap": statistics.mean(r["fairness_gap"] for r in runs),
            }
        )
    return {
        "setting": {
            "nodes": 120,
            "per_round": 12,
            "unavailable": 0.3,
            "rounds": rounds,
            "trials": trials,
        },
        "rows": rows,
        "notes": "privacy_t is the smallest over trials (the worst case); poisson samples "
        "each group with rate 12 / (120 * 0.7^4) so that 12 clients take part on average",
    }
