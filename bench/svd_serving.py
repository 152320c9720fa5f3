"""SVD serving throughput: aggregate decode tokens/s and time to first token at 1, 4 and 8
concurrent streaming requests through a real Ray Serve app over HTTP (continuous batching,
serving/svd/decoding.py), against a plain transformers `generate` loop on one request in the same
run. SVD: arXiv 2509.15888 (the requests here are plain, unsteered: steering needs a warm-started task;
bench/svd.py measures steered vs plain decode speed in the engine).

    python bench/svd_serving.py [--quick] [--tokens 64] [--concurrency 1,4,8] [--rounds 3]

Starts its own local Ray (`ray.init(address="local")`) and Serve on a free port, deploys
`serving.svd.app:app_builder` with configs/svd.yaml (SmolLM2-135M-Instruct, fetched by
scripts/assets/svd.sh; `--quick` uses the tiny random model), and per round runs:
  * `hf_generate`: `model.generate(max_new_tokens=T, min_new_tokens=T, greedy)` on one prompt in
    this process (the replica is idle meanwhile), tokens / wall seconds;
  * for each concurrency c: c streaming /v1/completions requests sent at once (distinct prompts,
    `max_tokens=T`, `ignore_eos=true`, greedy); aggregate tokens/s = all tokens received / wall
    seconds from the first send to the last [DONE] (prefill included); TTFT per request = send to
    its first content chunk.
Reported: the median over rounds of each tokens/s, p50 / p99 TTFT over every request of a
concurrency level, concurrency_speedup_c = tokens/s at c / tokens/s at 1 (target at 8: >= 3),
and serve_1_vs_hf = tokens/s at 1 / hf_generate. Last line JSON; rows in
bench/results/svd_serving[-quick].json, plot svd_serving[-quick].png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
APP, PREFIX = "svdserving", "/svdserving"
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how rain forms, step by step.",
           "List ideas for a small garden.", "Describe a day in a busy harbour.", "Tell me about the moon.",
           "What makes a good breakfast?", "Give advice for learning to cook.", "Describe an old library.",
           "Explain what a compiler does.", "Write a letter to a friend about autumn."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def stream_one(http, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, usage, chunks = None, None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    ended = time.perf_counter()
    return {"ttft_s": (first or ended) - started, "seconds": ended - started,
            "tokens": usage["completion_tokens"] if usage else chunks, "started": started, "ended": ended}


async def burst(url: str, model: str, concurrency: int, tokens: int, offset: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as http:
        results = await asyncio.gather(*[stream_one(http, url, model, PROMPTS[(offset + i) % len(PROMPTS)], tokens)
                                 for i in range(concurrency)])
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "tokens": total, "wall_s": wall, "tokens_per_s": total / wall,
            "ttft_ms": [1000 * r["ttft_s"] for r in results]}


def hf_generate_rate(model, tokenizer, prompt: str, tokens: int) -> dict:
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    produced = out.shape[1] - ids.shape[1]
    return {"tokens": produced, "wall_s": seconds, "tokens_per_s": produced / seconds}


def plot(summary: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [summary[f"tokens_per_s_{c}"] for c in levels]
    ax1.plot(levels, rates, "o-", label="SVD app over HTTP (continuous batching)")
    ax1.axhline(summary["hf_generate_tokens_per_s"], color="gray", ls="--", label="transformers generate, 1 request")
    ax1.plot(levels, [rates[0] * c for c in levels], ":", color="lightgray", label="linear in c")
    ax1.set_xlabel("concurrent streaming requests")
    ax1.set_ylabel("aggregate tokens/s")
    ax1.set_xticks(levels)
    ax1.legend(fontsize=8)
    ax2.plot(levels, [summary["ttft_ms_by_concurrency"][str(c)]["p50"] for c in levels], "o-", label="p50")
    ax2.plot(levels, [summary["ttft_ms_by_concurrency"][str(c)]["p99"] for c in levels], "s--", label="p99")
    ax2.set_xlabel("concurrent streaming requests")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_xticks(levels)
    ax2.legend(fontsize=8)
    fig.suptitle(f"SVD serving, {summary['model']}, {summary['tokens']} tokens/request, load "
                 f"{summary['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 round (< 2 min), the same keys")
    parser.add_argument("--config", default=str(ROOT / "configs" / "svd.yaml"))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (full 64, quick 24)")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, each level once per round (full 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (replica and the generate loop)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if levels[0] != 1 or 8 not in levels:
        parser.error("--concurrency must start with 1 and include 8 (the keys tokens_per_s_1 / _8)")
    tokens = args.tokens or (24 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 3)
    name = "svd_serving-quick" if args.quick else "svd_serving"
    out_json = Path(args.out) if args.out else RESULTS / f"{name}.json"
    started, load_before = time.time(), os.getloadavg()

    import ray
    import torch
    from ray import serve

    from edgeray.config import load_config
    from serving.svd.app import app_builder
    from serving.svd.config import SVDServeConfig
    from serving.svd.model import load_model, resolve_source

    overrides = {"config": args.config, "serve.num_cpus": 0, "serve.num_threads": args.threads,
                 "serve.max_batch_size": max(levels), "serve.max_tokens_limit": max(tokens, 64),
                 "serve.tasks_dir": str(ROOT / "runs" / "svd_serving_bench_tasks")}
    if args.quick:
        overrides.update({"model.source": "tiny-random", "model.name": "tiny"})
    cfg = load_config(SVDServeConfig, args.config, [f"{k}={v}" for k, v in overrides.items() if k != "config"])
    source = resolve_source(cfg.model.source)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(source, cfg.model.dtype, cfg.model.device, cfg.model.seed)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(overrides), name=APP, route_prefix=PREFIX)
    url = f"http://127.0.0.1:{port}{PREFIX}"
    rows = []
    try:
        asyncio.run(burst(url, cfg.model.name, 2, 4, 0))           # warm-up: both paths once
        hf_generate_rate(model, tokenizer, PROMPTS[0], 4)
        for rnd in range(rounds):
            row = hf_generate_rate(model, tokenizer, PROMPTS[rnd % len(PROMPTS)], tokens)
            rows.append({"round": rnd, "mode": "hf_generate", "concurrency": 1, **row})
            print(json.dumps(rows[-1]), flush=True)
            for c in levels:
                row = asyncio.run(burst(url, cfg.model.name, c, tokens, rnd))
                rows.append({"round": rnd, "mode": "serve", **row})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "ttft_ms"}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {}
    hf = statistics.median(r["tokens_per_s"] for r in rows if r["mode"] == "hf_generate")
    ttft_by = {}
    for c in levels:
        mine = [r for r in rows if r["mode"] == "serve" and r["concurrency"] == c]
        summary[f"tokens_per_s_{c}"] = statistics.median(r["tokens_per_s"] for r in mine)
        ttfts = [t for r in mine for t in r["ttft_ms"]]
        ttft_by[str(c)] = {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99), "n": len(ttfts)}
    for c in levels[1:]:
        summary[f"concurrency_speedup_{c}"] = summary[f"tokens_per_s_{c}"] / summary["tokens_per_s_1"]
    every_ttft = [t for r in rows if r["mode"] == "serve" for t in r["ttft_ms"]]
    summary.update({
        "ttft_p50_ms": percentile(every_ttft, 50), "ttft_p99_ms": percentile(every_ttft, 99),
        "ttft_p50_ms_at_8": ttft_by["8"]["p50"], "ttft_p99_ms_at_8": ttft_by["8"]["p99"],
        "ttft_ms_by_concurrency": ttft_by, "hf_generate_tokens_per_s": hf,
        "serve_1_vs_hf": summary["tokens_per_s_1"] / hf,
        "speedup_8_target": 3.0, "speedup_8_met": summary["concurrency_speedup_8"] >= 3.0,
        "model": cfg.model.name, "source": cfg.model.source, "tokens": tokens, "rounds": rounds,
        "concurrency": levels, "steer": False, "quick": args.quick, "threads": args.threads,
        "seconds": round(time.time() - started, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cut": None if not args.quick else "tiny random model, 1 round, 24 tokens per request",
    })
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    plot(summary, levels, out_json.with_suffix(".png"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
