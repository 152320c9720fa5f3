"""Per-request overhead of Ray Serve vs the same FastAPI app under plain uvicorn, in one run.

    python bench/serve_overhead.py [--quick] [--requests N]

Modes, each in its own subprocess (and its own Ray session, since Serve's env vars are read
when Ray starts):
- ``uvicorn``: the FastAPI app under uvicorn on 127.0.0.1 (the floor);
- ``serve_default``: ``@serve.ingress(app)`` behind Serve's Python proxy actor (proxy -> Ray actor
  call -> replica: the slow hop, notes/serve_overhead.md);
- ``serve_fast``: the same deployment with ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: HAProxy owns the HTTP port and forwards to the replica's
  own HTTP server (direct ingress), so the per-request Ray actor hop is gone. This is the mode
  `edgeray serve` uses.

Each mode: one keep-alive httpx client, ``warmup`` requests, then ``requests`` timed sequential
GETs of a no-op endpoint. Last line JSON: serve_p50_ms / serve_p99_ms (the fast mode),
serve_default_p50_ms, uvicorn_p50_ms / uvicorn_p99_ms, overhead_p50_ms (fast - uvicorn),
overhead_default_p50_ms, load averages. Writes bench/results/serve_overhead.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PORT = {"uvicorn": 18301, "serve_default": 18302, "serve_fast": 18303}
FAST_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def make_app():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/ping")
    async def ping():
        return {"ok": True}

    return app


def measure(url: str, warmup: int, requests: int) -> list[float]:
    import httpx

    with httpx.Client(timeout=30) as client:
        deadline = time.monotonic() + 120
        while True:  # wait until the server answers
            try:
                if client.get(url).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within 120 s")
            time.sleep(0.5)
        for _ in range(warmup):
            client.get(url)
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200
    return times


def run_mode(mode: str, warmup: int, requests: int) -> dict:
    """Runs inside the subprocess for one mode; returns the latencies."""
    url = f"http://127.0.0.1:{PORT[mode]}/ping"
    if mode == "uvicorn":
        import threading

        import uvicorn

        server = uvicorn.Server(uvicorn.Config(make_app(), host="127.0.0.1", port=PORT[mode], log_level="error",
                                               access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            return {"latencies_ms": measure(url, warmup, requests)}
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    app = make_app()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Noop:
        pass

    serve.start(http_options={"host": "127.0.0.1", "port": PORT[mode]})
    serve.run(Noop.bind(), name="noop", route_prefix="/")
    try:
        return {"latencies_ms": measure(url, warmup, requests)}
    finally:
        ray.shutdown()  # ends the whole local session (Serve's controller, proxies, replica) at once


def summarize(latencies: list[float]) -> dict:
    a = np.asarray(latencies)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "n": len(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (< 2 min), same keys")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--mode", choices=list(PORT), help=argparse.SUPPRESS)  # internal: one mode
    args = parser.parse_args()
    requests = args.requests or (200 if args.quick else 1000)
    warmup = 20 if args.quick else 100
    if args.mode:
        print(json.dumps(run_mode(args.mode, warmup, requests)), flush=True)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    modes = {}
    for mode in PORT:
        env = {**os.environ, **(FAST_ENV if mode == "serve_fast" else {})}
        proc = subprocess.run([sys.executable, __file__, "--mode", mode, "--requests", str(requests)]
                              + (["--quick"] if args.quick else []),
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
        modes[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["latencies_ms"]
    stats = {mode: summarize(lat) for mode, lat in modes.items()}
    result = {
        "quick": args.quick, "requests": requests,
        "serve_p50_ms": stats["serve_fast"]["p50_ms"], "serve_p99_ms": stats["serve_fast"]["p99_ms"],
        "serve_default_p50_ms": stats["serve_default"]["p50_ms"],
        "serve_default_p99_ms": stats["serve_default"]["p99_ms"],
        "uvicorn_p50_ms": stats["uvicorn"]["p50_ms"], "uvicorn_p99_ms": stats["uvicorn"]["p99_ms"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    result["overhead_p50_ms"] = result["serve_p50_ms"] - result["uvicorn_p50_ms"]
    result["overhead_default_p50_ms"] = result["serve_default_p50_ms"] - result["uvicorn_p50_ms"]
    (RESULTS / "serve_overhead.json").write_text(json.dumps({"result": result, "stats": stats,
                                                             "latencies_ms": modes}, indent=2))
    plot(modes, RESULTS / "serve_overhead.png")
    print(json.dumps(result), flush=True)


def plot(modes: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, lat in modes.items():
        a = np.sort(lat)
        ax.plot(a, np.arange(1, len(a) + 1) / len(a), label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("CDF")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
