"""Clipping of a client's model update, fixed or adaptive (Andrew et al., 2021).

The DP unit is one client's whole dataset, so the quantity clipped is the client's
whole model update (its new weights minus the global ones, all arrays together) in
L2 norm. Adaptive clipping follows "Differentially Private Learning with Adaptive
Clipping" (Andrew, Thakkar, McMahan, Ramaswamy; NeurIPS 2021,
https://arxiv.org/abs/1905.03871): the clip norm moves geometrically towards the
``target_quantile`` of the update norms, steered by a noisy count of the clients
whose update was not clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def clip_l2(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """``update`` scaled down to L2 norm ``clip_norm`` if longer; and whether it was.

    Returns a float64 copy. An all-zero update stays zero (no division by zero).
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")
    values = np.asarray(update, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError("update has NaN or inf values")
    norm = float(np.linalg.norm(values))
    if norm <= clip_norm:
        return values.copy(), False
    return values * (clip_norm / norm), True


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al.'s geometric update of the clip norm.

    Parameters
    ----------
    target_quantile : float
        Fraction of clients whose update should fit under the clip norm, in (0, 1).
    learning_rate : float
        η in ``C ← C · exp(-η (b̄ - target_quantile))``, > 0.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"clip learning_rate must be > 0, got {self.learning_rate}")

    def next_clip_norm(self, clip_norm: float, unclipped_fraction: float) -> float:
        """The next clip norm, given the (noisy) fraction of clients not clipped."""
        return clip_norm * math.exp(
            -self.learning_rate * (unclipped_fraction - self.target_quantile)
        )


def noisy_unclipped_fraction(
    unclipped: int, participants: int, expected_clients: float, noise: float
) -> float:
    """b̄ = (Σ (b_i - 1/2) + noise) / m + 1/2, Andrew et al.'s estimate.

    Each participant contributes ``b_i - 1/2`` with ``b_i = 1`` if its update was not
    clipped, so adding or removing a client changes the sum by at most 1/2 (hence the
    ``2·σ_b`` in :func:`~flower_privacy.dp.accounting.adaptive_update_noise`). ``m`` is
    the expected number of clients, fixed before the run, never the observed one.
    """
    if not 0 <= unclipped <= participants:
        raise ValueError(f"unclipped={unclipped} must be in [0, participants={participants}]")
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    return (unclipped - participants / 2 + noise) / expected_clients + 0.5
