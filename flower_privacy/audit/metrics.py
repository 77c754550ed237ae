"""Image-quality metrics of a reconstruction against the true inputs.

PSNR and SSIM come from scikit-image. A reconstruction attack yields a set of
candidate inputs; :func:`match` pairs candidates with true inputs one to one
(Hungarian assignment on PSNR), so that one good candidate never counts twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

# An exact reconstruction has infinite PSNR; JSON has no infinity, so PSNR is capped.
PSNR_CAP_DB = 100.0


def psnr(true: np.ndarray, estimate: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (capped at :data:`PSNR_CAP_DB`)."""
    mse = float(np.mean((np.asarray(true, np.float64) - np.asarray(estimate, np.float64)) ** 2))
    if mse <= data_range**2 * 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return float(10 * np.log10(data_range**2 / mse))


def ssim(
    true: np.ndarray, estimate: np.ndarray, shape: tuple[int, int], data_range: float = 1.0
) -> float:
    """Structural similarity of two images given as flat rows of ``shape``."""
    a = np.asarray(true, np.float64).reshape(shape)
    b = np.asarray(estimate, np.float64).reshape(shape)
    win = min(7, *(s if s % 2 else s - 1 for s in shape))
    return float(structural_similarity(a, b, data_range=data_range, win_size=win))


@dataclass(frozen=True)
class Match:
    """True inputs paired with their best candidates (one candidate per true input)."""

    true_index: np.ndarray  # indices into the true inputs, best PSNR first
    candidate_index: np.ndarray
    psnr: np.ndarray  # dB, per pair
    ssim: np.ndarray

    def count_above(self, threshold_db: float) -> int:
        """How many true inputs were reconstructed above ``threshold_db``."""
        return int(np.sum(self.psnr >= threshold_db))

    @property
    def best_psnr(self) -> float:
        return float(self.psnr.max()) if self.psnr.size else 0.0


def match(
    true: np.ndarray, candidates: np.ndarray, shape: tuple[int, int], data_range: float = 1.0
) -> Match:
    """Pair each true input with at most one candidate, maximising total PSNR.

    Candidates are clipped to the data range first (an attacker knows it).
    """
    true = np.asarray(true, np.float64).reshape(len(true), -1)
    cands = np.clip(np.asarray(candidates, np.float64).reshape(len(candidates), -1), 0, data_range)
    if len(true) == 0 or len(cands) == 0:
        empty = np.zeros(0)
        return Match(empty.astype(int), empty.astype(int), empty, empty)
    mse = ((true[:, None, :] - cands[None, :, :]) ** 2).mean(axis=2)
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)
    table = 10 * np.log10(data_range**2 / np.maximum(mse, floor))
    rows, cols = linear_sum_assignment(-table)
    scores = table[rows, cols]
    order = np.argsort(-scores)
    rows, cols, scores = rows[order], cols[order], scores[order]
    pairs = zip(rows, cols, strict=True)
    sims = np.array([ssim(true[r], cands[c], shape, data_range) for r, c in pairs])
    return Match(rows, cols, scores, sims)


def random_baseline(true: np.ndarray, count: int, shape: tuple[int, int], seed: int = 0) -> Match:
    """The match ``count`` uniformly random images reach: what "nothing recovered" scores."""
    rng = np.random.default_rng(seed)
    return match(true, rng.uniform(0, 1, size=(max(count, 1), np.prod(shape))), shape)
