"""SIDeR OpenAPI schema states the deployment's real limits (so `schemathesis run` with its default
checks does not see schema-valid requests refused): a schema-valid request whose image cannot be used
gets 200 with the reason (protect: published=false; verify: comparable=false), /restore answers every
image it cannot use with the one 403, and the length rules the schema states are exactly the
service's. No Ray: the schema is built from the FastAPI app, the service runs in-process."""

import base64
import io

import pytest
from PIL import Image

from edgeray.config import load_config
from serving.sider.app import api, declare_limits
from serving.sider.config import SiderConfig


def _schema(overrides=()):
    api.openapi_schema = None
    return declare_limits(api.openapi(), load_config(SiderConfig, overrides=list(overrides)))


def test_schema_declares_the_configured_limits():
    schema = _schema(["limits.max_samples=3", "crypto.min_password_bytes=14"])
    protect = schema["paths"]["/protect"]["post"]
    for body in protect["requestBody"]["content"].values():
        props = body["schema"]["properties"]
        assert props["n_samples"]["maximum"] == 3 and props["n_samples"]["minimum"] == 1
        assert props["password"]["minLength"] == 14 and props["password"]["maxLength"] == 256
    form = protect["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["additionalProperties"] is False and form["schema"]["required"] == ["image", "password"]
    assert form["schema"]["properties"]["image"]["minLength"] == 1
    assert form["schema"]["properties"]["image"]["maxLength"] == 8 * 2**20
    as_json = protect["requestBody"]["content"]["application/json"]["schema"]["properties"]["image_b64"]
    assert as_json["contentEncoding"] == "base64" and as_json["maxLength"] == 4 * -(-8 * 2**20 // 3)
    import re
    for good in ("AAAA", "AB==", "ABC=", "QUJD" * 3):          # the pattern is what b64decode(validate) takes
        assert re.fullmatch(as_json["pattern"], good) and base64.b64decode(good, validate=True) is not None
    for bad in ("0", "00", "A===", "AB=C", "ABC", "AB CD", "!!!!"):
        assert not re.fullmatch(as_json["pattern"], bad)
    assert form["encoding"]["image"]["contentType"] == "image/png, image/jpeg, image/webp"
    assert protect["x-sider-image"]["min_side_px"] == 64 and protect["x-sider-image"]["needs_face"]
    assert "64 to 2048 px" in protect["description"] and "published=false" in protect["description"]
    restore = schema["paths"]["/restore"]["post"]["requestBody"]["content"]
    assert restore["application/json"]["schema"]["required"] == ["image_b64", "password"]
    assert restore["multipart/form-data"]["schema"]["properties"]["password"]["minLength"] == 1
    assert restore["application/json"]["schema"]["additionalProperties"] is False
    verify = schema["paths"]["/verify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert verify["required"] == ["image_a", "image_b"]


def _image(size, fmt):
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 60, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def service():
    from serving.sider.service import SiderService
    return SiderService(load_config(SiderConfig, overrides=["crypto.argon2_memory_kib=8192",
                                                            "crypto.argon2_iterations=1"]))


@pytest.mark.parametrize("image", [_image((1, 1), "PNG"), _image((3, 70), "JPEG"), _image((64, 64), "WEBP"),
                                   _image((1, 1), "GIF"), b"not an image", b"\x89PNG\r\n\x1a\n"],
                         ids=["png_1x1", "jpeg_3x70", "webp_64", "gif", "garbage", "png_header_only"])
def test_restore_answers_any_unusable_image_with_the_same_403(service, image):
    from serving.sider.service import ApiError
    for token in (None, "", "AAAA", base64.b64encode(b"SDR1" + bytes(40)).decode()):
        with pytest.raises(ApiError) as err:
            service.restore(image, "any password at all", token)
        assert (err.value.status, err.value.code) == (403, "restore_failed")


@pytest.mark.parametrize("image", [_image((1, 1), "PNG"), _image((1, 1), "JPEG"), _image((1, 1), "WEBP"),
                                   _image((80, 80), "PNG"), _image((1, 1), "GIF"), b"not an image"],
                         ids=["png_1x1", "jpeg_1x1", "webp_1x1", "png_no_face", "gif", "garbage"])
def test_protect_and_verify_answer_an_unusable_image_with_200_naming_the_problem(service, image):
    """What schemathesis sends for a binary part (1x1 samples) is schema-valid: 200, and the body says why
    nothing was published / the pair is not comparable."""
    out = service.protect(image, "correct horse battery staple 9")
    assert out["published"] is False and out["samples"] == []
    assert out["refused"]["error"] in {"invalid_image", "unsupported_format", "no_face_detected"}
    assert out["refused"]["message"]
    face = _image((80, 80), "PNG")
    res = service.verify(image, face)
    assert res["comparable"] is False and res["distance"] is None and res["same_identity"] is False
    assert set(res["problems"]) == {"image_a", "image_b"} or set(res["problems"]) == {"image_a"}
    assert res["problems"]["image_a"]["message"].startswith(("image_a", "no face"))


def test_the_service_enforces_exactly_the_schema_length_rules(service):
    """minLength/maxLength count characters; the service counts the same way (before NFC), so a
    schema-valid password is never a 422 and a schema-invalid one always is."""
    from serving.sider.service import ApiError
    face = _image((80, 80), "PNG")
    low, high = service.password_limits(protect=True)
    assert (low, high) == (12, 256)
    for bad in ("é" * 11, "0" * 11, "x" * 257, ""):        # 11 chars (22 bytes); 11; too long; empty
        for image in (face, b"not an image"):               # refused whatever the image (schema first)
            with pytest.raises(ApiError) as err:
                service.protect(image, bad)
            assert (err.value.status, err.value.code) == (422, "invalid_password")
    assert service.protect(face, "é" * 12)["refused"]["error"] in {"weak_password", "no_face_detected"}
    with pytest.raises(ApiError) as err:                    # 256 four-byte characters: 1024 bytes, allowed
        service.restore(face, "\U0001F600" * 257, None)
    assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        service.restore(face, "\U0001F600" * 256, None)
    assert err.value.status == 403
