"""Password-bound restoration envelope (OUR DESIGN; the paper's carrier is a password-conditioned
invertible network whose details are unpublished).

    token = header || AES-256-GCM(key, plaintext, AAD)
    header = "SDR1" | kdf id | 3 kdf params | salt(16) | nonce(12) | carrier | lsb bits | region | image size
    key = Argon2id(password, salt)   (scrypt when OpenSSL lacks Argon2, or when configured)
    AAD = header || "sider/1" || SHA-256(the protected pixels, carrier bits masked)

Every header field is authenticated, and the AAD binds the token to the exact protected pixels,
so a token cannot be replayed onto another image and any flipped pixel or token bit fails the tag.
`open_token` accepts only the server's OWN KDF and parameters: a token that asks for another KDF or
another cost runs the decoy KDF at the server's cost and fails like a wrong password. It always
runs exactly one KDF and raises one `RestoreFailed` for every failure, so neither the message nor
the timing tells a wrong password from a tampered image or a garbage token. KDF runs are gated
(`KdfGate`: at most `crypto.max_concurrent_kdf` at once). An optional server-side pepper makes the
key HMAC-SHA256(pepper, KDF(password)).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import threading
from pathlib import Path
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edgeray.errors import UserError
from serving.sider.config import CryptoConfig

MAGIC = b"SDR1"
VERSION = b"sider/1"
KDF_ARGON2ID, KDF_SCRYPT = 1, 2
KDF_NAMES = {KDF_ARGON2ID: "argon2id", KDF_SCRYPT: "scrypt"}
CARRIER_TOKEN, CARRIER_LSB = 0, 1
_HEADER = struct.Struct("<4sBIII16s12sBB4H2H")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 16


class RestoreFailed(Exception):
    """Wrong password, tampered image, mismatched or garbage token: deliberately one error."""


def argon2_available() -> bool:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
        Argon2id(salt=b"\0" * 16, length=32, iterations=1, lanes=1, memory_cost=8).derive(b"probe")
        return True
    except Exception:  # ImportError or UnsupportedAlgorithm on an OpenSSL without Argon2
        return False


@dataclass(frozen=True)
class KdfParams:
    kdf: int
    a: int  # argon2: memory KiB | scrypt: log2 n
    b: int  # argon2: iterations | scrypt: r
    c: int  # argon2: lanes      | scrypt: p
    pepper: bytes = field(default=b"", repr=False)   # server-side secret, never in a token or a log

    @classmethod
    def from_config(cls, cfg: CryptoConfig, argon2_ok: bool, pepper: bytes = b"") -> "KdfParams":
        if cfg.kdf == "argon2id" and argon2_ok:
            return cls(KDF_ARGON2ID, cfg.argon2_memory_kib, cfg.argon2_iterations, 1, pepper)
        return cls(KDF_SCRYPT, cfg.scrypt_log2_n, 8, 1, pepper)

    def acceptable(self, own: "KdfParams") -> bool:
        """A token's parameters are accepted only when they are exactly the server's own: nobody
        chooses our KDF or its cost from an unauthenticated header."""
        return (self.kdf, self.a, self.b, self.c) == (own.kdf, own.a, own.b, own.c)

    def describe(self) -> dict:
        if self.kdf == KDF_ARGON2ID:
            return {"kdf": "argon2id", "memory_kib": self.a, "iterations": self.b, "lanes": self.c}
        return {"kdf": "scrypt", "n": 2 ** self.a, "r": self.b, "p": self.c}


def derive_key(password: bytes, salt: bytes, params: KdfParams, gate: "KdfGate | None" = None) -> bytes:
    with gate or _NO_GATE:
        if params.kdf == KDF_ARGON2ID:
            from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
            key = Argon2id(salt=salt, length=32, iterations=params.b, lanes=params.c,
                           memory_cost=params.a).derive(password)
        else:
            key = Scrypt(salt=salt, length=32, n=2 ** params.a, r=params.b, p=params.c).derive(password)
    return hmac.new(params.pepper, key, hashlib.sha256).digest() if params.pepper else key


class KdfBusy(Exception):
    """No KDF slot became free within the wait (HTTP 429)."""


class KdfGate:
    """At most `limit` KDF runs at once; a caller waits up to `wait_s`, then KdfBusy."""

    def __init__(self, limit: int, wait_s: float):
        self._sem, self.wait_s = threading.BoundedSemaphore(limit), wait_s

    def __enter__(self):
        if not self._sem.acquire(timeout=self.wait_s):
            raise KdfBusy()
        return self

    def __exit__(self, *exc):
        self._sem.release()
        return False


class _Ungated:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_GATE = _Ungated()


def read_pepper(path: str) -> bytes:
    """The pepper file's bytes ('' = no pepper); a missing or short file is a config error."""
    if not path:
        return b""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"sider.crypto.pepper_file={path!r} cannot be read ({exc.strerror})") from None
    if len(data) < 16:
        raise UserError(f"sider.crypto.pepper_file={path!r} holds {len(data)} bytes; at least 16 random "
                        f"bytes are needed (e.g. head -c 32 /dev/urandom > pepper.bin)")
    return data


