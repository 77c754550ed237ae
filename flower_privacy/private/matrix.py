"""Which privacy mechanisms compose: the composition matrix, defined once.

:class:`~flower_privacy.private.config.PrivacyConfig` refuses a configuration through
:func:`check`; the README's matrix is :func:`markdown_table`; the tests walk every cell.
A cell is ``valid``, ``invalid`` (the maths forbids it: the reason names the conflict
and the fix) or ``not-yet`` (sound in principle: the reason says what it would take).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from flower_privacy.errors import FlowerPrivacyError

NONE = "none"
SECAGG = "secagg"
SECAGG_GROUPS = "secagg-groups"
DP_CENTRAL = "dp-central"
DP_CLIENT = "dp-client"
DP_DISTRIBUTED = "dp-distributed"
HE = "he"
DP_SGD = "dp-sgd"
# In the order a configuration's name lists them ("secagg-groups+dp-distributed").
MECHANISMS = (SECAGG, SECAGG_GROUPS, HE, DP_CENTRAL, DP_CLIENT, DP_DISTRIBUTED, DP_SGD)
SEPARATOR = "+"
SECURE_SUMS = frozenset({SECAGG, SECAGG_GROUPS})
CLIENT_LEVEL_DP = frozenset({DP_CENTRAL, DP_CLIENT, DP_DISTRIBUTED})
# Applied by the ClientApp's own training code, not by a mod or a server wrapper.
APP_CODE = frozenset({DP_SGD})

VALID, INVALID, NOT_YET = "valid", "invalid", "not-yet"


class InvalidCompositionError(FlowerPrivacyError, ValueError):
    """Two mechanisms that cannot be combined (the maths forbids it)."""


class NotSupportedYetError(FlowerPrivacyError, ValueError):
    """Two mechanisms that could be combined, but flower-privacy does not do it yet."""


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: a status and, unless valid, why."""

    status: str
    reason: str = ""


_SECAGG_TWICE = Cell(
    INVALID,
    "secagg-groups is secure aggregation with groups: choose one of secagg or secagg-groups",
)
_HE_AND_SECAGG = Cell(
    INVALID,
    "both replace the update's encoding, and each alone already hides every update from "
    "the server: choose he (encrypted sum, clients hold the key) or secagg (masked sum, "
    "the server sees the aggregate)",
)
_CENTRAL_HIDDEN = Cell(
    INVALID,
    "dp-central needs the server to see each update to clip it, which {other} hides: use "
    "{fix} (clients clip and add noise shares inside secure aggregation)",
)
_CLIENT_UNDER_SECAGG = Cell(
    NOT_YET,
    "server noise after secure aggregation would be calibrated for the clip norm, but the "
    "fixed-point rounding adds up to sqrt(d)/scale to each update's norm; it would take "
    "the distributed encoding's bounded rounding with no client noise and server noise "
    "for the rounded bound. Use dp-distributed today",
)
_CLIENT_UNDER_HE = Cell(
    NOT_YET,
    "the server holds only the encrypted sum, so its noise must be encrypted too; it "
    "would take clipping before encryption (client_clipping_mod inside encryption_mod) "
    "and server noise encrypted under the public context, quantised as the updates are",
)
_DISTRIBUTED_UNDER_HE = Cell(
    NOT_YET,
    "it would take integer noise shares (Skellam) added inside the BFV encoding, with "
    "the accounting for the encrypted sum's rounding; today noise shares exist only in "
    "secure aggregation's encoding",
)
_ONE_PLACEMENT = Cell(
    INVALID,
    "client-level DP has one noise placement per run: choose one of dp-central, "
    "dp-client, dp-distributed",
)
_DP_SGD_ANYWHERE = Cell(
    VALID,
    "DP-SGD is app code (Opacus in the ClientApp): its sample-level guarantee holds "
    "whatever the server does; under secagg or he the server no longer sees each "
    "client's reported ε",
)


def cell(first: str, second: str) -> Cell:
    """The matrix cell of two distinct mechanisms (order does not matter)."""
    for name in (first, second):
        if name not in MECHANISMS:
            raise ValueError(f"unknown mechanism {name!r}: one of {MECHANISMS}")
    if first == second:
        raise ValueError(f"{first!r} named twice")
    pair = frozenset({first, second})
    if DP_SGD in pair:
        return _DP_SGD_ANYWHERE
    if pair == SECURE_SUMS:
        return _SECAGG_TWICE
    if HE in pair and pair & SECURE_SUMS:
        return _HE_AND_SECAGG
    if len(pair & CLIENT_LEVEL_DP) == 2:
        return _ONE_PLACEMENT
    other = next(iter(pair - {DP_CENTRAL}), "")
    if DP_CENTRAL in pair:
        fix = "secagg+dp-distributed instead of he" if other == HE else "dp-distributed"
        return Cell(INVALID, _CENTRAL_HIDDEN.reason.format(other=other, fix=fix))
    if DP_CLIENT in pair:
        return _CLIENT_UNDER_SECAGG if pair & SECURE_SUMS else _CLIENT_UNDER_HE
    if DP_DISTRIBUTED in pair:
        return Cell(VALID) if pair & SECURE_SUMS else _DISTRIBUTED_UNDER_HE
    raise AssertionError(f"no rule for {sorted(pair)}")  # every pair is covered above


def check(mechanisms: frozenset[str]) -> None:
    """Raise the error of the first invalid or unsupported pair in ``mechanisms``."""
    ordered = [m for m in MECHANISMS if m in mechanisms]
    for first, second in combinations(ordered, 2):
        found = cell(first, second)
        if found.status == INVALID:
            raise InvalidCompositionError(f"{first}+{second} is invalid: {found.reason}")
        if found.status == NOT_YET:
            raise NotSupportedYetError(f"{first}+{second} is not supported yet: {found.reason}")


def markdown_table() -> str:
    """The matrix as a Markdown table (the README holds this text; a test compares)."""
    symbol = {VALID: "✓", INVALID: "✗", NOT_YET: "…"}
    lines = [
        "| | " + " | ".join(MECHANISMS) + " |",
        "|---|" + "---|" * len(MECHANISMS),
    ]
    for row in MECHANISMS:
        cells = ["·" if row == col else symbol[cell(row, col).status] for col in MECHANISMS]
        lines.append(f"| **{row}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reasons() -> list[str]:
    """One line per distinct reason, naming its pairs (for the README)."""
    pairs: dict[Cell, list[str]] = {}
    for first, second in combinations(MECHANISMS, 2):
        found = cell(first, second)
        if found.reason:
            pairs.setdefault(found, []).append(f"`{first}+{second}`")
    return [f"- {', '.join(p)}: **{c.status}**: {c.reason}." for c, p in pairs.items()]
