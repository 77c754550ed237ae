"""Lines the synthetic benchmark app logs at the end of a run, and how to read them back.

The app (``apps/synthetic``) logs ``MARK json``; benchmarks read the last such line from
the run's streamed log. Both sides import the marks from here.
"""

from __future__ import annotations

import json
import statistics

from flower_privacy.strategies._exchange import EXCHANGE_LOG

# Seconds of each round, round 1 first (start-up before round 1 excluded).
ROUND_SECONDS = "round-seconds:"
# The train metrics of every round, {round: {metric: value}}, as the strategy reported them.
TRAIN_METRICS = "train-metrics:"


def logged_json(log: list[str], mark: str) -> object:
    """The JSON value after ``mark`` on the last log line holding it."""
    for line in reversed(log):
        if mark in line:
            return json.loads(line.split(mark, 1)[1])
    raise RuntimeError(f"the run logged no {mark!r} line; last lines:\n" + "\n".join(log[-20:]))


def exchange_medians(log: list[str], first_round: int = 2) -> dict[str, dict[str, float]]:
    """Per kind of exchange (``train``, ``prepare+unmask``, ...) from round ``first_round``
    on: the median seconds and messages of the ``exchange-seconds`` lines the strategies log.
    """
    seen: dict[str, list[tuple[float, int]]] = {}
    for line in log:
        if EXCHANGE_LOG not in line:
            continue
        fields = dict(f.split("=", 1) for f in line.split(EXCHANGE_LOG, 1)[1].split() if "=" in f)
        if int(fields["round"]) >= first_round:
            seen.setdefault(fields["what"], []).append(
                (float(fields["seconds"]), int(fields["messages"]))
            )
    return {
        what: {
            "seconds": statistics.median(s for s, _ in rows),
            "messages": statistics.median(m for _, m in rows),
            "count": len(rows),
        }
        for what, rows in seen.items()
    }
