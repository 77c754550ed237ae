"""Mask generation: AES-256-CTR keystreams read as uint32 (a CSPRNG, not numpy's RNG).

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


def expand_mask(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values from ``seed`` for ``context``."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    key = derive_key(seed, _MASK_INFO + context)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def uniform_floats(seed: bytes, context: bytes, length: int) -> np.ndarray:
    """``length`` floats uniform in [0, 1) from the same keystream construction."""
    out = expand_mask(seed, context, length).astype(np.float64)
    out *= 1.0 / 2**32
    return out
