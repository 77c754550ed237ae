"""Key agreement (X25519 + HKDF) and authenticated encryption (ChaCha20-Poly1305)."""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_KEY_BYTES = 32
_PAIR_INFO = b"flower-privacy/secagg/pair/v2|"
_NONCE_BYTES = 12


class DecryptionError(Exception):
    """A ciphertext failed authentication (tampered, misaddressed, or wrong key)."""


def generate_private_key() -> bytes:
    """A fresh X25519 private key (raw 32 bytes, from the OS CSPRNG)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private_key: bytes) -> bytes:
    """Raw 32-byte X25519 public key of ``private_key``."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


class KeyAgreement:
    """One X25519 private key, loaded once, agreeing pair materials with many peers."""

    def __init__(self, private_key: bytes, own_id: int) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private_key)
        self.own_id = own_id

    def material(self, peer_public_key: bytes, peer_id: int, context: bytes) -> bytes:
        """64 bytes this node and ``peer_id`` share, bound to both ids and ``context``.

        Raises ``ValueError`` for a malformed or low-order peer key (an all-zero secret).
        """
        if len(peer_public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(
                f"public key must be {PUBLIC_KEY_BYTES} bytes, got {len(peer_public_key)}"
            )
        if self.own_id == peer_id:
            raise ValueError("a node does not agree a key with itself")
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
        low, high = sorted((self.own_id, peer_id))
        info = _PAIR_INFO + struct.pack("<QQ", low, high) + context
        return HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=info).derive(shared)


def mac(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 tag of ``message``."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def mac_ok(key: bytes, message: bytes, tag: bytes) -> bool:
    """Constant-time check of a :func:`mac` tag."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    try:
        h.verify(tag)
    except InvalidSignature:
        return False
    return True


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt and authenticate; the output is nonce || ciphertext || tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Decrypt what :func:`seal` made; raise :class:`DecryptionError` on any failure."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise DecryptionError()
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data
        )
    except InvalidTag:
        raise DecryptionError() from None
