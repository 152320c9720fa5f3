"""`edgeray serve` end to end: its own local Ray, Serve behind HAProxy with direct ingress,
a real HTTP request, a clean stop on SIGTERM; bad input as one line and exit code 2."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from edgeray.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_edgeray_serve_sider_answers_and_stops(tmp_path):
    port = 18131
    proc = subprocess.Popen([sys.executable, "-m", "edgeray.cli", "serve", "sider", "--port", str(port),
                             "--set", "search.steps=2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any("serving; Ctrl-C" in x for x in lines):
            time.sleep(0.5)
        assert any("serving; Ctrl-C" in x for x in lines), "".join(lines)[-3000:]
        assert f"sider: http://127.0.0.1:{port}/sider/  (OpenAPI: /sider/docs)\n" in lines
        assert httpx.get(f"http://127.0.0.1:{port}/sider/health", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/sider/openapi.json", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-2000:]


@pytest.mark.e2e
@pytest.mark.slow
def test_edgeray_serve_bad_input():
    proc = subprocess.run([sys.executable, "-m", "edgeray.cli", "serve", "sider", "--set", "search.stepz=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("edgeray: error: unknown config key search.stepz")


@pytest.mark.parametrize("argv, message", [
    (["--address", "127.0.0.1:1"], "cannot attach to the Ray cluster at 127.0.0.1:1"),
    (["--num-cpus", "0"], "--num-cpus must be >= 1"),
])
def test_serve_bad_ray_options_fail_before_ray_starts(monkeypatch, capsys, argv, message):
    # connect() sets RAY_AUTH_MODE when attaching: keep that out of the other tests' environment
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "sider", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeray: error: ") and err.count("\n") == 1 and message in err
