"""Fixed-point encoding of weighted updates into 32- or 64-bit words, stochastically rounded.

Each client clips its update to ``[-clip_range, clip_range]`` (counting the clipped
values), multiplies by its integer weight (capped at ``max_weight``), scales, and
rounds stochastically so the encoding is unbiased. The scale is chosen from the
declared limits so that the sum of ``max_clients`` encodings cannot wrap modulo
``2^word_bits``. :meth:`Quantizer.for_cohort` picks the word width: 32 bits when the
mean's worst-case rounding error (:attr:`Quantizer.resolution`) stays within the
bound asked for, 64 bits otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from flower_privacy.secagg.prg import uniform_floats

WORD_BITS = (32, 64)
# Largest scaled magnitude of one client's value: float64 holds every integer up to
# 2^53, so floor and fraction stay exact below 2^52.
_EXACT = 2.0**52
# The default bound on the mean's worst-case rounding error, relative to clip_range.
DEFAULT_RELATIVE_ERROR = 1e-3


def word_dtype(word_bits: int) -> np.dtype:
    """The unsigned little-endian dtype of one masked word."""
    if word_bits not in WORD_BITS:
        raise ValueError(f"word_bits must be one of {WORD_BITS}, got {word_bits!r}")
    return np.dtype("<u4" if word_bits == 32 else "<u8")


def stochastic_round(values: np.ndarray, seed: bytes) -> np.ndarray:
    """Round each value down or up, up with probability its fractional part (int64).

    ``floor(x) + [U < x - floor(x)]``: the fraction is exact in float64 at any magnitude,
    so the rounding is unbiased to within 2^-32 (U's step), unlike ``floor(x + U)``,
    whose sum loses U's low bits once x is above 2^21.
    """
    base = np.floor(values)
    up = uniform_floats(seed, b"stochastic-rounding", values.size) < (values - base)
    return base.astype(np.int64) + up


@dataclass(frozen=True)
class Encoded:
    """One client's encoding: words mod 2^bits plus what it had to change."""

    values: np.ndarray
    clipped: int
    weight: int
    weight_capped: bool


class Encoder(Protocol):
    """Anything that turns one client's update into an :class:`Encoded` for masking."""

    @property
    def word_bits(self) -> int: ...

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
    word_bits : int
        32 or 64: the ring ``Z_(2^word_bits)`` the sum is taken in.
    """

    clip_range: float
    max_weight: int
    max_clients: int
    word_bits: int = 32

    def __post_init__(self) -> None:
        half = self._half
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if not 1 <= self.max_weight < half:
            raise ValueError(
                f"max_weight must be in [1, 2^{self.word_bits - 1}), got {self.max_weight}"
            )
        if not 1 <= self.max_clients:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if self.max_clients * self.max_weight >= half - self.max_clients:
            raise ValueError(
                f"max_clients * max_weight = {self.max_clients * self.max_weight} leaves no room "
                f"in {self.word_bits} bits: lower max_weight or max_clients"
            )

    @classmethod
    def for_cohort(
        cls,
        clip_range: float,
        max_weight: int,
        max_clients: int,
        max_error: float | None = None,
    ) -> Quantizer:
        """The narrowest word whose worst-case error of the mean is at most ``max_error``.

        ``max_error`` defaults to ``clip_range * 1e-3``. Raises ``ValueError`` when even
        64 bits cannot meet it.
        """
        if not (np.isfinite(clip_range) and clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {clip_range}")
        if int(max_weight) != max_weight or max_weight < 1:
            raise ValueError(f"max_weight must be an integer >= 1, got {max_weight}")
        bound = clip_range * DEFAULT_RELATIVE_ERROR if max_error is None else max_error
        if not (np.isfinite(bound) and bound > 0):
            raise ValueError(f"max_error must be a finite number > 0, got {bound}")
        for bits in WORD_BITS:
            try:
                candidate = cls(clip_range, max_weight, max_clients, bits)
            except ValueError:
                continue  # no room in this width
            if candidate.resolution <= bound:
                return candidate
        raise ValueError(
            f"no word width keeps the mean's error within {bound:g} for {max_clients} clients "
            f"of weight up to {max_weight} (clip ±{clip_range}): lower max_weight"
        )

    @property
    def _half(self) -> int:
        return 2 ** (word_dtype(self.word_bits).itemsize * 8 - 1)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of one encoded word."""
        return word_dtype(self.word_bits)

    @property
    def scale(self) -> float:
        """Units per unit of weighted update; the worst-case sum stays below half the ring."""
        headroom = self._half - 1 - self.max_clients  # each client may round up by one unit
        fits = headroom / (self.max_clients * self.max_weight * self.clip_range)
        return min(fits, _EXACT / (self.max_weight * self.clip_range))

    @property
    def resolution(self) -> float:
        """Largest rounding step of one client's weighted update.

        Also the worst-case error of the decoded mean per coordinate: each client
        rounds by less than one unit and the denominator is at least the client count.
        """
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
        rounded = stochastic_round(scaled, seed or os.urandom(32))
        return Encoded(
            # int64 -> unsigned wraps modulo 2^bits: negatives become their residues.
            values=rounded.astype(self.dtype),
            clipped=clipped,
            weight=capped,
            weight_capped=capped != int(weight),
        )

    def decode_sum(self, total: np.ndarray, denominator: float) -> np.ndarray:
        """The mean from a sum of encodings mod 2^bits, divided by ``denominator``."""
        if not denominator > 0:
            raise ValueError(f"denominator must be > 0, got {denominator}")
        words = np.asarray(total, dtype=self.dtype)
        # Two's complement: the top half of the ring is the negative sums.
        signed = words.view(np.int32 if self.word_bits == 32 else np.int64)
        return signed.astype(np.float64) / (self.scale * denominator)
