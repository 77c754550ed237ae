"""Plaintext side of encrypted FedAvg: model layout, packing into slots, quantisation.

Every model is flattened into one vector and cut into chunks of ``slots - 1`` values;
each chunk's slot 0 is a *canary*: chunk ``j`` carries ``1 + (j mod C)``, so that in an
aggregate of K contributions chunk ``j``'s canary must decrypt to ``K * (1 + (j mod C))``
(a chunk moved to another position is caught unless the positions differ by a multiple
of C; the engine sets C to the largest value one client may put in a slot, so the
canaries fit the capacity the declared limits already reserve). The first chunk also
carries the client's weight (its example count, capped) and its count of clipped values:

    chunk 0: [canary 1, weight, clipped, v0, v1, ...]
    chunk j: [canary 1 + (j mod C), v..., ...]

Stochastic rounding draws its randomness from the OS CSPRNG (``os.urandom``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flower_privacy.he.errors import HEConfigError
from flower_privacy.he.presets import DeclaredLimits

HEADER_SLOTS = 2  # weight, clipped count (in chunk 0, after its canary)


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's arrays, in order (public information)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise HEConfigError("a model needs at least one array")
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise HEConfigError("layout names, shapes and dtypes differ in length")
        if len(set(self.names)) != len(self.names):
            raise HEConfigError(f"array names repeat: {list(self.names)}")
        for name, dtype in zip(self.names, self.dtypes, strict=True):
            if dtype not in ("float16", "float32", "float64"):
                raise HEConfigError(
                    f"array {name!r} has dtype {dtype}: encrypted FedAvg averages floating "
                    "arrays only (float16, float32, float64)"
                )

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``arrays``."""
        return cls(
            tuple(arrays),
            tuple(tuple(int(d) for d in np.shape(a)) for a in arrays.values()),
            tuple(str(np.asarray(a).dtype) for a in arrays.values()),
        )

    @property
    def size(self) -> int:
        """Number of values in the model."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """All values as one float64 vector; raises naming a missing or misshapen array."""
        if list(arrays) != list(self.names):
            raise HEConfigError(
                f"the arrays {list(arrays)} differ from the model's {list(self.names)}"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            values = np.asarray(arrays[name])
            if values.shape != shape:
                raise HEConfigError(f"array {name!r} has shape {values.shape}, expected {shape}")
            parts.append(values.astype(np.float64, copy=False).reshape(-1))
        return np.concatenate(parts)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Split a vector of :attr:`size` values into the model's arrays and dtypes."""
        if flat.shape != (self.size,):
            raise HEConfigError(f"expected {self.size} values, got shape {flat.shape}")
        out, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
            offset += size
        return out

    def to_json(self) -> list:
        """JSON-ready form."""
        return [
            [n, list(s), d] for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)
        ]

    @classmethod
    def from_json(cls, items: list) -> Layout:
        """Inverse of :meth:`to_json`."""
        return cls(
            tuple(str(i[0]) for i in items),
            tuple(tuple(int(d) for d in i[1]) for i in items),
            tuple(str(i[2]) for i in items),
        )


def chunk_lengths(n_values: int, slots: int) -> list[int]:
    """Slot counts of the chunks holding ``n_values`` values (canaries and header included)."""
    payload = n_values + HEADER_SLOTS
    per_chunk = slots - 1
    full, rest = divmod(payload, per_chunk)
    return [slots] * full + ([rest + 1] if rest else [])


def canaries(n_chunks: int, cycle: int) -> np.ndarray:
    """The canary of each of ``n_chunks`` chunks in one contribution: ``1 + (j mod cycle)``."""
    if cycle < 1:
        raise HEConfigError(f"the canary cycle must be >= 1, got {cycle}")
    return 1 + np.arange(n_chunks, dtype=np.int64) % cycle


def pack(header: np.ndarray, values: np.ndarray, slots: int, cycle: int) -> list[np.ndarray]:
    """Cut ``header + values`` into chunks of ``slots - 1``, chunk j led by its canary."""
    payload = np.concatenate([header.astype(values.dtype), values])
    per_chunk = slots - 1
    starts = range(0, len(payload), per_chunk)
    marks = canaries(len(starts), cycle).astype(values.dtype)
    return [
        np.concatenate([marks[j : j + 1], payload[start : start + per_chunk]])
        for j, start in enumerate(starts)
    ]


def unpack(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(canaries, header, values)`` from decrypted chunks."""
    canaries = np.array([c[0] for c in chunks])
    payload = np.concatenate([c[1:] for c in chunks])
    return canaries, payload[:HEADER_SLOTS], payload[HEADER_SLOTS:]


def clip(values: np.ndarray, clip_range: float) -> tuple[np.ndarray, int]:
    """Values clipped to ``±clip_range`` and how many were clipped; refuses NaN and inf."""
    if not np.isfinite(values).all():
        raise HEConfigError("the model holds NaN or infinite values: refusing to encrypt them")
    clipped = int(np.count_nonzero(np.abs(values) > clip_range))
    return np.clip(values, -clip_range, clip_range), clipped


def quantize(
    values: np.ndarray, weight: int, limits: DeclaredLimits, *, test_seed: int | None = None
) -> tuple[np.ndarray, int]:
    """BFV encoding of one client's weighted values: ``(int64 vector, clipped count)``.

    Each value is clipped to ``±clip_range``, multiplied by ``weight`` and rounded
    stochastically (unbiased) to an integer number of ``2**-precision_bits`` steps,
    so that ``|q| <= limits.max_quantized``.

    ``test_seed`` makes the rounding reproducible **for tests only**: it replaces the
    OS CSPRNG by numpy's PCG64. Never pass it in a federation.
    """
    clipped_values, clipped = clip(values, limits.clip_range)
    scaled = clipped_values * (float(weight) * 2.0**limits.precision_bits)
    low = np.floor(scaled)
    uniform = uniform_01(len(values), test_seed=test_seed)
    rounded = (low + (uniform < (scaled - low))).astype(np.int64)
    np.clip(rounded, -limits.max_quantized, limits.max_quantized, out=rounded)
    return rounded, clipped


def uniform_01(n: int, *, test_seed: int | None = None) -> np.ndarray:
    """``n`` uniform floats in [0, 1) with 32-bit resolution, from ``os.urandom``.

    ``test_seed``: numpy PCG64 instead, **for tests only**.
    """
    if test_seed is not None:
        raw = np.random.Generator(np.random.PCG64(test_seed)).bytes(4 * n)
    else:
        raw = os.urandom(4 * n)
    return np.frombuffer(raw, dtype=np.uint32) * (1.0 / 2**32)
