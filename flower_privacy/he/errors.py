"""Exceptions of the homomorphic-encryption core."""

from __future__ import annotations


class HEConfigError(ValueError):
    """A declared configuration or parameter is out of range; the message names it."""


class CapacityError(HEConfigError):
    """The declared limits exceed what the encryption parameters can hold without wrapping."""


class KeyRoleError(ValueError):
    """A context has the wrong role: a secret key where only a public one belongs, or none."""


class InvalidCiphertext(Exception):  # noqa: N818 - named like cryptography's InvalidToken
    """Encrypted data failed verification and was not used.

    The message names the check that failed (wrong key, malformed or truncated bytes,
    a layout that does not match the model, a failed canary) and never includes key
    material or decrypted values.
    """
