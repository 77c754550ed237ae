"""Homomorphic encryption for FedAvg (TenSEAL): presets, keys, packing, add-only aggregation.

Knows nothing of Flower: numpy arrays and bytes in and out. The Flower seams are
:class:`flower_privacy.strategies.EncryptedFedAvg` and :mod:`flower_privacy.mods.encryption_mod`.
"""

from flower_privacy.he.codec import Layout
from flower_privacy.he.engine import (
    DecryptedModel,
    EncryptedUpdate,
    LoadedUpdate,
    add_updates,
    decrypt_model,
    encrypt_model,
    encrypt_public_model,
    load_update,
    sum_updates,
)
from flower_privacy.he.envelope import Envelope
from flower_privacy.he.errors import CapacityError, HEConfigError, InvalidCiphertext, KeyRoleError
from flower_privacy.he.keys import CLIENT_CONTEXT, SERVER_CONTEXT, HEContext, generate_keys
from flower_privacy.he.pool import EncryptionPool, default_workers
from flower_privacy.he.presets import (
    DEFAULT_PRESET,
    PRESETS,
    DeclaredLimits,
    HEParameters,
    derive_parameters,
    precision_bound,
)

__all__ = [
    "CLIENT_CONTEXT",
    "DEFAULT_PRESET",
    "PRESETS",
    "SERVER_CONTEXT",
    "CapacityError",
    "DecryptedModel",
    "DeclaredLimits",
    "EncryptedUpdate",
    "EncryptionPool",
    "Envelope",
    "HEConfigError",
    "HEContext",
    "HEParameters",
    "InvalidCiphertext",
    "KeyRoleError",
    "Layout",
    "LoadedUpdate",
    "add_updates",
    "decrypt_model",
    "default_workers",
    "derive_parameters",
    "encrypt_model",
    "encrypt_public_model",
    "generate_keys",
    "load_update",
    "precision_bound",
    "sum_updates",
]
