"""Scale of the FL runtime on one machine: 10, 100 and 1,000 virtual clients, 10% per round.

    python bench/fl_scale.py [--quick]

Per setting: per-round wall time (median, excluding evaluation), actor calls per round, and the
memory of the whole Ray session (this driver and every process under it: GCS, raylet, workers)
sampled every 0.25 s, as summed RSS (counts shared pages, e.g. the object store, once per
process) and summed PSS (shares them out; the fair total). Flat memory: PSS at the end of each
round at 1,000 clients. A control setting trains 10 of 1,000 registered clients per round, to
show that round time follows the clients trained, not the clients registered.

Aggregation throughput: the strategy's partial aggregate (``WeightedSum.add``) over 100 updates
of the MNIST CNN vs a plain ``torch`` in-place sum of the same tensors, in the same run.

Last line JSON: peak_rss_gib_1000, peak_pss_gib_1000, agg_bandwidth_ratio, round_s_{10,100,1000},
round_s_1000_train10, actor_calls_per_round_{...}, pss_growth_gib_1000. Writes
bench/results/fl_scale.json and fl_scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GIB = 1024 ** 3


class SessionMemory:
    """Peak summed RSS / PSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        me = psutil.Process(os.getpid())
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                rss += info.rss
                pss += info.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return rss, pss

    def _run(self):
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.interval_s)

    def reset(self):
        self.peak_rss = self.peak_pss = 0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_setting(num_clients: int, per_round: int, rounds: int, memory: SessionMemory) -> dict:
    import ray

    from actors.config import FLConfig
    from actors.driver import FLRun, prepare
    from edgeray.config import load_config

    cfg = load_config(FLConfig, ROOT / "configs" / "fedavg_mnist.yaml", [
        f"data.num_clients={num_clients}", f"strategy.clients_per_round={per_round}",
        f"data.path={ROOT / 'data' / 'mnist.pkl.gz'}", f"rounds={rounds}"])
    prepared = prepare(cfg)
    memory.reset()
    fl = FLRun(cfg, cfg.strategy.spec(), prepared)
    rows = []
    try:
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            row = ray.get(fl.aggregator.run_round.remote(rnd))
            row["round_wall_s"] = time.perf_counter() - t0
            row["pss_gib"] = memory.sample()[1] / GIB
            rows.append(row)
        accuracy = ray.get(fl.aggregator.evaluate.remote())["test_accuracy"]
    finally:
        fl.shutdown()
    times = [r["round_wall_s"] for r in rows]
    return {"clients": num_clients, "per_round": per_round, "rows": rows,
            "round_s": float(np.median(times[1:] if len(times) > 1 else times)),
            "actor_calls_per_round": float(np.mean([r["actor_calls"] for r in rows])),
            "peak_rss_gib": memory.peak_rss / GIB, "peak_pss_gib": memory.peak_pss / GIB,
            "pss_growth_gib": rows[-1]["pss_gib"] - rows[0]["pss_gib"], "accuracy": accuracy}


def aggregation_bandwidth(num_updates: int = 100, repeats: int = 5) -> dict:
    """GB/s of update bytes folded: WeightedSum vs a plain torch in-place sum, same tensors."""
    import torch

    from pipelines.models import build_model, get_params
    from pipelines.registry import ModelSpec
    from pipelines.strategy import ClientUpdate, WeightedSum

    base = get_params(build_model(ModelSpec("cnn", data_info={"input_shape": [1, 28, 28], "num_classes": 10})))
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(i, int(rng.integers(50, 500)),
                            {k: (v + rng.normal(size=v.shape).astype(v.dtype)) for k, v in base.items()})
               for i in range(num_updates)]
    nbytes = sum(v.nbytes for u in updates for v in u.params.values())

    def plain():
        acc = {k: torch.zeros_like(torch.from_numpy(v)) for k, v in base.items()}
        for u in updates:
            for k, v in u.params.items():
                acc[k].add_(torch.from_numpy(v))

    def ours():
        partial = WeightedSum()
        for u in updates:
            partial.add(u)

    best = {}
    for name, fn in (("plain", plain), ("ours", ours)) * repeats:  # interleaved, best of N
        t0 = time.perf_counter()
        fn()
        best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
    return {"agg_gbps_ours": nbytes / best["ours"] / 1e9, "agg_gbps_torch": nbytes / best["plain"] / 1e9,
            "agg_bandwidth_ratio": best["plain"] / best["ours"], "agg_bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 min), same keys")
    args = parser.parse_args()
    import ray

    RESULTS.mkdir(parents=True, exist_ok=True)
    rounds = 2 if args.quick else 5
    load_before = os.getloadavg()
    result = {"quick": args.quick, "rounds": rounds, **aggregation_bandwidth(repeats=3 if args.quick else 7)}
    settings = {}
    with SessionMemory() as memory:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        # quick: the 10-client setting trains 5,000 samples per round; 1 round shows the same
        for key, (n, k, r) in {"10": (10, 1, 1 if args.quick else rounds), "100": (100, 10, rounds),
                               "1000": (1000, 100, rounds), "1000_train10": (1000, 10, rounds)}.items():
            settings[key] = run_setting(n, k, r, memory)
        ray.shutdown()
    for key, s in settings.items():
        result[f"round_s_{key}"] = s["round_s"]
        result[f"actor_calls_per_round_{key}"] = s["actor_calls_per_round"]
        result[f"peak_rss_gib_{key}"] = s["peak_rss_gib"]
        result[f"peak_pss_gib_{key}"] = s["peak_pss_gib"]
        result[f"accuracy_{key}"] = s["accuracy"]
    result["pss_growth_gib_1000"] = settings["1000"]["pss_growth_gib"]
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    (RESULTS / "fl_scale.json").write_text(json.dumps({"result": result, "settings": settings}, indent=2))
    plot(settings, RESULTS / "fl_scale.png")
    print(json.dumps(result), flush=True)


def plot(settings: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, s in settings.items():
        label = f"{s['clients']} clients, {s['per_round']}/round"
        ax1.plot([r["round"] for r in s["rows"]], [r["round_wall_s"] for r in s["rows"]], marker="o", label=label)
        ax2.plot([r["round"] for r in s["rows"]], [r["pss_gib"] for r in s["rows"]], marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("round wall time (s)")
    ax2.set_xlabel("round")
    ax2.set_ylabel("Ray session PSS (GiB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
