"""Client side of secure aggregation: a ClientApp mod.

``ClientApp(mods=[secagg_mod])`` is the whole client-side change. The mod answers the
key set-up and unmasking stages itself; for a training round it lets the app train,
then replaces the plain reply by the masked, quantised, weighted update.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import log

from flower_privacy import _flwr_compat as compat
from flower_privacy import _secagg_wire as wire
from flower_privacy.dp.distributed import ENCODING, DistributedNoiseEncoding
from flower_privacy.secagg import protocol, signing
from flower_privacy.secagg.quantize import Quantizer

_STATE_KEY = "flower-privacy.secagg"


class SecAggMod:
    """The secure aggregation mod, optionally with a rule for refusing to unmask.

    Parameters
    ----------
    unmask_rule : callable, optional
        ``rule(survivors, dropped, cohort)`` returns a reason to refuse an unmask
        request (e.g. an incomplete group), or None to allow it.

    A node whose node config names a signing key file (``secagg-signing-key``) and a
    roster file (``secagg-roster``, from ``flower-privacy keys signing``) signs its key
    and survivor lists and insists on the server's consistency check.
    """

    def __init__(self, unmask_rule: protocol.UnmaskRule | None = None) -> None:
        self.unmask_rule = unmask_rule
        self._identities: dict[tuple[str, str], protocol.Identity] = {}

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        stage = wire.stage_of(msg.content) if msg.has_content() else None
        if msg.metadata.message_type != "train" or stage is None:
            return call_next(msg, context)
        state = _load(context)
        request = wire.payload_of(msg.content)
        try:
            identity = self._identity(context)
            if stage == wire.ADVERTISE:
                reply = protocol.client_advertise(state, request, identity)
            elif stage == wire.DISTRIBUTE:
                reply = protocol.client_distribute(state, request, identity)
            elif stage == wire.CONSISTENCY:
                if identity is None:
                    raise protocol.RefusedError(
                        f"the consistency check needs a signing key: set node config "
                        f"{wire.NODE_SIGNING_KEY} and {wire.NODE_ROSTER}"
                    )
                reply = protocol.client_consistency(state, request, identity)
            elif stage == wire.TRAIN:
                reply = self._train(msg, context, call_next, state, request)
                if isinstance(reply, Message):
                    return reply  # the app's own error reply
            elif stage == wire.UNMASK:
                reply = protocol.client_unmask(state, request, self.unmask_rule, identity)
            else:
                raise protocol.RefusedError(f"unknown stage {stage!r}")
        except (protocol.RefusedError, ValueError, OSError) as err:
            _save(context, state)
            return Message(
                Error(
                    code=compat.ErrorCode.MOD_FAILED_PRECONDITION,
                    reason=f"{wire.MOD_NAME} refused ({stage}): {err}",
                ),
                reply_to=msg,
            )
        _save(context, state)
        out_stage = wire.UPLOAD if stage == wire.TRAIN else stage
        return Message(RecordDict({wire.RECORD: wire.to_record(out_stage, reply)}), reply_to=msg)

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

    def _train(self, msg, context, call_next, state, request):  # noqa: ANN001, ANN202
        arrays_key = str(request["arrays-key"])
        weight_key = str(request["weight-key"])
        global_arrays = msg.content.array_records[arrays_key]
        # The app sees the message a plain FedAvg would send it.
        msg.content = RecordDict({k: v for k, v in msg.content.items() if k != wire.RECORD})
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
        metrics = [r for r in reply.content.metric_records.values() if weight_key in r]
        if request["weighting"] == "uniform":
            weight = 1
        elif not metrics:
            raise ValueError(f"the app's reply has no metric {weight_key!r} to weight by")
        else:
            weight = int(metrics[0][weight_key])
        quantizer: Quantizer | DistributedNoiseEncoding
        if request.get("encoding") == ENCODING:
            # Client-level DP: this client's noise share goes into the masked sum.
            if request["weighting"] != "uniform":
                raise ValueError("distributed DP needs uniform weighting")
            quantizer = DistributedNoiseEncoding.from_request(request)
        else:
            quantizer = Quantizer(
                clip_range=float(request["clip-range"]),
                max_weight=int(request["max-weight"]),
                max_clients=int(request["max-clients"]),
            )
        upload, report = protocol.client_upload(
            state, request, np.concatenate(deltas), weight, quantizer
        )
        # The report stays on this node: a per-client clipped count is data; the server
        # learns only the masked sum of the counts.
        if report["clipped"] or report["weight-capped"]:
            log(WARNING, "secure aggregation clipped this node's update: %s", report)
        return upload


def _load(context: Context) -> protocol.ClientState:
    record = context.state.config_records.get(_STATE_KEY)
    if record is None:
        return protocol.ClientState(node_id=context.node_id)
    return protocol.ClientState.from_bytes(record["state"])


def _save(context: Context, state: protocol.ClientState) -> None:
    context.state[_STATE_KEY] = ConfigRecord({"state": state.to_bytes()})


secagg_mod = SecAggMod()
"""The default secure aggregation mod: ``ClientApp(mods=[secagg_mod])``."""
