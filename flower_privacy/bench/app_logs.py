"""Lines the synthetic benchmark app logs at the end of a run, and how to read them back.

The app (``apps/synthetic``) logs ``MARK json``; benchmarks read the last such line from
the run's streamed log. Both sides import the marks from here.
"""

from __future__ import annotations

import json

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
