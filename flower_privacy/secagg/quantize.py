"""Fixed-point encoding of weighted updates into uint32, with stochastic rounding.

Each client clips its update to ``[-clip_range, clip_range]`` (counting the clipped
values), multiplies by its integer weight (capped at ``max_weight``), scales, and
rounds stochastically so the encoding is unbiased. The scale is chosen from the
declared limits so that the sum of ``max_clients`` encodings cannot wrap modulo 2^32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from flower_privacy.secagg.prg import uniform_floats

MODULUS = 2**32
_HALF = 2**31


@dataclass(frozen=True)
class Encoded:
    """One client's encoding: values mod 2^32 plus what it had to change."""

    values: np.ndarray
    clipped: int
    weight: int
    weight_capped: bool


class Encoder(Protocol):
    """Anything that turns one client's update into an :class:`Encoded` for masking."""

    def encode(self, update: np.ndarray, weight: int) -> Encoded: ...


@dataclass(frozen=True)
class Quantizer:
    """Declared limits of one secure aggregation, and the scale they allow.

    Parameters
    ----------
    clip_range : float
        Each coordinate of an update is clipped to ``[-clip_range, clip_range]``.
    max_weight : int
        A client's weight (e.g. its example count) is capped at this value.
    max_clients : int
        Most clients whose encodings are ever summed together.
    """

    clip_range: float
    max_weight: int
    max_clients: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if not 1 <= self.max_weight < _HALF:
            raise ValueError(f"max_weight must be in [1, 2^31), got {self.max_weight}")
        if not 1 <= self.max_clients:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if self.max_clients * self.max_weight >= _HALF - self.max_clients:
            raise ValueError(
                f"max_clients * max_weight = {self.max_clients * self.max_weight} leaves no room "
                "in 32 bits: lower max_weight or max_clients"
            )

    @property
    def scale(self) -> float:
        """Units per unit of weighted update; the worst-case sum stays below 2^31."""
        headroom = _HALF - 1 - self.max_clients  # each client may round up by one unit
        return headroom / (self.max_clients * self.max_weight * self.clip_range)

    @property
    def resolution(self) -> float:
        """Largest rounding step of one client's weighted update."""
        return 1.0 / self.scale

    def encode(self, update: np.ndarray, weight: int, *, seed: bytes | None = None) -> Encoded:
        """Encode ``weight * clip(update)``; ``seed`` only for reproducible tests."""
        update = np.asarray(update).reshape(-1)
        if not np.issubdtype(update.dtype, np.floating):
            update = update.astype(np.float64)
        if not np.isfinite(update).all():
            raise ValueError("update has NaN or inf values")
        if int(weight) != weight or weight < 1:
            raise ValueError(f"weight must be an integer >= 1, got {weight}")
        capped = min(int(weight), self.max_weight)
        clipped = int(np.count_nonzero(np.abs(update) > self.clip_range))
        # float64 keeps every integer of the scaled range exact before rounding.
        scaled = np.clip(update, -self.clip_range, self.clip_range).astype(np.float64)
        scaled *= capped * self.scale
        # Stochastic rounding, unbiased: floor(x + U) with U uniform in [0, 1).
        scaled += uniform_floats(seed or os.urandom(32), b"stochastic-rounding", update.size)
        np.floor(scaled, out=scaled)
        return Encoded(
            # int64 -> uint32 wraps modulo 2^32: negatives become their residues.
            values=scaled.astype(np.int64).astype(np.uint32),
            clipped=clipped,
            weight=capped,
            weight_capped=capped != int(weight),
        )

    def decode_sum(self, total: np.ndarray, denominator: float) -> np.ndarray:
        """The mean from a sum of encodings mod 2^32, divided by ``denominator``."""
        if not denominator > 0:
            raise ValueError(f"denominator must be > 0, got {denominator}")
        signed = np.asarray(total, dtype=np.uint32).astype(np.int64)
        signed[signed >= _HALF] -= MODULUS
        return signed / (self.scale * denominator)
