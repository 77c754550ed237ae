"""Multi-round privacy bookkeeping for a run: groups, selection, participation audit.

Free of Flower: the strategy asks it which nodes take part, which uploads to keep,
and what the audit says after each round.
"""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np

from flower_privacy.secagg import audit, groups, selection


class GroupPlan:
    """Fixed groups of ``group_size`` nodes, chosen whole each round.

    Parameters
    ----------
    group_size : int
        T: nodes per group; no combination of rounds isolates fewer than T nodes.
    rule : str
        ``"least-used"`` or ``"poisson"`` (``"random"`` is the per-node baseline).
    seed : bytes
        The public partition seed, sent to every client, which recomputes the groups.
    rate : float | None
        Group sampling probability for ``"poisson"``.
    selection_seed : int | None
        Makes ``least-used`` tie-breaks and ``random`` reproducible (experiments only).
        Refused for ``poisson``: its sampling carries a privacy claim and always comes
        from the OS CSPRNG.
    """

    def __init__(
        self,
        group_size: int,
        rule: str,
        seed: bytes,
        rate: float | None = None,
        selection_seed: int | None = None,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        if rule not in selection.SELECTIONS:
            raise ValueError(f"selection must be one of {selection.SELECTIONS}, got {rule!r}")
        if rule == "poisson" and (rate is None or not 0 < rate <= 1):
            raise ValueError(f"poisson selection needs sampling_rate in (0, 1], got {rate!r}")
        self.group_size, self.rule, self.seed, self.rate = group_size, rule, seed, rate
        self.generations: list[list[int]] = []
        self.groups: list[list[int]] = []
        self.usage: dict[int, int] = {}
        self.history: list[set[int]] = []
        if rule == "poisson" and selection_seed is not None:
            raise ValueError(
                "poisson selection takes no seed: its sampling carries a privacy claim"
            )
        self._rng = (
            random.Random(selection_seed) if selection_seed is not None else random.SystemRandom()
        )

    def update(self, population: list[int]) -> None:
        """Group newly keyed nodes once there are ``group_size`` of them."""
        grouped = {n for g in self.generations for n in g}
        waiting = sorted(set(population) - grouped)
        usable = len(waiting) - len(waiting) % self.group_size
        if usable == 0:
            return
        index = len(self.generations)
        order = sorted(
            waiting,
            key=lambda n: hashlib.sha256(self.seed + struct.pack("<IQ", index, n)).digest(),
        )
        self.generations.append(sorted(order[:usable]))
        self.groups = groups.groups_from_generations(self.generations, self.group_size, self.seed)

    def select(self, available: list[int], per_round: int) -> list[int]:
        """This round's nodes: whole groups whose members are all available."""
        if self.rule == "random":
            return selection.select("random", [], set(available), per_round, {}, self._rng)
        return selection.select(
            self.rule, self.groups, set(available), per_round, self.usage, self._rng, self.rate
        )

    def request_fields(self) -> dict:
        """What clients need to recompute the groups (``PrepareRequest`` fields by name)."""
        nodes, sizes = groups.flatten(self.generations)
        return {
            "group_size": self.group_size,
            "group_seed": self.seed,
            "generation_nodes": nodes,
            "generation_sizes": sizes,
        }

    def keep(self, survivors: list[int]) -> tuple[list[int], list[int]]:
        """(kept, excluded): members of groups with a member missing are excluded."""
        if self.rule == "random":
            return sorted(survivors), []
        broken = groups.incomplete_groups(self.groups, survivors)
        excluded = sorted({n for g in broken for n in g} & set(survivors))
        return sorted(set(survivors) - set(excluded)), excluded

    def record(self, aggregated: list[int]) -> None:
        """Add a round's aggregated nodes to the usage counts and the history."""
        member_of = groups.group_of(self.groups)
        for g in {member_of[n] for n in aggregated if n in member_of}:
            self.usage[g] = self.usage.get(g, 0) + 1
        self.history.append(set(aggregated))

    def participation(self) -> tuple[np.ndarray, list[int]]:
        """(rounds x nodes 0/1 matrix, node ids of its columns) of the history so far."""
        nodes = sorted(set().union(*self.history))
        matrix = np.zeros((len(self.history), len(nodes)), dtype=np.int8)
        column = {n: j for j, n in enumerate(nodes)}
        for r, members in enumerate(self.history):
            matrix[r, [column[n] for n in members]] = 1
        return matrix, nodes

    def audit(self) -> audit.Audit:
        """The participation audit of the history so far."""
        return audit.audit(self.participation()[0])
