"""The secure aggregation protocol (SecAgg+ style), free of Flower.

Messages are plain dicts of ints, bytes, strings and lists, so that any transport can
carry them. One run goes:

1. ``advertise`` (once per node and key epoch): each node makes an X25519 key pair and
   returns the public key.
2. ``distribute`` (whenever the set of keyed nodes changes): the server sends every
   public key; each node derives its neighbours (a public function of the run seed and
   the node list), Shamir-shares its private key among them (threshold: more than
   ``threshold_fraction`` of them) and returns the shares, each sealed for one
   neighbour with ChaCha20-Poly1305 under a pairwise key.
3. each round, ``train``/``upload``: a node masks its encoded update with a fresh
   self mask and pairwise masks (AES-CTR keystreams keyed by HKDF of the pairwise
   secret and the round) with its neighbours in the round's cohort, and sends it with
   sealed shares of the self-mask seed.
4. each round, ``unmask``: the server names survivors and dropped nodes; each survivor
   checks the request and returns self-mask shares of survivors and private-key shares
   of dropped nodes. A node whose private key was rebuilt must make a new one (step 1)
   before it takes part again; its neighbours never reveal a self-mask share of a key
   epoch whose private key they helped rebuild.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flower_privacy.secagg import graph, keys, shamir
from flower_privacy.secagg.prg import expand_mask
from flower_privacy.secagg.quantize import MODULUS, Quantizer

PROTOCOL = "flower-privacy-secagg/1"
# Slots appended to every masked vector after the model coordinates.
EXTRA_SLOTS = 2  # total weight, clipped values


class RefusedError(Exception):
    """An honest node refuses a server request; the message names the failed check."""


class ProtocolError(Exception):
    """The server cannot complete the round (too few shares, bad uploads, ...)."""


UnmaskRule = Callable[[list[int], list[int], list[int]], "str | None"]
"""``rule(survivors, dropped, cohort)`` returns why a node must refuse, or None."""


def _context(run: bytes, *parts: int) -> bytes:
    return run + b"".join(struct.pack("<Q", p) for p in parts)


def _sign(own: int, peer: int) -> int:
    return 1 if own < peer else -1


def _ad(kind: bytes, run: bytes, *parts: int) -> bytes:
    return kind + b"|" + _context(run, *parts)


# --------------------------------------------------------------------------- client


@dataclass
class ClientState:
    """Everything a node keeps between messages (serialisable to bytes)."""

    node_id: int
    run: bytes = b""
    epoch: int = 0
    private_key: bytes = b""
    roster: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    degree: int = 0
    threshold_fraction: float = 0.5
    round: int = 0
    cohort: list[int] = field(default_factory=list)
    uploaded: bool = False
    unmasked: bool = False
    burned: dict[int, int] = field(default_factory=dict)  # node -> epoch whose key we revealed

    def to_bytes(self) -> bytes:
        data = {
            "node_id": self.node_id,
            "run": self.run.hex(),
            "epoch": self.epoch,
            "private_key": self.private_key.hex(),
            "roster": {str(k): [v[0].hex(), v[1]] for k, v in self.roster.items()},
            "degree": self.degree,
            "threshold_fraction": self.threshold_fraction,
            "round": self.round,
            "cohort": self.cohort,
            "uploaded": self.uploaded,
            "unmasked": self.unmasked,
            "burned": {str(k): v for k, v in self.burned.items()},
        }
        return base64.b64encode(json.dumps(data).encode())

    @classmethod
    def from_bytes(cls, raw: bytes) -> ClientState:
        data = json.loads(base64.b64decode(raw))
        return cls(
            node_id=data["node_id"],
            run=bytes.fromhex(data["run"]),
            epoch=data["epoch"],
            private_key=bytes.fromhex(data["private_key"]),
            roster={int(k): (bytes.fromhex(v[0]), v[1]) for k, v in data["roster"].items()},
            degree=data["degree"],
            threshold_fraction=data["threshold_fraction"],
            round=data["round"],
            cohort=data["cohort"],
            uploaded=data["uploaded"],
            unmasked=data["unmasked"],
            burned={int(k): v for k, v in data["burned"].items()},
        )

    def neighbours(self) -> list[int]:
        return graph.neighbours(sorted(self.roster), self.degree, self.run)[self.node_id]

    def round_neighbours(self) -> list[int]:
        cohort = set(self.cohort)
        return [v for v in self.neighbours() if v in cohort]

    def pair(self, peer: int) -> keys.PairSecrets:
        peer_key, _ = self.roster[peer]
        return keys.pair_secrets(self.private_key, self.node_id, peer_key, peer, self.run)


def client_advertise(state: ClientState, request: dict) -> dict:
    """Step 1: a fresh key pair for this run (a new epoch)."""
    run = _bytes(request, "run")
    if state.run != run:  # a new run: nothing of an old one carries over
        state.__dict__.update(ClientState(node_id=state.node_id, run=run).__dict__)
    state.epoch += 1
    state.private_key = keys.generate_private_key()
    state.roster = {}
    return {"public-key": keys.public_key(state.private_key), "epoch": state.epoch}


def client_distribute(state: ClientState, request: dict) -> dict:
    """Step 2: learn the roster, derive neighbours, share the private key among them."""
    _check_run(state, request)
    node_ids = [int(x) for x in request["node-ids"]]
    public_keys = list(request["public-keys"])
    epochs = [int(x) for x in request["epochs"]]
    if not len(node_ids) == len(public_keys) == len(epochs):
        raise RefusedError("roster lists differ in length")
    roster = dict(zip(node_ids, zip(public_keys, epochs, strict=True), strict=True))
    if roster.get(state.node_id) != (keys.public_key(state.private_key), state.epoch):
        raise RefusedError("the roster does not hold this node's current public key")
    state.roster = roster
    state.degree = int(request["degree"])
    state.threshold_fraction = float(request["threshold-fraction"])
    peers = state.neighbours()
    t = graph.threshold(len(peers), state.threshold_fraction)
    shares = shamir.split(state.private_key, t, len(peers))
    sealed = [
        keys.seal(
            state.pair(peer).encryption_key,
            share,
            _ad(b"sk", state.run, state.node_id, peer, state.epoch, roster[peer][1]),
        )
        for peer, share in zip(peers, shares, strict=True)
    ]
    return {"to": peers, "shares": sealed, "epoch": state.epoch}


def client_upload(
    state: ClientState, request: dict, update: np.ndarray, weight: int, quantizer: Quantizer
) -> tuple[dict, dict]:
    """Step 3: mask ``weight * update``; returns (upload, report of what was clipped)."""
    _check_run(state, request)
    rnd = int(request["round"])
    if rnd <= state.round:
        raise RefusedError(f"round {rnd} is not after round {state.round} (replay)")
    cohort = sorted(int(x) for x in request["cohort"])
    if state.node_id not in cohort:
        raise RefusedError("this node is not in the round's cohort")
    unknown = [v for v in cohort if v not in state.roster]
    if unknown:
        raise RefusedError(f"cohort nodes {unknown} have no key in this node's roster")
    stale = [v for v in cohort if state.burned.get(v) == state.roster[v][1]]
    if stale:
        raise RefusedError(f"cohort nodes {stale} were not re-keyed after their key was rebuilt")
    state.round, state.cohort, state.uploaded, state.unmasked = rnd, cohort, False, False
    peers = state.round_neighbours()
    if len(peers) < 2:
        raise RefusedError(f"only {len(peers)} neighbour(s) in the cohort; at least 2 needed")
    encoded = quantizer.encode(update, weight)
    vector = np.concatenate(
        [encoded.values, np.array([encoded.weight, encoded.clipped], dtype=np.uint32)]
    )
    self_seed = os.urandom(32)
    vector += expand_mask(self_seed, _context(state.run, rnd, state.node_id), vector.size)
    for peer in peers:
        mask = expand_mask(state.pair(peer).mask_seed, _context(state.run, rnd), vector.size)
        vector += mask if _sign(state.node_id, peer) > 0 else (np.uint32(0) - mask)
    t = graph.threshold(len(peers), state.threshold_fraction)
    shares = shamir.split(self_seed, t, len(peers))
    sealed = [
        keys.seal(
            state.pair(peer).encryption_key,
            share,
            _ad(b"b", state.run, rnd, state.node_id, peer, state.epoch, state.roster[peer][1]),
        )
        for peer, share in zip(peers, shares, strict=True)
    ]
    state.uploaded = True
    upload = {"round": rnd, "masked": vector.astype("<u4").tobytes(), "to": peers, "shares": sealed}
    return upload, {"clipped": encoded.clipped, "weight-capped": int(encoded.weight_capped)}


def client_unmask(state: ClientState, request: dict, rule: UnmaskRule | None = None) -> dict:
    """Step 4: check the server's request; reveal only what keeps every input hidden."""
    _check_run(state, request)
    rnd = int(request["round"])
    if rnd != state.round or not state.uploaded:
        raise RefusedError(
            f"unmask request for round {rnd}, but this node uploaded in no such round"
        )
    if state.unmasked:
        raise RefusedError(f"round {rnd} was already unmasked (replay)")
    survivors = [int(x) for x in request["survivors"]]
    dropped = [int(x) for x in request["dropped"]]
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise RefusedError(f"nodes {both} are listed both as survivor and as dropped")
    if sorted(survivors + dropped) != state.cohort:
        raise RefusedError("survivors and dropped nodes do not make up the round's cohort")
    if state.node_id not in survivors:
        raise RefusedError("this node uploaded but is not listed as a survivor")
    round_peers = state.round_neighbours()
    live_peers = [v for v in round_peers if v in survivors]
    t = graph.threshold(len(round_peers), state.threshold_fraction)
    if len(live_peers) < t:
        raise RefusedError(
            f"only {len(live_peers)} surviving neighbours named, fewer than the threshold {t}"
        )
    if rule is not None and (why := rule(survivors, dropped, state.cohort)) is not None:
        raise RefusedError(f"unmask rule: {why}")
    owners = [int(x) for x in request["from"]]
    sealed = list(request["sealed"])
    if len(owners) != len(sealed) or len(set(owners)) != len(owners):
        raise RefusedError("malformed share list")
    all_peers = set(state.neighbours())
    outside = [u for u in owners if u not in all_peers]
    if outside:
        raise RefusedError(f"shares requested of nodes {outside} outside this node's neighbourhood")
    sk_of, sk_shares, b_of, b_shares = [], [], [], []
    for owner, blob in zip(owners, sealed, strict=True):
        owner_epoch = state.roster[owner][1]
        if owner in dropped:
            ad = _ad(b"sk", state.run, owner, state.node_id, owner_epoch, state.epoch)
            target_of, target = sk_of, sk_shares
        else:
            if owner not in round_peers:
                raise RefusedError(f"self-mask share of node {owner}, not a neighbour this round")
            if state.burned.get(owner) == owner_epoch:
                raise RefusedError(f"node {owner}'s key was rebuilt: its self masks stay secret")
            ad = _ad(b"b", state.run, rnd, owner, state.node_id, owner_epoch, state.epoch)
            target_of, target = b_of, b_shares
        try:
            share = keys.open_sealed(state.pair(owner).encryption_key, blob, ad)
        except keys.DecryptionError:
            raise RefusedError(f"the share from node {owner} failed authentication") from None
        target_of.append(owner)
        target.append(share)
    for owner in sk_of:
        state.burned[owner] = state.roster[owner][1]
    state.unmasked = True
    return {
        "round": rnd,
        "sk-of": sk_of,
        "sk-shares": sk_shares,
        "b-of": b_of,
        "b-shares": b_shares,
    }


