"""Benchmark: SVD (steering-vector decoding, arXiv 2509.15888) against its PEFT warm start on
real multiple-choice benchmarks, SmolLM2-135M-Instruct on CPU.

Data: the validation splits that scripts/assets/mc_data.sh extracts (serving/svd/mcdata.py),
each cut with a fixed seed into warm-start train / calibration / test. Per warm-start method
(prompt tuning, LoRA, IA3) and seed:
  1. ONE adapter is warm-started on the union of the benchmarks' train splits (OUR CUT: the
     paper warm-starts one adapter per task; a shared adapter costs one training run instead of
     one per benchmark), with the very functions the Serve task runs (`make_peft_model`,
     `warm_start`);
  2. at each checkpoint of the warm-start step sweep, mu_bar is calibrated PER BENCHMARK on its
     calibration split (`calibrate`: every estimator with its sign; the ratio form of Eq. 46 is
     the default; EOS and whitespace-only tokens left out);
  3. every test item is scored under base / warm start / warm start + SVD (one decoder per mu
     estimator), cloze format (length-normalised) and, with --letter, the letter format
     (one answer token decides; the fallbacks to the warm start are counted)
     (serving/svd/mceval.py).
Statistics: per item, SVD - warm start averaged over the seeds; paired bootstrap 95 % intervals
per benchmark and for the mean over the MC benchmarks (TruthfulQA MC1/MC2 reported apart).
Then decode tokens/s, plain vs SVD, in the same process (the LoRA adapter of the first seed).

Writes bench/results/svd/{summary.json,rows.jsonl,gain_vs_warmstart.png}; prints one JSON line
per checkpoint and, last, the summary line (svd_minus_warmstart_acc, svd_minus_warmstart_ci_low,
truthfulqa_mc1_gain, benchmarks_used, fallback_rate, decode_speed_ratio, ...). `--quick` runs
a small grid (< 2 min) with the same keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeray.config import load_config  # noqa: E402
from serving.svd.decoding import DecodeRequest, SVDEngine  # noqa: E402
from serving.svd.mcdata import (MC_DIR, cloze_item, letter_item, load_benchmark, split_questions,  # noqa: E402
                                truthfulqa_mc1_options)
from edgeray.stats import stratified_paired_bootstrap  # noqa: E402
from serving.svd.mceval import evaluate  # noqa: E402
from serving.svd.model import SMOLLM2_GGUF, load_model, resolve_source  # noqa: E402
from serving.svd.warmstart import TaskSpec, calibrate, make_peft_model, warm_start  # noqa: E402

FULL_BENCHMARKS = "piqa,arc_easy,sciq,siqa,openbookqa,commonsense_qa,truthfulqa"
ALL_BENCHMARKS = "piqa,hellaswag,arc_easy,arc_challenge,boolq,sciq,siqa,openbookqa,winogrande,commonsense_qa,truthfulqa"
DEFAULT_LR = {"prompt_tuning": 3e-2, "lora": 1e-3, "ia3": 1e-2}
ESTIMATORS = ("ratio", "mean", "median")
DEFAULT_DECODER = "svd:ratio"


def decode_speed(engine: SVDEngine, task, prompts: list[list[int]], tokens: int, repeats: int) -> dict:
    """Median tokens/s of plain vs SVD decoding, alternated so drift hits both alike."""
    rates = {"plain": [], "svd": []}
    for _ in range(repeats):
        for mode in ("plain", "svd"):
            requests = [DecodeRequest(p, tokens, task, mode == "svd", task.mu_bar, task.alpha, ignore_eos=True)
                        for p in prompts]
            started = time.perf_counter()
            produced = sum(sum(t is not None for t in step) for step in engine.generate(requests))
            rates[mode].append(produced / (time.perf_counter() - started))
    plain, svd = statistics.median(rates["plain"]), statistics.median(rates["svd"])
    return {"plain_tok_s": plain, "svd_tok_s": svd, "ratio": svd / plain}


def load_splits(names: list[str], n_train: int, n_calib: int, n_test: int, seed: int) -> dict:
    splits = {}
    for name in names:
        questions = load_benchmark(name, ROOT / MC_DIR)
        splits[name] = split_questions(questions, n_train, n_calib, n_test, seed)
    return splits


def train_examples(splits: dict, seed: int) -> list[dict]:
    examples = [cloze_item(q).as_example() for split in splits.values() for q in split["train"]]
    random.Random(seed).shuffle(examples)
    return examples


def evaluate_checkpoint(peft_model, tokenizer, source: str, spec: TaskSpec, splits: dict, args, ckpt_dir: Path,
                        task_id: str) -> dict:
    """Calibrate per benchmark, save the adapter, score every benchmark's test split."""
    calib = {name: calibrate(peft_model, tokenizer, spec, [cloze_item(q).as_example() for q in split["calib"]])
             for name, split in splits.items()}
    peft_model.save_pretrained(ckpt_dir / "adapter")
    engine = SVDEngine(*load_model(source), model_name="bench", model_loader=lambda: load_model(source))
    # one task in the engine; each benchmark passes its own calibrated mu values to `evaluate`
    task = engine.load_task({"id": task_id, "peft_type": spec.peft.type, "adapter_path": str(ckpt_dir / "adapter"),
                             "mu_bar": 0.0, "alpha": spec.alpha})
    results, started = {}, time.time()
    for name, split in splits.items():
        c = calib[name]
        mus = {est: c[f"mu_{est}"] for est in ESTIMATORS}
        questions = split["test"]
        extra = {}
        if name == "truthfulqa":
            extra = {"mc1_options": [truthfulqa_mc1_options(q, ROOT / MC_DIR) for q in questions],
                     "true_options": [q.true_options for q in questions]}
        cloze = evaluate(engine, task, [cloze_item(q) for q in questions], "cloze", mus, spec.alpha,
                         args.batch_rows, **extra)
        results[name] = {"cloze": cloze, "calib": c}
        if args.letter and name != "truthfulqa":
            results[name]["letter"] = evaluate(engine, task, [letter_item(q) for q in questions], "letter", mus,
                                               spec.alpha, args.batch_rows)
        if name == splits_first(splits) and args.speed_task is None and spec.peft.type == "lora":
            speed_task = dataclasses.replace(task, mu_bar=c["mu_bar"])
            args.speed_task = (engine, speed_task, [tokenizer(cloze_item(q).prompt).input_ids for q in questions[:4]])
        # a run cut mid-checkpoint (time budget) keeps the benchmarks already scored
        partial = Path(args.out) / "checkpoints" / f"{task_id}.pkl.partial"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(pickle.dumps(results))
        print(json.dumps({"checkpoint": task_id, "benchmark": name, "n": cloze["n"],
                          "acc": {d: round(float(v.mean()), 4) for d, v in cloze["correct"].items()},
                          "seconds": round(time.time() - started, 1)}), flush=True)
    return results


