"""FedAvg-MoE vs HFedMoE vs FedAlign-MoE through the runtime (``edgeray run``'s ``run_fl``), side
by side in one process and one local Ray, plus a plain sequential in-process loop of the same
LoRA fine-tuning (the round-time reference) and a centralised run (the accuracy target).

Legs (each: 10 clients, all of them every round, Dirichlet split over the labels):
- ``topics``: the synthetic 4-topic task, 2-layer OLMoE (E=8, top-2) from a config;
- ``drug``: the drug reviews (3 classes), the same OLMoE shape, compact SmolLM2 vocabulary;
- ``smollm2``: SmolLM2-135M-Instruct upcycled (first 4 layers kept, the last 2 of them MoE with
  E=4, top-2) on the drug reviews.
The configs are ``configs/fedmoe_*.yaml``; the overrides below size them for a loaded 2-core machine.

Validity gate (moe_fl.md §6): the mean per-client routing entropy H(mean G) of the last round,
over ln E, must be <= 0.9 for the comparison to mean anything; the JSON prints the ratio
(``routing_entropy_ratio``, topics leg) and, per leg, also the mean per-token routing entropy
over ln E (``token_entropy_ratio``): sharp per-token routing with a balanced load passes the second
and not the first (the upcycled SmolLM2 with its k-means router init).

    python bench/fedmoe.py [--quick] [--seeds N] [--legs topics,drug,smollm2]

Last line: JSON with fedalign_minus_fedavg_acc_alpha0.1, fedalign_rounds_ratio_alpha0.1,
hfedmoe_bytes_ratio, hfedmoe_minus_fedavg_acc, hfedmoe_budget_violations,
round_time_ratio_vs_inprocess, routing_entropy_ratio (and the per-leg rows, what was cut, load).
Writes bench/results/fedmoe/{rows.jsonl,summary.json,*.png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "fedmoe"
METHODS = ("fedavg-moe", "hfedmoe", "fedalign-moe")
LEGS = {
    "topics": ("fedmoe_topics.yaml", []),
    "drug": ("fedmoe_drugreviews.yaml", ["data.min_size=5"]),
    "smollm2": ("fedmoe_smollm2.yaml", ["model.args.upcycle.keep_layers=4", "data.args.seq_len=32"]),
}


def config(leg: str, method: str, alpha: float, seed: int, rounds: int, extra=()):
    from actors.config import FLConfig
    from edgeray.config import load_config

    file, overrides = LEGS[leg]
    if leg == "smollm2" and method == "hfedmoe":   # E=4, top-2: the lowest default tier (0.25·4 = 1) is below top-k
        overrides = [*overrides, "strategy.params.tiers=[0.5, 1.0]"]
    return load_config(FLConfig, ROOT / "configs" / file, [
        f"strategy.name={method}", f"rounds={rounds}", f"seed={seed}", "data.partition=dirichlet",
        f"data.alpha={alpha}", f"output_dir={OUT / 'runs'}", "runtime.warm_pool=on", "runtime.warm_idle_exit_s=120",
        *overrides, *extra])


def local_loop(cfg, rounds: int, clients_as_one: bool = False, keep: dict | None = None) -> list[dict]:
    """The same strategy and clients, one after another in this process (no Ray); with
    ``clients_as_one`` all training data is one client: the centralised reference. ``keep`` (a dict)
    receives the final global tensors, server state, model and data."""
    import torch

    from actors.driver import prepare
    from pipelines.models import ClientHandover, build_model, get_params, set_params
    from pipelines.registry import EVALUATIONS, load
    from pipelines.strategy import ClientContext, ClientData

    torch.set_num_threads(1)
    prepared = prepare(cfg)
    data = prepared.data
    parts = [np.arange(len(data.y_train))] if clients_as_one else prepared.parts
    strategy = cfg.strategy.spec().build()
    evaluation = EVALUATIONS[prepared.task.evaluation]
    evaluate, loss = load(evaluation.target), load(evaluation.loss)
    model = build_model(prepared.task.model)
    handover = ClientHandover(model)
    global_params = get_params(model)
    state = strategy.init_state(global_params)
    population = prepared.population if not clients_as_one else \
        type(prepared.population)(prepared.population.profiles[:1], (len(data.y_train),))
    rows = []
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        clients = list(range(len(parts)))
        instructions = strategy.configure_round(rnd, state, clients, population)
        partial = strategy.init_partial()
        for cid in clients:
            handover.restore()
            set_params(model, global_params)
            torch.manual_seed(hash((cfg.seed, rnd, cid)) & 0xFFFFFFFF)
            ctx = ClientContext(cid, rnd, model, ClientData(data.x_train[parts[cid]], data.y_train[parts[cid]]),
                                instructions[cid], {}, np.random.default_rng([cfg.seed, rnd, cid]), loss)
            partial = strategy.accumulate(partial, strategy.client_update(ctx))
        global_params, state, _ = strategy.aggregate(rnd, global_params, state, strategy.merge([partial]))
        round_s = time.perf_counter() - started
        handover.restore()
        set_params(model, global_params)
        sums = evaluate(model, data.x_test, data.y_test)
        rows.append({"round": rnd, "round_wall_s": round_s, "test_accuracy": sums["test_accuracy"] / sums["count"]})
    if keep is not None:
        keep.update(global_params=global_params, state=state, model=model, handover=handover, prepared=prepared)
    return rows


def personal_accuracy(cfg, rounds: int) -> dict:
    """FedAlign-MoE, ``expert_mode`` global vs personalised, in process: each client's accuracy on
    the test set reweighted to its own label mix, Σ_k p_c(k)·acc_k(model_c), where model_c is the
    global model, or the global model with the client's γ-mixed experts (``state['personal']``);
    the mean over clients is weighted by their example counts."""
    import torch

    from pipelines.fedmoe.layout import insert_rows
    from pipelines.models import set_params
    from pipelines.strategy import Rows

    out = {}
    for mode in ("global", "personalised"):
        keep: dict = {}
        c = config("topics", "fedalign-moe", cfg.data.alpha, cfg.seed, rounds,
                   [f"strategy.params.expert_mode={mode}"])
        local_loop(c, rounds, keep=keep)
        data, parts = keep["prepared"].data, keep["prepared"].parts
        classes = int(data.info["num_classes"])
        accs, sizes = [], []
        for cid, idx in enumerate(parts):
            params = keep["global_params"]
            mix = keep["state"].get("personal", {}).get(cid) if mode == "personalised" else None
            if mix:
                params = insert_rows(params, {k: Rows(v["index"], v["values"], v["axis"]) for k, v in mix.items()})
            keep["handover"].restore()
            set_params(keep["model"], params)
            keep["model"].eval()
            with torch.no_grad():
                pred = keep["model"](torch.from_numpy(data.x_test)).argmax(-1).numpy()
            per_class = np.array([(pred[data.y_test == k] == k).mean() for k in range(classes)])
            mix_k = np.bincount(data.y_train[idx], minlength=classes) / len(idx)
            accs.append(float(mix_k @ per_class))
            sizes.append(len(idx))
        out[mode] = float(np.average(accs, weights=sizes))
    out["personalised_minus_global"] = out["personalised"] - out["global"]
    return out


def edgeray_run(cfg) -> tuple[dict, list[dict]]:
    from actors.driver import run_fl
    from edgeray import runs

    run_dir = runs.new_run_dir(cfg.output_dir, cfg.name, kind="fl", method=cfg.strategy.name)
    summary = run_fl(cfg, run_dir, progress=False)
    return summary, runs.read_metrics(run_dir)


def finished_run(cfg) -> tuple[dict, list[dict]] | None:
    """A completed run of the same config under OUT/runs (``--reuse``), or None."""
    import yaml

    from edgeray import runs

    want = {"name": cfg.name, "seed": cfg.seed, "rounds": cfg.rounds, "strategy": cfg.strategy.name,
            "params": cfg.strategy.params, "alpha": cfg.data.alpha, "model": cfg.model.args, "data": cfg.data.args}
    for run_dir in sorted((OUT / "runs").glob(f"{cfg.name}-*"), reverse=True):
        try:
            got = yaml.safe_load((run_dir / "config.yaml").read_text())
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            continue
        have = {"name": got["name"], "seed": got["seed"], "rounds": got["rounds"], "strategy": got["strategy"]["name"],
                "params": got["strategy"]["params"], "alpha": got["data"]["alpha"], "model": got["model"]["args"],
                "data": got["data"]["args"]}
        if have == want and summary.get("final_round") == cfg.rounds:
            return summary, runs.read_metrics(run_dir)
    return None


def rounds_to(rows: list[dict], target: float) -> int | None:
    return next((r["round"] for r in rows if r.get("test_accuracy") is not None and r["round"] > 0
                 and r["test_accuracy"] >= target), None)


def plots(results: list[dict], suffix: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r["seed"] == min(x["seed"] for x in results)]
    keys = sorted({(r["leg"], r["alpha"]) for r in shown})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    for j, (leg, alpha) in enumerate(keys):
        for r in [x for x in shown if (x["leg"], x["alpha"]) == (leg, alpha)]:
            rows = [x for x in r["rows"] if "test_accuracy" in x]
            axes[0][j].plot([x["round"] for x in rows], [x["test_accuracy"] for x in rows], marker=".", label=r["method"])
            cum = np.cumsum([x.get("bytes_up", 0) for x in rows]) / 1e6
            axes[1][j].plot(cum, [x["test_accuracy"] for x in rows], marker=".", label=r["method"])
        axes[0][j].set_title(f"{leg}, alpha={alpha}")
        axes[0][j].set_xlabel("round")
        axes[1][j].set_xlabel("MB uploaded (cumulative)")
        axes[0][j].set_ylabel("test accuracy")
        axes[1][j].set_ylabel("test accuracy")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / f"accuracy{suffix}.png", dpi=90)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    pick = next((r for r in shown if r["method"] == "fedalign-moe" and r["leg"] == "topics"), shown[0])
    load = np.array([x["train_expert_load"] for x in pick["rows"] if "train_expert_load" in x])
    im = axes[0].imshow((load / load.sum(1, keepdims=True)).T, aspect="auto", cmap="viridis",
                        extent=(0.5, len(load) + 0.5, load.shape[1] - 0.5, -0.5))
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("expert")
    axes[0].set_title(f"{pick['method']} {pick['leg']} a={pick['alpha']}: token load share")
    fig.colorbar(im, ax=axes[0])
    for r in shown:
        ent = [x["train_routing_entropy"] for x in r["rows"] if "train_routing_entropy" in x]
        axes[1].plot(range(1, len(ent) + 1), ent, label=f"{r['method']} {r['leg']} a={r['alpha']}")
    axes[1].axhline(0.9 * math.log(8), ls="--", c="k", lw=0.8)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean client routing entropy")
    axes[1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(OUT / f"routing{suffix}.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="topics leg only, alpha 0.1, 1 seed, 3 rounds (< 2 min)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the topics leg (drug, smollm2: seed 0)")
    parser.add_argument("--legs", default="topics,drug,smollm2", help="comma-separated legs to run")
    parser.add_argument("--smollm2-rounds", type=int, default=2, help="rounds of the upcycled SmolLM2 leg")
    parser.add_argument("--topic-alphas", default="0.1,0.5", help="Dirichlet alphas of the topics leg")
    parser.add_argument("--personal", action="store_true", help="only FedAlign-MoE global vs personalised experts "
                        "on topics (alpha 0.1, seed 0, in process), each client scored on its own label mix")
    parser.add_argument("--tag", default="", help="suffix of the rows/summary file names (separate runs of one grid)")
    parser.add_argument("--reuse", action="store_true", help="take runs already completed under bench/results/fedmoe/"
                        "runs with the same config (the round-time pair and the centralised targets always run)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.personal:
        rounds = 3 if args.quick else 6
        result = personal_accuracy(config("topics", "fedalign-moe", 0.1, 0, rounds), rounds)
        result.update(rounds=rounds, alpha=0.1, seed=0, wall_s=time.perf_counter() - started,
                      loadavg_before=load_before, loadavg_after=os.getloadavg())
        (OUT / f"personal{'-quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
        return
    if args.quick:
        grid = [("topics", 0.1, 0, 3)]
        cut = ["quick: topics leg only, alpha 0.1, seed 0, 3 rounds; drug and smollm2 legs skipped"]
    else:
        legs = [leg for leg in args.legs.split(",") if leg]
        unknown = sorted(set(legs) - set(LEGS))
        if unknown or args.seeds < 1:
            parser.error(f"--legs: unknown {unknown}; choose from {', '.join(LEGS)}" if unknown else "--seeds must be >= 1")
        alphas = [float(a) for a in args.topic_alphas.split(",") if a]
        grid = [("topics", a, s, 10) for a in alphas for s in range(args.seeds) if "topics" in legs] + \
               [("drug", a, 0, 8) for a in (0.1, 0.5) if "drug" in legs] + \
               [("smollm2", 0.5, 0, args.smollm2_rounds) for _ in [0] if "smollm2" in legs]
        cut = [f"3 seeds -> {args.seeds} on topics (alpha {alphas}), 1 on drug and smollm2" if "topics" in legs
               else "3 seeds -> 1 on drug and smollm2",
               f"rounds 30 -> 10 (topics), 8 (drug), {args.smollm2_rounds} (smollm2)",
               "smollm2: alpha 0.5 only, first 4 of 30 layers kept, seq_len 32",
               "centralised target: same epochs as rounds, in-process, seed 0 only",
               "smollm2 (E=4, top-2): HFedMoE tiers [0.5, 1.0] instead of [0.25, 0.5, 1.0]"] + \
              [f"leg {leg} not run" for leg in LEGS if leg not in legs]
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results, targets, timing = [], {}, {}
    try:
        for leg, alpha, seed, rounds in grid:
            if (leg, alpha) not in targets and seed == 0:
                central = local_loop(config(leg, "fedavg-moe", alpha, seed, rounds), rounds, clients_as_one=True)
                targets[(leg, alpha)] = max(r["test_accuracy"] for r in central)
            for method in METHODS:
                cfg = config(leg, method, alpha, seed, rounds)
                timed = (leg, alpha, seed, method) == (*grid[0][:3], "fedavg-moe")
                done = finished_run(cfg) if args.reuse and not timed else None
                summary, rows = done or edgeray_run(cfg)
                trained = [r for r in rows if r["round"] > 0]
                results.append({
                    "leg": leg, "alpha": alpha, "seed": seed, "method": method,
                    "final_accuracy": summary["final_test_accuracy"],
                    "rounds_to_target": rounds_to(rows, 0.9 * targets[(leg, alpha)]),
                    "bytes_up": summary["bytes_up_total"], "bytes_down": summary["bytes_down_total"],
                    "routing_entropy": trained[-1].get("train_routing_entropy"),
                    "token_entropy": trained[-1].get("train_token_entropy"),
                    "budget_violations": int(sum(r.get("train_budget_violations", 0) for r in trained)),
                    "backward_expert_tokens": float(sum(r.get("train_backward_expert_tokens", 0) for r in trained)),
                    "median_round_wall_s": summary["median_round_wall_s"], "sim_time_s": summary["sim_time_s"],
                    "reused": done is not None, "rows": rows})
                print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)
            if (leg, alpha, seed) == grid[0][:3]:
                ref = local_loop(config(leg, "fedavg-moe", alpha, seed, rounds), rounds)
                ours = next(r for r in results if (r["leg"], r["alpha"], r["seed"], r["method"]) ==
                            (leg, alpha, seed, "fedavg-moe"))
                timing = {"edgeray_median_round_s": ours["median_round_wall_s"],
                          "inprocess_median_round_s": float(np.median([r["round_wall_s"] for r in ref])),
                          "inprocess_final_accuracy": ref[-1]["test_accuracy"]}
    finally:
        ray.shutdown()

    def pick(method, **where):
        return [r for r in results if r["method"] == method and all(r[k] == v for k, v in where.items())]

    def paired(a, b, key):
        return [x[key] - y[key] for x, y in zip(a, b)]

    fa, al, hf = pick("fedavg-moe", leg="topics", alpha=0.1), pick("fedalign-moe", leg="topics", alpha=0.1), \
        pick("hfedmoe", leg="topics")
    fa_all = pick("fedavg-moe", leg="topics")
    censor = max(r["rows"][-1]["round"] for r in results) + 1

    def rounds_or_censored(r):
        return r["rounds_to_target"] if r["rounds_to_target"] is not None else censor

    no_topics = not (fa and al and hf)
    if no_topics:                       # --legs without topics: the topic keys are None
        fa = al = hf = fa_all = [{"final_accuracy": math.nan, "rounds_to_target": None, "bytes_up": math.nan,
                                  "backward_expert_tokens": math.nan, "routing_entropy": math.nan}]
    diffs = paired(al, fa, "final_accuracy")
    summary = {
        "fedalign_minus_fedavg_acc_alpha0.1": float(np.mean(diffs)),
        "fedalign_minus_fedavg_acc_alpha0.1_per_seed": diffs,
        "fedalign_rounds_ratio_alpha0.1": float(np.mean([rounds_or_censored(a) for a in al]) /
                                                np.mean([rounds_or_censored(f) for f in fa])),
        "hfedmoe_bytes_ratio": float(np.sum([r["bytes_up"] for r in hf]) / np.sum([r["bytes_up"] for r in fa_all])),
        "hfedmoe_minus_fedavg_acc": float(np.mean(paired(hf, fa_all, "final_accuracy"))),
        "hfedmoe_budget_violations": int(sum(r["budget_violations"] for r in results if r["method"] == "hfedmoe")),
        "hfedmoe_backward_expert_tokens_ratio": float(np.sum([r["backward_expert_tokens"] for r in hf]) /
                                                      np.sum([r["backward_expert_tokens"] for r in fa_all])),
        "round_time_ratio_vs_inprocess": timing["edgeray_median_round_s"] / timing["inprocess_median_round_s"],
        "routing_entropy_ratio": float(np.mean([r["routing_entropy"] for r in results if r["leg"] == "topics"]) /
                                       math.log(8)),
        "validity_gate_passed": None,
        "per_leg": {f"{leg}/a{alpha}": {m: {"final_accuracy": float(np.mean([r["final_accuracy"] for r in
                                                                              pick(m, leg=leg, alpha=alpha)])),
                                            "rounds_to_target": [r["rounds_to_target"] for r in pick(m, leg=leg, alpha=alpha)],
                                            "bytes_up": float(np.mean([r["bytes_up"] for r in pick(m, leg=leg, alpha=alpha)])),
                                            "routing_entropy_ratio": float(np.mean([r["routing_entropy"] for r in pick(
                                                m, leg=leg, alpha=alpha)]) / math.log(8 if leg != "smollm2" else 4)),
                                            "token_entropy_ratio": float(np.mean([r["token_entropy"] for r in pick(
                                                m, leg=leg, alpha=alpha)]) / math.log(8 if leg != "smollm2" else 4))}
                                        for m in METHODS} | {"centralised_target": 0.9 * targets[(leg, alpha)]}
                    for leg, alpha in sorted(targets)},
        **timing,
        "cut": cut, "wall_s": time.perf_counter() - started,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    summary["validity_gate_passed"] = summary["routing_entropy_ratio"] <= 0.9
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    if no_topics:
        for key in ("fedalign_minus_fedavg_acc_alpha0.1", "fedalign_minus_fedavg_acc_alpha0.1_per_seed",
                    "fedalign_rounds_ratio_alpha0.1", "validity_gate_passed"):
            summary[key] = None
    summary["validity_gate_per_leg"] = {
        name: {"client_routing_entropy": all(v["routing_entropy_ratio"] <= 0.9 for m, v in row.items() if m in METHODS),
               "token_routing_entropy": all(v["token_entropy_ratio"] <= 0.9 for m, v in row.items() if m in METHODS)}
        for name, row in summary["per_leg"].items()}
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    with open(OUT / f"rows{suffix}.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    (OUT / f"summary{suffix}.json").write_text(json.dumps(summary, indent=1))
    plots(results, suffix)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
