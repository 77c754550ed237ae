"""ClientApp mods."""

from flower_privacy.mods.secagg_mod import SecAggMod, secagg_mod

__all__ = ["SecAggMod", "secagg_mod"]
