"""`edgeray main` brings up the whole service and `edgeray down` stops it: a local head with the
dashboard, the Serve apps from a `serve deploy` config fitted to the machine (SVD's OpenAI API
under /v1 on its tiny model, SIDeR under /sider), the FL job through Ray Jobs; the printed curl
and openai examples run as printed. Plus the sizing rules and bad input, without Ray."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from edgeray.errors import UserError
from edgeray.launch import (DEFAULT_SERVE_CONFIG, MIN_ACTOR_CPUS, SERVE_CPU_SHARE, fit_pool, fit_serve,
                            load_deploy_config, serve_cpu_requests)

ROOT = Path(__file__).resolve().parents[1]
# Ports of this test's head; tests/test_e2e_jobs.py and the two-node test use others.
GCS, DASHBOARD, METRICS, SERVE, PROMETHEUS = 6399, 8284, 8104, 18141, 19099
DEFAULT_CLASS = {"num_cpus": 1, "num_gpus": 0, "num_actors": 0, "share": 1.0}


def test_shipped_deploy_config_is_valid_and_fits_two_cores():
    deploy = load_deploy_config(ROOT / DEFAULT_SERVE_CONFIG)   # Serve's own schema
    routes = {app["name"]: app["route_prefix"] for app in deploy["applications"]}
    assert routes == {"svd": "/", "sider": "/sider"}           # SVD's routes are /v1/...
    fitted, reserved = fit_serve(deploy, total_cpus=2)
    assert reserved == pytest.approx(SERVE_CPU_SHARE * 2)
    assert [c for _, _, c in serve_cpu_requests(fitted)] == [0.25, 0.25]
    assert serve_cpu_requests(deploy) == [("svd", 1, 1.0), ("sider", 1, 1.0)]   # the input is left alone
    # the FL pool keeps the two actors of the whole machine, each with the CPUs Serve leaves
    pool = fit_pool({"default": dict(DEFAULT_CLASS)}, 2, 0, 2 - reserved)
    assert pool == {"default": {**DEFAULT_CLASS, "num_cpus": 0.75, "num_actors": 2}}
    # a big machine: Serve asks less than its share and keeps its request; the pool fits as it is
    assert fit_serve(deploy, total_cpus=16)[1] == 2.0
    assert fit_pool({"default": dict(DEFAULT_CLASS)}, 16, 0, 16) is None


def test_sizing_refuses_what_cannot_fit():
    deploy = load_deploy_config(ROOT / DEFAULT_SERVE_CONFIG)
    with pytest.raises(UserError, match=r"app 'svd' would get 0\.02 CPU per replica .* or --no-serve"):
        fit_serve(deploy, total_cpus=0.2)
    with pytest.raises(UserError, match=r"4 ClientActors of class 'default' would get 0\.01 CPU each"):
        fit_pool({"default": {**DEFAULT_CLASS, "num_actors": 4}}, 2, 0, 0.05)
    assert MIN_ACTOR_CPUS > 0.01


@pytest.mark.parametrize("argv, message", [
    (["--serve-config", "nope.yaml"], "Serve deploy config not found: "),
    (["--serve-config", "configs/svd.yaml"], "does not match Serve's schema"),
    (["--set", "rounds=0"], "rounds=0 is out of range"),
])
def test_main_bad_input_fails_before_ray(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "edgeray.cli", "main", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "EDGERAY_STATE": str(tmp_path / "head.json")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("edgeray: error: ") and message in proc.stderr
    assert not (tmp_path / "head.json").exists()     # nothing started


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_main_brings_up_serve_and_the_job_then_down_stops_it(tmp_path):
    deploy = yaml.safe_load((ROOT / DEFAULT_SERVE_CONFIG).read_text())
    svd, sider = deploy["applications"]
    svd["args"]["config"] = "configs/svd_tiny.yaml"          # SVD's tiny random model: no asset needed
    svd["args"]["serve.tasks_dir"] = str(tmp_path / "svd_tasks")
    sider["args"]["set"] = "search.steps=2"
    (tmp_path / "deploy.yaml").write_text(yaml.safe_dump(deploy))
    env = {**os.environ, "EDGERAY_STATE": str(tmp_path / "state" / "head.json")}
    main = [sys.executable, "-m", "edgeray.cli", "main", "--config", "configs/fedavg_digits.yaml",
            "--set", "rounds=2", "--set", f"output_dir={tmp_path / 'runs'}", "--serve-config", str(tmp_path / "deploy.yaml"),
            "--serve-port", str(SERVE), "--gcs-port", str(GCS), "--dashboard-port", str(DASHBOARD),
            "--metrics-port", str(METRICS), "--prometheus-port", str(PROMETHEUS)]
    try:
        proc = subprocess.run(main, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
        out = proc.stdout
        assert proc.returncode == 0, (out + proc.stderr)[-4000:]
        state = json.loads((tmp_path / "state" / "head.json").read_text())
        assert f"dashboard:  http://127.0.0.1:{DASHBOARD}" in out and "job id:     raysubmit_" in out
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert f"results:    {run_dir}" in out
        assert json.loads((run_dir / "summary.json").read_text())["final_round"] == 2
        # the job's pool was fitted beside Serve: 2 actors x 0.75 CPU on 2 cores
        assert re.search(r"serve:      svd 1x0\.25 CPU, sider 1x0\.25 CPU", out), out
        assert json.loads((run_dir / "summary.json").read_text())["pool"] == {"default": 2}
        base = f"http://127.0.0.1:{SERVE}"
        assert f"svd:  {base}/v1  (OpenAI API" in out and f"sider:  {base}/sider  (docs" in out
        # the printed examples work as printed (python = this interpreter, which has openai)
        curl = next(line.strip() for line in out.splitlines() if "curl -s" in line and "/v1/completions" in line)
        answer = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120).stdout)
        assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
        openai_line = next(line.strip() for line in out.splitlines() if line.strip().startswith("python -c"))
        ran = subprocess.run(sys.executable + openai_line[len("python"):], shell=True, capture_output=True,
                             text=True, timeout=120)
        assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr[-2000:]
        verify = next(line.strip() for line in out.splitlines() if "curl -s" in line and "/sider/verify" in line)
        verified = json.loads(subprocess.run(verify, shell=True, cwd=ROOT, capture_output=True, text=True,
                                             timeout=300).stdout)
        assert "distance" in json.dumps(verified), verified
        protect = next(line.strip() for line in out.splitlines() if "curl -s" in line and "/sider/protect" in line)
        protect = protect.replace("| python -c", f"| {sys.executable} -c")
        protected = subprocess.run(protect, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert "'restore_token'" in protected.stdout and "'identity_kept'" in protected.stdout, protected.stdout[-2000:]
        assert httpx.get(f"{base}/sider/health", timeout=30).status_code == 200
        if state.get("prometheus_url"):
            assert httpx.get(f"{state['prometheus_url']}/-/ready", timeout=10).status_code == 200
    finally:
        down = subprocess.run([sys.executable, "-m", "edgeray.cli", "down"], cwd=ROOT, capture_output=True,
                              text=True, timeout=180, env=env)
    assert down.returncode == 0 and "stopped the Ray head" in down.stdout, down.stdout + down.stderr
    assert not (tmp_path / "state" / "head.json").exists()
    still_open = [p for p in (GCS, DASHBOARD, SERVE, PROMETHEUS) if _port_open(p)]
    assert not still_open, still_open
    again = subprocess.run([sys.executable, "-m", "edgeray.cli", "down"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=env)
    assert again.returncode == 0 and "no edgeray-started Ray head is running" in again.stdout
