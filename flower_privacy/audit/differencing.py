"""Least-squares differencing: per-client updates from the round aggregates the server saw.

With a fixed update ``u_i`` per client, round ``r``'s change of the global model is the
mean of the participants' updates: ``release_r = sum_i P[r, i] u_i / sum_i P[r, i]``
(clients weighted equally). The server knows ``P`` (who took part) and every release, so
it solves ``rows @ U = releases`` for ``U`` by least squares (the minimum-norm solution
where ``P`` leaves clients tied). A client whose column the row space isolates comes out
exactly; clients that always take part together come out as a mix of their updates.
"""

from __future__ import annotations

import numpy as np


def estimate_updates(participation: np.ndarray, releases: np.ndarray) -> np.ndarray:
    """Per-client update estimates (nodes x dim) from rounds x nodes ``participation``
    and rounds x dim ``releases`` (each round's change of the global model)."""
    matrix = np.asarray(participation, dtype=np.float64)
    releases = np.asarray(releases, dtype=np.float64)
    if matrix.ndim != 2 or releases.ndim != 2 or matrix.shape[0] != releases.shape[0]:
        raise ValueError(
            f"participation (rounds x nodes) and releases (rounds x dim) disagree: "
            f"shapes {matrix.shape} and {releases.shape}"
        )
    counts = matrix.sum(axis=1, keepdims=True)
    if (counts == 0).any():
        raise ValueError("a round without participants has no aggregate to difference")
    estimate, *_ = np.linalg.lstsq(matrix / counts, releases, rcond=None)
    return estimate


def cosines(estimates: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (0 where either row is zero)."""
    estimates, true = np.asarray(estimates, np.float64), np.asarray(true, np.float64)
    norms = np.linalg.norm(estimates, axis=1) * np.linalg.norm(true, axis=1)
    dots = np.einsum("ij,ij->i", estimates, true)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def score(
    participation: np.ndarray, releases: np.ndarray, true: np.ndarray
) -> tuple[np.ndarray, float]:
    """Each client's estimate's cosine to its ``true`` update (nodes x dim), and the
    baseline without differencing: the best cosine of the mean release to a true update."""
    found = cosines(estimate_updates(participation, releases), true)
    mean = np.broadcast_to(np.asarray(releases, np.float64).mean(axis=0), np.shape(true))
    return found, float(cosines(mean, true).max())