def _check_run(state: ClientState, request: dict) -> None:
    if _bytes(request, "run") != state.run or not state.private_key:
        raise RefusedError("the request belongs to another run or key set-up (replay)")


def _bytes(request: dict, key: str) -> bytes:
    value = request.get(key)
    if not isinstance(value, bytes):
        raise RefusedError(f"request field {key!r} is missing or not bytes")
    return value


# --------------------------------------------------------------------------- server


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
    ) -> None:
        graph.threshold(2, threshold_fraction)  # validates the fraction
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
        return {
            "protocol": PROTOCOL,
            "run": self.run,
            "node-ids": nodes,
            "public-keys": [self.roster[n][0] for n in nodes],
            "epochs": [self.roster[n][1] for n in nodes],
            "degree": degree,
            "threshold-fraction": self.threshold_fraction,
        }

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

    def unmask_requests(self) -> dict[int, dict]:
        """Per survivor: the survivor/dropped lists and the sealed shares it holds."""
        survivors = sorted(self._uploads)
        dropped = [n for n in self._cohort if n not in self._uploads]
        requests = {}
        for holder in survivors:
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
                total -= mask if _sign(peer, node) > 0 else (np.uint32(0) - mask)
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


assert MODULUS == 2**32  # masks are uint32 keystreams: arithmetic is mod 2^32
