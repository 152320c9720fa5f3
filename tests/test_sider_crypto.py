"""SIDeR restoration envelope and carriers: round trips, rejection, bit-exactness (no Ray, no dlib)."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from serving.sider import crypto, restoration
from serving.sider.config import CryptoConfig

PASSWORD = b"correct horse battery"
REGION = (40, 50, 140, 150)   # top, left, bottom, right


@pytest.fixture(scope="module")
def fast_kdf():
    # cheap Argon2id so the many round trips stay fast; the default cost is tested once below
    return crypto.KdfParams.from_config(CryptoConfig(argon2_memory_kib=8192, argon2_iterations=1),
                                        crypto.argon2_available())


def _images(seed=0, shape=(200, 240, 3)):
    # smooth gradients + mild noise: compresses like a photo (pure noise would not fit in the pixels)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.stack([yy * 0.8, xx * 0.6, (yy + xx) * 0.4], -1) + rng.normal(0, 3, shape)
    original = np.clip(base, 0, 255).astype(np.uint8)
    protected = original.copy()
    top, left, bottom, right = REGION
    protected[top:bottom, left:right] = rng.integers(0, 256, (bottom - top, right - left, 3), dtype=np.uint8)
    return original, protected


@pytest.mark.parametrize("embed", ["none", "chunk", "lsb"])
def test_round_trip_is_bit_exact(fast_kdf, embed):
    original, protected = _images()
    published, token = restoration.protect_payload(original, protected, REGION, PASSWORD, fast_kdf, embed)
    restored = restoration.restore(published, token, PASSWORD, fast_kdf)
    assert restored.dtype == np.uint8 and np.array_equal(restored, original)
    if embed != "lsb":
        assert np.array_equal(published, protected)   # the token carriers do not touch pixels
    else:
        changed = np.argwhere(published != protected)
        # in-pixel carrier: only the region's low bits and the locator in row 0 change
        assert all(r == 0 or REGION[0] <= r < REGION[2] for r in changed[:, 0])
        assert np.abs(published.astype(int) - protected.astype(int)).max() < 2 ** restoration.MAX_LSB_BITS


def test_restore_from_the_png_alone(fast_kdf):
    original, protected = _images(1)
    for embed, reader in (("chunk", lambda img: restoration.chunk_token(img.text)),
                          ("lsb", lambda img: restoration.lsb_token(np.asarray(img)))):
        published, token = restoration.protect_payload(original, protected, REGION, PASSWORD, fast_kdf, embed)
        png = restoration.encode_png(published, token if embed == "chunk" else None)
        img = Image.open(io.BytesIO(png))
        img.load()
        carried = reader(img)
        assert carried == token
        pixels = np.asarray(img.convert("RGB"))
        assert np.array_equal(restoration.restore(pixels, carried, PASSWORD, fast_kdf), original)


def test_lsb_carrier_needs_room(fast_kdf):
    original, protected = _images(2)
    with pytest.raises(restoration.CarrierError, match="embed=chunk"):
        restoration.protect_payload(original, protected, (40, 50, 44, 54), PASSWORD, fast_kdf, "lsb")


@pytest.mark.parametrize("embed", ["none", "lsb"])
def test_every_tampering_gives_the_same_failure(fast_kdf, embed):
    original, protected = _images(3)
    published, token = restoration.protect_payload(original, protected, REGION, PASSWORD, fast_kdf, embed)

    def fails(pixels, tok, password=PASSWORD):
        with pytest.raises(crypto.RestoreFailed) as info:
            restoration.restore(pixels, tok, password, fast_kdf)
        assert str(info.value) == ""       # one error, no detail to tell cases apart

    fails(published, token, b"wrong password!")
    flipped = bytearray(token)
    flipped[-5] ^= 0x01
    fails(published, bytes(flipped))
    header_flip = bytearray(token)
    header_flip[40] ^= 0x80                # inside the nonce: authenticated via the AAD
    fails(published, bytes(header_flip))
    outside = published.copy()
    outside[180, 10, 1] ^= 1               # one bit of one pixel outside the region
    fails(outside, token)
    inside = published.copy()
    inside[60, 60, 0] ^= 0x80              # a high bit inside the region
    fails(inside, token)
    other_original, other_protected = _images(4)
    fails(other_protected, token)          # token moved to another image of the same size
    fails(published[:, :-1], token)        # cropped
    fails(published, b"garbage")
    fails(published, b"")


def test_token_of_one_sample_does_not_open_another(fast_kdf):
    original, protected = _images(5)
    _, token_a = restoration.protect_payload(original, protected, REGION, PASSWORD, fast_kdf, "none")
    second = protected.copy()
    second[REGION[0]:REGION[2], REGION[1]:REGION[3]] ^= 7
    with pytest.raises(crypto.RestoreFailed):
        restoration.restore(second, token_a, PASSWORD, fast_kdf)


def test_kdf_always_runs():
    own = crypto.KdfParams.from_config(CryptoConfig(), crypto.argon2_available())
    salt = b"s" * 16
    start = time.perf_counter()
    crypto.derive_key(PASSWORD, salt, own)
    one_kdf = time.perf_counter() - start
    for token in (b"", b"garbage" * 10, crypto.MAGIC + b"\xff" * 80):
        start = time.perf_counter()
        with pytest.raises(crypto.RestoreFailed):
            crypto.open_token(PASSWORD, token, own, lambda h: b"")
        assert time.perf_counter() - start > 0.5 * one_kdf


def test_default_kdf_is_argon2id_when_available():
    params = crypto.KdfParams.from_config(CryptoConfig(), crypto.argon2_available())
    if crypto.argon2_available():
        assert params.describe() == {"kdf": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 1}
    scrypt = crypto.KdfParams.from_config(CryptoConfig(kdf="scrypt"), True)
    assert scrypt.describe()["kdf"] == "scrypt"
    key_a = crypto.derive_key(PASSWORD, b"x" * 16, scrypt)
    assert len(key_a) == 32 and key_a != crypto.derive_key(b"other password", b"x" * 16, scrypt)


def test_token_kdf_cost_is_bounded(fast_kdf):
    own = crypto.KdfParams.from_config(CryptoConfig(), True)
    assert not crypto.KdfParams(crypto.KDF_ARGON2ID, 4 * 1024 * 1024, 3, 1).acceptable(own)
    assert not crypto.KdfParams(crypto.KDF_SCRYPT, 30, 8, 1).acceptable(own)
    assert not crypto.KdfParams(9, 1, 1, 1).acceptable(own)
    assert fast_kdf.acceptable(own)
