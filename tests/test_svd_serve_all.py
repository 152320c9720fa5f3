"""`edgeray serve all` on a 2-CPU Ray (the two apps hold one CPU each, so a warm-start Ray task
could never be scheduled): a task registered over HTTP still becomes ready (it trains in the SVD
replica, `serve.task_placement=auto`) and then steers a completion. Needs the SmolLM2 asset
(`bash scripts/assets/svd.sh`) and the SIDeR assets, as `edgeray serve all` does."""

import math
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from serving.svd.model import SMOLLM2_GGUF, resolve_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_task_registered_under_serve_all_becomes_ready():
    if not Path(resolve_source(SMOLLM2_GGUF)).is_file():
        pytest.skip("SmolLM2 asset missing: bash scripts/assets/svd.sh")
    port = 18137
    proc = subprocess.Popen([sys.executable, "-m", "edgeray.cli", "serve", "all", "--num-cpus", "2",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    # the default tasks_dir (runs/svd_tasks) is the repo's: a unique name, deleted at the end
    name = f"serve-all-{uuid.uuid4().hex[:8]}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not any("serving; Ctrl-C" in x for x in lines):
            time.sleep(0.5)
        assert any("serving; Ctrl-C" in x for x in lines), "".join(lines)[-3000:]
        train = [{"prompt": f"Is {k} odd or even? Answer:", "target": " odd" if k % 2 else " even"} for k in range(16)]
        resp = httpx.post(base + "/svd/tasks", json={"name": name, "train": train, "batch_size": 4, "max_steps": 2},
                          timeout=60)
        assert resp.status_code == 202, resp.text
        assert resp.json()["runs_in"] == "replica"      # no CPU is free for a Ray task: no silent wait
        deadline = time.time() + 300
        while time.time() < deadline:
            record = httpx.get(f"{base}/svd/tasks/{name}", timeout=60).json()
            if record["status"] in ("ready", "failed"):
                break
            assert "waiting" not in record, record
            time.sleep(1)
        assert record["status"] == "ready", record
        assert record["runs_in"] == "replica" and math.isfinite(record["mu_bar"]) and record["n_calib_tokens"] > 0
        out = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "Is 7 odd or even? Answer:",
                                                         "max_tokens": 2}, timeout=120)
        assert out.status_code == 200, out.text
        assert out.json()["svd"]["task"] == name and out.json()["svd"]["enabled"] is True
        assert httpx.get(base + "/sider/health", timeout=60).status_code == 200   # the other app answers too
    finally:
        try:
            httpx.delete(f"{base}/svd/tasks/{name}", timeout=60)
        except httpx.HTTPError:
            pass
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-2000:]
