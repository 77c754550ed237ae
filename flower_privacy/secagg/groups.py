"""Batch partitioning (So et al., AAAI-23): fixed groups of T nodes, chosen whole.

The partition is a public function of the node ids and the run seed, so every client
can recompute it and check the server's claims against it.
"""

from __future__ import annotations

import functools
import hashlib
import struct


def partition(node_ids: list[int], group_size: int, seed: bytes) -> list[list[int]]:
    """Split ``node_ids`` into groups of exactly ``group_size`` (sorted lists).

    Nodes are ordered by a keyed hash and cut into consecutive groups; the fewer than
    ``group_size`` left over are in no group (they wait for more nodes to join).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    nodes = sorted(set(node_ids))
    if len(nodes) != len(node_ids):
        raise ValueError("node ids must be distinct")
    order = sorted(nodes, key=lambda n: hashlib.sha256(seed + struct.pack("<Q", n)).digest())
    full = len(order) - len(order) % group_size
    return sorted(sorted(order[i : i + group_size]) for i in range(0, full, group_size))


def group_of(groups: list[list[int]]) -> dict[int, int]:
    """Node id -> index of its group."""
    return {node: index for index, members in enumerate(groups) for node in members}


def incomplete_groups(groups: list[list[int]], nodes: list[int]) -> list[list[int]]:
    """Groups of which ``nodes`` hold some members but not all."""
    present = set(nodes)
    return [g for g in groups if 0 < len(present.intersection(g)) < len(g)]


def is_union_of_groups(groups: list[list[int]], nodes: list[int]) -> bool:
    """True if ``nodes`` is exactly a union of whole groups."""
    grouped = group_of(groups)
    return all(n in grouped for n in nodes) and not incomplete_groups(groups, nodes)


def groups_from_generations(
    generations: list[list[int]], group_size: int, seed: bytes
) -> list[list[int]]:
    """All groups of a run: each generation of joining nodes partitioned on its own.

    Generation ``i`` (the nodes that were grouped together) is partitioned with the seed
    ``seed || i``, so groups never change once formed: later joiners only add groups.
    """
    frozen = tuple(tuple(members) for members in generations)
    return [list(group) for group in _groups_of(frozen, group_size, seed)]


# A process answers many prepares with the same generations (a Ray actor runs many
# virtual nodes; a SuperNode prepares every round): hashing every node once is enough.
@functools.lru_cache(maxsize=8)
def _groups_of(
    generations: tuple[tuple[int, ...], ...], group_size: int, seed: bytes
) -> tuple[tuple[int, ...], ...]:
    seen: set[int] = set()
    result: list[tuple[int, ...]] = []
    for index, members in enumerate(generations):
        if seen.intersection(members):
            raise ValueError("a node appears in two generations")
        seen.update(members)
        parts = partition(list(members), group_size, seed + index.to_bytes(4, "little"))
        if sum(len(g) for g in parts) != len(members):
            raise ValueError(f"generation {index} is not a multiple of the group size")
        result.extend(tuple(g) for g in parts)
    return tuple(result)


def flatten(generations: list[list[int]]) -> tuple[list[int], list[int]]:
    """Generations as two flat lists (nodes, sizes), as messages carry them."""
    return [n for g in generations for n in g], [len(g) for g in generations]


def unflatten(nodes: list[int], sizes: list[int]) -> list[list[int]]:
    """Inverse of :func:`flatten`."""
    if sum(sizes) != len(nodes) or any(s < 0 for s in sizes):
        raise ValueError("generation sizes do not add up to the node list")
    out, start = [], 0
    for size in sizes:
        out.append(list(nodes[start : start + size]))
        start += size
    return out
