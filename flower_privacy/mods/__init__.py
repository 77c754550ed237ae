"""ClientApp mods."""

from flower_privacy.mods.client_clipping_mod import client_clipping_mod
from flower_privacy.mods.encryption_mod import EncryptionMod, encryption_mod
from flower_privacy.mods.secagg_mod import SecAggMod, secagg_mod

__all__ = [
    "EncryptionMod",
    "SecAggMod",
    "client_clipping_mod",
    "encryption_mod",
    "secagg_mod",
]
