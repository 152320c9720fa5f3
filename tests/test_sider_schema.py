"""SIDeR OpenAPI schema states the deployment's real limits (so `schemathesis run` with its default
checks does not see schema-valid requests refused), and /restore answers every image it cannot use
with the one 403. No Ray: the schema is built from the FastAPI app, the service runs in-process."""

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
        assert props["password"]["minLength"] == 14
    form = protect["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["additionalProperties"] is False and form["schema"]["required"] == ["image", "password"]
    assert form["schema"]["properties"]["image"]["minLength"] == 1
    assert form["encoding"]["image"]["contentType"] == "image/png, image/jpeg, image/webp"
    assert protect["x-sider-image"]["min_side_px"] == 64 and protect["x-sider-image"]["needs_face"]
    assert "64 to 2048 px" in protect["description"]
    restore = schema["paths"]["/restore"]["post"]["requestBody"]["content"]
    assert restore["application/json"]["schema"]["required"] == ["image_b64", "password"]
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


def test_protect_and_verify_still_name_the_image_problem(service):
    from serving.sider.service import ApiError
    with pytest.raises(ApiError) as err:
        service.verify(_image((1, 1), "PNG"), _image((80, 80), "PNG"))
    assert err.value.status == 422 and "image_a is 1x1; at least 64x64" in str(err.value)
    with pytest.raises(ApiError) as err:
        service.protect(_image((1, 1), "GIF"), "correct horse battery staple 9")
    assert err.value.status == 415
