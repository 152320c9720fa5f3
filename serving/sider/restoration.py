"""Bit-exact restoration and its carriers.

The plaintext is the ORIGINAL pixels of the changed region (lossless WebP) plus, for the in-pixel
carrier, the original low bits of the locator. Restoring = paste that crop back (and put the
locator bits back): every other pixel of the protected image is the original's, so the result is
bit-exact. The encrypted token travels in one of three ways (`embed`):

- "none":  only beside the image (the `restore_token` of the response);
- "chunk": also in an iTXt chunk `sider-restore` of the protected PNG (lost on re-encoding);
- "lsb":   in the pixels: the token fills the k lowest bits (k = 1..6, the smallest that fits) of
           the changed region, whose pixels restoration overwrites anyway, and a 15-byte locator
           (region, k, length) sits in the lowest bits of row 0's first 120 channel values. So the
           image alone plus the password restores it. Lost on any lossy re-encoding.
The token's AAD hashes the protected pixels with exactly those carrier bits cleared.
"""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
from PIL import Image, PngImagePlugin

from serving.sider import crypto

CHUNK_KEY = "sider-restore"
EMBED_MODES = ("none", "chunk", "lsb")
_LOCATOR = struct.Struct("<2s4HBI")
LOCATOR_MAGIC = b"SL"
LOCATOR_BITS = _LOCATOR.size * 8
MAX_LSB_BITS = 6   # 6 low bits = up to 63 levels of noise, only inside the already-changed region


class CarrierError(Exception):
    """The token does not fit the in-pixel carrier (image region too small)."""


def encode_png(pixels: np.ndarray, token: bytes | None = None) -> bytes:
    info = None
    if token is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(CHUNK_KEY, base64.b64encode(token).decode("ascii"))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def _lossless(pixels: np.ndarray) -> bytes:
    """Lossless WebP: about 20% smaller than PNG on photos, which decides whether the in-pixel
    carrier fits."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP", lossless=True, quality=100, method=4)
    return buf.getvalue()


def chunk_token(text_chunks: dict) -> bytes | None:
    value = text_chunks.get(CHUNK_KEY)
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        return None


def cover(pixels: np.ndarray, header: crypto.Header) -> np.ndarray:
    """The pixels with the carrier bits cleared: what the AAD digest covers."""
    masked = pixels.copy()
    if header.carrier == crypto.CARRIER_LSB:
        flat = masked.reshape(-1)
        flat[:LOCATOR_BITS] &= 0xFE
        top, left, bottom, right = header.region
        masked[top:bottom, left:right] &= (0xFF << header.lsb_bits) & 0xFF
    return masked


def cover_digest(pixels: np.ndarray, header: crypto.Header) -> bytes:
    if pixels.shape[:2] != tuple(header.size):
        raise ValueError("image size differs from the token's")
    return crypto.pixel_digest(cover(pixels, header))


def protect_payload(original: np.ndarray, protected: np.ndarray, region: tuple, password: bytes,
                    params: crypto.KdfParams, embed: str, gate: crypto.KdfGate | None = None
                    ) -> tuple[np.ndarray, bytes]:
    """Seal the original region under the password. Returns (pixels to publish, token)."""
    top, left, bottom, right = region
    crop_png = _lossless(np.ascontiguousarray(original[top:bottom, left:right]))
    saved_bits = b""
    lsb_bits = 0
    carrier = crypto.CARRIER_TOKEN
    if embed == "lsb":
        carrier = crypto.CARRIER_LSB
        saved_bits = np.packbits(original.reshape(-1)[:LOCATOR_BITS] & 1).tobytes()
        plaintext = struct.pack("<I", len(crop_png)) + crop_png + saved_bits
        token_len = crypto.HEADER_SIZE + len(plaintext) + crypto.TAG_SIZE
        lsb_bits = _lsb_bits_needed(region, token_len)
    else:
        plaintext = struct.pack("<I", len(crop_png)) + crop_png
    header = crypto.new_header(params, carrier, lsb_bits, region, protected.shape[:2])
    token = crypto.seal(password, plaintext, header, cover_digest(protected, header), gate)
    if embed == "lsb":
        protected = _write_lsb(cover(protected, header), token, header)
    return protected, token


def restore(pixels: np.ndarray, token: bytes, password: bytes, own: crypto.KdfParams,
            gate: crypto.KdfGate | None = None) -> np.ndarray:
    """The original image; crypto.RestoreFailed on any failure (one error for all).

    Anyone can mint a valid token for their own upload, so the decrypted payload is not trusted:
    the region must lie inside the image, the crop must be a WebP whose declared size equals the
    region BEFORE it is decoded (no decompression bomb is ever allocated), and the in-pixel
    carrier's saved bits must be there."""
    header, plaintext = crypto.open_token(password, token, own, lambda h: cover_digest(pixels, h), gate)
    try:
        return _apply_payload(pixels, header, plaintext)
    except Exception:
        raise crypto.RestoreFailed() from None


