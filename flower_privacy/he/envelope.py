"""The ciphertext envelope: serialized TenSEAL chunks plus what is needed to check them.

Wire format (version 1)::

    b"FPHE1\\n" | header length (4 bytes, big endian) | JSON header | chunk bytes...

The header names the scheme, the SHA-256 fingerprint of the public key the chunks were
made under, the model layout, the declared limits, the number of contributions summed
in (1 for a client's upload) and every chunk's byte length. Parsing is strict: any
deviation, including trailing or missing bytes, raises :class:`InvalidCiphertext`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flower_privacy.he.codec import Layout
from flower_privacy.he.errors import HEConfigError, InvalidCiphertext
from flower_privacy.he.presets import DeclaredLimits

MAGIC = b"FPHE1\n"
VERSION = 1
_MAX_HEADER_BYTES = 16 << 20


@dataclass(frozen=True)
class Envelope:
    """Encrypted chunks of one model (an upload, an aggregate or the global model)."""

    scheme: str
    fingerprint: bytes
    layout: Layout
    limits: DeclaredLimits
    contributors: int
    chunks: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        """The wire form."""
        header = json.dumps(
            {
                "version": VERSION,
                "scheme": self.scheme,
                "key": self.fingerprint.hex(),
                "layout": self.layout.to_json(),
                "limits": self.limits.to_dict(),
                "contributors": self.contributors,
                "chunks": [len(c) for c in self.chunks],
            },
            separators=(",", ":"),
        ).encode()
        return b"".join([MAGIC, len(header).to_bytes(4, "big"), header, *self.chunks])

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse the wire form; raises :class:`InvalidCiphertext` naming the defect."""
        data = bytes(data)
        if not data.startswith(MAGIC):
            raise InvalidCiphertext("not an encrypted-model envelope (bad magic bytes)")
        start = len(MAGIC) + 4
        if len(data) < start:
            raise InvalidCiphertext("truncated envelope (no header)")
        header_len = int.from_bytes(data[len(MAGIC) : start], "big")
        if header_len > _MAX_HEADER_BYTES or start + header_len > len(data):
            raise InvalidCiphertext("truncated or malformed envelope header")
        try:
            header = json.loads(data[start : start + header_len])
            if header["version"] != VERSION:
                raise InvalidCiphertext(f"unsupported envelope version {header['version']!r}")
            lengths = [int(n) for n in header["chunks"]]
            layout = Layout.from_json(header["layout"])
            limits = DeclaredLimits.from_dict(dict(header["limits"]))
            fingerprint = bytes.fromhex(header["key"])
            scheme = str(header["scheme"])
            contributors = int(header["contributors"])
        except InvalidCiphertext:
            raise
        except (ValueError, KeyError, TypeError, HEConfigError) as err:
            raise InvalidCiphertext(f"malformed envelope header ({type(err).__name__})") from None
        if any(n <= 0 for n in lengths) or len(fingerprint) != 32:
            raise InvalidCiphertext("malformed envelope header (chunk lengths or key)")
        offset = start + header_len
        body_len = len(data) - offset
        if body_len != sum(lengths):
            raise InvalidCiphertext(
                f"truncated or padded ciphertext: {body_len} bytes, header says {sum(lengths)}"
            )
        chunks = []
        for n in lengths:
            chunks.append(data[offset : offset + n])
            offset += n
        return cls(scheme, fingerprint, layout, limits, contributors, tuple(chunks))
