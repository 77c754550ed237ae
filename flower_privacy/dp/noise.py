"""Gaussian noise from a CSPRNG-seeded generator, with the output snapped to a grid.

Noise carrying a privacy claim never comes from ``random`` or numpy's global state:
each generator is seeded with 256 bits from the OS CSPRNG (``os.urandom``). The
``seed`` arguments exist for reproducible tests only; a seeded generator gives no
privacy.

Floating point (Mironov, "On Significance of the Least Significant Bits for
Differential Privacy", CCS 2012): the set of doubles that ``x + noise`` can take
depends on ``x``, which an observer of the raw output can exploit. We never release
``x + noise`` as drawn: the result is rounded to a fixed power-of-two grid about
2^-20 of the noise scale. Every grid cell near the data then collects many doubles
whatever ``x`` is, so the low-order bits no longer single out ``x``. This is a
heuristic in the spirit of Mironov's snapping, not his scheme (a grid at the noise
scale plus clamping, proven for the Laplace) and not a proof for the Gaussian; the
distributed placement adds integer noise in integer arithmetic instead.
"""

from __future__ import annotations

import math
import os

import numpy as np

# Grid = 2^(floor(log2(std)) - _GRID_BITS): far below the noise, far above float64 ulps.
_GRID_BITS = 20


def secure_generator(seed: int | None = None) -> np.random.Generator:
    """A numpy generator seeded from the OS CSPRNG; ``seed`` is for reproducible tests only."""
    if seed is None:
        return np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "big")))
    return np.random.Generator(np.random.PCG64DXSM(seed))


def snap(values: np.ndarray, std: float) -> np.ndarray:
    """Round ``values`` to the power-of-two grid for noise of ``std``."""
    grid = 2.0 ** (math.floor(math.log2(std)) - _GRID_BITS)
    return np.round(np.asarray(values, dtype=np.float64) / grid) * grid


def add_gaussian_noise(values: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``values + N(0, std²)`` per coordinate, in float64, snapped to the grid."""
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"noise std must be a finite number > 0, got {std}")
    values = np.asarray(values, dtype=np.float64)
    return snap(values + rng.normal(0.0, std, size=values.shape), std)
