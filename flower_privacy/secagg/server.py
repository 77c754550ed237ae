"""Server half of the secure aggregation protocol (see :mod:`.protocol`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from flower_privacy.secagg import graph, keys, signing
from flower_privacy.secagg import messages as m
from flower_privacy.secagg._common import EXTRA_SLOTS, PROTOCOL, ProtocolError
from flower_privacy.secagg.floors import required_threshold
from flower_privacy.secagg.quantize import word_dtype
from flower_privacy.secagg.server_unmask import ServerRound, checked_shares, unmasked_total
from flower_privacy.secagg.views import advertise_message

_DIGEST = 32
R = TypeVar("R", m.PrepareReply, m.Upload)


@dataclass
class RoundResult:
    """The server's view after unmasking: only sums."""

    total: np.ndarray  # sum of encoded updates mod 2^bits (model coordinates only)
    weight: int  # sum of the survivors' (capped) weights
    clipped: int  # clipped coordinates over all survivors
    survivors: list[int]
    dropped: list[int]
    bad_holders: list[int] = field(default_factory=list)  # revealed shares that failed


class SecAggServer:
    """Server side: long-term key directory, per-round share routing, sums and unmasking.

    Parameters
    ----------
    max_colluders : int
        c: the threshold is ``floor((k + c) / 2) + 1`` for k holders (clients may demand more).
    degree : int | None
        Neighbours per node in each round's graph (default: the least that survives
        ``dropout`` with failure probability 2^-20; the complete graph for small cohorts).
    dropout : float
        Fraction of a cohort expected to drop in a round (sizes the default degree).
    consistency : bool
        Require signed long-term keys and run the signed-view consistency stage.
    """

    def __init__(
        self,
        *,
        max_colluders: int = 0,
        degree: int | None = None,
        consistency: bool = False,
        dropout: float = 0.1,
    ) -> None:
        if max_colluders < 0:
            raise ValueError(f"max_colluders must be >= 0, got {max_colluders}")
        if degree is not None and degree < 2:
            raise ValueError(f"degree must be >= 2, got {degree}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.max_colluders, self.degree, self.consistency = max_colluders, degree, consistency
        self.dropout = dropout
        self.nonce = os.urandom(16)
        self.lt_keys: dict[int, bytes] = {}
        self._signing: dict[int, tuple[bytes, bytes]] = {}  # node -> (signing key, binding)
        self._rounds: dict[int, ServerRound] = {}

    # -- long-term keys -------------------------------------------------------------

    def nodes_to_advertise(self, nodes: list[int]) -> list[int]:
        return sorted(n for n in nodes if n not in self.lt_keys)

    def advertise_request(self) -> dict:
        return m.AdvertiseRequest(protocol=PROTOCOL, nonce=self.nonce).to_dict()

    def accept_advertisement(self, node: int, reply: dict) -> None:
        try:
            parsed = m.AdvertiseReply.parse(reply)
        except m.MessageError as err:
            raise ProtocolError(f"node {node}: {err}") from None
        key = parsed.lt_key
        if len(key) != keys.PUBLIC_KEY_BYTES:
            raise ProtocolError(f"node {node} advertised no valid long-term key")
        if self.consistency:
            signer, binding = parsed.signing_key, parsed.key_signature
            if not signing.verify(signer, binding, advertise_message(self.nonce, node, key)):
                raise ProtocolError(
                    f"node {node} advertised no validly signed key: the consistency option "
                    "needs a signing key on every node (node config secagg-signing-key)"
                )
            self._signing[node] = (signer, binding)
        self.lt_keys[node] = key

    # -- one round ------------------------------------------------------------------

    def prepare_requests(
        self, rnd: int, cohort: list[int], extra: dict | None = None
    ) -> dict[int, dict]:
        """Fix round ``rnd``'s cohort and graph; one prepare request per cohort node.

        ``extra``: further :class:`PrepareRequest` fields by name (groups, survivor floor).
        """
        cohort = sorted(set(cohort))
        unknown = self.nodes_to_advertise(cohort)
        if unknown:
            raise ProtocolError(f"cohort nodes {unknown} have no long-term key")
        if len(cohort) < 3:
            raise ProtocolError(f"a cohort of {len(cohort)} nodes; secure aggregation needs 3")
        degree = (
            self.degree
            if self.degree is not None
            else graph.default_degree(len(cohort), self.dropout)
        )
        degree = min(degree, len(cohort) - 1)
        seed = os.urandom(16)
        neighbours = graph.neighbours(cohort, degree, seed)
        holders = min(len(v) for v in neighbours.values())
        t = required_threshold(holders, self.max_colluders)
        if t > holders:
            raise ProtocolError(
                f"{holders} neighbours per node cannot meet the threshold {t} for "
                f"max_colluders={self.max_colluders}: raise the degree or the cohort"
            )
        self._rounds = {r: s for r, s in self._rounds.items() if r >= rnd - 1}
        self._rounds[rnd] = ServerRound(cohort, degree, t, seed, neighbours)
        requests = {}
        for node in cohort:
            peers = neighbours[node]
            signed = {}
            if self.consistency:
                signed = {
                    "signing_keys": [self._signing[v][0] for v in peers],
                    "signatures": [self._signing[v][1] for v in peers],
                }
            request = m.PrepareRequest(
                **self._head(rnd),
                cohort=cohort,
                degree=degree,
                threshold=t,
                graph_seed=seed,
                keys_of=peers,
                keys=[self.lt_keys[v] for v in peers],
                **signed,
                **(extra or {}),
            ).to_dict()
            requests[node] = request
        return requests

    def _head(self, rnd: int) -> dict:
        """The fields every round request starts with."""
        return {"protocol": PROTOCOL, "nonce": self.nonce, "round": rnd}

    def has_round(self, rnd: int) -> bool:
        return rnd in self._rounds

    def cohort(self, rnd: int) -> list[int]:
        return list(self._rounds[rnd].cohort)

    def accept_prepare(self, rnd: int, node: int, reply: dict) -> str | None:
        """Keep a node's sealed shares and commitments; return why unusable, or None."""
        state = self._rounds[rnd]
        peers = state.neighbours.get(node)
        if peers is None:
            return "not in the round's cohort"
        parsed = _round_reply(m.PrepareReply, reply, rnd)
        if isinstance(parsed, str):
            return parsed
        if list(parsed.to) != peers:
            return "shares not addressed to its round neighbours"
        if len(parsed.mask_key) != keys.PUBLIC_KEY_BYTES or len(parsed.seed_commitment) != _DIGEST:
            return "malformed round key or seed commitment"
        if not len(parsed.packages) == len(parsed.commit_sk) == len(parsed.commit_b) == len(peers):
            return "packages or commitments do not match its neighbours"
        if not all(len(c) == _DIGEST for c in parsed.commit_sk + parsed.commit_b):
            return "malformed share commitments"
        state.prepares[node] = parsed
        return None

    def prepared_nodes(self, rnd: int) -> list[int]:
        """Nodes whose prepare reply was accepted (before any is left out)."""
        return sorted(self._rounds[rnd].prepares)

    def train_requests(self, rnd: int, leave_out: list[int] | tuple = ()) -> dict[int, dict]:
        """Per prepared node: the prepared cohort and the share packages it holds.

        Nodes with fewer than t prepared neighbours are left out (repeatedly, since
        leaving one out can thin another): their shares could not be rebuilt.
        """
        state = self._rounds[rnd]
        prepared = set(state.prepares) - set(leave_out)
        while True:
            thin = {
                u
                for u in prepared
                if len(prepared.intersection(state.neighbours[u])) < state.threshold
            }
            if not thin:
                break
            prepared -= thin
        state.prepared, state.prepared_set = sorted(prepared), prepared
        # Owner by owner, each reply read once in the order it was addressed (holder by
        # holder, looking each holder up in its owners' lists, took 3x as long at 10,000).
        # Owners ascend and neighbour lists are sorted: each holder's lists follow its own.
        held: dict[int, tuple[list, list, list, list, list]] = {
            holder: ([], [], [], [], []) for holder in state.prepared
        }
        for owner in state.prepared:
            reply = state.prepares[owner]
            for index, holder in enumerate(state.neighbours[owner]):
                if (lists := held.get(holder)) is not None:
                    lists[0].append(owner)
                    lists[1].append(reply.packages[index])
                    lists[2].append(reply.commit_sk[index])
                    lists[3].append(reply.commit_b[index])
                    lists[4].append(reply.mask_key)
        head = self._head(rnd)
        return {
            holder: m.TrainRequest(
                **head,
                prepared=state.prepared,
                from_=owners,
                packages=packages,
                commit_sk=commit_sk,
                commit_b=commit_b,
                mask_keys=mask_keys,
            ).to_dict()
            for holder, (owners, packages, commit_sk, commit_b, mask_keys) in held.items()
        }

    def accept_upload(
        self, rnd: int, node: int, reply: dict, length: int, word_bits: int = 32
    ) -> str | None:
        """Keep a masked upload of ``length`` coordinates; return why it is unusable, or None."""
        state = self._rounds[rnd]
        if node not in state.prepared_set:
            return "not in the round's prepared cohort"
        upload = _round_reply(m.Upload, reply, rnd)
        if isinstance(upload, str):
            return upload
        size = word_dtype(word_bits).itemsize * (length + EXTRA_SLOTS)
        if len(upload.masked) != size:
            return f"masked vector is not {size} bytes ({word_bits}-bit words)"
        live = [v for v in state.neighbours[node] if v in state.prepared_set]
        if list(upload.tags_to) != live or not (
            len(upload.tags) == len(live) and all(len(t) == _DIGEST for t in upload.tags)
        ):
            return "view tags are not addressed to its round neighbours"
        if len(upload.view) != _DIGEST:
            return "no view digest"
        state.uploads[node] = upload
        return None

    def survivors(self, rnd: int) -> list[int]:
        return sorted(self._rounds[rnd].uploads)

    def exclude(self, rnd: int, nodes: list[int]) -> None:
        """Leave uploaded ``nodes`` out of the sum (e.g. the rest of an incomplete group).

        They count as dropped (their round keys are revealed, their seeds never), but
        they are alive: they still answer as share holders.
        """
        state = self._rounds[rnd]
        for node in nodes:
            if node in state.uploads:
                state.excluded[node] = state.uploads.pop(node)

    def _lists(self, rnd: int) -> tuple[list[int], list[int], list[int]]:
        """(survivors summed, dropped or excluded, excluded) of round ``rnd``."""
        state = self._rounds[rnd]
        survivors = sorted(state.uploads)
        dropped = [n for n in state.prepared if n not in state.uploads]
        return survivors, dropped, sorted(state.excluded)

    def _holders(self, rnd: int) -> list[int]:
        """Nodes asked to reveal shares: every live uploader, summed or excluded."""
        state = self._rounds[rnd]
        return sorted(set(state.uploads) | set(state.excluded))

    def consistency_requests(self, rnd: int) -> dict[int, dict]:
        survivors, dropped, excluded = self._lists(rnd)
        self._rounds[rnd].signatures = {}
        request = m.UnmaskRequest(
            **self._head(rnd), survivors=survivors, dropped=dropped, excluded=excluded
        ).to_dict()
        return {node: request for node in self._holders(rnd)}

    def accept_consistency(self, rnd: int, replies: dict[int, dict]) -> None:
        """Keep the signatures (the clients verify them; the server cannot forge any)."""
        state = self._rounds[rnd]
        holders = set(self._holders(rnd))
        for node, reply in replies.items():
            try:
                signed = m.SignReply.parse(reply)
            except m.MessageError:
                continue
            if node in holders and signed.round == rnd and len(signed.signature) == 64:
                state.signatures[node] = signed.signature

    def unmask_requests(self, rnd: int) -> dict[int, dict]:
        """Per survivor: the lists, its live neighbours' view tags and (option) signatures."""
        state = self._rounds[rnd]
        survivors, dropped, excluded = self._lists(rnd)
        signed = sorted(state.signatures)
        # With the consistency check only signers are asked: the others refuse anyway.
        holders = self._holders(rnd)
        if self.consistency:
            holders = [n for n in holders if n in state.signatures]
        # Sender by sender (ascending, as each holder's sorted neighbours): every tag read
        # once where it was addressed. A survivor tagged all its prepared neighbours.
        tagged: dict[int, tuple[list[int], list[bytes]]] = {h: ([], []) for h in holders}
        for sender in survivors:
            upload = state.uploads[sender]
            for holder, tag in zip(upload.tags_to, upload.tags, strict=True):
                if (lists := tagged.get(holder)) is not None:
                    lists[0].append(sender)
                    lists[1].append(tag)
        signatures = {}
        if self.consistency:  # the same for every holder: built once
            signatures = {
                "signers": signed,
                "signatures": [state.signatures[n] for n in signed],
                "signer_keys": [self._signing[n][0] for n in signed],
                "signer_lt_keys": [self.lt_keys[n] for n in signed],
                "signer_bindings": [self._signing[n][1] for n in signed],
            }
        head = self._head(rnd)
        return {
            holder: m.UnmaskRequest(
                **head,
                survivors=survivors,
                dropped=dropped,
                excluded=excluded,
                tags_from=live,
                tags=tags,
                **signatures,
            ).to_dict()
            for holder, (live, tags) in tagged.items()
        }

    def unmask(
        self, rnd: int, replies: dict[int, dict], length: int, word_bits: int = 32
    ) -> RoundResult:
        """Check every revealed share against its commitment, rebuild, sum and unmask."""
        state = self._rounds[rnd]
        survivors, dropped, _ = self._lists(rnd)
        b_shares, sk_shares, bad = checked_shares(
            state, self.nonce, rnd, replies, set(self._holders(rnd)), survivors, dropped
        )
        total = unmasked_total(
            state, self.nonce, rnd, b_shares, sk_shares, length + EXTRA_SLOTS, word_bits
        )
        return RoundResult(
            total=total[:length],
            weight=int(total[length]),
            clipped=int(total[length + 1]),
            survivors=survivors,
            dropped=dropped,
            bad_holders=sorted(bad),
        )


def _round_reply(cls: type[R], reply: dict, rnd: int) -> R | str:
    """``reply`` parsed as ``cls`` for round ``rnd``, or why it is not."""
    try:
        parsed = cls.parse(reply)
    except m.MessageError as err:
        return str(err)
    if parsed.round != rnd:
        return f"{cls.KIND} for round {parsed.round}, expected {rnd}"
    return parsed  # type: ignore[return-value]
