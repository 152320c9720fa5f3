"""Per-batch exchange round trip through the runtime vs the same step in one process.

Split learning calls ``ctx.exchange(payload)`` once per batch: the ClientActor sends the smashed
data to its EdgeServerActor, which runs ``server_step`` and replies with a gradient of the same
size. This bench times that round trip through the real runtime (FLRun on a local Ray: 1
ClientActor, 1 EdgeServerActor; the client's ``client_update`` loops over exchanges and times
each) against calling the same ``server_step`` in one process, for payloads of 10 kB, 1 MB and
10 MB. Overhead per call = runtime time per call − in-process time per call (medians); both
include the step itself (a float32 array scaled by 0.5: the reply is as large as the request).
The metering on the client (bytes of every request and reply) is part of the runtime's time.

    python bench/exchange.py [--quick]

Target (issue "Runtime v2, part 2"): <= 2 ms overhead per call at 1 MB on the 2-core machine.
Prints one JSON line last: exchange_overhead_ms_{10kb,1mb,10mb}, exchange_calls_per_s (1 MB),
medians and p90s of both sides, calls per size, load averages. Writes bench/results/exchange.json
and exchange.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from pipelines.fedavg.strategy import FedAvg  # noqa: E402
from pipelines.strategy import ClientUpdate  # noqa: E402

SIZES = {"10kb": 10_000, "1mb": 1_000_000, "10mb": 10_000_000}


class ExchangeLoop(FedAvg):
    """Each client sends ``calls`` payloads of ``nbytes`` (float32) and times every round trip."""

    name = "exchange-bench"
    uses_client_state = False

    def __init__(self, settings=None, nbytes: int = 1_000_000, calls: int = 100):
        super().__init__(settings)
        self.nbytes, self.calls = nbytes, calls

    def client_update(self, ctx):
        payload = {"x": np.random.default_rng(0).random(self.nbytes // 4, dtype=np.float32)}
        times = []
        for _ in range(self.calls):
            started = time.perf_counter()
            reply = ctx.exchange(payload)
            times.append(time.perf_counter() - started)
            assert reply["grad"].nbytes == payload["x"].nbytes
        return ClientUpdate(ctx.client_id, 1, {}, stats={"times": times})

    def server_step(self, edge_state, client_id, payload):
        return {"grad": payload["x"] * 0.5}

    def aggregate(self, rnd, global_params, state, partial):
        return global_params, state, {"times": np.concatenate([s["times"] for _, _, s in partial.stats])}


def in_process(nbytes: int, calls: int) -> np.ndarray:
    strategy = ExchangeLoop(nbytes=nbytes, calls=calls)
    payload = {"x": np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)}
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        strategy.server_step({}, 0, payload)
        times.append(time.perf_counter() - started)
    return np.array(times)


def through_runtime(nbytes: int, calls: int) -> tuple[np.ndarray, dict]:
    import ray

    from actors.config import FLConfig
    from actors.driver import FLRun, prepare
    from edgeray.config import load_config

    cfg = load_config(FLConfig, ROOT / "configs" / "fedavg_digits.yaml", [
        "data.num_clients=2", "data.partition=iid", "strategy.clients_per_round=1", "model.name=mlp",
        "runtime.num_edge_servers=1", "runtime.edge_overlap=0", "runtime.resource_classes.default.num_actors=1",
        "runtime.resource_classes.default.num_cpus=1"])
    fl = FLRun(cfg, ExchangeLoop(nbytes=nbytes, calls=calls), prepare(cfg))
    try:
        row = ray.get(fl.aggregator.run_round.remote(1))
    finally:
        fl.shutdown()
    assert row["exchange_calls"] == calls, row
    return np.asarray(row["train_times"]), row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls (< 2 min), same keys")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    from edgeray.connect import connect
    import ray

    RESULTS.mkdir(parents=True, exist_ok=True)
    calls = {"10kb": 200, "1mb": 100, "10mb": 20} if args.quick else {"10kb": 2000, "1mb": 1000, "10mb": 200}
    load_before = os.getloadavg()
    connect(None, num_cpus=2, log_to_driver=False)
    result, raw = {"quick": args.quick, "calls": calls}, {}
    try:
        for name, nbytes in SIZES.items():
            local = in_process(nbytes, calls[name])
            remote, row = through_runtime(nbytes, calls[name])
            warm = remote[min(10, len(remote) // 10):]   # the first calls pay for connection set-up
            raw[name] = {"in_process_s": local.tolist(), "runtime_s": remote.tolist(),
                         "metered_up_bytes": row["bytes_up"], "metered_down_bytes": row["bytes_down"]}
            result[f"exchange_overhead_ms_{name}"] = 1e3 * (float(np.median(warm)) - float(np.median(local)))
            result[f"runtime_ms_median_{name}"] = 1e3 * float(np.median(warm))
            result[f"runtime_ms_p90_{name}"] = 1e3 * float(np.percentile(warm, 90))
            result[f"in_process_ms_median_{name}"] = 1e3 * float(np.median(local))
            result[f"metered_bytes_per_call_{name}"] = (row["bytes_up"] + row["bytes_down"]) / calls[name]
            if name == "1mb":
                result["exchange_calls_per_s"] = 1.0 / float(np.median(warm))
    finally:
        ray.shutdown()
    result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()
    result["target_overhead_ms_1mb"] = 2.0
    (RESULTS / "exchange.json").write_text(json.dumps({"result": result, "raw": raw}))
    plot(raw, RESULTS / "exchange.png")
    print(json.dumps(result), flush=True)


def plot(raw: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(raw)
    ax.boxplot([np.array(raw[n]["runtime_s"]) * 1e3 for n in names], positions=np.arange(len(names)) * 2,
               widths=0.6, showfliers=False)
    ax.boxplot([np.array(raw[n]["in_process_s"]) * 1e3 for n in names], positions=np.arange(len(names)) * 2 + 0.8,
               widths=0.6, showfliers=False)
    ax.set_xticks(np.arange(len(names)) * 2 + 0.4, [f"{n}\n(runtime | in-process)" for n in names])
    ax.set_ylabel("ms per exchange round trip")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