def splits_first(splits: dict) -> str:
    return next(iter(splits))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (< 2 min), the same keys")
    parser.add_argument("--model", default=SMOLLM2_GGUF, help="model source (.gguf or HF dir)")
    parser.add_argument("--benchmarks", default=None, help=f"comma-separated; full run: {FULL_BENCHMARKS}; "
                                                           f"available: {ALL_BENCHMARKS}")
    parser.add_argument("--methods", default=None, help="comma-separated PEFT methods: prompt_tuning,lora,ia3")
    parser.add_argument("--seeds", type=int, default=None, help="warm-start seeds (full 3)")
    parser.add_argument("--seed-start", type=int, default=0, help="first warm-start seed (run seeds in parallel "
                                                                  "processes, then --summarize their outputs)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="DIR",
                        help="no training: build the summary from the checkpoints/ of these earlier --out dirs")
    parser.add_argument("--steps", default=None,
                        help="warm-start checkpoints in optimizer steps (full 9, quick 2), e.g. 4,12")
    parser.add_argument("--n-train", type=int, default=None, help="train questions per benchmark")
    parser.add_argument("--n-calib", type=int, default=None, help="calibration questions per benchmark")
    parser.add_argument("--n-test", type=int, default=None, help="test questions per benchmark")
    parser.add_argument("--batch-size", type=int, default=None, help="warm-start batch size (default 8; quick 4)")
    parser.add_argument("--batch-rows", type=int, default=32, help="rows per scoring forward")
    parser.add_argument("--letter", action="store_true", help="also score the letter format")
    parser.add_argument("--no-speed", action="store_true", help="skip the decode-speed measurement (when another "
                                                                "process of a split run measures it)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "svd"))
    parser.add_argument("--cut-why", default="a 135M forward pass runs at ~300-500 tokens/s on the shared 2-core "
                                             "machine", help="why the grid was cut (recorded in the JSON)")
    args = parser.parse_args(argv)
    quick = args.quick
    names = (args.benchmarks or ("piqa,sciq,truthfulqa" if quick else FULL_BENCHMARKS)).split(",")
    methods = (args.methods or "prompt_tuning,lora,ia3").split(",")
    seeds = args.seeds or (1 if quick else 3)
    steps = sorted(int(s) for s in (args.steps or ("2" if quick else "9")).split(","))
    n_train = args.n_train or (4 if quick else 10)
    n_calib = args.n_calib or (3 if quick else 10)
    args.batch_size = args.batch_size or (4 if quick else 8)
    n_test = args.n_test or (5 if quick else 150)
    for m in methods:
        if m not in DEFAULT_LR:
            parser.error(f"unknown method {m!r}; choose from {', '.join(DEFAULT_LR)}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    source = resolve_source(args.model)
    splits = load_splits(names, n_train, n_calib, n_test, args.split_seed)
    args.speed_task = False if args.no_speed else None

    # runs[(method, step)][seed][benchmark] = {"cloze": ..., "letter": ..., "calib": ...}
    runs: dict = {}
    speed = None
    if args.summarize:
        for folder in args.summarize:
            for path in sorted(Path(folder, "checkpoints").glob("*.pkl")):
                method, seed, step = path.stem.rsplit("-", 2)
                runs.setdefault((method, int(step[1:])), {})[int(seed[1:])] = pickle.loads(path.read_bytes())
            if Path(folder, "checkpoints", "speed.json").is_file():
                speed = json.loads(Path(folder, "checkpoints", "speed.json").read_text())
        methods = sorted({m for m, _ in runs})
        steps = sorted({s for _, s in runs})
        seeds = max(len(v) for v in runs.values())
    for method in ([] if args.summarize else methods):
        for seed in range(args.seed_start, args.seed_start + seeds):
            torch.manual_seed(seed)
            model, tokenizer = load_model(source)
            spec = load_config(TaskSpec, data={"peft": {"type": method}, "lr": DEFAULT_LR[method],
                                               "batch_size": args.batch_size, "max_steps": steps[-1],
                                               "epochs": 20, "alpha": args.alpha, "seed": seed})
            peft_model = make_peft_model(model, spec.peft)
            examples = train_examples(splits, seed)
            t0 = time.time()

            def on_step(step, pm, method=method, seed=seed, spec=spec):
                if step not in steps:
                    return
                pm.eval()
                ckpt = out / "tasks" / f"{method}-s{seed}-k{step}"
                res = evaluate_checkpoint(pm, tokenizer, source, spec, splits, args, ckpt, ckpt.name)
                runs.setdefault((method, step), {})[seed] = res
                (out / "checkpoints").mkdir(exist_ok=True)
                (out / "checkpoints" / f"{method}-s{seed}-k{step}.pkl").write_bytes(pickle.dumps(res))
                (out / "checkpoints" / f"{method}-s{seed}-k{step}.pkl.partial").unlink(missing_ok=True)
                line = {"method": method, "seed": seed, "step": step, "elapsed_s": round(time.time() - t0, 1)}
                for name, r in res.items():
                    acc = {d: round(float(v.mean()), 4) for d, v in r["cloze"]["correct"].items()}
                    line[name] = {"cloze": acc, "mu": {e: round(r["calib"][f"mu_{e}"], 4) for e in ESTIMATORS}}
                print(json.dumps(line), flush=True)

            stats = warm_start(peft_model, tokenizer, spec, examples, on_step=on_step)
            print(json.dumps({"method": method, "seed": seed, "warm_start": stats}), flush=True)
            del peft_model, model

    if args.speed_task:
        engine, task, prompts = args.speed_task
        tokens, repeats = (8, 2) if quick else (24, 3)
        speed = {f"batch{b}": decode_speed(engine, task, prompts[:b], tokens, repeats) for b in (1, 4)}
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "speed.json").write_text(json.dumps(speed))

    summary, rows = summarize(runs, names, methods, steps, seeds, args.bootstrap)
    best = summary["best"]
    mc_names = [n for n in names if n != "truthfulqa"]
    full_grid = {"benchmarks": ALL_BENCHMARKS.split(","), "test_per_benchmark": ">= 1000 where the set allows",
                 "methods": ["prompt_tuning", "lora", "ia3"], "seeds": 3, "warm_start": "per benchmark"}
    result = {
        "svd_minus_warmstart_acc": best["mean"], "svd_minus_warmstart_ci_low": best["ci"][0],
        "svd_minus_warmstart_ci": best["ci"], "best_method": best["method"], "best_step": best["step"],
        "truthfulqa_mc1_gain": best.get("truthfulqa_mc1"), "truthfulqa_mc2_gain": best.get("truthfulqa_mc2"),
        "benchmarks_used": names, "fallback_rate": summary["fallback_rate"],
        "letter_fallback_rate": summary["letter_fallback_rate"],
        "neginf_all_masked_rate": summary["neginf_all_masked_rate"],
        "decode_speed_ratio": speed["batch1"]["ratio"] if speed else None,
        "decode_speed_ratio_batch4": speed["batch4"]["ratio"] if speed else None,
        "per_method": summary["per_method"], "mu_signs": summary["mu_signs"],
        "n_train": n_train, "n_calib": n_calib, "n_test": n_test, "methods": methods, "seeds": seeds,
        "steps": steps, "mc_benchmarks": mc_names, "quick": quick,
        "cut": {"issue_grid": full_grid, "ran": {"benchmarks": names, "test_per_benchmark": n_test,
                                                 "methods": methods, "seeds": seeds,
                                                 "warm_start": "one shared adapter over all benchmarks"},
                "why": args.cut_why},
        "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time(), 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "threads": args.threads,
    }
    with open(out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": result, "decode": speed}, indent=1))
    _plot(rows, out / "gain_vs_warmstart.png")
    print(json.dumps(result), flush=True)
    return 0


def summarize(runs: dict, names: list[str], methods: list[str], steps: list[int], seeds: int, resamples: int):
    """Per (method, step): accuracies, SVD - warm start with paired intervals (items paired,
    seeds averaged per item), TruthfulQA MC1/MC2 gains, fallbacks and mu signs."""
    mc_names = [n for n in names if n != "truthfulqa"]
    per_method, rows = {}, []
    fallbacks = items = letter_fallbacks = letter_items = neginf = 0
    mu_signs: dict = {}
    for (method, step), by_seed in sorted(runs.items()):
        entry = {"benchmarks": {}}
        diffs = []
        for name in names:
            per_seed = [by_seed[s][name] for s in sorted(by_seed)]
            cloze = [r["cloze"] for r in per_seed]
            acc = {d: float(np.mean([c["correct"][d].mean() for c in cloze])) for d in cloze[0]["correct"]}
            diff = np.mean([c["correct"][DEFAULT_DECODER] - c["correct"]["warmstart"] for c in cloze], axis=0)
            bench = {"acc": acc, "svd_minus_warmstart": float(diff.mean()),
                     "mu": {e: [r["calib"][f"mu_{e}"] for r in per_seed] for e in ESTIMATORS},
                     "n_calib_tokens": [r["calib"]["n_calib_tokens"] for r in per_seed],
                     "n_calib_tokens_excluded": [r["calib"]["n_calib_tokens_excluded"] for r in per_seed]}
            for e in ESTIMATORS:
                mu_signs.setdefault(e, {"positive": 0, "negative": 0})
                for r in per_seed:
                    mu_signs[e]["positive" if r["calib"][f"mu_{e}"] > 0 else "negative"] += 1
            for c in cloze:
                fallbacks += c["fallbacks"][DEFAULT_DECODER]
                items += c["n"]
                neginf += c["neginf_all_masked"] or 0
            if name == "truthfulqa":
                mc2 = {d: float(np.mean([c["mc2"][d].mean() for c in cloze])) for d in cloze[0]["mc2"]}
                mc2_diff = np.mean([c["mc2"][DEFAULT_DECODER] - c["mc2"]["warmstart"] for c in cloze], axis=0)
                bench["mc2"] = mc2
                boot = stratified_paired_bootstrap([diff, mc2_diff], reps=resamples)["per_group"]
                entry["truthfulqa_mc1"], entry["truthfulqa_mc1_ci"] = boot[0]["mean"], boot[0]["ci"]
                entry["truthfulqa_mc2"], entry["truthfulqa_mc2_ci"] = boot[1]["mean"], boot[1]["ci"]
            else:
                diffs.append(diff)
            if "letter" in per_seed[0]:
                letter = [r["letter"] for r in per_seed]
                bench["letter_acc"] = {d: float(np.mean([c["correct"][d].mean() for c in letter]))
                                       for d in letter[0]["correct"]}
                bench["letter_fallbacks"] = {d: sum(c["fallbacks"][d] for c in letter) for d in letter[0]["fallbacks"]}
                letter_fallbacks += bench["letter_fallbacks"][DEFAULT_DECODER]
                letter_items += sum(c["n"] for c in letter)
            entry["benchmarks"][name] = bench
            rows.append({"method": method, "step": step, "benchmark": name, "warmstart_acc": acc["warmstart"],
                         "svd_acc": acc[DEFAULT_DECODER], "base_acc": acc["base"],
                         "svd_minus_warmstart": float(diff.mean())})
        if diffs:
            boot = stratified_paired_bootstrap(diffs, reps=resamples)
            entry["mean"], entry["ci"] = boot["mean"]["mean"], boot["mean"]["ci"]
            for name, b in zip(mc_names, boot["per_group"]):
                entry["benchmarks"][name]["svd_minus_warmstart_ci"] = b["ci"]
            entry["warmstart_acc_mean"] = float(np.mean([entry["benchmarks"][n]["acc"]["warmstart"] for n in mc_names]))
            entry["base_acc_mean"] = float(np.mean([entry["benchmarks"][n]["acc"]["base"] for n in mc_names]))
        per_method[f"{method}@{step}"] = entry
    final = {k: v for k, v in per_method.items() if int(k.split("@")[1]) == steps[-1] and "mean" in v}
    pool = final or {k: v for k, v in per_method.items() if "mean" in v}
    if pool:
        key = max(pool, key=lambda k: pool[k]["mean"])
        best = {"method": key.split("@")[0], "step": int(key.split("@")[1]), **pool[key]}
        best = {k: v for k, v in best.items() if k != "benchmarks"}
    else:
        best = {"method": None, "step": None, "mean": None, "ci": [None, None]}
    return ({"per_method": per_method, "best": best, "mu_signs": mu_signs,
             "fallback_rate": fallbacks / max(items, 1),
             "letter_fallback_rate": letter_fallbacks / letter_items if letter_items else None,
             "neginf_all_masked_rate": neginf / max(items, 1)}, rows)


def _plot(rows: list[dict], path: Path) -> None:
    """SVD - warm start against warm-start accuracy: one small point per (benchmark, checkpoint),
    one large point per checkpoint for the mean over the MC benchmarks, joined along the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        color = f"C{k}"
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([r["warmstart_acc"] for r in mine], [r["svd_minus_warmstart"] for r in mine], s=12, alpha=0.5,
                   color=color)
        means = []
        for step in sorted({r["step"] for r in mine}):
            mc = [r for r in mine if r["step"] == step and r["benchmark"] != "truthfulqa"]
            if mc:
                means.append((step, float(np.mean([r["warmstart_acc"] for r in mc])),
                              float(np.mean([r["svd_minus_warmstart"] for r in mc]))))
        if means:
            ax.plot([m[1] for m in means], [m[2] for m in means], "-o", color=color, ms=7,
                    label=f"{method} (MC mean; steps {', '.join(str(m[0]) for m in means)})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("warm-start accuracy (small: one benchmark x checkpoint)")
    ax.set_ylabel("SVD - warm start (accuracy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
