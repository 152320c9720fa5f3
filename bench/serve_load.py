"""The service under sustained concurrent load, from this machine to 127.0.0.1 only.

    python bench/serve_load.py [--quick] [--concurrency 16] [--duration 60] [--max-requests 20000]

Starts its own Ray head (token auth, ports of its own), deploys ``serving/deploy.yaml`` on it with
the CPU requests `edgeray main` would give (edgeray/launch.py: fit_serve), then holds each
endpoint in turn at ``--concurrency`` clients (one keep-alive connection each, a new request as
soon as the last answered) for ``--duration`` seconds, never more than ``--max-requests``:

- ``svd_completion``: POST /v1/completions, max_tokens 4 (a tiny token budget), greedy;
- ``sider_verify``:   POST /sider/verify, two face photos (JSON, base64);
- ``sider_restore``:  POST /sider/restore, a protected image + password + restore token made
  once before the phase (argon2id per request: the service's own 429 caps the concurrency);
- ``jobs_submit``:    POST /api/jobs/ of the FL job's entrypoint (``edgeray run fedavg``). The
  submitted jobs ask a custom resource no node has, so they stay PENDING instead of starting
  hundreds of FL drivers on 2 cores; what is measured is the submission API. They go with the
  head at the end.

Per endpoint: requests/s, p50/p99 latency, errors by HTTP status and dropped connections
(connect/read errors, timeouts); the RSS of the Serve processes (controller, proxy, replicas)
after a warm-up (one request, then one burst of ``--concurrency`` requests per endpoint: the
working set at that concurrency; the RSS after the single request is reported too) and at the end. Targets (issue 20): zero 5xx and zero dropped connections at 16
clients for 60 s per endpoint, RSS growth <= 10 %. Last line JSON (errors_5xx, errors_dropped,
p99_ms_sider_verify, p99_ms_svd_completion, rss_growth_ratio, ...). ``--quick``: 5 s per
endpoint on SVD's tiny random model, the RSS baseline after one request, same keys, under 2
minutes on a quiet machine (the head and the apps take most of it). Writes
bench/results/serve_load.json (rows) and serve_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# Ports of our own head (the e2e tests use 6391-6399 and their neighbours).
GCS, DASHBOARD, METRICS, CLIENT, AGENT, SERVE_PORT = 6403, 8288, 8108, 20214, 52414, 18151
FACES = ROOT / "data" / "sider_faces"
PASSWORD = "correct horse battery staple"
MAX_JOBS = 2000   # pending jobs the submission phase may leave on the head (each is a pending actor)


def serve_rss_mb(head_pid: int) -> dict[str, float]:
    """RSS (MiB) of the Serve processes under our head: controller, proxies, replicas."""
    import psutil

    out = {}
    for proc in psutil.Process(head_pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            if "Serve" in title or "ProxyActor" in title:
                out[f"{title.split()[0][:60]}#{proc.pid}"] = proc.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


async def hold(name: str, make_request, concurrency: int, duration_s: float, max_requests: int) -> dict:
    """``concurrency`` clients, each with its own keep-alive connection, for ``duration_s``."""
    import httpx

    latencies, statuses, dropped = [], Counter(), Counter()
    sent = 0
    deadline = time.monotonic() + duration_s

    async def client():
        nonlocal sent
        async with httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=1)) as http:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                start = time.perf_counter()
                try:
                    response = await make_request(http)
                except httpx.HTTPError as exc:   # connect/read errors, timeouts: a dropped connection
                    dropped[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                statuses[response.status_code] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.monotonic() - started
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    return {"endpoint": name, "concurrency": concurrency, "wall_s": round(wall, 2), "requests": sent,
            "answered": len(latencies), "ok": ok, "rps": round(len(latencies) / wall, 2),
            "ok_rps": round(ok / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "max_ms": round(float(np.max(lat)), 1),
            "status": {str(k): v for k, v in sorted(statuses.items())},
            "errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
            "errors_4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
            "dropped": dict(dropped), "errors_dropped": sum(dropped.values()),
            "hit_max_requests": sent >= max_requests}


async def burst(make_request, n: int) -> list[int]:
    """``n`` requests at once, each on its own connection; their status codes."""
    import httpx

    async def one():
        async with httpx.AsyncClient(timeout=600.0) as http:
            return (await make_request(http)).status_code
    return await asyncio.gather(*(one() for _ in range(n)))


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per endpoint, SVD's tiny model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, help="seconds per endpoint (default 60; --quick 10)")
    parser.add_argument("--max-requests", type=int, default=20000, help="most requests per endpoint")
    parser.add_argument("--svd-config", help="SVD config (default configs/svd.yaml; --quick configs/svd_tiny.yaml)")
    args = parser.parse_args()
    if args.concurrency < 1 or args.max_requests < 1 or (args.duration is not None and args.duration <= 0):
        parser.error("--concurrency, --max-requests and --duration must be positive")
    duration = args.duration or (5.0 if args.quick else 60.0)
    svd_config = args.svd_config or ("configs/svd_tiny.yaml" if args.quick else "configs/svd.yaml")
    for face in ("obama.jpg", "obama2.jpg"):
        if not (FACES / face).is_file():
            sys.exit(f"serve_load: {FACES / face} is missing; run scripts/setup.sh (scripts/assets/sider.sh)")
    os.environ["RAY_AUTH_MODE"] = "token"

    import httpx
    import yaml

    from edgeray.launch import (DEFAULT_SERVE_CONFIG, absolute_configs, cluster_resources, deploy_serve,
                                end_head_tree, fit_serve, load_deploy_config, serve_cpu_requests)
    from edgeray.localhead import LocalHead, auth_token

    t0 = time.monotonic()
    RESULTS.mkdir(parents=True, exist_ok=True)
    head = LocalHead(gcs_port=GCS, dashboard_port=DASHBOARD, metrics_port=METRICS, client_port=CLIENT,
                     agent_port=AGENT).start()
    try:
        deploy = absolute_configs(load_deploy_config(ROOT / DEFAULT_SERVE_CONFIG))
        deploy["http_options"]["port"] = SERVE_PORT
        svd_app = next(a for a in deploy["applications"] if a["name"] == "svd")
        svd_app["args"]["config"] = str(ROOT / svd_config)
        svd_app["args"]["serve.tasks_dir"] = str(Path(head.temp_dir) / "svd_tasks")
        # the one protect call that makes the restore phase's input: its search is not measured
        next(a for a in deploy["applications"] if a["name"] == "sider")["args"]["set"] = "search.steps=2"
        cpus, _ = cluster_resources(head.dashboard_url)
        deploy, reserved = fit_serve(deploy, cpus)
        deploy_serve(head.dashboard_url, deploy, Path(head.temp_dir) / "deploy.yaml", timeout_s=900)
        ready_s = time.monotonic() - t0
        base = f"http://127.0.0.1:{SERVE_PORT}"
        model = httpx.get(f"{base}/v1/models", timeout=60).json()["data"][0]["id"]
        face_a, face_b = b64(FACES / "obama.jpg"), b64(FACES / "obama2.jpg")
        protected = httpx.post(f"{base}/sider/protect", json={"image_b64": face_b, "password": PASSWORD, "seed": 0},
                               timeout=600)
        if protected.status_code != 200:
            raise SystemExit(f"serve_load: POST /sider/protect answered {protected.status_code}: {protected.text[:300]}")
        sample = protected.json()["samples"][0]
        restore_body = {"image_b64": sample["image_b64"], "password": PASSWORD,
                        "restore_token": sample["restore_token"]}
        auth = {"Authorization": f"Bearer {auth_token()}"}
        job_body = {"entrypoint": f"{sys.executable} -m edgeray.cli run fedavg --config configs/fedavg_digits.yaml "
                                  "--set rounds=1 --no-progress",
                    "entrypoint_resources": {"serve_load_never_scheduled": 1}, "metadata": {"edgeray": "serve_load"}}

        phases = {
            "svd_completion": lambda http: http.post(f"{base}/v1/completions", json={
                "model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
            "sider_verify": lambda http: http.post(f"{base}/sider/verify", json={"image_a_b64": face_a,
                                                                                 "image_b_b64": face_b}),
            "sider_restore": lambda http: http.post(f"{base}/sider/restore", json=restore_body),
            "jobs_submit": lambda http: http.post(f"{head.dashboard_url}/api/jobs/", json=job_body, headers=auth),
        }
        # Warm-up: one request per endpoint, then one burst of `concurrency` requests each, so the
        # baseline RSS holds the working set at this concurrency (thread pools, allocator arenas,
        # batches); growth after it is what the load adds.
        with httpx.Client(timeout=300) as http:
            warm = {name: make(http).status_code for name, make in phases.items() if name != "jobs_submit"}
        rss_single = serve_rss_mb(head.proc.pid)
        for name, make in phases.items():
            if name != "jobs_submit" and not args.quick:   # --quick: the baseline is after one request
                asyncio.run(burst(make, args.concurrency))
        rss_start = serve_rss_mb(head.proc.pid)
        rows = []
        for name, make in phases.items():
            bound = min(args.max_requests, MAX_JOBS) if name == "jobs_submit" else args.max_requests
            row = asyncio.run(hold(name, lambda http, make=make: make(http), args.concurrency, duration, bound))
            row["rss_mb"] = round(sum(serve_rss_mb(head.proc.pid).values()), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        rss_end = serve_rss_mb(head.proc.pid)
    finally:
        end_head_tree(head.proc.pid)   # faster than LocalHead.stop's 30 s wait; stop() then sweeps the rest
        head.stop()

    start_total, end_total = sum(rss_start.values()), sum(rss_end.values())
    by = {r["endpoint"]: r for r in rows}
    result = {
        "errors_5xx": sum(r["errors_5xx"] for r in rows),
        "errors_dropped": sum(r["errors_dropped"] for r in rows),
        **{f"p99_ms_{n}": by[n]["p99_ms"] for n in phases},
        **{f"p50_ms_{n}": by[n]["p50_ms"] for n in phases},
        **{f"rps_{n}": by[n]["rps"] for n in phases},
        **{f"status_{n}": by[n]["status"] for n in phases},
        "rss_after_one_request_mb": round(sum(rss_single.values()), 1),
        "rss_start_mb": round(start_total, 1), "rss_end_mb": round(end_total, 1),
        "rss_growth_ratio": round(end_total / start_total, 3) if start_total else None,
        "serve_processes": len(rss_end), "serve_cpus": {n: c for n, _, c in serve_cpu_requests(deploy)},
        "machine_cpus": cpus, "warmup_status": warm, "concurrency": args.concurrency, "duration_s_per_endpoint": duration,
        "max_requests": args.max_requests, "svd_config": svd_config, "ready_s": round(ready_s, 1),
        "quick": args.quick, "loadavg": [round(x, 2) for x in os.getloadavg()],
        "rss_baseline": "after one request per endpoint" if args.quick else
                        f"after one request and a burst of {args.concurrency} per endpoint",
        "cut": ("--quick: 5 s per endpoint (issue: 60 s) on SVD's tiny random model, no warm-up burst" if args.quick
                else "none against the issue's grid (16 clients, 60 s per endpoint)")
               + "".join(f"; {r['endpoint']} stopped at its cap of {r['requests']} requests after {r['wall_s']:g} s"
                         for r in rows if r["hit_max_requests"])
               + "; jobs are submitted but kept PENDING (never-scheduled resource): the API is measured, "
                 "not hundreds of FL runs",
    }
    (RESULTS / ("serve_load_quick.json" if args.quick else "serve_load.json")).write_text(json.dumps({"rows": rows, "rss_start": rss_start, "rss_end": rss_end,
                                                         "result": result}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [r["endpoint"] for r in rows]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r["p50_ms"] for r in rows], 0.4, label="p50")
        ax.bar(x + 0.2, [r["p99_ms"] for r in rows], 0.4, label="p99")
        ax.set_xticks(x, names)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{args.concurrency} clients, {duration:g} s per endpoint, load {os.getloadavg()[0]:.1f}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / ("serve_load_quick.png" if args.quick else "serve_load.png"), dpi=120)
    except ImportError:
        pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
