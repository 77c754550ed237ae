"""``client_mods()``: the ClientApp mods for every configuration, installed once.

Mods are built when the ClientApp module is imported, before any run config exists, so
the same list serves every configuration: each mod acts only on its own messages and
passes the rest through. A node declares what it requires in its node config,
``privacy-required = "secagg-groups+dp-distributed"`` (the names of
:class:`~flower_privacy.private.config.PrivacyConfig`), and then refuses every weaker
request. Nothing required: the mods are passive for plain messages.

The requirement is translated into the floors each mod already enforces
(``secagg-required``, ``secagg-min-group-size``, ``secagg-min-noise-multiplier``, the
encryption mod's rule), so that one refusal path exists per mechanism; only
``dp-client``, which no mod enforced, is checked here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.common import log

from flower_privacy import _flwr_compat as compat
from flower_privacy.dp.distributed import ENCODING
from flower_privacy.mods import EncryptionMod, client_clipping_mod, secagg_mod
from flower_privacy.mods.encryption_mod import ContextLocator, EncryptionRule
from flower_privacy.private import matrix
from flower_privacy.private.config import parse_mechanisms
from flower_privacy.secagg import floors
from flower_privacy.wire import dp as dp_wire
from flower_privacy.wire import secagg as secagg_wire

# Node config key: the mechanisms this node requires (a PrivacyConfig name).
REQUIRED = "privacy-required"
# Node config key: answer evaluate messages although a mechanism is required (their
# metrics are outside every mechanism's guarantee).
ALLOW_EVALUATE = "privacy-allow-evaluate"
# Node config key (dp-client): the largest L2 clip norm this node accepts.
MAX_CLIP_NORM = "dp-max-clip-norm"
MOD_NAME = "flower_privacy.private.requirement_mod"
# The least group size "secagg-groups" requires when the node names none.
_MIN_GROUP_SIZE = 2

CallNext = Callable[[Message, Context], Message]


def required_mechanisms(node_config: Mapping[str, object]) -> frozenset[str]:
    """The mechanisms node config :data:`REQUIRED` names (empty if absent).

    Raise ``ValueError`` for a requirement no node can check: ``dp-central`` (the server
    clips and adds noise out of the node's sight) and app code such as ``dp-sgd``.
    """
    raw = node_config.get(REQUIRED, "none")
    try:
        mechanisms = parse_mechanisms(str(raw))
    except ValueError as err:
        raise ValueError(f"node config {REQUIRED}: {err}") from None
    if matrix.DP_CENTRAL in mechanisms:
        raise ValueError(
            f"node config {REQUIRED}: a node cannot check dp-central (the server clips and "
            "adds noise where the node cannot see): require dp-client or dp-distributed"
        )
    if mechanisms & matrix.APP_CODE:
        raise ValueError(
            f"node config {REQUIRED}: {sorted(mechanisms & matrix.APP_CODE)} is the app's own "
            "training code, not a mod's: a node enforces it by running that code"
        )
    return mechanisms


def floors_for(node_config: Mapping[str, object]) -> dict[str, object]:
    """``node_config`` with the secure aggregation floors its requirement implies."""
    mechanisms = required_mechanisms(node_config)
    config = dict(node_config)
    if mechanisms & matrix.SECURE_SUMS:
        config[floors.REQUIRED] = True
    if matrix.SECAGG_GROUPS in mechanisms:
        given = int(config.get(floors.MIN_GROUP_SIZE, 0))  # type: ignore[arg-type]
        config[floors.MIN_GROUP_SIZE] = max(given, _MIN_GROUP_SIZE)
    if matrix.DP_DISTRIBUTED in mechanisms:
        noise = float(config.get(floors.MIN_NOISE_MULTIPLIER, 0.0))  # type: ignore[arg-type]
        if not noise > 0:
            raise ValueError(
                f"node config {REQUIRED} names dp-distributed: also give "
                f"{floors.MIN_NOISE_MULTIPLIER} > 0, the least noise this node accepts"
            )
    if matrix.DP_CLIENT in mechanisms:
        ceiling = config.get(MAX_CLIP_NORM)
        if isinstance(ceiling, bool) or not isinstance(ceiling, int | float) or not ceiling > 0:
            raise ValueError(
                f"node config {REQUIRED} names dp-client: also give {MAX_CLIP_NORM} > 0, the "
                "largest clip norm this node accepts (the server's is its request)"
            )
    return config


def requirement_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Refuse requests weaker than node config :data:`REQUIRED`; hand the floors on."""
    try:
        node_config = floors_for(context.node_config)
    except ValueError as err:
        return _refusal(msg, f"bad node config: {err}")
    mechanisms = required_mechanisms(node_config)
    if not mechanisms:
        return call_next(msg, context)
    category = msg.metadata.message_type.split(".")[0]
    if category not in ("train", "evaluate"):
        # Fail closed: no mod here knows what a query or another type would release.
        problem = f"this node requires {sorted(mechanisms)}: it answers no {category!r} messages"
        log(ERROR, "%s: node %s refused: %s", MOD_NAME, context.node_id, problem)
        return _refusal(msg, problem)
    if category == "evaluate" and not _evaluate_allowed(mechanisms, node_config):
        problem = (
            f"this node requires {sorted(mechanisms)}: an evaluate reply releases its metrics "
            f"on any model the server sends, outside that guarantee (set {ALLOW_EVALUATE} = "
            "true in its node config to answer anyway)"
        )
        log(ERROR, "%s: node %s refused: %s", MOD_NAME, context.node_id, problem)
        return _refusal(msg, problem)
    if matrix.DP_CLIENT in mechanisms and (problem := _unclipped_request(msg, node_config)):
        log(ERROR, "%s: node %s refused: %s", MOD_NAME, context.node_id, problem)
        return _refusal(msg, problem)
    # A copy that shares the node's state: the later mods enforce the implied floors.
    raised = copy.copy(context)
    raised.node_config = node_config
    return call_next(msg, raised)


def _evaluate_allowed(mechanisms: frozenset[str], node_config: Mapping[str, object]) -> bool:
    """HE guards evaluate itself (encrypted models only); the others need the opt-in."""
    if mechanisms <= {matrix.HE}:
        return True
    return node_config.get(ALLOW_EVALUATE) is True


def _unclipped_request(msg: Message, node_config: Mapping[str, object]) -> str | None:
    """Why a train request does not make this node clip its update enough, or None."""
    if msg.metadata.message_type.split(".")[0] != "train" or not msg.has_content():
        return None
    stages = secagg_wire.stages_of(msg.content)
    if stages:
        if secagg_wire.TRAIN not in stages:
            return None  # key set-up or unmasking: no update leaves this node
        masking = secagg_wire.payload_of(msg.content, secagg_wire.MASKING)
        if masking.get("encoding") == ENCODING:
            return None  # distributed DP: the node clips and adds its noise share
        return "this node requires dp-client: the secure sum carries no clipped DP encoding"
    config = msg.content.config_records.get("config")
    if config is None or dp_wire.CLIP_NORM not in config:
        return f"this node requires dp-client: the request sets no {dp_wire.CLIP_NORM}"
    ceiling = float(node_config[MAX_CLIP_NORM])  # type: ignore[arg-type]
    asked = config[dp_wire.CLIP_NORM]
    if isinstance(asked, bool) or not isinstance(asked, int | float) or not 0 < asked <= ceiling:
        return (
            f"this node requires dp-client with a clip norm of at most {ceiling}: the request "
            f"asks {asked!r}"
        )
    return None


def _refusal(msg: Message, reason: str) -> Message:
    return Message(
        Error(
            code=compat.ErrorCode.MOD_FAILED_PRECONDITION, reason=f"{MOD_NAME} refused: {reason}"
        ),
        reply_to=msg,
    )


def client_mods(
    *,
    he_context: str | ContextLocator | None = None,
    require_encryption: EncryptionRule | None = None,
) -> list:
    """The mods, in order, for ``ClientApp(mods=client_mods())``.

    Parameters
    ----------
    he_context : str | callable | None
        Where the node's ``client.ctx`` is (default: node config, then run config,
        ``he-context``), as for :class:`~flower_privacy.mods.EncryptionMod`.
    require_encryption : callable | None
        A further rule ``rule(context) -> bool`` under which plaintext train and
        evaluate messages are refused (node config ``privacy-required`` containing
        ``he`` always is one).
    """

    def encryption_required(context: Context) -> bool:
        if matrix.HE in required_mechanisms(context.node_config):
            return True
        return bool(require_encryption(context)) if require_encryption else False

    # requirement_mod first: it refuses weaker requests and hands on the floors;
    # encryption_mod next, so that the others only ever see plaintext; secagg_mod
    # answers its stages; client_clipping_mod clips when the server asks.
    return [
        requirement_mod,
        EncryptionMod(he_context, require_encryption=encryption_required),
        secagg_mod,
        client_clipping_mod,
    ]
