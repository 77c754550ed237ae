"""Server half of the secure aggregation protocol (see :mod:`.protocol`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from flower_privacy.secagg import graph, keys, shamir, signing
from flower_privacy.secagg._common import EXTRA_SLOTS, PROTOCOL, ProtocolError
from flower_privacy.secagg._common import context as _context
from flower_privacy.secagg._common import mask_sign as _sign
from flower_privacy.secagg.prg import expand_mask


@dataclass
class RoundResult:
    """The server's view after unmasking: only sums."""

    total: np.ndarray  # sum of encoded updates mod 2^32 (model coordinates only)
    weight: int  # sum of the survivors' (capped) weights
    clipped: int  # clipped coordinates over all survivors
    survivors: list[int]
    dropped: list[int]


class SecAggServer:
    """Server side of the protocol: keeps the roster and shares, sums and unmasks."""

    def __init__(
        self,
        *,
        threshold_fraction: float = 0.5,
        degree: int | None = None,
        run: bytes | None = None,
        consistency: bool = False,
    ) -> None:
        graph.threshold(2, threshold_fraction)  # validates the fraction
        self.consistency = consistency
        self._signing: dict[int, tuple[bytes, bytes]] = {}  # node -> (signing key, signature)
        self._signatures: dict[int, bytes] = {}
        self.threshold_fraction = threshold_fraction
        self.degree = degree
        self.run = run if run is not None else os.urandom(16)
        self.roster: dict[int, tuple[bytes, int]] = {}
        self.rekey: set[int] = set()
        self.population: list[int] = []
        self._graph: dict[int, list[int]] = {}
        self._sk_shares: dict[int, dict[int, bytes]] = {}
        self._uploads: dict[int, dict] = {}
        self._round = 0
        self._cohort: list[int] = []

    # -- set-up --------------------------------------------------------------------

    def nodes_to_key(self, nodes: list[int]) -> list[int]:
        """Nodes that must (re-)advertise a key before they can take part."""
        return sorted(n for n in nodes if n not in self.roster or n in self.rekey)

    def needs_distribution(self, nodes: list[int]) -> bool:
        """True when the keyed population changed since the last distribution."""
        return sorted(nodes) != self.population

    def advertise_request(self) -> dict:
        return {"protocol": PROTOCOL, "run": self.run}

    def accept_advertisement(self, node: int, reply: dict) -> None:
        key = reply.get("public-key")
        epoch = reply.get("epoch")
        if not isinstance(key, bytes) or len(key) != keys.PUBLIC_KEY_BYTES:
            raise ProtocolError(f"node {node} advertised no valid public key")
        if not isinstance(epoch, int) or epoch <= self.roster.get(node, (b"", 0))[1]:
            raise ProtocolError(f"node {node} advertised a stale key epoch {epoch!r}")
        if self.consistency:
            signer, signature = reply.get("signing-key"), reply.get("key-signature")
            message = signing.advertise_message(self.run, node, epoch, key)
            if not (
                isinstance(signer, bytes)
                and isinstance(signature, bytes)
                and signing.verify(signer, signature, message)
            ):
                raise ProtocolError(
                    f"node {node} advertised no validly signed key: the consistency option "
                    "needs a signing key on every node (node config secagg-signing-key)"
                )
            self._signing[node] = (signer, signature)
        self.roster[node] = (key, epoch)
        self.rekey.discard(node)
        self.population = []  # a new key must reach every node: distribute again

    def distribute_request(self, nodes: list[int]) -> dict:
        nodes = sorted(nodes)
        missing = self.nodes_to_key(nodes)
        if missing:
            raise ProtocolError(f"nodes {missing} have no current key")
        degree = self.degree if self.degree is not None else graph.default_degree(len(nodes))
        degree = min(degree, len(nodes) - 1)
        self._pending_graph = (nodes, degree, graph.neighbours(nodes, degree, self.run))
        request = {
            "protocol": PROTOCOL,
            "run": self.run,
            "node-ids": nodes,
            "public-keys": [self.roster[n][0] for n in nodes],
            "epochs": [self.roster[n][1] for n in nodes],
            "degree": degree,
            "threshold-fraction": self.threshold_fraction,
        }
        if self.consistency:
            request["signing-keys"] = [self._signing[n][0] for n in nodes]
            request["key-signatures"] = [self._signing[n][1] for n in nodes]
        return request

    def accept_distributions(self, replies: dict[int, dict]) -> None:
        """Store every node's sealed key shares; all nodes must have answered."""
        nodes, _degree, neighbour_graph = self._pending_graph
        missing = [n for n in nodes if n not in replies]
        if missing:
            raise ProtocolError(f"nodes {missing} did not distribute their key shares")
        shares: dict[int, dict[int, bytes]] = {n: {} for n in nodes}
        for node in nodes:
            reply = replies[node]
            if [int(x) for x in reply.get("to", [])] != neighbour_graph[node]:
                raise ProtocolError(f"node {node} shared its key with the wrong neighbours")
            if len(reply.get("shares", [])) != len(neighbour_graph[node]):
                raise ProtocolError(f"node {node} sent the wrong number of key shares")
            if reply.get("epoch") != self.roster[node][1]:
                raise ProtocolError(f"node {node} distributed shares of a stale key")
            for holder, blob in zip(neighbour_graph[node], reply["shares"], strict=True):
                shares[holder][node] = blob
        self.population, self._graph, self._sk_shares = nodes, neighbour_graph, shares

    # -- rounds --------------------------------------------------------------------

    def round_neighbours(self, node: int, cohort: list[int]) -> list[int]:
        members = set(cohort)
        return [v for v in self._graph[node] if v in members]

    def train_request(self, rnd: int, cohort: list[int]) -> dict:
        cohort = sorted(cohort)
        outside = [n for n in cohort if n not in self._graph]
        if outside:
            raise ProtocolError(f"cohort nodes {outside} are not in the keyed population")
        thin = [n for n in cohort if len(self.round_neighbours(n, cohort)) < 2]
        if thin:
            raise ProtocolError(
                f"cohort nodes {thin} have fewer than 2 neighbours in the cohort: select more "
                "nodes per round or use a denser neighbour graph"
            )
        self._round, self._cohort, self._uploads = rnd, cohort, {}
        return {"protocol": PROTOCOL, "run": self.run, "round": rnd, "cohort": cohort}

    def accept_upload(self, node: int, reply: dict, length: int) -> str | None:
        """Keep a masked upload; return why it is unusable, or None."""
        if node not in self._cohort:
            return "not in the round's cohort"
        if reply.get("round") != self._round:
            return f"upload for round {reply.get('round')!r}, expected {self._round}"
        masked = reply.get("masked")
        if not isinstance(masked, bytes) or len(masked) != 4 * (length + EXTRA_SLOTS):
            return f"masked vector is not {4 * (length + EXTRA_SLOTS)} bytes"
        peers = self.round_neighbours(node, self._cohort)
        if [int(x) for x in reply.get("to", [])] != peers or len(reply.get("shares", [])) != len(
            peers
        ):
            return "self-mask shares are not addressed to its round neighbours"
        self._uploads[node] = reply
        return None

    def consistency_requests(self) -> dict[int, dict]:
        """Per survivor: the lists it is asked to sign (consistency option)."""
        survivors = sorted(self._uploads)
        dropped = [n for n in self._cohort if n not in self._uploads]
        self._signatures = {}
        request = {
            "protocol": PROTOCOL,
            "run": self.run,
            "round": self._round,
            "survivors": survivors,
            "dropped": dropped,
        }
        return {node: request for node in survivors}

    def accept_consistency(self, replies: dict[int, dict]) -> None:
        """Keep the valid signatures of the survivor lists."""
        survivors = sorted(self._uploads)
        dropped = [n for n in self._cohort if n not in self._uploads]
        message = signing.consistency_message(self.run, self._round, survivors, dropped)
        for node, reply in replies.items():
            signature = reply.get("signature")
            if (
                node in self._uploads
                and isinstance(signature, bytes)
                and signing.verify(self._signing[node][0], signature, message)
            ):
                self._signatures[node] = signature

    def exclude(self, nodes: list[int]) -> None:
        """Treat uploaded ``nodes`` as dropped (e.g. the rest of an incomplete group).

        They will not be asked to unmask, so they re-key before their next round.
        """
        for node in nodes:
            if self._uploads.pop(node, None) is not None:
                self.rekey.add(node)

    def abandon_round(self) -> None:
        """The round failed after uploads: its nodes re-key before they take part again.

        Uploaders were not unmasked as survivors (they refuse to mask under their keys
        again), and shares of the dropped nodes' keys may already have been revealed.
        """
        self.rekey.update(self._cohort)
        self._uploads = {}

    def survivors(self) -> list[int]:
        """Nodes whose upload is kept this round."""
        return sorted(self._uploads)

    def unmask_requests(self) -> dict[int, dict]:
        """Per survivor: the survivor/dropped lists and the sealed shares it holds.

        With the consistency option, only nodes that signed the lists are asked, and
        every request carries all signatures.
        """
        survivors = sorted(self._uploads)
        dropped = [n for n in self._cohort if n not in self._uploads]
        requests = {}
        holders = [n for n in survivors if n in self._signatures] if self.consistency else survivors
        for holder in holders:
            owners, sealed = [], []
            for owner in self._graph[holder]:
                if owner in dropped:
                    owners.append(owner)
                    sealed.append(self._sk_shares[holder][owner])
                elif owner in self._uploads:
                    upload = self._uploads[owner]
                    idx = [int(x) for x in upload["to"]].index(holder)
                    owners.append(owner)
                    sealed.append(upload["shares"][idx])
            requests[holder] = {
                "protocol": PROTOCOL,
                "run": self.run,
                "round": self._round,
                "survivors": survivors,
                "dropped": dropped,
                "from": owners,
                "sealed": sealed,
            }
            if self.consistency:
                requests[holder]["signers"] = sorted(self._signatures)
                requests[holder]["signatures"] = [
                    self._signatures[n] for n in sorted(self._signatures)
                ]
        return requests

    def unmask(self, replies: dict[int, dict], length: int) -> RoundResult:
        """Sum the survivors' uploads and remove every mask; raise if shares are short."""
        survivors = sorted(self._uploads)
        dropped = [n for n in self._cohort if n not in self._uploads]
        b_shares: dict[int, list[bytes]] = {u: [] for u in survivors}
        sk_shares: dict[int, list[bytes]] = {u: [] for u in dropped}
        for holder, reply in replies.items():
            if holder not in survivors or reply.get("round") != self._round:
                continue
            for owner, share in zip(reply.get("b-of", []), reply.get("b-shares", []), strict=False):
                if int(owner) in b_shares:
                    b_shares[int(owner)].append(share)
            for owner, share in zip(
                reply.get("sk-of", []), reply.get("sk-shares", []), strict=False
            ):
                if int(owner) in sk_shares:
                    sk_shares[int(owner)].append(share)

        # A survivor that did not answer will refuse to mask under its key again (it
        # cannot tell whether its key was rebuilt): it re-keys before its next round.
        self.rekey.update(node for node in survivors if node not in replies)
        total = np.zeros(length + EXTRA_SLOTS, dtype=np.uint32)
        for node in survivors:
            total += np.frombuffer(self._uploads[node]["masked"], dtype="<u4")
        for node in survivors:
            seed = self._rebuild(
                node,
                b_shares[node],
                len(self.round_neighbours(node, self._cohort)),
                "self-mask seed",
            )
            total -= expand_mask(seed, _context(self.run, self._round, node), total.size)
        for node in dropped:
            live = [v for v in self.round_neighbours(node, self._cohort) if v in self._uploads]
            if not live:
                continue  # no survivor ever masked with it
            private_key = self._rebuild(
                node, sk_shares[node], len(self._graph[node]), "private key"
            )
            if keys.public_key(private_key) != self.roster[node][0]:
                raise ProtocolError(
                    f"rebuilt private key of node {node} does not match its public key"
                )
            self.rekey.add(node)
            for peer in live:
                pair = keys.pair_secrets(private_key, node, self.roster[peer][0], peer, self.run)
                mask = expand_mask(pair.mask_seed, _context(self.run, self._round), total.size)
                # The survivor added sign(peer, node) * mask: take it away.
                if _sign(peer, node) > 0:
                    total -= mask
                else:
                    total += mask
        return RoundResult(
            total=total[:length],
            weight=int(total[length]),
            clipped=int(total[length + 1]),
            survivors=survivors,
            dropped=dropped,
        )

    def _rebuild(self, owner: int, shares: list[bytes], holders: int, what: str) -> bytes:
        t = graph.threshold(holders, self.threshold_fraction)
        if len(shares) < t:
            raise ProtocolError(
                f"only {len(shares)} shares of node {owner}'s {what}, {t} needed: too many "
                "nodes dropped during unmasking"
            )
        try:
            return shamir.combine(shares, t)
        except shamir.ShareError as err:
            raise ProtocolError(
                f"shares of node {owner}'s {what} are inconsistent: {err}"
            ) from None
