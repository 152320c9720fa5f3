"""Orchestration overhead of one FedAvg round: edgeray on Ray vs a plain in-process loop.

The setting of the Flower anchor (notes/flower_anchor.md): MNIST, the CNN (conv 1->32 5x5, pool,
conv 32->64 5x5, pool, fc 1024->128->10), SGD lr 0.05 momentum 0.9, batch 32, 1 local epoch,
IID split, 10 clients per round, with 10 and with 100 clients. Both modes train the same clients
in the same order with the same seeds; round time excludes evaluation. The in-process loop uses
torch's default threads (2 here); edgeray runs 2 single-thread ClientActors.

    python bench/fl_round.py [--quick]

Prints one JSON line last: overhead_ratio_10, overhead_ratio_100 (edgeray / in-process, median of
rounds 2..N), rounds_to_97 (edgeray, 100 clients), accuracies of both modes, load averages.
Writes bench/results/fl_round.json and fl_round.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def config(num_clients: int, rounds: int):
    from actors.config import FLConfig
    from edgeray.config import load_config

    return load_config(FLConfig, ROOT / "configs" / "fedavg_mnist.yaml", [
        f"rounds={rounds}", f"data.num_clients={num_clients}", "data.partition=iid",
        f"data.path={ROOT / 'data' / 'mnist.pkl.gz'}", "strategy.clients_per_round=10",
        "runtime.num_edge_servers=1"])


def in_process(cfg, prepared, rounds: int, eval_every_round: bool) -> list[dict]:
    """The baseline: the same strategy, selection and seeds, one client after another in this process."""
    import torch

    from actors.clock import VirtualClock
    from pipelines.models import build_model, get_params, set_params
    from pipelines.strategy import ClientContext, ClientData
    from pipelines.tasks.vision import classification_loss, evaluate_classification

    data, parts = prepared.data, prepared.parts
    strategy = cfg.strategy.spec().build()
    clock = VirtualClock(prepared.profiles, cfg.seed)
    model = build_model(prepared.task.model)
    global_params = get_params(model)
    rows = []
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, rnd, 3])
        clients = strategy.select_clients(rnd, {}, clock.available(rnd), cfg.strategy.clients_per_round, rng)
        instructions = strategy.configure_round(rnd, {}, clients, prepared.population)
        partial = strategy.init_partial()
        for cid in clients:
            set_params(model, global_params)
            torch.manual_seed(hash((cfg.seed, rnd, cid)) & 0xFFFFFFFF)
            ctx = ClientContext(cid, rnd, model, ClientData(data.x_train[parts[cid]], data.y_train[parts[cid]]),
                                instructions[cid], {}, np.random.default_rng([cfg.seed, rnd, cid]),
                                classification_loss)
            partial = strategy.accumulate(partial, strategy.client_update(ctx))
        global_params, _, _ = strategy.aggregate(rnd, global_params, {}, partial)
        row = {"round": rnd, "round_wall_s": time.perf_counter() - started}
        if eval_every_round or rnd == rounds:
            set_params(model, global_params)
            sums = evaluate_classification(model, data.x_test, data.y_test)
            row["test_accuracy"] = sums["test_accuracy"] / sums["count"]
        rows.append(row)
    return rows


def on_edgeray(cfg, prepared, rounds: int, stop_at: float | None = None) -> tuple[list[dict], float]:
    """edgeray's actors on the local Ray; round time is measured around the driver's call."""
    import ray

    from actors.driver import FLRun

    started = time.perf_counter()
    fl = FLRun(cfg, cfg.strategy.spec(), prepared)
    setup_s = time.perf_counter() - started
    rows = []
    try:
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            row = ray.get(fl.aggregator.run_round.remote(rnd))
            row["round_wall_s"] = time.perf_counter() - t0
            row.update(ray.get(fl.aggregator.evaluate.remote()))
            rows.append(row)
            if stop_at is not None and row["test_accuracy"] >= stop_at:
                break
    finally:
        fl.shutdown()
    return rows, setup_s


def median_after_first(rows: list[dict]) -> float:
    times = [r["round_wall_s"] for r in rows]
    return float(np.median(times[1:] if len(times) > 1 else times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 min), same keys")
    args = parser.parse_args()
    import ray

    from actors.driver import prepare

    RESULTS.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_init = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t_init
    rounds_10, rounds_100, max_rounds_97 = (1, 3, 3) if args.quick else (3, 4, 25)
    result = {"quick": args.quick, "ray_init_s": ray_init_s}

    cfg10 = config(10, rounds_10)
    prep10 = prepare(cfg10)
    base10 = in_process(cfg10, prep10, rounds_10, eval_every_round=False)
    ours10, _ = on_edgeray(cfg10, prep10, rounds_10)

    cfg100 = config(100, max_rounds_97)
    prep100 = prepare(cfg100)
    base100 = in_process(cfg100, prep100, rounds_100, eval_every_round=False)
    ours100, setup_s = on_edgeray(cfg100, prep100, max_rounds_97, stop_at=0.97)
    ray.shutdown()

    rows_97 = [r["round"] for r in ours100 if r["test_accuracy"] >= 0.97]
    same_rounds = min(rounds_100, len(ours100))
    result.update({
        "round_s_inprocess_10": median_after_first(base10),
        "round_s_edgeray_10": median_after_first(ours10),
        "round_s_inprocess_100": median_after_first(base100),
        "round_s_edgeray_100": median_after_first(ours100[:rounds_100]),
        "accuracy_inprocess_10": base10[-1]["test_accuracy"],
        "accuracy_edgeray_10": ours10[-1]["test_accuracy"],
        "accuracy_inprocess_100_round%d" % rounds_100: base100[-1]["test_accuracy"],
        "accuracy_edgeray_100_round%d" % same_rounds: ours100[same_rounds - 1]["test_accuracy"],
        "rounds_to_97": rows_97[0] if rows_97 else None,
        "rounds_run_100": len(ours100),
        "final_accuracy_edgeray_100": ours100[-1]["test_accuracy"],
        "pool_setup_s": setup_s,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    })
    result["overhead_ratio_10"] = result["round_s_edgeray_10"] / result["round_s_inprocess_10"]
    result["overhead_ratio_100"] = result["round_s_edgeray_100"] / result["round_s_inprocess_100"]
    raw = {"result": result, "inprocess_10": base10, "edgeray_10": ours10, "inprocess_100": base100,
           "edgeray_100": ours100}
    (RESULTS / "fl_round.json").write_text(json.dumps(raw, indent=2))
    plot(raw, RESULTS / "fl_round.png")
    print(json.dumps(result), flush=True)


def plot(raw: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("inprocess_10", "in-process, 10 clients"), ("edgeray_10", "edgeray, 10 clients"),
                       ("inprocess_100", "in-process, 100 clients"), ("edgeray_100", "edgeray, 100 clients")):
        rows = raw[key]
        ax1.plot([r["round"] for r in rows], [r["round_wall_s"] for r in rows], marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("round wall time (s, excl. eval)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    rows = raw["edgeray_100"]
    ax2.plot([r["round"] for r in rows], [r["test_accuracy"] for r in rows], marker="o", label="edgeray, 100 clients")
    ax2.axhline(0.97, color="grey", ls="--", lw=1)
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
