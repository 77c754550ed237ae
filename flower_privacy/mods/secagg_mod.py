"""Client side of secure aggregation: a ClientApp mod.

``ClientApp(mods=[secagg_mod])`` is the whole client-side change. The mod answers the
key, prepare, consistency and unmask stages itself; for a training round it lets the
app train, then replaces the plain reply by the masked, quantised, weighted update.
A node whose node config sets ``secagg-required=true``, and any node that has taken
part in secure aggregation in this Flower run, refuses plain training requests.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import log

from flower_privacy import _flwr_compat as compat
from flower_privacy.dp.distributed import ENCODING, DistributedNoiseEncoding
from flower_privacy.secagg import protocol, signing
from flower_privacy.secagg.quantize import Quantizer
from flower_privacy.wire import secagg as wire

_STATE_KEY = "flower-privacy.secagg"


class SecAggMod:
    """The secure aggregation mod, optionally with a rule for refusing to unmask.

    Parameters
    ----------
    unmask_rule : callable, optional
        ``rule(survivors, dropped, cohort)`` returns a reason to refuse an unmask
        request (e.g. an incomplete group), or None to allow it.

    Node config: the security floors of :class:`~flower_privacy.secagg.floors.ClientFloors`
    (``secagg-max-colluders``, ``secagg-min-degree``, ``secagg-min-cohort``,
    ``secagg-min-survivors``, ``secagg-min-group-size``, ``secagg-required``); a signing
    key file (``secagg-signing-key``) and a roster file (``secagg-roster``, from
    ``flower-privacy keys signing``) make the node sign its keys and views and insist on
    the server's consistency check.
    """

    def __init__(self, unmask_rule: protocol.UnmaskRule | None = None) -> None:
        self.unmask_rule = unmask_rule
        self._identities: dict[tuple[str, str], protocol.Identity] = {}

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        # "train" and "train.<action>" both reach the app's training functions.
        if msg.metadata.message_type.split(".")[0] != "train" or not msg.has_content():
            return call_next(msg, context)
        stages = wire.stages_of(msg.content)
        state = _load(context)
        try:
            floors = protocol.ClientFloors.from_node_config(context.node_config)
            identity = self._identity(context)
        except (ValueError, OSError) as err:
            return _error(msg, f"{wire.MOD_NAME}: bad node config: {err}")
        if not stages:
            if floors.required or state.participated:
                return _error(
                    msg,
                    f"{wire.MOD_NAME} refused ({protocol.Refusal.DOWNGRADE}): this node "
                    "requires secure aggregation and never sends a plain update",
                )
            return call_next(msg, context)
        content = RecordDict()
        for stage in [s for s in wire.ORDER if s in stages]:
            request = wire.payload_of(msg.content, stage)
            try:
                reply = self._answer(
                    stage, msg, context, call_next, state, request, floors, identity
                )
            except protocol.RefusedError as err:
                log(
                    WARNING,
                    "secure aggregation: node %s refused %s: %s",
                    context.node_id,
                    stage,
                    err,
                )
                reply = {wire.REFUSED: err.code, wire.DETAIL: err.detail}
            except ValueError as err:  # the app's reply cannot be masked
                _save(context, state)
                return _error(msg, f"{wire.MOD_NAME} ({stage}): {err}")
            if isinstance(reply, Message):
                _save(context, state)
                return reply  # the app's own error reply
            wire.put(content, wire.REPLY_STAGE.get(stage, stage), reply)
        _save(context, state)
        return Message(content, reply_to=msg)

    def _answer(self, stage, msg, context, call_next, state, request, floors, identity):  # noqa: ANN001, ANN202, PLR0913
        if stage == wire.ADVERTISE:
            return protocol.client_advertise(state, request, identity)
        if stage == wire.PREPARE:
            return protocol.client_prepare(state, request, floors, identity)
        if stage == wire.CONSISTENCY:
            if identity is None:
                raise protocol.RefusedError(
                    protocol.Refusal.UNSIGNED,
                    f"the consistency check needs node config {wire.NODE_SIGNING_KEY} "
                    f"and {wire.NODE_ROSTER}",
                )
            return protocol.client_sign(state, request, identity)
        if stage == wire.UNMASK:
            return protocol.client_unmask(
                state, request, self.unmask_rule, identity, floors.max_colluders
            )
        if stage == wire.TRAIN:
            return self._train(msg, context, call_next, state, request, floors)
        raise protocol.RefusedError(protocol.Refusal.BAD_REQUEST, f"unknown stage {stage!r}")

    def _identity(self, context: Context) -> protocol.Identity | None:
        key_path = context.node_config.get(wire.NODE_SIGNING_KEY)
        roster_path = context.node_config.get(wire.NODE_ROSTER)
        if key_path is None and roster_path is None:
            return None
        if key_path is None or roster_path is None:
            raise ValueError(
                f"node config needs both {wire.NODE_SIGNING_KEY} and {wire.NODE_ROSTER}"
            )
        cache_key = (str(key_path), str(roster_path))
        if cache_key not in self._identities:
            self._identities[cache_key] = protocol.Identity(
                signing.read_private_key(Path(str(key_path))),
                frozenset(signing.read_roster(Path(str(roster_path)))),
            )
        return self._identities[cache_key]

    def _train(self, msg, context, call_next, state, request, floors):  # noqa: ANN001, ANN202
        masking_payload = wire.payload_of(msg.content, wire.MASKING)
        masking = wire.Masking.from_payload(masking_payload)
        plain = wire.without_stages(msg.content)
        digest = wire.content_digest(plain, dict(context.run_config), masking_payload)
        global_arrays = plain.array_records[masking.arrays_key]
        msg.content = plain  # the app sees the message a plain FedAvg would send it
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        records = list(reply.content.array_records.values())
        if len(records) != 1:
            raise ValueError(f"the app replied with {len(records)} ArrayRecords, expected 1")
        local = records[0]
        if list(local.keys()) != list(global_arrays.keys()):
            raise ValueError(
                f"the app's arrays {list(local.keys())} differ from the model's "
                f"{list(global_arrays.keys())}"
            )
        deltas = []
        for key, array in global_arrays.items():
            before, after = array.numpy(), local[key].numpy()
            if before.shape != after.shape:
                raise ValueError(f"array {key!r} has shape {after.shape}, expected {before.shape}")
            deltas.append(np.subtract(after, before, dtype=np.float32).reshape(-1))
        metrics = [r for r in reply.content.metric_records.values() if masking.weight_key in r]
        if masking.weighting == "uniform":
            weight = 1
        elif not metrics:
            raise ValueError(f"the app's reply has no metric {masking.weight_key!r} to weight by")
        else:
            weight = int(metrics[0][masking.weight_key])
        quantizer: Quantizer | DistributedNoiseEncoding
        if masking.dp.get("encoding") == ENCODING:
            # Client-level DP: this client's noise share goes into the masked sum.
            if masking.weighting != "uniform":
                raise ValueError("distributed DP needs uniform weighting")
            quantizer = DistributedNoiseEncoding.from_request(masking.dp)
        else:
            quantizer = Quantizer(
                clip_range=masking.clip_range,
                max_weight=masking.max_weight,
                max_clients=masking.max_clients,
                word_bits=masking.word_bits,
            )
        if quantizer.word_bits != masking.word_bits:
            raise ValueError(
                f"the server asked for {masking.word_bits}-bit words, the encoding uses "
                f"{quantizer.word_bits}"
            )
        upload, report = protocol.client_mask(
            state,
            request,
            np.concatenate(deltas),
            weight,
            quantizer,
            digest,
            floors.min_noise_multiplier,
            floors.max_colluders,
        )
        # The report stays on this node: a per-client clipped count is data; the server
        # learns only the masked sum of the counts.
        if report["clipped"] or report["weight-capped"]:
            log(WARNING, "secure aggregation clipped this node's update: %s", report)
        return upload


def _error(msg: Message, reason: str) -> Message:
    return Message(
        Error(code=compat.ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
    )


def _load(context: Context) -> protocol.ClientState:
    record = context.state.config_records.get(_STATE_KEY)
    if record is None:
        return protocol.ClientState(node_id=context.node_id)
    return protocol.ClientState.from_bytes(record["state"])


def _save(context: Context, state: protocol.ClientState) -> None:
    context.state[_STATE_KEY] = ConfigRecord({"state": state.to_bytes()})


secagg_mod = SecAggMod()
"""The default secure aggregation mod: ``ClientApp(mods=[secagg_mod])``."""
