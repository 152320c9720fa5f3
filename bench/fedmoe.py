"""FedAvg-MoE vs HFedMoE vs FedAlign-MoE through the runtime (``edgeray run``'s ``run_fl``), side
by side in one process and one local Ray, plus a plain sequential in-process loop of the same
LoRA fine-tuning (the round-time reference, interleaved round by round with the runtime) and a
centralised run (the accuracy target).

Legs (each: 10 clients, all of them every round, Dirichlet split over the labels):
- ``topics``: the synthetic 4-topic task, 2-layer OLMoE (E=8, top-2) from a config;
- ``drug``: the drug reviews (3 classes), the same OLMoE shape, compact SmolLM2 vocabulary;
- ``smollm2``: SmolLM2-135M-Instruct upcycled (first 4 layers kept, the last 2 of them MoE with
  E=4, top-2) on the drug reviews.
The configs are ``configs/fedmoe_*.yaml``; the overrides below size them for a 2-core machine.

Paired intervals: the per-seed differences (method − FedAvg, same seed, same split) get a 95 %
paired bootstrap interval from ``edgeray.stats.paired_gain`` (``*_ci`` keys); the rounds ratio's
interval comes from the same draws (1 + relative gain).

Round time (``round_time_ratio_vs_inprocess``): one FedAvg-MoE run of the first grid cell is
driven round by round through the runtime's aggregator (``actors.driver.FLRun``), and between its
rounds the same round of the same clients, data split, seeds and strategy runs in this process,
one client after another on one thread; the order inside a pair alternates. The key is the median
over rounds of the paired ratio edgeray / in-process (driver-side wall time of a round, evaluation
excluded on both sides).

Validity gate (moe_fl.md §6): the mean per-client routing entropy H(mean G) of the last round,
over ln E, must be <= 0.9 for the comparison to mean anything; the JSON prints it per leg
(``validity_gate_per_leg``), with the mean per-token routing entropy over ln E as a second
reading: sharp per-token routing with a balanced load passes the second and not the first (the
upcycled SmolLM2 with its k-means router init). The bench prints one gate line per leg too.

    python bench/fedmoe.py [--quick] [--legs topics,drug,smollm2] [--seeds N] [--drug-seeds N] ...
    python bench/fedmoe.py --merge topics,drug,smollm2     # one summary over separately run tags

Last line: JSON with fedalign_minus_fedavg_acc_alpha0.1(_ci), fedalign_rounds_ratio_alpha0.1(_ci),
hfedmoe_bytes_ratio, hfedmoe_minus_fedavg_acc(_ci), hfedmoe_budget_violations,
round_time_ratio_vs_inprocess, routing_entropy_ratio (and the per-leg rows, what was cut against
the issue's grid, load). Writes bench/results/fedmoe/{rows,summary}[-tag].{jsonl,json} and plots.
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
EXPERTS = {"topics": 8, "drug": 8, "smollm2": 4}
ISSUE_GRID = {"alphas": (0.1, 0.5), "seeds": 3, "rounds": 30}   # the issue's grid, per leg
STANDING_CUTS = [
    "smollm2: first 4 of 30 layers kept, seq_len 32",
    "smollm2 (E=4, top-2): HFedMoE tiers [0.5, 1.0] instead of [0.25, 0.5, 1.0]",
    "centralised target: in-process, one client holding all training data, seed 0 only, as many epochs as rounds",
]


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


class InProcess:
    """The same strategy and clients, one after another in this process on one thread (no Ray);
    with ``clients_as_one`` all training data is one client: the centralised reference. Its
    attributes (global tensors, server state, model, data) stay readable after the rounds."""

    def __init__(self, cfg, clients_as_one: bool = False, prepared=None):
        import torch

        from actors.driver import prepare
        from pipelines.models import ClientHandover, build_model, get_params
        from pipelines.registry import EVALUATIONS, load

        torch.set_num_threads(1)
        self.cfg = cfg
        self.prepared = prepared or prepare(cfg)
        data = self.prepared.data
        self.parts = [np.arange(len(data.y_train))] if clients_as_one else self.prepared.parts
        self.strategy = cfg.strategy.spec().build()
        evaluation = EVALUATIONS[self.prepared.task.evaluation]
        self.evaluate_fn, self.loss = load(evaluation.target), load(evaluation.loss)
        self.model = build_model(self.prepared.task.model)
        self.handover = ClientHandover(self.model)
        self.global_params = get_params(self.model)
        self.state = self.strategy.init_state(self.global_params)
        self.population = self.prepared.population if not clients_as_one else \
            type(self.prepared.population)(self.prepared.population.profiles[:1], (len(data.y_train),))

    def round(self, rnd: int) -> float:
        """One round (client updates + aggregation); returns its wall seconds."""
        import torch

        from pipelines.models import set_params
        from pipelines.strategy import ClientContext, ClientData

        data, strategy, cfg = self.prepared.data, self.strategy, self.cfg
        started = time.perf_counter()
        clients = list(range(len(self.parts)))
        instructions = strategy.configure_round(rnd, self.state, clients, self.population)
        partial = strategy.init_partial()
        for cid in clients:
            self.handover.restore()
            set_params(self.model, self.global_params)
            torch.manual_seed(hash((cfg.seed, rnd, cid)) & 0xFFFFFFFF)
            ctx = ClientContext(cid, rnd, self.model,
                                ClientData(data.x_train[self.parts[cid]], data.y_train[self.parts[cid]]),
                                instructions[cid], {}, np.random.default_rng([cfg.seed, rnd, cid]), self.loss)
            partial = strategy.accumulate(partial, strategy.client_update(ctx))
        self.global_params, self.state, _ = strategy.aggregate(rnd, self.global_params, self.state,
                                                               strategy.merge([partial]))
        return time.perf_counter() - started

    def accuracy(self) -> float:
        from pipelines.models import set_params

        data = self.prepared.data
        self.handover.restore()
        set_params(self.model, self.global_params)
        sums = self.evaluate_fn(self.model, data.x_test, data.y_test)
        return sums["test_accuracy"] / sums["count"]


def local_loop(cfg, rounds: int, clients_as_one: bool = False) -> tuple[list[dict], InProcess]:
    loop = InProcess(cfg, clients_as_one)
    rows = [{"round": rnd, "round_wall_s": loop.round(rnd), "test_accuracy": loop.accuracy()}
            for rnd in range(1, rounds + 1)]
    return rows, loop


def interleaved_round_time(cfg) -> dict:
    """Round r through the runtime (its aggregator, ClientActor pool and edge server), then round r
    of the in-process loop on the same clients, split, seeds and strategy (or the other way round
    on even rounds); returns the per-round pairs and the median paired ratio."""
    import ray

    from actors.driver import FLRun

    loop = InProcess(cfg)
    fl = FLRun(cfg, cfg.strategy.spec(), loop.prepared, run_id="fedmoe-bench-timing",
               warm=cfg.runtime.warm_pool == "on")
    pairs = []
    try:
        for rnd in range(1, cfg.rounds + 1):
            def edgeray_round():
                started = time.perf_counter()
                row = ray.get(fl.aggregator.run_round.remote(rnd))
                return time.perf_counter() - started, row["round_wall_s"]
            if rnd % 2:
                (ours, ours_inner), ref = edgeray_round(), loop.round(rnd)
            else:
                ref = loop.round(rnd)
                ours, ours_inner = edgeray_round()
            pairs.append({"round": rnd, "edgeray_s": ours, "edgeray_aggregator_round_s": ours_inner,
                          "inprocess_s": ref, "ratio": ours / ref, "edgeray_first": bool(rnd % 2),
                          "loadavg_1m": os.getloadavg()[0]})
        edgeray_acc = ray.get(fl.aggregator.evaluate.remote())["test_accuracy"]
    finally:
        fl.shutdown()
    ratios = [p["ratio"] for p in pairs]
    return {"round_time_ratio_vs_inprocess": float(np.median(ratios)),
            "round_time_ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
            "edgeray_median_round_s": float(np.median([p["edgeray_s"] for p in pairs])),
            "inprocess_median_round_s": float(np.median([p["inprocess_s"] for p in pairs])),
            "edgeray_final_accuracy": edgeray_acc, "inprocess_final_accuracy": loop.accuracy(),
            "timing_cell": {"leg": cfg.name, "method": cfg.strategy.name, "alpha": cfg.data.alpha,
                            "seed": cfg.seed, "rounds": cfg.rounds},
            "timing_pairs": pairs}


def personal_accuracy(alpha: float, seed: int, rounds: int) -> dict:
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
        _, loop = local_loop(config("topics", "fedalign-moe", alpha, seed, rounds,
                                    [f"strategy.params.expert_mode={mode}"]), rounds)
        data, parts = loop.prepared.data, loop.parts
        classes = int(data.info["num_classes"])
        accs, sizes = [], []
        for cid, idx in enumerate(parts):
            params = loop.global_params
            mix = loop.state.get("personal", {}).get(cid) if mode == "personalised" else None
            if mix:
                params = insert_rows(params, {k: Rows(v["index"], v["values"], v["axis"]) for k, v in mix.items()})
            loop.handover.restore()
            set_params(loop.model, params)
            loop.model.eval()
            with torch.no_grad():
                pred = loop.model(torch.from_numpy(data.x_test)).argmax(-1).numpy()
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


def cell_key(leg: str, alpha: float) -> str:
    return f"{leg}/a{alpha}"


def paired(results: list[dict], method: str, key: str, **where) -> tuple[list, list, list]:
    """(method values, FedAvg values, seeds) of ``key``, paired by (leg, alpha, seed)."""
    def match(r):
        return all(r[k] == v for k, v in where.items())
    base = {(r["leg"], r["alpha"], r["seed"]): r for r in results if r["method"] == "fedavg-moe" and match(r)}
    mine = [r for r in results if r["method"] == method and match(r)
            and (r["leg"], r["alpha"], r["seed"]) in base]
    return [r[key] for r in mine], [base[(r["leg"], r["alpha"], r["seed"])][key] for r in mine], \
        [(r["alpha"], r["seed"]) for r in mine]


def paired_interval(a, b) -> dict | None:
    from edgeray.stats import paired_gain

    return paired_gain(a, b) if a else None


def cuts(results: list[dict]) -> list[str]:
    """What the runs in ``results`` left out of the issue's grid (3 legs × α {0.1, 0.5} × 3 seeds
    × 30 rounds × 3 methods), derived from the rows themselves."""
    out = []
    for leg in LEGS:
        mine = [r for r in results if r["leg"] == leg]
        if not mine:
            out.append(f"{leg}: leg not run")
            continue
        rounds = sorted({r["rows"][-1]["round"] for r in mine})
        if max(rounds) < ISSUE_GRID["rounds"]:
            out.append(f"{leg}: rounds {ISSUE_GRID['rounds']} -> {'/'.join(map(str, rounds))}")
        for alpha in ISSUE_GRID["alphas"]:
            seeds = sorted({r["seed"] for r in mine if r["alpha"] == alpha})
            if not seeds:
                out.append(f"{leg}: alpha {alpha} not run")
            elif len(seeds) < ISSUE_GRID["seeds"]:
                out.append(f"{leg}: alpha {alpha}: seeds {len(seeds)} of {ISSUE_GRID['seeds']} ({seeds})")
    return out + [c for c in STANDING_CUTS if not c.startswith("smollm2") or any(r["leg"] == "smollm2" for r in results)]


def summarise(results: list[dict], targets: dict, timing: dict, notes: list[str], load_before, started) -> dict:
    """The last-line JSON from the per-run rows, the centralised targets ("leg/aX": best accuracy)
    and the round-time pair."""
    topics_a01 = dict(leg="topics", alpha=0.1)
    al, fa, seeds_a01 = paired(results, "fedalign-moe", "final_accuracy", **topics_a01)
    hf, fa_h, hf_cells = paired(results, "hfedmoe", "final_accuracy", leg="topics")
    rounds_max = max((r["rows"][-1]["round"] for r in results), default=0)

    def censored(values):      # a run that never reached the target counts as rounds + 1
        return [rounds_max + 1 if v is None else v for v in values]

    al_r, fa_r, _ = paired(results, "fedalign-moe", "rounds_to_target", **topics_a01)
    hf_b, fa_b, _ = paired(results, "hfedmoe", "bytes_up", leg="topics")
    hf_t, fa_t, _ = paired(results, "hfedmoe", "backward_expert_tokens", leg="topics")
    gain_al, gain_hf = paired_interval(al, fa), paired_interval(hf, fa_h)
    gain_r = paired_interval(censored(al_r), censored(fa_r))

    def ci(g, diff=True):
        if g is None:
            return None
        return [g["diff_ci_low"], g["diff_ci_high"]] if diff else [1 + g["ci_low_pct"] / 100, 1 + g["ci_high_pct"] / 100]

    per_leg = {}
    for leg, alpha in sorted({(r["leg"], r["alpha"]) for r in results}):
        cell, ln_e = dict(leg=leg, alpha=alpha), math.log(EXPERTS[leg])
        row = {}
        for m in METHODS:
            mine = [r for r in results if r["method"] == m and r["leg"] == leg and r["alpha"] == alpha]
            if not mine:
                continue
            row[m] = {"seeds": [r["seed"] for r in mine],
                      "final_accuracy": float(np.mean([r["final_accuracy"] for r in mine])),
                      "final_accuracy_per_seed": [r["final_accuracy"] for r in mine],
                      "rounds_to_target": [r["rounds_to_target"] for r in mine],
                      "bytes_up": float(np.mean([r["bytes_up"] for r in mine])),
                      "budget_violations": int(sum(r["budget_violations"] for r in mine)),
                      "routing_entropy_ratio": float(np.mean([r["routing_entropy"] for r in mine]) / ln_e),
                      "token_entropy_ratio": float(np.mean([r["token_entropy"] for r in mine]) / ln_e)}
            if m != "fedavg-moe":
                a, b, _ = paired(results, m, "final_accuracy", **cell)
                g = paired_interval(a, b)
                if g:
                    row[m]["minus_fedavg_acc"] = g["diff_mean"]
                    row[m]["minus_fedavg_acc_ci"] = ci(g)
        row["centralised_target"] = 0.9 * targets[cell_key(leg, alpha)] if cell_key(leg, alpha) in targets else None
        per_leg[cell_key(leg, alpha)] = row
    gate = {name: {"client_routing_entropy_ratio": max(v["routing_entropy_ratio"] for m, v in row.items()
                                                       if m in METHODS),
                   "client_routing_entropy": all(v["routing_entropy_ratio"] <= 0.9 for m, v in row.items()
                                                 if m in METHODS),
                   "token_routing_entropy_ratio": max(v["token_entropy_ratio"] for m, v in row.items() if m in METHODS),
                   "token_routing_entropy": all(v["token_entropy_ratio"] <= 0.9 for m, v in row.items()
                                                if m in METHODS)}
            for name, row in per_leg.items()}
    topics = [r for r in results if r["leg"] == "topics"]
    routing_ratio = float(np.mean([r["routing_entropy"] for r in topics]) / math.log(8)) if topics else None
    summary = {
        "fedalign_minus_fedavg_acc_alpha0.1": gain_al["diff_mean"] if gain_al else None,
        "fedalign_minus_fedavg_acc_alpha0.1_ci": ci(gain_al),
        "fedalign_minus_fedavg_acc_alpha0.1_per_seed": [x - y for x, y in zip(al, fa)] or None,
        "fedalign_rounds_ratio_alpha0.1": float(np.mean(censored(al_r)) / np.mean(censored(fa_r))) if al_r else None,
        "fedalign_rounds_ratio_alpha0.1_ci": ci(gain_r, diff=False),
        "hfedmoe_bytes_ratio": float(np.sum(hf_b) / np.sum(fa_b)) if hf_b else None,
        "hfedmoe_minus_fedavg_acc": gain_hf["diff_mean"] if gain_hf else None,
        "hfedmoe_minus_fedavg_acc_ci": ci(gain_hf),
        "hfedmoe_minus_fedavg_acc_cells": [list(c) for c in hf_cells],
        "hfedmoe_budget_violations": int(sum(r["budget_violations"] for r in results if r["method"] == "hfedmoe")),
        "hfedmoe_backward_expert_tokens_ratio": float(np.sum(hf_t) / np.sum(fa_t)) if hf_t else None,
        "round_time_ratio_vs_inprocess": timing.get("round_time_ratio_vs_inprocess"),
        "routing_entropy_ratio": routing_ratio,
        "validity_gate_passed": None if routing_ratio is None else routing_ratio <= 0.9,
        "validity_gate_per_leg": gate,
        "seeds_alpha0.1": seeds_a01 and [s for _, s in seeds_a01],
        "rounds_to_target_censored_at": rounds_max + 1,
        "per_leg": per_leg,
        "centralised_best_accuracy": targets,
        **{k: v for k, v in timing.items() if k != "timing_pairs"},
        "cut": cuts(results) + notes,
        "wall_s": time.perf_counter() - started,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    return summary


def gate_lines(summary: dict) -> list[str]:
    return [f"validity gate {name}: client routing entropy <= {g['client_routing_entropy_ratio']:.3f}·ln E "
            f"({'pass' if g['client_routing_entropy'] else 'FAIL'}), token routing entropy <= "
            f"{g['token_routing_entropy_ratio']:.3f}·ln E ({'pass' if g['token_routing_entropy'] else 'FAIL'})"
            for name, g in summary["validity_gate_per_leg"].items()]


def plots(results: list[dict], suffix: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r["seed"] == min(x["seed"] for x in results if x["leg"] == r["leg"])]
    keys = sorted({(r["leg"], r["alpha"]) for r in shown})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    for j, (leg, alpha) in enumerate(keys):
        for r in [x for x in shown if (x["leg"], x["alpha"]) == (leg, alpha)]:
            rows = [x for x in r["rows"] if "test_accuracy" in x]
            axes[0][j].plot([x["round"] for x in rows], [x["test_accuracy"] for x in rows], marker=".", label=r["method"])
            cum = np.cumsum([x.get("bytes_up", 0) for x in rows]) / 1e6
            axes[1][j].plot(cum, [x["test_accuracy"] for x in rows], marker=".", label=r["method"])
        axes[0][j].set_title(f"{leg}, alpha={alpha}, seed {min(r['seed'] for r in shown if r['leg'] == leg)}")
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
        ent = [x["train_routing_entropy"] / math.log(EXPERTS[r["leg"]]) for x in r["rows"]
               if "train_routing_entropy" in x]
        axes[1].plot(range(1, len(ent) + 1), ent, label=f"{r['method']} {r['leg']} a={r['alpha']}")
    axes[1].axhline(0.9, ls="--", c="k", lw=0.8)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean client routing entropy / ln E")
    axes[1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(OUT / f"routing{suffix}.png", dpi=90)
    plt.close(fig)


def write(results, summary, suffix) -> None:
    with open(OUT / f"rows{suffix}.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    (OUT / f"summary{suffix}.json").write_text(json.dumps(summary, indent=1))
    if results:
        plots(results, suffix)
    for line in gate_lines(summary):
        print(line, flush=True)
    print(json.dumps(summary), flush=True)


def merge(tags: list[str], started, load_before) -> None:
    """One summary over runs made separately (``--tag``): their rows, centralised targets, the
    round-time pair of the first tag that measured one, and their notes."""
    results, targets, timing, notes = [], {}, {}, []
    for tag in tags:
        rows_file, summary_file = OUT / f"rows-{tag}.jsonl", OUT / f"summary-{tag}.json"
        if not rows_file.is_file() or not summary_file.is_file():
            raise SystemExit(f"bench/fedmoe.py: error: --merge {tag}: {rows_file.name} or {summary_file.name} missing "
                             f"under {OUT}; run it with --tag {tag} first")
        results += [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        old = json.loads(summary_file.read_text())
        targets.update(old.get("centralised_best_accuracy") or     # summaries before 3 Dec 2026 kept 0.9 x best
                       {k: v["centralised_target"] / 0.9 for k, v in old.get("per_leg", {}).items()
                        if v.get("centralised_target") is not None})
        if not timing and old.get("round_time_ratio_vs_inprocess") is not None:
            timing = {k: old[k] for k in ("round_time_ratio_vs_inprocess", "round_time_ratio_iqr",
                                          "edgeray_median_round_s", "inprocess_median_round_s",
                                          "edgeray_final_accuracy", "inprocess_final_accuracy", "timing_cell")
                      if k in old}
        notes += [f"[{tag}] {n}" for n in old.get("notes", [])]
        notes.append(f"[{tag}] wall {old.get('wall_s', 0):.0f} s, load {old.get('loadavg_before')} -> "
                     f"{old.get('loadavg_after')}")
    summary = summarise(results, targets, timing, notes, load_before, started)
    summary["merged_tags"] = tags
    write(results, summary, "-" + "+".join(tags) if len(tags) > 1 else f"-merged-{tags[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="topics leg only, alpha 0.1, 1 seed, 3 rounds (< 2 min)")
    parser.add_argument("--legs", default="topics,drug,smollm2", help="comma-separated legs to run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the topics leg")
    parser.add_argument("--topic-alphas", default="0.1,0.5", help="Dirichlet alphas of the topics leg")
    parser.add_argument("--topic-rounds", type=int, default=10, help="rounds of the topics leg")
    parser.add_argument("--drug-seeds", type=int, default=1, help="seeds of the drug-review leg")
    parser.add_argument("--drug-alphas", default="0.1,0.5", help="Dirichlet alphas of the drug-review leg")
    parser.add_argument("--drug-rounds", type=int, default=8, help="rounds of the drug-review leg")
    parser.add_argument("--smollm2-seeds", type=int, default=1, help="seeds of the upcycled SmolLM2 leg")
    parser.add_argument("--smollm2-alphas", default="0.5", help="Dirichlet alphas of the upcycled SmolLM2 leg")
    parser.add_argument("--smollm2-rounds", type=int, default=2, help="rounds of the upcycled SmolLM2 leg")
    parser.add_argument("--no-timing", action="store_true", help="skip the interleaved round-time pair")
    parser.add_argument("--note", action="append", default=[], help="a note for the JSON's cut list (repeatable)")
    parser.add_argument("--personal", action="store_true", help="only FedAlign-MoE global vs personalised experts "
                        "on topics (alpha 0.1, seed 0, in process), each client scored on its own label mix")
    parser.add_argument("--tag", default="", help="suffix of the rows/summary file names (separate runs of one grid)")
    parser.add_argument("--merge", default="", help="comma-separated tags: summarise their rows into one JSON "
                        "(runs nothing)")
    parser.add_argument("--reuse", action="store_true", help="take runs already completed under bench/results/fedmoe/"
                        "runs with the same config (the round-time pair and the centralised targets always run)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.merge:
        merge([t for t in args.merge.split(",") if t], started, load_before)
        return
    if args.personal:
        rounds = 3 if args.quick else 6
        result = personal_accuracy(0.1, 0, rounds)
        result.update(rounds=rounds, alpha=0.1, seed=0, wall_s=time.perf_counter() - started,
                      loadavg_before=load_before, loadavg_after=os.getloadavg())
        (OUT / f"personal{'-quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
        return
    if args.quick:
        grid = [("topics", 0.1, 0, 3)]
        notes = ["quick: topics leg only, alpha 0.1, seed 0, 3 rounds"]
    else:
        legs = [leg for leg in args.legs.split(",") if leg]
        unknown = sorted(set(legs) - set(LEGS))
        if unknown:
            parser.error(f"--legs: unknown {unknown}; choose from {', '.join(LEGS)}")
        counts = {"--seeds": args.seeds, "--drug-seeds": args.drug_seeds, "--smollm2-seeds": args.smollm2_seeds,
                  "--topic-rounds": args.topic_rounds, "--drug-rounds": args.drug_rounds,
                  "--smollm2-rounds": args.smollm2_rounds}
        bad = [name for name, v in counts.items() if v < 1]
        if bad:
            parser.error(f"{bad[0]} must be >= 1")
        try:
            alphas = {leg: [float(a) for a in getattr(args, f"{leg if leg != 'topics' else 'topic'}_alphas").split(",")
                            if a] for leg in LEGS}
        except ValueError as exc:
            parser.error(f"--*-alphas: {exc}")
        if any(a <= 0 for v in alphas.values() for a in v):
            parser.error("Dirichlet alphas must be > 0")
        plan = {"topics": (args.seeds, args.topic_rounds), "drug": (args.drug_seeds, args.drug_rounds),
                "smollm2": (args.smollm2_seeds, args.smollm2_rounds)}
        grid = [(leg, a, s, plan[leg][1]) for leg in legs for a in alphas[leg] for s in range(plan[leg][0])]
        notes = list(args.note)
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results, targets, timing = [], {}, {}
    try:
        if not args.no_timing:      # first: the round-time pair of the first grid cell, FedAvg-MoE
            leg, alpha, seed, rounds = grid[0]
            timing = interleaved_round_time(config(leg, "fedavg-moe", alpha, seed, rounds))
            print(json.dumps({k: v for k, v in timing.items() if k != "timing_pairs"}), flush=True)
        for leg, alpha, seed, rounds in grid:
            if cell_key(leg, alpha) not in targets:
                central, _ = local_loop(config(leg, "fedavg-moe", alpha, 0, rounds), rounds, clients_as_one=True)
                targets[cell_key(leg, alpha)] = max(r["test_accuracy"] for r in central)
            for method in METHODS:
                cfg = config(leg, method, alpha, seed, rounds)
                done = finished_run(cfg) if args.reuse else None
                summary, rows = done or edgeray_run(cfg)
                trained = [r for r in rows if r["round"] > 0]
                results.append({
                    "leg": leg, "alpha": alpha, "seed": seed, "method": method,
                    "final_accuracy": summary["final_test_accuracy"],
                    "rounds_to_target": rounds_to(rows, 0.9 * targets[cell_key(leg, alpha)]),
                    "bytes_up": summary["bytes_up_total"], "bytes_down": summary["bytes_down_total"],
                    "routing_entropy": trained[-1].get("train_routing_entropy"),
                    "token_entropy": trained[-1].get("train_token_entropy"),
                    "budget_violations": int(sum(r.get("train_budget_violations", 0) for r in trained)),
                    "backward_expert_tokens": float(sum(r.get("train_backward_expert_tokens", 0) for r in trained)),
                    "median_round_wall_s": summary["median_round_wall_s"], "sim_time_s": summary["sim_time_s"],
                    "wall_s": summary["wall_s"], "reused": done is not None, "rows": rows})
                print(json.dumps({k: v for k, v in results[-1].items() if k != "rows"}), flush=True)
    finally:
        ray.shutdown()
    summary = summarise(results, targets, timing, notes, load_before, started)
    summary["notes"] = notes
    summary["timing_pairs"] = timing.get("timing_pairs")
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    write(results, summary, suffix)


if __name__ == "__main__":
    main()
