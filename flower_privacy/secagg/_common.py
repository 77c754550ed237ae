"""Definitions shared by the client and server halves of the protocol."""

from __future__ import annotations

from collections.abc import Callable

PROTOCOL = "flower-privacy-secagg/3"
# Slots appended to every masked vector after the model coordinates.
EXTRA_SLOTS = 2  # total weight, clipped values


class Refusal:
    """Structured refusal codes: what an honest node answers instead of a payload.

    The server matches these codes, never the free-text detail beside them.
    """

    BELOW_FLOOR = "below-floor"  # a security parameter under the node's own floor
    REPLAY = "replay"  # another round, a repeated stage, another protocol run
    BAD_REQUEST = "bad-request"  # malformed or self-contradictory lists
    INCONSISTENT_VIEW = "inconsistent-view"  # neighbours saw another model, config or cohort
    BAD_SHARE = "bad-share"  # a sealed package failed authentication or its commitment
    GROUPS = "groups"  # the cohort or survivor list breaks the run's groups
    UNSIGNED = "unsigned"  # too few valid signatures (consistency check)
    VERSION = "version"  # another protocol version
    DOWNGRADE = "downgrade"  # a plain request to a node that requires secure aggregation
    CODES = (
        BELOW_FLOOR,
        REPLAY,
        BAD_REQUEST,
        INCONSISTENT_VIEW,
        BAD_SHARE,
        GROUPS,
        UNSIGNED,
        VERSION,
        DOWNGRADE,
    )


class RefusedError(Exception):
    """An honest node refuses a server request: a :class:`Refusal` code and a detail."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in Refusal.CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


class ProtocolError(Exception):
    """The server cannot complete the round (too few shares, bad uploads, ...)."""


UnmaskRule = Callable[[list[int], list[int], list[int]], "str | None"]
"""``rule(survivors, dropped, cohort)`` returns why a node must refuse, or None."""


def mask_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pairwise mask it shares with ``peer``, -1 if it subtracts it."""
    return 1 if own < peer else -1