def _apply_payload(pixels: np.ndarray, header: crypto.Header, plaintext: bytes) -> np.ndarray:
    top, left, bottom, right = header.region
    h, w = pixels.shape[:2]
    if not (0 <= top < bottom <= h and 0 <= left < right <= w) or tuple(header.size) != (h, w):
        raise ValueError("region outside the image")
    (n,) = struct.unpack_from("<I", plaintext)
    if not 0 < n <= len(plaintext) - 4:
        raise ValueError("bad crop length")
    with Image.open(io.BytesIO(plaintext[4:4 + n]), formats=["WEBP"]) as img:   # reads the header only
        if img.size != (right - left, bottom - top):
            raise ValueError("crop size differs from the region")
        crop = np.asarray(img.convert("RGB"))
    out = pixels.copy()
    out[top:bottom, left:right] = crop
    if header.carrier == crypto.CARRIER_LSB:
        saved = plaintext[4 + n:]
        if len(saved) * 8 < LOCATOR_BITS:
            raise ValueError("saved locator bits missing")
        bits = np.unpackbits(np.frombuffer(saved, dtype=np.uint8))[:LOCATOR_BITS]
        flat = out.reshape(-1)
        flat[:LOCATOR_BITS] = (flat[:LOCATOR_BITS] & 0xFE) | bits
    return out


def lsb_token(pixels: np.ndarray) -> bytes | None:
    """The token an image carries in its pixels, or None when it carries no readable locator."""
    flat = pixels.reshape(-1)
    if flat.size < LOCATOR_BITS:
        return None
    magic, top, left, bottom, right, bits, length = _LOCATOR.unpack(np.packbits(flat[:LOCATOR_BITS] & 1).tobytes())
    h, w = pixels.shape[:2]
    inside = 1 <= top < bottom <= h and 0 <= left < right <= w
    if magic != LOCATOR_MAGIC or not (1 <= bits <= MAX_LSB_BITS) or not inside:
        return None
    values = pixels[top:bottom, left:right].reshape(-1)
    if length * 8 > values.size * bits:
        return None
    planes = [(values >> b) & 1 for b in range(bits)]
    stream = np.stack(planes, axis=1).reshape(-1)[: length * 8]
    return np.packbits(stream).tobytes()


def _lsb_bits_needed(region: tuple, nbytes: int) -> int:
    top, left, bottom, right = region
    values = (bottom - top) * (right - left) * 3
    for bits in range(1, MAX_LSB_BITS + 1):
        if values * bits >= nbytes * 8:
            return bits
    raise CarrierError(f"the in-pixel carrier needs {nbytes} bytes but the face region holds at most "
                       f"{values * MAX_LSB_BITS // 8}; use embed=chunk or embed=none")


def _write_lsb(masked: np.ndarray, token: bytes, header: crypto.Header) -> np.ndarray:
    """Write the stream (bit j of value i goes to bit plane j) and the locator into cleared bits."""
    top, left, bottom, right = header.region
    out = masked
    region = out[top:bottom, left:right].reshape(-1).copy()
    bits = header.lsb_bits
    stream = np.unpackbits(np.frombuffer(token, dtype=np.uint8))
    n_values = -(-stream.size // bits)
    padded = np.zeros(n_values * bits, dtype=np.uint8)
    padded[: stream.size] = stream
    planes = padded.reshape(n_values, bits)
    region[:n_values] |= sum((planes[:, b] << b) for b in range(bits)).astype(np.uint8)
    out[top:bottom, left:right] = region.reshape(bottom - top, right - left, 3)
    locator = _LOCATOR.pack(LOCATOR_MAGIC, top, left, bottom, right, bits, len(token))
    flat = out.reshape(-1)
    flat[:LOCATOR_BITS] |= np.unpackbits(np.frombuffer(locator, dtype=np.uint8))
    return out
