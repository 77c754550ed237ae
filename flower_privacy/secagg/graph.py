"""The neighbour graph: which nodes mask with, and hold shares for, which.

A Harary-style ring over a keyed random permutation of the node ids: every node
recomputes it from the public seed and the node list, so a server cannot hand a
client a neighbourhood of its own choosing without the client noticing.
"""

from __future__ import annotations

import hashlib
import struct


def default_degree(num_nodes: int, dropout: float = 0.1, failure_bits: float = 20.0) -> int:
    """The least degree at which a round survives ``dropout`` (a fraction of the cohort).

    With threshold floor(k/2) + 1, a round fails when a node loses more than k - t of its
    k neighbours; the degree keeps that below 2^-failure_bits over the whole cohort (a
    union bound on binomial tails). Small cohorts get the complete graph.
    """
    from flower_privacy.secagg.floors import safe_degree

    found = safe_degree(num_nodes, 0.0, dropout, failure_bits) if num_nodes > 8 else None
    return num_nodes - 1 if found is None else found[0]


class Ring:
    """The keyed ring of one cohort: built once, then any node's neighbours in O(degree)."""

    def __init__(self, node_ids: list[int], degree: int, seed: bytes) -> None:
        nodes = sorted(set(node_ids))
        if len(nodes) != len(node_ids):
            raise ValueError("node ids must be distinct")
        n = len(nodes)
        if n < 2:
            raise ValueError(f"a neighbour graph needs at least 2 nodes, got {n}")
        if not 1 <= degree <= n - 1:
            raise ValueError(f"degree must be in [1, {n - 1}] for {n} nodes, got {degree}")
        self.nodes, self.degree = nodes, degree
        self.order = sorted(
            nodes, key=lambda node: hashlib.sha256(seed + struct.pack("<Q", node)).digest()
        )
        self.position = {node: i for i, node in enumerate(self.order)}
        half, odd = divmod(degree, 2)
        if odd and n % 2:  # no opposite node on an odd ring: one more step each side
            half, odd = half + 1, 0
        self._half, self._opposite = half, bool(odd)

    def neighbours_of(self, node: int) -> list[int]:
        """``node``'s neighbours, sorted (symmetric: v is u's iff u is v's)."""
        n = len(self.order)
        if self.degree == n - 1:
            return [m for m in self.nodes if m != node]
        i = self.position[node]
        peers = {self.order[(i + step) % n] for step in range(1, self._half + 1)}
        peers |= {self.order[(i - step) % n] for step in range(1, self._half + 1)}
        if self._opposite:  # the opposite node on the ring, symmetric for even n
            peers.add(self.order[(i + n // 2) % n])
        return sorted(peers)


def neighbours(node_ids: list[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """Each node's neighbours (sorted), for ``degree`` neighbours per node."""
    ring = Ring(node_ids, degree, seed)
    return {node: ring.neighbours_of(node) for node in ring.nodes}
