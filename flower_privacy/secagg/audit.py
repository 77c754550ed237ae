"""How many clients any combination of round aggregates mixes (multi-round privacy).

Round ``r``'s aggregate is the sum of the updates of the nodes in row ``r`` of the 0/1
participation matrix P (rounds x nodes). Whatever linear combination of aggregates the
server forms, its coefficients on the nodes are a vector of P's row space; privacy T is
the smallest number of nodes such a non-zero vector can involve (So et al., AAAI-23).

- Lower bound: nodes whose columns are identical receive identical coefficients in every
  row-space vector, so no combination separates them: T is at least the smallest such
  class among nodes that ever took part. Cheap, always computed.
- Exact T: the smallest total size of a set S of classes for which some row-space vector
  vanishes outside S, i.e. rank(P) > rank(P restricted to the other classes). Searched
  by increasing size over subsets of classes while that stays cheap.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Audit:
    """The audit of one participation matrix."""

    lower_bound: int  # smallest class of identical participation histories (0: nobody yet)
    exact: int | None  # exact T if the search finished, else None
    classes: int  # number of distinct non-zero participation histories


def _classes(participation: np.ndarray) -> list[np.ndarray]:
    """Columns grouped by identical history (all-zero columns left out)."""
    columns = participation.T
    seen: dict[bytes, list[int]] = {}
    for index, column in enumerate(columns):
        if column.any():
            seen.setdefault(column.tobytes(), []).append(index)
    return [np.array(members) for members in seen.values()]


def audit(participation: np.ndarray, max_subsets: int = 20_000) -> Audit:
    """Audit ``participation`` (rounds x nodes, 0/1)."""
    matrix = np.asarray(participation, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"participation must be a 2-D matrix, got shape {matrix.shape}")
    classes = _classes(matrix)
    if not classes:
        return Audit(lower_bound=0, exact=0, classes=0)
    sizes = [len(c) for c in classes]
    # One column per class: identical columns add nothing to the rank.
    reduced = np.stack([matrix[:, c[0]] for c in classes], axis=1)
    full_rank = np.linalg.matrix_rank(reduced)
    order = sorted(range(len(classes)), key=lambda j: sizes[j])
    checked = 0
    best: int | None = None
    for count in range(1, len(classes) + 1):
        for subset in itertools.combinations(order, count):
            weight = sum(sizes[j] for j in subset)
            if best is not None and weight >= best:
                continue
            checked += 1
            if checked > max_subsets:
                return Audit(
                    lower_bound=min(sizes),
                    exact=best if best == min(sizes) else None,
                    classes=len(classes),
                )
            rest = [j for j in range(len(classes)) if j not in subset]
            rest_rank = np.linalg.matrix_rank(reduced[:, rest]) if rest else 0
            if full_rank > rest_rank:
                best = weight
        # Any subset of count + 1 classes weighs at least the count + 1 smallest.
        if best is not None and best <= sum(sorted(sizes)[: count + 1]):
            break
    return Audit(lower_bound=min(sizes), exact=best, classes=len(classes))
