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
4. optional, each round, ``consistency`` (nodes with an :class:`Identity`): survivors
   sign the survivor and dropped lists; keys were signed at step 1 and checked against
   the roster at step 2.
5. each round, ``unmask``: the server names survivors and dropped nodes; each survivor
   checks the request and returns self-mask shares of survivors and private-key shares
   of dropped nodes. A node whose private key was rebuilt must make a new one (step 1)
   before it takes part again; its neighbours never reveal a self-mask share of a key
   epoch whose private key they helped rebuild, and a node that uploaded but was not
   asked to unmask as a survivor re-keys before it masks again.
"""

from flower_privacy.secagg._common import (
    EXTRA_SLOTS,
    PROTOCOL,
    ProtocolError,
    RefusedError,
    UnmaskRule,
)
from flower_privacy.secagg.client import (
    ClientState,
    Identity,
    client_advertise,
    client_consistency,
    client_distribute,
    client_unmask,
    client_upload,
)
from flower_privacy.secagg.server import RoundResult, SecAggServer

__all__ = [
    "EXTRA_SLOTS",
    "PROTOCOL",
    "ClientState",
    "Identity",
    "ProtocolError",
    "RefusedError",
    "RoundResult",
    "SecAggServer",
    "UnmaskRule",
    "client_advertise",
    "client_consistency",
    "client_distribute",
    "client_unmask",
    "client_upload",
]