def estimate_entropy_bits(text: str) -> float:
    """A crude passphrase-strength estimate (OUR policy, no dictionary): log2 of the character pool
    the text draws from (lower, upper, digits, ASCII symbols/space, other) times its effective length,
    where runs of one character count once and the length is capped at 3x the distinct characters."""
    if not text:
        return 0.0
    pool = 0
    pool += 26 if any(c.islower() and c.isascii() for c in text) else 0
    pool += 26 if any(c.isupper() and c.isascii() for c in text) else 0
    pool += 10 if any(c.isdigit() and c.isascii() for c in text) else 0
    pool += 33 if any(c.isascii() and not c.isalnum() for c in text) else 0
    pool += 100 if any(not c.isascii() for c in text) else 0
    collapsed = [c for i, c in enumerate(text) if i == 0 or c != text[i - 1]]
    length = min(len(collapsed), 3 * len(set(text)))
    return length * math.log2(max(pool, 2))


@dataclass(frozen=True)
class Header:
    params: KdfParams
    salt: bytes
    nonce: bytes
    carrier: int                          # CARRIER_TOKEN (token / PNG chunk) or CARRIER_LSB
    lsb_bits: int                         # low bits per channel used by the in-pixel carrier
    region: tuple[int, int, int, int]     # top, left, bottom, right of the stored original crop
    size: tuple[int, int]                 # image height, width

    def pack(self) -> bytes:
        p = self.params
        return _HEADER.pack(MAGIC, p.kdf, p.a, p.b, p.c, self.salt, self.nonce, self.carrier,
                            self.lsb_bits, *self.region, *self.size)

    @classmethod
    def unpack(cls, token: bytes) -> "Header":
        if len(token) < HEADER_SIZE + TAG_SIZE:
            raise ValueError("token too short")
        magic, kdf, a, b, c, salt, nonce, carrier, bits, t, l, bo, r, h, w = _HEADER.unpack_from(token)
        if magic != MAGIC or carrier not in (CARRIER_TOKEN, CARRIER_LSB) or not (0 <= bits <= 6):
            raise ValueError("not a SIDeR token")
        return cls(KdfParams(kdf, a, b, c), salt, nonce, carrier, bits, (t, l, bo, r), (h, w))


def seal(password: bytes, plaintext: bytes, header: Header, cover_digest: bytes,
         gate: KdfGate | None = None) -> bytes:
    key = derive_key(password, header.salt, header.params, gate)
    head = header.pack()
    return head + AESGCM(key).encrypt(header.nonce, plaintext, head + VERSION + cover_digest)


def new_header(params: KdfParams, carrier: int, lsb_bits: int, region: tuple, size: tuple) -> Header:
    return Header(params, os.urandom(16), os.urandom(12), carrier, lsb_bits, tuple(region), tuple(size))


def open_token(password: bytes, token: bytes, own: KdfParams, cover_digest_for,
               gate: KdfGate | None = None) -> tuple[Header, bytes]:
    """Decrypt; `cover_digest_for(header)` hashes the protected pixels the way the header says.
    Raises RestoreFailed for every failure, after running exactly one KDF at the server's own
    parameters in every case."""
    try:
        header = Header.unpack(token)
        usable = header.params.acceptable(own)
    except (ValueError, struct.error):
        header, usable = None, False
    if not usable:
        derive_key(password, os.urandom(16), own, gate)  # the decoy: same work as a real attempt
        raise RestoreFailed()
    key = derive_key(password, header.salt, own, gate)   # own params (equal to the header's) + pepper
    try:
        digest = cover_digest_for(header)
        head = token[:HEADER_SIZE]
        return header, AESGCM(key).decrypt(header.nonce, token[HEADER_SIZE:], head + VERSION + digest)
    except Exception:   # InvalidTag, a bad size or region: one failure for all
        raise RestoreFailed() from None


def pixel_digest(pixels) -> bytes:
    """SHA-256 over shape and raw bytes of a uint8 HxWx3 array."""
    return hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.tobytes()).digest()
