"""Encrypted FedAvg as a strategy wrapper for Flower's Message API.

``EncryptedFedAvg(FedAvg(...), server_context="keys/server.ctx")`` on the server and
``ClientApp(mods=[encryption_mod])`` on the clients. Clients send their weights times
their (capped) example count, quantised and encrypted with TenSEAL, together with the
encrypted count; the server only adds ciphertexts, keeps the global model encrypted
between rounds and sends it back encrypted; clients decrypt and divide by the decrypted
total count. The server learns neither updates, counts, nor the model. The HE core
is :mod:`flower_privacy.he`; this module only moves records.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from flower_privacy import he
from flower_privacy.errors import RoundFailedError
from flower_privacy.strategies import _replies
from flower_privacy.strategies.strict_rounds import StrictRounds
from flower_privacy.wire import he as wire

# Inner strategies whose aggregate is the weighted mean of the replies and that need
# nothing else from them: the server can only add ciphertexts.
FEDAVG_STRATEGIES = (FedAvg, FedProx)


class EncryptedFedAvg(StrictRounds):
    """Wrap FedAvg so that the server only ever holds ciphertexts.

    Parameters
    ----------
    strategy : Strategy
        ``FedAvg`` or ``FedProx`` (node selection, configs and evaluation metrics). Server
        optimisers (FedAdam, FedYogi, ...) and robust aggregators need plaintext and are
        refused; pass ``trust_inner_is_fedavg=True`` for your own FedAvg subclass.
    server_context : str | os.PathLike | bytes | he.HEContext
        ``server.ctx`` from ``flower-privacy keys generate`` (public key only). A context
        holding the secret key is refused.
    max_clients, max_weight, clip_range, precision_bits : int, int, float, int
        The declared limits (see :class:`flower_privacy.he.DeclaredLimits`): most clients
        per round, cap of a client's weight (example count), range every model value is
        clipped to, and (BFV) the quantisation step ``2**-precision_bits``. Checked
        against the context's capacity here, before round 1.
    save_path : str | os.PathLike | None
        Where the encrypted final model is written (atomically) when the run ends,
        completed or halted: the last aggregate, unless a client refused it (then the
        file is not written). ``flower-privacy he decrypt`` recovers it with
        ``client.ctx``.
    trust_inner_is_fedavg : bool
        Accept an inner strategy that is not FedAvg or FedProx.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        server_context: str | os.PathLike[str] | bytes | he.HEContext,
        max_clients: int = 100,
        max_weight: int = 1000,
        clip_range: float = 4.0,
        precision_bits: int = 16,
        save_path: str | os.PathLike[str] | None = None,
        trust_inner_is_fedavg: bool = False,
        min_train_replies: int | None = None,
        max_failed_rounds: int = 0,
        node_wait_timeout: float = 300.0,
    ) -> None:
        if not (trust_inner_is_fedavg or type(strategy) in FEDAVG_STRATEGIES):
            raise TypeError(
                f"{type(strategy).__name__} cannot run on encrypted updates: the server can only "
                "add ciphertexts, so the inner strategy must be FedAvg or FedProx (pass "
                "trust_inner_is_fedavg=True for a subclass whose aggregate is a weighted mean)"
            )
        super().__init__(
            strategy,
            min_train_replies=min_train_replies,
            max_failed_rounds=max_failed_rounds,
            node_wait_timeout=node_wait_timeout,
        )
        self.context = _load_public_context(server_context)
        self.limits = he.DeclaredLimits(max_clients, max_weight, clip_range, precision_bits)
        self.context.check_limits(self.limits)
        self.save_path = None if save_path is None else Path(save_path)
        self.layout: he.Layout | None = None
        # Digests of the aggregates made, of the model sent per (stage, round) and of
        # the models a client refused: save_path gets only an aggregate nobody refused.
        self._aggregates: set[bytes] = set()
        self._sent_model: dict[tuple[str, int], bytes] = {}
        self._refused: set[bytes] = set()

    # -- Strategy ---------------------------------------------------------------------

    def summary(self) -> None:
        """Log the scheme, limits and precision, then the wrapped strategy's summary."""
        log(
            INFO,
            "\t├──> EncryptedFedAvg: %s N=%d, key %s..., max clients %d, max weight %d, clip ±%s%s",
            self.context.scheme.upper(),
            self.context.poly_modulus_degree,
            self.context.fingerprint.hex()[:12],
            self.limits.max_clients,
            self.limits.max_weight,
            self.limits.clip_range,
            f", step 2^-{self.limits.precision_bits}" if self.context.scheme == "bfv" else "",
        )
        super().summary()

    def _run_input(
        self,
        initial_arrays: ArrayRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    ) -> ArrayRecord:
        """Encrypt the (public) initial model; ``evaluate_fn`` is refused.

        The server cannot evaluate a model it cannot read; evaluation is federated.
        ``result.arrays`` then holds the *encrypted* final model (see
        :func:`encrypted_model_bytes`).
        """
        if evaluate_fn is not None:
            raise ValueError(
                "evaluate_fn is not possible with EncryptedFedAvg: the server never sees the "
                "model; use federated evaluation (the inner strategy's fraction_evaluate)"
            )
        plain = {key: array.numpy() for key, array in initial_arrays.items()}
        self.layout = he.Layout.of(plain)
        initial = he.encrypt_public_model(self.context, plain, self.limits)
        if initial.clipped:
            log(
                WARNING,
                "%d values of the initial model lie outside ±%s and were clipped",
                initial.clipped,
                self.limits.clip_range,
            )
        return wire.ciphertext_record(initial.envelope.to_bytes())

    def _run_output(self, arrays: ArrayRecord) -> None:
        """Write the encrypted final model (``save_path``), halted run or not."""
        self._save(arrays)

    def prepare_run(self, grid: Grid, num_rounds: int) -> None:
        """Forget the aggregates, sent models and refusals of any earlier run."""
        self._aggregates, self._sent_model, self._refused = set(), {}, set()
        super().prepare_run(grid, num_rounds)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages, carrying the encrypted model and limits."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if len(messages) > self.limits.max_clients:
            raise RoundFailedError(
                server_round,
                f"{len(messages)} nodes selected but max_clients={self.limits.max_clients}: "
                "their sum could wrap; raise max_clients (and make keys for it)",
            )
        return self._mark(server_round, messages, arrays, "train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Verify every encrypted upload and add them; a plaintext reply fails the round."""
        assert self.layout is not None, "start() sets the layout"
        replies = list(replies)
        sent_to = self._sent_to.get(server_round, [])
        silent = _replies.log_silent_nodes(server_round, "training", sent_to, replies)
        usable: list[he.LoadedUpdate] = []
        problems: list[str] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                usable.append(self._load(server_round, reply))
            except he.InvalidCiphertext as err:
                problems.append(f"node {node}: {err}")
                log(ERROR, "round %d: rejected the upload of node %s: %s", server_round, node, err)
            except _UnusableReply as err:
                problems.append(f"node {node}: {err}")
                log(ERROR, "round %d: rejected reply of node %s: %s", server_round, node, err)
        _replies.require_usable(
            server_round,
            len(usable),
            sent_to,
            problems,
            silent,
            self.min_train_replies,
            "encrypted uploads",
        )
        try:
            aggregate = he.add_updates(usable)
        except he.InvalidCiphertext as err:
            raise RoundFailedError(server_round, f"aggregation failed: {err}") from None
        blob = aggregate.to_bytes()
        self._aggregates.add(_digest(blob))
        log(INFO, "round %d: added %d encrypted updates", server_round, len(usable))
        metrics = MetricRecord({"he-clients": len(usable), "he-rejected": len(problems)})
        return wire.ciphertext_record(blob), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluate messages, carrying the encrypted model."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._mark(server_round, messages, arrays, "evaluate")

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Fail loudly when a client refused to decrypt the model; else delegate."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error() and wire.REFUSED in reply.error.reason:
                self._mark_refused("evaluate", server_round)
                raise RoundFailedError(
                    server_round, f"node {reply.metadata.src_node_id}: {reply.error.reason}"
                )
        return super().aggregate_evaluate(server_round, replies)

    # -- internals --------------------------------------------------------------------

    def _mark(
        self, server_round: int, messages: list[Message], arrays: ArrayRecord, stage: str
    ) -> list[Message]:
        blob = wire.ciphertext_of(arrays)
        if blob is None:
            raise RoundFailedError(
                server_round, "the global model is not encrypted: refusing to send it"
            )
        self._sent_model[(stage, server_round)] = _digest(blob)
        record = wire.request_record(self.arrays_key, self.weight_key, self.limits)
        for message in messages:
            message.content[wire.RECORD] = record
        return messages

    def _load(self, server_round: int, reply: Message) -> he.LoadedUpdate:
        assert self.layout is not None
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = reply.error.reason
            if wire.REFUSED in reason:
                # An honest client refuses only a global model that failed its checks
                # (or a plaintext one, or it has no usable key).
                self._mark_refused("train", server_round)
                raise RoundFailedError(server_round, f"node {node}: {reason}")
            raise _UnusableReply(f"error reply ({reason})")
        content = reply.content
        records = content.array_records
        blob = None
        if self.arrays_key in records:
            blob = wire.ciphertext_of(records[self.arrays_key])
        # An upload is exactly two records: the stage marker and the ciphertext.
        plaintext = [k for k, r in records.items() if wire.ciphertext_of(r) is None]
        plaintext += [f"{k} (MetricRecord)" for k in content.metric_records]
        plaintext += [
            f"{k} (ConfigRecord)"
            for k, r in content.config_records.items()
            if k != wire.RECORD or dict(r) != {wire.STAGE: wire.UPDATE}
        ]
        plaintext += [k for k in records if k != self.arrays_key and k not in plaintext]
        if plaintext:
            raise RoundFailedError(
                server_round,
                f"node {node} sent plaintext records {plaintext}, not only an encrypted "
                f"update: is {wire.MOD_NAME} in its ClientApp, first, as "
                "ClientApp(mods=[encryption_mod, ...])? Refusing to aggregate it",
            )
        if wire.stage_of(content) != wire.UPDATE or blob is None:
            raise _UnusableReply("a reply without an encrypted update")
        return he.load_update(self.context, blob, self.layout, self.limits)

    def _mark_refused(self, stage: str, server_round: int) -> None:
        digest = self._sent_model.get((stage, server_round))
        if digest is not None:
            self._refused.add(digest)

    def _save(self, arrays: ArrayRecord) -> None:
        """Write the final encrypted model to ``save_path`` unless a client refused it."""
        if self.save_path is None:
            return
        blob = wire.ciphertext_of(arrays)
        digest = None if blob is None else _digest(blob)
        if blob is None or digest not in self._aggregates:
            log(WARNING, "no aggregate to save: %s not written", self.save_path)
            return
        if digest in self._refused:
            log(
                ERROR,
                "the last aggregate was refused by a client: %s not written",
                self.save_path,
            )
            return
        _write_atomic(self.save_path, blob)
        log(INFO, "wrote the encrypted final model to %s", self.save_path)


class _UnusableReply(Exception):  # noqa: N818 - internal
    """A reply that carries no usable encrypted update."""


def _load_public_context(value: str | os.PathLike[str] | bytes | he.HEContext) -> he.HEContext:
    if isinstance(value, he.HEContext):
        ctx = value
    elif isinstance(value, bytes):
        ctx = he.HEContext.from_bytes(value)
    else:
        ctx = he.HEContext.load(value)
    return ctx.require_public_only()


def encrypted_model_bytes(arrays: ArrayRecord) -> bytes:
    """The envelope inside an encrypted ArrayRecord (e.g. ``result.arrays``)."""
    blob = wire.ciphertext_of(arrays)
    if blob is None:
        raise ValueError(f"not an encrypted model: the record holds {list(arrays.keys())}")
    return blob


def _digest(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
