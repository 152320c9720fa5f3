"""End to end on a real head: `ray start --head`, `ray job submit`, the Jobs REST API with a
token (and 401 without), and the run's metrics in the head's Prometheus text."""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgeray.localhead import LocalHead, auth_token, client_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def _get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read().decode()


@pytest.fixture(scope="module")
def head():
    head = LocalHead(gcs_port=6391, dashboard_port=8276, metrics_port=8096, client_port=20202, agent_port=52402,
                     num_cpus=2, extra_env={"RAY_metrics_report_interval_ms": "2000"}).start()
    yield head
    head.stop()


def test_unauthenticated_jobs_api_gets_401(head):
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(head.dashboard_url + "/api/jobs/")
    assert err.value.code == 401
    status, body = _get(head.dashboard_url + "/api/jobs/", auth_token())
    assert status == 200 and isinstance(json.loads(body), list)


def test_job_submit_runs_fedavg_and_exports_metrics(head, tmp_path):
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url,
         "--working-dir", str(ROOT), "--no-wait", "--",
         sys.executable, "-m", "edgeray.cli", "run", "fedavg", "--config", "configs/fedavg_digits.yaml",
         "--set", f"output_dir={tmp_path}", "--no-progress"],
        capture_output=True, text=True, env=client_env(), timeout=300)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)

    token, status, seen_metrics = auth_token(), None, ""
    deadline = time.time() + 600
    while time.time() < deadline:
        status = json.loads(_get(f"{head.dashboard_url}/api/jobs/{job_id}", token)[1])["status"]
        seen_metrics = _get(head.metrics_url)[1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") and "ray_edgeray_round_seconds" in seen_metrics:
            break
        time.sleep(2)
    logs = json.loads(_get(f"{head.dashboard_url}/api/jobs/{job_id}/logs", token)[1])["logs"]
    assert status == "SUCCEEDED", logs[-3000:]

    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_round"] == 4 and summary["final_test_accuracy"] > 0.6
    for name in ("edgeray_round_seconds", "edgeray_aggregate_seconds", "edgeray_clients_completed",
                 "edgeray_bytes_up_total", "edgeray_bytes_down_total"):
        assert f"ray_{name}" in seen_metrics, name
    assert f'run_id="{run_dir.name}"' in seen_metrics and 'method="fedavg"' in seen_metrics
    assert "client_id" not in seen_metrics  # no per-client tags


def test_edgeray_main_submits_and_follows_the_job(head, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeray.cli", "main", "--config", "configs/fedavg_digits.yaml",
                           "--address", head.dashboard_url, "--no-serve", "--set", f"output_dir={tmp_path}",
                           "--set", "rounds=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dashboard:  {head.dashboard_url}" in proc.stdout and "job id:     raysubmit_" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    assert f"results:    {run_dir}" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["final_round"] == 2


def test_edgeray_main_bad_input_fails_before_ray(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeray.cli", "main", "--set", "data.alpha=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "edgeray: error: data.alpha=-1.0 is out of range; it must be > 0"
