"""Password-bound restoration envelope (OUR DESIGN; the paper's carrier is a password-conditioned
invertible network whose details are unpublished).

    token = header || AES-256-GCM(key, plaintext, AAD)
    header = "SDR1" | kdf id | 3 kdf params | salt(16) | nonce(12) | carrier | lsb bits | region | image size
    key = Argon2id(password, salt)   (scrypt when OpenSSL lacks Argon2, or when configured)
    AAD = header || "sider/1" || SHA-256(the protected pixels, carrier bits masked)

Every header field is authenticated, and the AAD binds the token to the exact protected pixels,
so a token cannot be replayed onto another image and any flipped pixel or token bit fails the tag.
`open_token` always runs a KDF (with the server's own parameters when the token is unreadable)
and raises one `RestoreFailed` for every failure, so neither the message nor the timing tells a
wrong password from a tampered image or a garbage token.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

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

    @classmethod
    def from_config(cls, cfg: CryptoConfig, argon2_ok: bool) -> "KdfParams":
        if cfg.kdf == "argon2id" and argon2_ok:
            return cls(KDF_ARGON2ID, cfg.argon2_memory_kib, cfg.argon2_iterations, 1)
        return cls(KDF_SCRYPT, cfg.scrypt_log2_n, 8, 1)

    def acceptable(self, own: "KdfParams") -> bool:
        """Bounds for parameters read from a token: no one makes us spend more than 4x our own cost."""
        if self.kdf == KDF_ARGON2ID:
            return 8192 <= self.a <= 4 * max(own.a, 65536) and 1 <= self.b <= 10 and self.c == 1
        if self.kdf == KDF_SCRYPT:
            return 10 <= self.a <= 20 and self.b == 8 and self.c == 1
        return False

    def describe(self) -> dict:
        if self.kdf == KDF_ARGON2ID:
            return {"kdf": "argon2id", "memory_kib": self.a, "iterations": self.b, "lanes": self.c}
        return {"kdf": "scrypt", "n": 2 ** self.a, "r": self.b, "p": self.c}


def derive_key(password: bytes, salt: bytes, params: KdfParams) -> bytes:
    if params.kdf == KDF_ARGON2ID:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
        return Argon2id(salt=salt, length=32, iterations=params.b, lanes=params.c,
                        memory_cost=params.a).derive(password)
    return Scrypt(salt=salt, length=32, n=2 ** params.a, r=params.b, p=params.c).derive(password)


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


def seal(password: bytes, plaintext: bytes, header: Header, cover_digest: bytes) -> bytes:
    key = derive_key(password, header.salt, header.params)
    head = header.pack()
    return head + AESGCM(key).encrypt(header.nonce, plaintext, head + VERSION + cover_digest)


def new_header(params: KdfParams, carrier: int, lsb_bits: int, region: tuple, size: tuple) -> Header:
    return Header(params, os.urandom(16), os.urandom(12), carrier, lsb_bits, tuple(region), tuple(size))


def open_token(password: bytes, token: bytes, own: KdfParams, cover_digest_for) -> tuple[Header, bytes]:
    """Decrypt; `cover_digest_for(header)` hashes the protected pixels the way the header says.
    Raises RestoreFailed for every failure, after running a KDF in every case."""
    try:
        header = Header.unpack(token)
        usable = header.params.acceptable(own)
    except (ValueError, struct.error):
        header, usable = None, False
    if not usable:
        derive_key(password, os.urandom(16), own)  # same work as a real attempt
        raise RestoreFailed()
    key = derive_key(password, header.salt, header.params)
    try:
        digest = cover_digest_for(header)
        head = token[:HEADER_SIZE]
        return header, AESGCM(key).decrypt(header.nonce, token[HEADER_SIZE:], head + VERSION + digest)
    except (InvalidTag, ValueError):
        raise RestoreFailed() from None


def pixel_digest(pixels) -> bytes:
    """SHA-256 over shape and raw bytes of a uint8 HxWx3 array."""
    return hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.tobytes()).digest()
