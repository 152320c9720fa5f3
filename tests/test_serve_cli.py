"""`edgeray serve` end to end: its own local Ray, Serve behind HAProxy with direct ingress,
a real HTTP request, a clean stop on SIGTERM."""

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


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


def test_edgeray_serve_bad_input():
    proc = subprocess.run([sys.executable, "-m", "edgeray.cli", "serve", "sider", "--set", "search.stepz=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("edgeray: error: unknown config key search.stepz")
