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


def test_only_the_servers_own_kdf_parameters_are_accepted(fast_kdf):
    own = crypto.KdfParams.from_config(CryptoConfig(), True)
    assert own.acceptable(own)
    assert not crypto.KdfParams(crypto.KDF_ARGON2ID, 4 * 1024 * 1024, 3, 1).acceptable(own)
    assert not crypto.KdfParams(crypto.KDF_ARGON2ID, 65536, 4, 1).acceptable(own)     # more passes
    assert not crypto.KdfParams(crypto.KDF_SCRYPT, 20, 8, 1).acceptable(own)          # the other KDF
    assert not crypto.KdfParams(9, 1, 1, 1).acceptable(own)
    assert not fast_kdf.acceptable(own)                                              # cheaper: no either


def test_a_token_asking_for_other_kdf_parameters_is_refused_at_the_servers_cost(fast_kdf):
    """The header's KDF fields are unauthenticated until the tag check: a token that asks for a
    costlier KDF must run the decoy at OUR cost (timed against a normal wrong password)."""
    original, protected = _images(6)
    _, token = restoration.protect_payload(original, protected, REGION, PASSWORD, fast_kdf, "none")
    costly = crypto.KdfParams(crypto.KDF_SCRYPT, 17, 8, 1)          # 128 MiB, ~10x our fast cost
    header = crypto.Header.unpack(token)
    minted = crypto.seal(PASSWORD, b"x", crypto.Header(costly, header.salt, header.nonce, header.carrier,
                                                        header.lsb_bits, header.region, header.size),
                         restoration.cover_digest(protected, header))

    def timed(tok, password):
        start = time.perf_counter()
        with pytest.raises(crypto.RestoreFailed):
            restoration.restore(protected, tok, password, fast_kdf)
        return time.perf_counter() - start
    wrong = min(timed(token, b"wrong password!!") for _ in range(3))
    other = min(timed(minted, PASSWORD) for _ in range(3))      # even the right password is refused
    assert other < 3 * wrong + 0.05                              # same order: no costly KDF was run


def _webp(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _vp8l_with_size(data: bytes, width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header declares another size (what a crafted bomb does)."""
    out = bytearray(data)
    at = out.index(b"VP8L") + 8
    assert out[at] == 0x2F
    bits = int.from_bytes(out[at + 1:at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    out[at + 1:at + 5] = bits.to_bytes(4, "little")
    return bytes(out)


def _mint(fast_kdf, pixels, plaintext: bytes, region) -> bytes:
    """A token anyone can make for their own upload: valid tag, chosen payload."""
    header = crypto.new_header(fast_kdf, crypto.CARRIER_TOKEN, 0, region, pixels.shape[:2])
    return crypto.seal(PASSWORD, plaintext, header, restoration.cover_digest(pixels, header))


def test_self_minted_oversized_webp_is_refused_before_decoding(fast_kdf):
    import resource
    import struct

    _, protected = _images(7)
    bomb = _vp8l_with_size(_webp(64, 64), 9000, 9000)   # under PIL's own bomb guard
    with Image.open(io.BytesIO(bomb)) as img:
        assert img.size == (9000, 9000)              # the header says 9000 x 9000 (324 MB of RGBA)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for region in (REGION, (0, 0, 200, 240)):
        token = _mint(fast_kdf, protected, struct.pack("<I", len(bomb)) + bomb, region)
        with pytest.raises(crypto.RestoreFailed):
            restoration.restore(protected, token, PASSWORD, fast_kdf)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200


@pytest.mark.parametrize("case", ["region_outside", "length_too_big", "not_webp", "empty", "lsb_bits_missing"])
def test_self_minted_bad_payloads_are_one_failure(fast_kdf, case):
    import struct

    _, protected = _images(8)
    good = _webp(REGION[3] - REGION[1], REGION[2] - REGION[0])
    region, carrier = REGION, crypto.CARRIER_TOKEN
    plaintext = struct.pack("<I", len(good)) + good
    if case == "region_outside":
        region = (150, 200, 250, 300)                 # beyond the 200 x 240 image
    elif case == "length_too_big":
        plaintext = struct.pack("<I", 10 ** 9) + good
    elif case == "not_webp":
        png = io.BytesIO()
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(png, format="PNG")
        plaintext = struct.pack("<I", len(png.getvalue())) + png.getvalue()
    elif case == "empty":
        plaintext = b""
    else:
        carrier = crypto.CARRIER_LSB
    header = crypto.new_header(fast_kdf, carrier, 1 if carrier else 0, region, protected.shape[:2])
    try:
        digest = restoration.cover_digest(protected, header)
    except ValueError:
        digest = b""
    token = crypto.seal(PASSWORD, plaintext, header, digest)
    with pytest.raises(crypto.RestoreFailed):
        restoration.restore(protected, token, PASSWORD, fast_kdf)


def test_pepper_binds_tokens_to_the_server(fast_kdf, tmp_path):
    from edgeray.errors import UserError

    pepper_file = tmp_path / "pepper.bin"
    pepper_file.write_bytes(b"p" * 32)
    peppered = crypto.KdfParams.from_config(CryptoConfig(argon2_memory_kib=8192, argon2_iterations=1),
                                            crypto.argon2_available(), crypto.read_pepper(str(pepper_file)))
    assert "pppp" not in repr(peppered)
    original, protected = _images(9)
    _, token = restoration.protect_payload(original, protected, REGION, PASSWORD, peppered, "none")
    assert np.array_equal(restoration.restore(protected, token, PASSWORD, peppered), original)
    with pytest.raises(crypto.RestoreFailed):                      # the password alone is not enough
        restoration.restore(protected, token, PASSWORD, fast_kdf)
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(UserError, match="at least 16"):
        crypto.read_pepper(str(tmp_path / "short"))
    with pytest.raises(UserError, match="cannot be read"):
        crypto.read_pepper(str(tmp_path / "missing"))


def test_kdf_gate_limits_concurrency():
    import threading

    gate = crypto.KdfGate(1, wait_s=0.2)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with gate:
            entered.set()
            release.wait(5)
    worker = threading.Thread(target=hold)
    worker.start()
    entered.wait(5)
    with pytest.raises(crypto.KdfBusy):
        with gate:
            pass
    release.set()
    worker.join()
    with gate:       # free again
        pass


def test_passphrase_entropy_estimate():
    assert crypto.estimate_entropy_bits("") == 0.0
    assert crypto.estimate_entropy_bits("aaaaaaaaaaaaaaaa") < 10           # runs count once
    assert crypto.estimate_entropy_bits("abababababababab") < 40           # capped at 3x distinct chars
    assert crypto.estimate_entropy_bits("correct horse battery staple") > 60
    assert crypto.estimate_entropy_bits("Tr0ub4dor&3x") > 40
