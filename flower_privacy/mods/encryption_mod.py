"""Client side of encrypted FedAvg: a ClientApp mod.

``ClientApp(mods=[encryption_mod])`` is the whole client-side change. For a train or
evaluate message that carries an encrypted global model, the mod decrypts it with the
node's secret context (checking key fingerprint, every canary and every bound), hands
the app the plaintext model exactly as plain FedAvg would, and for training replaces
the app's reply by its weights times its capped example count, quantised and encrypted.
The reply carries nothing else: no example count, no metrics.

A node that is configured for encryption (a ``client.ctx`` path given to
:class:`EncryptionMod`, node config or run config ``he-context`` set, or
``require_encryption``) refuses every train and evaluate message that is not an
encrypted global model: it never trains on, evaluates or replies with a plaintext model
in that case. Other messages (and, on nodes not configured for encryption, every
message) pass through untouched.

The secret context is found through node config ``he-context`` (a path to
``client.ctx``), else run config ``he-context``, or a locator given to
:class:`EncryptionMod`.

Refusals sent to the server are generic ("the global model failed verification",
"cannot encrypt the update"): which check failed, and any value, is logged on the
node only, so that a server cannot use refusals as a many-bit oracle.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from logging import ERROR, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.common import log

from flower_privacy import _flwr_compat as compat
from flower_privacy import he
from flower_privacy.wire import he as wire

ContextLocator = Callable[[Context], "str | os.PathLike[str] | None"]
EncryptionRule = Callable[[Context], bool]

# What the server learns when a node refuses (details stay in the node's log).
NO_CONTEXT = "this node has no usable secret context (details in the node's log)"
FAILED_VERIFICATION = "the global model failed verification (details in the node's log)"
CANNOT_ENCRYPT = "cannot encrypt the update (details in the node's log)"
NOT_ENCRYPTED = (
    "this node requires encryption (it holds a secret context) but the message does not "
    "carry an encrypted global model: refusing to use or return a plaintext model"
)


class EncryptionMod:
    """The encrypted-FedAvg mod, with where to find the secret context and how to encrypt.

    Parameters
    ----------
    context_path : str | os.PathLike | callable | None
        Path of ``client.ctx``, or ``locate(context) -> path``. By default node config
        ``he-context``, then run config ``he-context``.
    require_encryption : bool | callable | None
        Whether train and evaluate messages without an encrypted global model are
        refused. Encryption is always required when ``context_path`` is a path or node
        or run config ``he-context`` is set; this adds further cases: ``True``, or
        ``rule(context) -> bool`` (e.g. for a locator with a fallback). Default: no more.
    workers : int | None
        Encryption processes (default: the CPUs available, at most 4).
    parallel_from_values : int
        Models with at least this many values are encrypted in the process pool; smaller
        ones in this process (a pool costs about a second to start).
    """

    def __init__(
        self,
        context_path: str | os.PathLike[str] | ContextLocator | None = None,
        *,
        require_encryption: bool | EncryptionRule | None = None,
        workers: int | None = None,
        parallel_from_values: int = 262_144,
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if parallel_from_values < 1:
            raise ValueError(f"parallel_from_values must be >= 1, got {parallel_from_values}")
        self.context_path = context_path
        self.require_encryption = require_encryption
        self.workers = workers
        self.parallel_from_values = parallel_from_values
        self._contexts: dict[tuple[str, int, int], he.HEContext] = {}
        self._pools: dict[bytes, he.EncryptionPool] = {}

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        message_type = msg.metadata.message_type
        # "train.default" and other "train.<action>" types reach the app's train functions.
        if message_type.split(".")[0] not in ("train", "evaluate"):
            return call_next(msg, context)
        if not msg.has_content() or wire.stage_of(msg.content) != wire.GLOBAL:
            if self._requires_encryption(context):
                log(ERROR, "encryption_mod: refused a %s message: %s", message_type, NOT_ENCRYPTED)
                return _refusal(msg, NOT_ENCRYPTED)
            return call_next(msg, context)
        try:
            ctx = self._context(context)
        except (he.HEConfigError, he.KeyRoleError) as err:
            log(ERROR, "encryption_mod: no usable secret context: %s", err)
            return _refusal(msg, NO_CONTEXT)
        try:
            arrays_key, weight_key, limits = wire.parse_request(msg.content[wire.RECORD])
            blob = wire.ciphertext_of(msg.content.array_records[arrays_key])
            if blob is None:
                raise he.InvalidCiphertext("the server sent a model that is not encrypted")
            envelope = he.Envelope.from_bytes(blob)
            model = he.decrypt_model(ctx, envelope, limits=limits)
        except (he.InvalidCiphertext, he.HEConfigError, he.KeyRoleError, KeyError) as err:
            log(ERROR, "encryption_mod: refused the global model (%s): %s", message_type, err)
            return _refusal(msg, FAILED_VERIFICATION)
        if model.clipped:
            log(WARNING, "the last aggregate clipped %d values (all clients)", model.clipped)
        layout = envelope.layout
        # The app sees the message plain FedAvg would send it.
        content = RecordDict({k: v for k, v in msg.content.items() if k != wire.RECORD})
        content[arrays_key] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in model.arrays.items()}
        )
        msg.content = content
        reply = call_next(msg, context)
        if message_type == "evaluate" or reply.has_error():
            return reply
        try:
            blob = self._encrypt_reply(ctx, reply, layout, weight_key, limits)
        except (he.HEConfigError, ValueError) as err:
            log(ERROR, "encryption_mod: cannot encrypt the update: %s", err)
            return _refusal(msg, CANNOT_ENCRYPT)
        return Message(wire.update_content(arrays_key, blob), reply_to=msg)

    def _encrypt_reply(
        self,
        ctx: he.HEContext,
        reply: Message,
        layout: he.Layout,
        weight_key: str,
        limits: he.DeclaredLimits,
    ) -> bytes:
        records = list(reply.content.array_records.values())
        if len(records) != 1:
            raise ValueError(f"the app replied with {len(records)} ArrayRecords, expected 1")
        local = {key: array.numpy() for key, array in records[0].items()}
        metrics = [r for r in reply.content.metric_records.values() if weight_key in r]
        if not metrics:
            raise ValueError(f"the app's reply has no metric {weight_key!r} to weight by")
        raw_weight = metrics[0][weight_key]
        if float(raw_weight) != int(raw_weight):
            raise ValueError(f"{weight_key} must be a whole number, got {raw_weight!r}")
        encryptor = self._pool(ctx) if layout.size >= self.parallel_from_values else None
        update = he.encrypt_model(
            ctx, local, int(raw_weight), limits, layout=layout, encryptor=encryptor
        )
        if update.clipped:
            log(
                WARNING,
                "%d of %d values were clipped to ±%s before encryption",
                update.clipped,
                layout.size,
                limits.clip_range,
            )
        return update.envelope.to_bytes()

    def _requires_encryption(self, context: Context) -> bool:
        """Whether this node must refuse plaintext train and evaluate messages."""
        if self.context_path is not None and not callable(self.context_path):
            return True
        if wire.configured_context_path(context):
            return True
        rule = self.require_encryption
        return bool(rule(context)) if callable(rule) else bool(rule)

    def _context(self, context: Context) -> he.HEContext:
        if callable(self.context_path):
            path = self.context_path(context)
        elif self.context_path is not None:
            path = self.context_path
        else:
            path = wire.configured_context_path(context)
        if not path:
            raise he.HEConfigError(
                f"no secret context: give the node config {wire.NODE_CONTEXT}=<path to "
                "client.ctx> (or the run config key)"
            )
        path = Path(str(path))
        try:
            stat = path.stat()
        except OSError as err:
            raise he.HEConfigError(f"cannot read {path}: {err.strerror}") from None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._contexts:
            if stat.st_mode & 0o077:
                log(WARNING, "%s is readable by other users: it holds the secret key", path)
            self._contexts = {key: he.HEContext.load(path).require_secret()}
        return self._contexts[key]

    def _pool(self, ctx: he.HEContext) -> he.EncryptionPool | None:
        workers = self.workers or he.default_workers()
        if workers < 2:
            return None
        if ctx.fingerprint not in self._pools:
            pool = he.EncryptionPool(ctx.public_bytes, workers)
            atexit.register(pool.close)
            self._pools[ctx.fingerprint] = pool
        return self._pools[ctx.fingerprint]

    def close(self) -> None:
        """Stop the encryption processes this mod started."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _refusal(msg: Message, reason: str) -> Message:
    return Message(
        Error(
            code=compat.ErrorCode.MOD_FAILED_PRECONDITION,
            reason=f"{wire.REFUSED} ({msg.metadata.message_type}): {reason}",
        ),
        reply_to=msg,
    )


encryption_mod = EncryptionMod()
"""The default mod: ``ClientApp(mods=[encryption_mod])``, context from node or run config."""
