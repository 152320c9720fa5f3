"""Benchmark: SVD (steering-vector decoding, arXiv 2509.15888) against its baselines.

For each of three multiple-choice tasks generated in code (serving/svd/mctasks.py: compare,
parity, addition; fixed seeds, >= 500 test items each in the full run):
  1. warm-start a LoRA adapter on the train split and calibrate mu_bar on the calib split, with
     the very function the Serve deployment runs as a Ray task (`run_warm_start`);
  2. score every test item's options by summed log-probability under four decoders, all from
     ONE mixed-adapter forward per batch: base (p_theta), warm-start (p_phi), warm-start + min-p
     0.1 (the confidence mask alone, mu = 0), warm-start + SVD (mu_bar, alpha 0.1, lambda = -inf);
     the prediction is the best option (an option with a masked token scores -inf; when every
     option is masked the warm-start choice stands);
  3. accuracy with a percentile bootstrap interval, and paired bootstrap intervals of
     SVD - warm-start and SVD - min-p.
Then decode tokens/s of plain (adapted model, one pass) vs SVD decoding (one pass over doubled
rows) in the same process, greedy, fixed length, batch 1 and 4, alternated and repeated.

Writes bench/results/svd/{rows.jsonl,summary.json,accuracy.png}; prints one JSON line per task
and, last, the summary line with svd_minus_warmstart_acc, svd_minus_minp_acc, decode_speed_ratio.
`--quick` runs smaller splits and shorter decodes (< 2 min) with the same keys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeray.config import load_config, to_dict  # noqa: E402
from serving.svd.decoding import DecodeRequest, SVDEngine, option_logprobs  # noqa: E402
from serving.svd.mctasks import GENERATORS, make_task  # noqa: E402
from serving.svd.model import SMOLLM2_GGUF, TINY, load_model, resolve_source  # noqa: E402
from serving.svd.warmstart import TaskSpec, new_task_record, read_task, run_warm_start, write_task  # noqa: E402

CONDITIONS = ("base", "warmstart", "minp", "svd")


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def predict(scores: list[float], fallback: int) -> int:
    if all(s == float("-inf") for s in scores):
        return fallback
    return int(np.argmax(scores))


def score_task(engine: SVDEngine, task, items, alpha: float, batch_rows: int) -> dict[str, np.ndarray]:
    """Per condition, a 0/1 correctness array over the items."""
    tok = engine.tokenizer
    correct = {c: [] for c in CONDITIONS}
    batch: list = []

    def flush():
        prompts, options, owners = [], [], []
        for index, item in batch:
            ids = tok(item.prompt, add_special_tokens=False).input_ids
            for option in item.options:
                prompts.append(ids)
                options.append(tok(option, add_special_tokens=False).input_ids)
                owners.append(index)
        phi, theta, targets = engine.option_logits(task, prompts, options)
        row = 0
        for _, item in batch:
            n = len(item.options)
            rows = range(row, row + n)
            scores = {
                "base": [option_logprobs(phi[r], theta[r], targets[r], use_base=True) for r in rows],
                "warmstart": [option_logprobs(phi[r], theta[r], targets[r]) for r in rows],
                "minp": [option_logprobs(phi[r], theta[r], targets[r], 0.0, alpha, "neg_inf") for r in rows],
                "svd": [option_logprobs(phi[r], theta[r], targets[r], task.mu_bar, alpha, "neg_inf") for r in rows],
            }
            warm = predict(scores["warmstart"], 0)
            for condition, values in scores.items():
                correct[condition].append(predict(values, warm) == item.answer)
            row += n
        batch.clear()

    for index, item in enumerate(items):
        batch.append((index, item))
        if sum(len(i.options) for _, i in batch) >= batch_rows:
            flush()
    if batch:
        flush()
    return {c: np.array(v, dtype=float) for c, v in correct.items()}


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
    return {"plain_tok_s": plain, "svd_tok_s": svd, "ratio": svd / plain, "raw": rates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small splits and short decodes (< 2 min)")
    parser.add_argument("--model", default=SMOLLM2_GGUF, help=f"model source (.gguf, HF dir or {TINY!r})")
    parser.add_argument("--tasks", default=",".join(GENERATORS), help="comma-separated MC tasks")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-calib", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None, help="warm-start batch (default 16; 8 quick)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "svd"))
    args = parser.parse_args(argv)
    n_train = args.n_train or (16 if args.quick else 256)
    n_calib = args.n_calib or (8 if args.quick else 64)
    n_test = args.n_test or (40 if args.quick else 500)
    decode_tokens, repeats = (16, 3) if args.quick else (32, 3)
    batch_size = args.batch_size or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    source = resolve_source(args.model)

    rows, per_task, speed = [], {}, None
    for name in args.tasks.split(","):
        split = make_task(name, n_train, n_calib, n_test, seed=args.seed)
        spec = load_config(TaskSpec, data={"calib_frac": n_calib / (n_train + n_calib),
                                           "epochs": args.epochs, "lr": args.lr, "batch_size": batch_size,
                                           "alpha": args.alpha, "seed": args.seed})
        task_id = f"bench-{name}{'-quick' if args.quick else ''}"
        examples = [item.as_example() for item in split["train"] + split["calib"]]
        write_task(out / "tasks", task_id, new_task_record(task_id, spec, args.model, len(examples)))
        record = run_warm_start(str(out / "tasks"), task_id, source, "float32", to_dict(spec), examples, args.threads)
        if record["status"] != "ready":
            raise SystemExit(f"warm-start of {name} failed: {record.get('error')}")
        engine = SVDEngine(*load_model(source), model_name="bench")
        task = engine.load_task(read_task(out / "tasks", task_id))
        t0 = time.time()
        correct = score_task(engine, task, split["test"], args.alpha, batch_rows=48)
        score_seconds = time.time() - t0
        result = {"task": name, "n_test": n_test, "mu_bar": task.mu_bar, "mu_median": record["mu_median"],
                  "n_calib_tokens": record["n_calib_tokens"], "warmstart_steps": record["steps"],
                  "train_seconds": record["train_seconds"], "score_seconds": round(score_seconds, 1)}
        for condition, values in correct.items():
            low, high = bootstrap_interval(values, args.bootstrap, args.seed)
            result[f"{condition}_acc"] = float(values.mean())
            result[f"{condition}_ci"] = [low, high]
            rows.append({"task": name, "condition": condition, "acc": float(values.mean()), "ci": [low, high]})
        for other in ("warmstart", "minp"):
            diff = correct["svd"] - correct[other]
            result[f"svd_minus_{other}"] = float(diff.mean())
            result[f"svd_minus_{other}_ci"] = list(bootstrap_interval(diff, args.bootstrap, args.seed))
        per_task[name] = result
        print(json.dumps(result), flush=True)
        if speed is None:   # decode speed once, on the first task's adapter
            prompts = [engine.tokenizer(i.prompt).input_ids for i in split["test"][:4]]
            speed = {f"batch{b}": decode_speed(engine, task, prompts[:b], decode_tokens, repeats) for b in (1, 4)}
            print(json.dumps({"decode": {k: {kk: vv for kk, vv in v.items() if kk != "raw"}
                                         for k, v in speed.items()}}), flush=True)
        del engine

    mean = lambda key: float(np.mean([r[key] for r in per_task.values()]))  # noqa: E731
    summary = {
        "svd_minus_warmstart_acc": mean("svd_minus_warmstart"),
        "svd_minus_minp_acc": mean("svd_minus_minp"),
        "decode_speed_ratio": speed["batch1"]["ratio"],
        "decode_speed_ratio_batch4": speed["batch4"]["ratio"],
        "plain_tok_s": speed["batch1"]["plain_tok_s"], "svd_tok_s": speed["batch1"]["svd_tok_s"],
        **{f"{c}_acc_mean": mean(f"{c}_acc") for c in CONDITIONS},
        "mu_bar": {name: r["mu_bar"] for name, r in per_task.items()},
        "tasks": list(per_task), "n_test": n_test, "n_train": n_train, "n_calib": n_calib,
        "model": args.model, "quick": args.quick, "seconds": round(time.time() - started, 1),
        "cpu_seconds": round(time.process_time(), 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "threads": args.threads,
    }
    with open(out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps({"summary": summary, "tasks": per_task, "decode": speed}, indent=1))
    _plot(per_task, out / "accuracy.png")
    print(json.dumps(summary), flush=True)
    return 0


def _plot(per_task: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    for k, condition in enumerate(CONDITIONS):
        xs = np.arange(len(per_task)) + (k - 1.5) * width
        acc = [r[f"{condition}_acc"] for r in per_task.values()]
        err = np.array([[a - r[f"{condition}_ci"][0], r[f"{condition}_ci"][1] - a]
                        for a, r in zip(acc, per_task.values())]).T
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=condition)
    ax.set_xticks(np.arange(len(per_task)), list(per_task))
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
