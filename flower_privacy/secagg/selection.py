"""Which nodes take part in a round: whole groups (multi-round safe) or single nodes.

- ``least-used`` (So et al.): among groups whose members are all available, the ones
  that took part least so far (ties broken at random), as many as fit ``per_round``.
- ``poisson``: every group independently with probability ``rate``, so every node is
  Poisson-sampled with that probability (what DP amplification by sampling needs); a
  sampled group with a member unavailable does not take part.
- ``random``: ``per_round`` available nodes at random, as Flower samples: the unsafe
  baseline (the server can difference rounds down to single nodes).

Randomness comes from the caller's generator (``random.SystemRandom`` in the strategy).
"""

from __future__ import annotations

import math
import random

SELECTIONS = ("least-used", "poisson", "random")


def select(
    selection: str,
    groups: list[list[int]],
    available: set[int],
    per_round: int,
    usage: dict[int, int],
    rng: random.Random,
    rate: float | None = None,
) -> list[int]:
    """The nodes of one round (sorted). ``usage`` counts past rounds per group index."""
    if selection == "random":
        pool = sorted(available)
        return sorted(rng.sample(pool, min(per_round, len(pool))))
    whole = [i for i, members in enumerate(groups) if available.issuperset(members)]
    if selection == "least-used":
        if not groups:
            return []
        per_group = len(groups[0])
        wanted = max(1, math.floor(per_round / per_group))
        rng.shuffle(whole)
        chosen = sorted(whole, key=lambda i: usage.get(i, 0))[:wanted]
    elif selection == "poisson":
        if rate is None or not 0 < rate <= 1:
            raise ValueError(f"poisson selection needs a rate in (0, 1], got {rate!r}")
        complete = set(whole)
        # Draw for every group, available or not: the sampling itself is data-independent.
        chosen = [i for i in range(len(groups)) if rng.random() < rate and i in complete]
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return sorted(node for i in chosen for node in groups[i])
