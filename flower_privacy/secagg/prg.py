"""Mask generation: AES-256-CTR keystreams read as uint32 or uint64 words (a CSPRNG).

Each mask key is derived with HKDF-SHA256 from a full-entropy 32-byte seed and a
context naming its purpose, run and round, so that no key is ever used twice and the
counter-mode nonce can be fixed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)
_MASK_INFO = b"flower-privacy/secagg/mask/v1|"


def derive_key(seed: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of a 32-byte ``seed`` for the purpose named by ``info``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(seed)


class MaskBuffer:
    """Room for masks of one length: each :meth:`expand` overwrites the same words.

    Masks are the protocol's bulk work (a client expands k + 1 a round, the server one
    per survivor and per dropped pair); writing them into one buffer saves allocating
    and faulting in fresh pages for every one.
    """

    def __init__(self, length: int, word_bits: int = 32) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if word_bits not in (32, 64):
            raise ValueError(f"word_bits must be 32 or 64, got {word_bits!r}")
        self.word_bits = word_bits
        size = word_bits // 8 * length
        self._zeros = memoryview(bytes(size))
        # update_into wants room for one more block than it writes.
        self._out = bytearray(size + 15)
        self.words = np.frombuffer(self._out, dtype=f"<u{word_bits // 8}", count=length)

    def expand(self, seed: bytes, context: bytes) -> np.ndarray:
        """The mask of ``seed`` for ``context`` (valid until the next call)."""
        # The width is part of the key's purpose: a 64-bit mask never shares a keystream
        # with a 32-bit one.
        info = _MASK_INFO + (b"" if self.word_bits == 32 else b"u64|") + context
        cipher = Cipher(algorithms.AES(derive_key(seed, info)), modes.CTR(_ZERO_NONCE))
        encryptor = cipher.encryptor()
        encryptor.update_into(self._zeros, self._out)
        encryptor.finalize()
        return self.words


def expand_mask(seed: bytes, context: bytes, length: int, word_bits: int = 32) -> np.ndarray:
    """``length`` uniform words of ``word_bits`` (32 or 64) from ``seed`` for ``context``."""
    return MaskBuffer(length, word_bits).expand(seed, context)


def uniform_floats(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` floats uniform in [0, 1) from the same keystream construction."""
    out = expand_mask(seed, context, length).astype(np.float64)
    out *= 1.0 / 2**32
    return out
