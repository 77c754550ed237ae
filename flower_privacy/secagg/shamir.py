"""Shamir secret sharing of 32-byte secrets, vectorised with numpy.

Secrets are cut into 16-bit limbs; each limb is shared with its own random polynomial
over the prime field GF(2^31 - 1), so every product fits in int64 and all limbs and
shares are evaluated at once. Any ``threshold`` shares rebuild a secret; fewer reveal
nothing about it (each limb is an independent Shamir sharing).
"""

from __future__ import annotations

import functools
import os
import struct

import numpy as np

PRIME = 2**31 - 1
SECRET_BYTES = 32
LIMBS = SECRET_BYTES // 2
SHARE_BYTES = 4 + 4 * LIMBS


class ShareError(ValueError):
    """Shares that cannot rebuild a secret (too few, duplicated or inconsistent)."""


def _random_field_elements(count: int) -> np.ndarray:
    """``count`` uniform elements of GF(PRIME) from the OS CSPRNG (rejection sampling)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        raw = np.frombuffer(os.urandom(4 * (count - out.size) + 64), dtype="<u4")
        candidates = (raw & 0x7FFFFFFF).astype(np.int64)
        out = np.concatenate([out, candidates[candidates < PRIME]])
    return out[:count]


def split(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """Share ``secret`` (32 bytes) so that any ``threshold`` of ``num_shares`` rebuild it.

    Share ``i`` (0-based) is the polynomials evaluated at x = i + 1, encoded as bytes.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(
            f"need 1 <= threshold <= num_shares, got threshold={threshold}, num_shares={num_shares}"
        )
    if num_shares >= PRIME:
        raise ValueError(f"num_shares must be < {PRIME}, got {num_shares}")
    limbs = np.frombuffer(secret, dtype="<u2").astype(np.int64)
    # coefficients[d] is the degree-d coefficient of every limb's polynomial.
    coefficients = np.vstack(
        [limbs, _random_field_elements((threshold - 1) * LIMBS).reshape(-1, LIMBS)]
    )
    xs = np.arange(1, num_shares + 1, dtype=np.int64)[:, None]
    values = np.zeros((num_shares, LIMBS), dtype=np.int64)
    for coefficient in coefficients[::-1]:  # Horner, reducing at each step
        values = (values * xs + coefficient) % PRIME
    return [struct.pack("<I", i + 1) + values[i].astype("<u4").tobytes() for i in range(num_shares)]


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """Lagrange coefficients at x = 0 for the share indices ``xs``.

    Cached: a server rebuilds n secrets a round, most from the same few index sets.
    """
    coefficients = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        coefficients.append(num * pow(den, PRIME - 2, PRIME) % PRIME)
    out = np.array(coefficients, dtype=np.int64)
    out.flags.writeable = False  # shared by every caller of the cache
    return out


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Rebuild a secret from at least ``threshold`` shares (the first ``threshold`` used)."""
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    table = _decode(shares[:threshold])
    xs = tuple(int(x) for x in table[:, 0])
    if len(set(xs)) != len(xs):
        raise ShareError("duplicate share indices")
    values = table[:, 1:]
    # Each product is below 2^62; reduced, t of them sum far below 2^63.
    terms = (_lagrange_at_zero(xs)[:, None] * values) % PRIME
    secret = terms.sum(axis=0) % PRIME
    if np.any(secret >= 2**16):
        raise ShareError("shares are inconsistent (a limb is out of range)")
    return secret.astype("<u2").tobytes()


def _decode(shares: list[bytes]) -> np.ndarray:
    """One row per share: its index x, then its limb values (all checked in the field)."""
    for share in shares:
        if len(share) != SHARE_BYTES:
            raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    table = np.frombuffer(b"".join(shares), dtype="<u4").reshape(len(shares), 1 + LIMBS)
    table = table.astype(np.int64)
    if np.any(table[:, 0] == 0) or np.any(table >= PRIME):
        raise ShareError("share value outside the field")
    return table
