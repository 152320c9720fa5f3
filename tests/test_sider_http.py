"""SIDeR over HTTP against a real Ray Serve instance (session fixture `serve_url`), including a
schemathesis run of the served OpenAPI schema with all its default checks (slow)."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

pytestmark = pytest.mark.ray

APP, PREFIX = "sidertest", "/sidertest"
PASSWORD = "http-test-password-7f3a"
SETTINGS = ["search.steps=3", "crypto.argon2_memory_kib=8192", "crypto.argon2_iterations=1",
            "faces.max_faces=2", "limits.max_body_bytes=3000000", "limits.max_samples=2"]


@pytest.fixture(scope="module")
def base(serve_url):
    from ray import serve

    from serving.sider.app import app_builder

    serve.run(app_builder({"set": SETTINGS, "num_cpus": 0}), name=APP, route_prefix=PREFIX)
    yield serve_url + PREFIX
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base):
    with httpx.Client(base_url=base, timeout=120) as c:
        yield c


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


ASTRONAUT = data.astronaut()
ASTRONAUT_PNG = _png(ASTRONAUT)


@pytest.fixture(scope="module")
def protected(client):
    """Two samples from one multipart protect call (embed=chunk: the PNGs carry the token)."""
    r = client.post("/protect", files={"image": ("a.png", ASTRONAUT_PNG, "image/png")},
                    data={"password": PASSWORD, "n_samples": "2", "gamma": "0.6", "seed": "5", "embed": "chunk"})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_schema(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["backend"] == "morph"
    assert health["kdf"]["kdf"] in ("argon2id", "scrypt")
    schema = client.get("/openapi.json").json()
    assert {"/protect", "/restore", "/verify", "/health"} <= set(schema["paths"])
    content = schema["paths"]["/protect"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)


def test_protect_response_and_restore_from_png_alone(client, protected):
    assert protected["version"] == "sider/1" and protected["backend"] == "morph"
    assert len(protected["faces"]) == 1 and len(protected["samples"]) == 2
    first, second = protected["samples"]
    assert first["image_b64"] != second["image_b64"]
    for sample in protected["samples"]:
        assert sample["ssim_face"] < 1.0
        png = base64.b64decode(sample["image_b64"])
        r = client.post("/restore", files={"image": ("p.png", png, "image/png")}, data={"password": PASSWORD})
        assert r.status_code == 200, r.text
        assert r.json()["bit_exact"] is True
        assert np.array_equal(_pixels(base64.b64decode(r.json()["image_b64"])), ASTRONAUT)


def test_restore_with_token_over_json(client, protected):
    sample = protected["samples"][0]
    stripped = _png(_pixels(base64.b64decode(sample["image_b64"])))     # re-encoded: chunk gone
    r = client.post("/restore", json={"image_b64": base64.b64encode(stripped).decode(), "password": PASSWORD,
                                      "restore_token": sample["restore_token"]})
    assert r.status_code == 200, r.text
    assert np.array_equal(_pixels(base64.b64decode(r.json()["image_b64"])), ASTRONAUT)


def test_in_pixel_carrier_restores_without_chunk_or_token(client):
    r = client.post("/protect", json={"image_b64": base64.b64encode(ASTRONAUT_PNG).decode(),
                                      "password": PASSWORD, "embed": "lsb", "seed": 1})
    assert r.status_code == 200, r.text
    stripped = _png(_pixels(base64.b64decode(r.json()["samples"][0]["image_b64"])))
    r = client.post("/restore", files={"image": ("p.png", stripped, "image/png")}, data={"password": PASSWORD})
    assert r.status_code == 200, r.text
    assert np.array_equal(_pixels(base64.b64decode(r.json()["image_b64"])), ASTRONAUT)


def test_every_restore_failure_is_the_same_403(client, protected):
    first, second = protected["samples"]
    png_a, png_b = (base64.b64decode(s["image_b64"]) for s in (first, second))
    tampered = _pixels(png_a).copy()
    tampered[300, 300, 0] ^= 1
    attempts = [
        {"image": png_a, "password": "wrong-password-123"},
        {"image": _png(tampered), "password": PASSWORD, "restore_token": first["restore_token"]},
        {"image": png_b, "password": PASSWORD, "restore_token": first["restore_token"]},   # mismatched
        {"image": png_a, "password": PASSWORD, "restore_token": "bm90IGEgdG9rZW4="},      # garbage
        {"image": png_a, "password": PASSWORD, "restore_token": "%%%not base64%%%"},
        {"image": ASTRONAUT_PNG, "password": PASSWORD},                                      # carries nothing
    ]
    bodies = set()
    for attempt in attempts:
        fields = {k: v for k, v in attempt.items() if k != "image"}
        r = client.post("/restore", files={"image": ("p.png", attempt["image"], "image/png")}, data=fields)
        assert r.status_code == 403
        bodies.add(r.text)
    assert len(bodies) == 1 and '"restore_failed"' in bodies.pop()


def test_the_default_publishes_no_token_in_the_image(client):
    r = client.post("/protect", json={"image_b64": base64.b64encode(ASTRONAUT_PNG).decode(),
                                      "password": PASSWORD, "seed": 2})
    assert r.status_code == 200, r.text
    assert r.json()["embed"] == "none"
    png = base64.b64decode(r.json()["samples"][0]["image_b64"])
    assert b"sider-restore" not in png
    r = client.post("/restore", files={"image": ("p.png", png, "image/png")}, data={"password": PASSWORD})
    assert r.status_code == 403                      # the image alone carries nothing to guess against


def test_protect_does_not_block_verify(base):
    """A long protect holds the face models only per call, so /verify answers meanwhile."""
    import threading
    import time

    done = {}

    def long_protect():
        with httpx.Client(base_url=base, timeout=300) as c:
            c.post("/protect", json={"image_b64": base64.b64encode(ASTRONAUT_PNG).decode(),
                                     "password": PASSWORD, "n_samples": 2, "seed": 9})
        done["protect"] = time.monotonic()

    worker = threading.Thread(target=long_protect)
    worker.start()
    time.sleep(1.0)
    flipped = _png(np.ascontiguousarray(ASTRONAUT[:, ::-1]))
    with httpx.Client(base_url=base, timeout=300) as c:
        r = c.post("/verify", files={"image_a": ("a.png", ASTRONAUT_PNG, "image/png"),
                                     "image_b": ("b.png", flipped, "image/png")})
    verified = time.monotonic()
    worker.join()
    assert r.status_code == 200
    assert verified < done["protect"]


def test_verify_is_the_built_in_evaluator(client):
    flipped = _png(np.ascontiguousarray(ASTRONAUT[:, ::-1]))
    r = client.post("/verify", files={"image_a": ("a.png", ASTRONAUT_PNG, "image/png"),
                                      "image_b": ("b.png", flipped, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["same_identity"] is True and body["threshold"] == 0.6 and body["distance"] < 0.6


def test_bad_input_gives_4xx_json_and_the_replica_keeps_serving(client):
    face = ASTRONAUT[30:230, 120:320]
    many = np.concatenate([face] * 3, axis=1)
    cases = [    # schema-invalid requests and size limits: 4xx with {"error", "message"}
        (dict(files={"image": ("x.png", _png(np.zeros((2100, 80, 3), np.uint8)), "image/png")},
              data={"password": PASSWORD}), 413),
        (dict(files={"image": ("x.png", ASTRONAUT_PNG, "image/png")}, data={"password": ""}), 422),
        (dict(files={"image": ("x.png", ASTRONAUT_PNG, "image/png")}, data={"password": "p" * 5000}), 422),
        (dict(files={"image": ("x.png", ASTRONAUT_PNG, "image/png")}), 422),                # no password
        (dict(json={"image_b64": "!!!", "password": PASSWORD}), 422),
        (dict(json=[1, 2, 3]), 422),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 422),
        (dict(content=b"x" * 3_100_000, headers={"content-type": "application/json"}), 413),
        (dict(content=b"image=1", headers={"content-type": "text/plain"}), 415),
        (dict(json={"image_b64": base64.b64encode(ASTRONAUT_PNG).decode(), "password": PASSWORD,
                    "n_samples": 0}), 422),
    ]
    for kwargs, expected in cases:
        r = client.post("/protect", **kwargs)
        assert r.status_code == expected, (expected, r.status_code, r.text[:200])
        assert "error" in r.json()
    refused = [  # schema-valid, content unusable: 200, nothing published, the reason named
        (b"hello, not an image", "invalid_image"), (ASTRONAUT_PNG[:5000], "invalid_image"),
        (_png(np.full((200, 200, 3), 128, np.uint8)), "no_face_detected"), (_png(many), "too_many_faces")]
    for image, code in refused:
        r = client.post("/protect", files={"image": ("x.png", image, "image/png")}, data={"password": PASSWORD})
        assert r.status_code == 200, r.text[:200]
        body = r.json()
        assert (body["published"], body["samples"], body["refused"]["error"]) == (False, [], code)
    r = client.post("/verify", files={"image_a": ("a.png", ASTRONAUT_PNG, "image/png"),
                                      "image_b": ("b.png", b"\x89PNG\r\n\x1a\n", "image/png")})
    assert r.status_code == 200 and r.json()["comparable"] is False and "image_b" in r.json()["problems"]
    assert client.get("/health").status_code == 200


def test_password_never_reaches_the_logs(client, protected):
    import pathlib

    import ray

    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())  # private, test-only
    hits = [p for p in logs.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert hits == []


@pytest.mark.slow
def test_schemathesis_default_checks_pass(base):
    """Every default schemathesis check (no 5xx, schema-valid requests accepted, schema-invalid ones
    rejected, responses as documented) on generated requests, with no allowances (the CLI run is in
    docs/sider.md)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    failures, statuses = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case):
            try:
                response = case.call_and_validate(base_url=base, timeout=120)
                statuses.append(response.status_code)
            except (AssertionError, FailureGroup) as exc:    # a failed check
                failures.append((operation.label, str(exc)[:300]))

        call()
    assert failures == []
    assert len(statuses) >= 40 and 200 in statuses        # it did exercise the API
    with httpx.Client(base_url=base) as c:
        assert c.get("/health").status_code == 200


@pytest.mark.slow
@pytest.mark.e2e
def test_serve_run_starts_the_deploy_config(tmp_path):
    """`serve run` on the same YAML that `serve deploy` takes (its own local Ray, a free port)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = yaml.safe_load((root / "serving/sider/serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update({"num_cpus": 0, "set": ["search.steps=2"]})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = Path(sys.executable).parent / "serve"
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([str(serve_cli), "run", "-a", "local", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, health = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/sider/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert health is not None and health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)   # SIGINT, not SIGTERM: only SIGINT removes the app
        proc.wait(timeout=90)
