"""The digits app's privacy names: flower-privacy's, plus the app's older spellings.

``privacy = "dp"`` with ``dp-placement`` (central, client, distributed) is read as
``dp-<placement>``, and ``privacy = "secagg"`` with ``secagg-group-size > 0`` as
``secagg-groups``, so that existing run configs keep working. Imported by both the
ServerApp and the ClientApp (no server code here).
"""

from __future__ import annotations

from collections.abc import Mapping

from flower_privacy.private import PrivacyConfig
from flower_privacy.private.config import (
    HE_SERVER_CONTEXT,
    PRIVACY,
    SECAGG_GROUP_SIZE,
    parse_mechanisms,
)
from flower_privacy.private.matrix import SECAGG_GROUPS

PLACEMENT = "dp-placement"
PLACEMENTS = ("central", "client", "distributed")


def privacy_name(run_config: Mapping[str, object]) -> str:
    """The flower-privacy name of the run's privacy (older spellings mapped)."""
    name = str(run_config.get(PRIVACY, "none"))
    if name == "dp":
        placement = str(run_config.get(PLACEMENT, "central"))
        if placement not in PLACEMENTS:
            raise ValueError(f"{PLACEMENT} must be one of {PLACEMENTS}, got {placement!r}")
        return f"dp-{placement}"
    if name == "secagg" and int(run_config.get(SECAGG_GROUP_SIZE, 0)) > 0:  # type: ignore[arg-type]
        return SECAGG_GROUPS
    return name


def mechanisms(run_config: Mapping[str, object]) -> frozenset[str]:
    """The mechanisms of the run (empty for none)."""
    return parse_mechanisms(privacy_name(run_config))


def privacy_config(
    run_config: Mapping[str, object], he_server_context: str | None = None
) -> PrivacyConfig:
    """The run's :class:`PrivacyConfig`; ``he_server_context`` replaces the run config's
    (the ServerApp may have dealt simulation keys)."""
    cfg = {**run_config, PRIVACY: privacy_name(run_config)}
    if he_server_context is not None:
        cfg[HE_SERVER_CONTEXT] = he_server_context
    return PrivacyConfig.from_run_config(cfg)
