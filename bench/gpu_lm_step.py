"""The causal-LM task's client update, aggregation and evaluation through the pure pipelines/
code, the way a GPU ClientActor runs them: one prepared check for a lent accelerator (no Ray:
the device machine has torch, transformers and peft but not Ray).

A Mixtral-style OLMoE model built from a config (bf16 frozen base on the device, fp32 LoRA on
attention, the router trained in full), byte-level text from scikit-learn's descriptions when
sklearn is installed (random tokens otherwise, said so in the JSON), two virtual clients on one
shared model object (the runtime's hand-over between them), FedAvg's ``WeightedSum`` over their
LoRA + router tensors, then next-token evaluation.

    python bench/gpu_lm_step.py                      # cuda when present, the default size
    python bench/gpu_lm_step.py --device cpu --tiny  # the same code path in seconds on a laptop

Prints one JSON line last: device, dtype, parameters (frozen / trainable), trainable MB, step
time (median over the timed steps), client update seconds, aggregation seconds, evaluation
seconds and tokens/s, peak GPU memory (GiB; null on CPU), loss before / after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.fedavg.settings import FedAvgSettings  # noqa: E402
from pipelines.fedavg.strategy import FedAvg  # noqa: E402
from pipelines.models import ClientHandover, build_model, get_params, set_params  # noqa: E402
from pipelines.registry import ModelSpec  # noqa: E402
from pipelines.strategy import ClientContext, ClientData, WeightedSum  # noqa: E402
from pipelines.tasks.lm import evaluate_next_token, next_token_loss  # noqa: E402

SIZES = {
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2},
    "default": {"hidden_size": 1024, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
                "num_key_value_heads": 16, "num_experts": 16, "num_experts_per_tok": 4},
}


def corpus(seq_len: int, rows: int) -> tuple[np.ndarray, str]:
    try:
        from pipelines.data import load_text_bytes
        data = load_text_bytes(seq_len=seq_len)
        x = data.x_train
        return np.resize(x, (rows, seq_len)) if len(x) < rows else x[:rows], "sklearn descriptions (bytes)"
    except Exception:  # noqa: BLE001 (no sklearn on the device machine: say so in the output)
        return np.random.default_rng(0).integers(0, 256, (rows, seq_len)).astype(np.int64), "random tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (seconds on a CPU)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="local steps per client")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "default"]
    seq_len = 64 if args.tiny else args.seq_len
    dtype = "bfloat16"
    spec = ModelSpec("causal-lm", dtype=dtype, seed=0, data_info={"vocab_size": 256, "seq_len": seq_len},
                     args={"arch": "olmoe", "config": {**size, "max_position_embeddings": 2 * seq_len},
                           "lora": {"r": 16, "alpha": 32}, "trainable": ["mlp.gate"]})
    started = time.perf_counter()
    model = build_model(spec, args.device)
    build_s = time.perf_counter() - started
    handover = ClientHandover(model)
    global_params = get_params(model)
    tensors = dict(model.named_parameters())
    frozen = sum(p.numel() for n, p in tensors.items() if n not in global_params)
    trainable = sum(v.size for v in global_params.values())
    rows = args.batch_size * args.steps
    tokens, source = corpus(seq_len, 3 * rows)
    test = tokens[2 * rows:]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def evaluate() -> tuple[float, float]:
        t0 = time.perf_counter()
        sums = evaluate_next_token(model, test, test, args.device, batch_size=args.batch_size)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return sums["test_loss"] / sums["count"], sums["count"] / (time.perf_counter() - t0)

    loss_before, _ = evaluate()
    strategy = FedAvg(FedAvgSettings(batch_size=args.batch_size, lr=0.05, momentum=0.0))
    partial, update_s, step_times = WeightedSum(), [], []
    for client in (0, 1):                               # two virtual clients on one model object, as an actor
        handover.restore()
        set_params(model, global_params)
        data = tokens[client * rows:(client + 1) * rows]

        def timed_loss(m, x, y):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())
            return next_token_loss(m, x, y)

        t0 = time.perf_counter()
        update = strategy.client_update(ClientContext(client, 1, model, ClientData(data, data), {}, {},
                                                      np.random.default_rng(client), timed_loss, device=args.device))
        if args.device == "cuda":
            torch.cuda.synchronize()
        update_s.append(time.perf_counter() - t0)
        partial.add(update)
    t0 = time.perf_counter()
    global_params = partial.average(global_params)
    aggregate_s = time.perf_counter() - t0
    handover.restore()
    set_params(model, global_params)
    t0 = time.perf_counter()
    loss_after, tokens_per_s = evaluate()
    eval_s = time.perf_counter() - t0
    steps = np.diff(step_times)
    print(json.dumps({
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "dtype_frozen": dtype, "dtype_trainable": "float32", "size": "tiny" if args.tiny else "default",
        "config": size, "seq_len": seq_len, "batch_size": args.batch_size, "steps_per_client": args.steps,
        "frozen_params": int(frozen), "trainable_params": int(trainable),
        "trainable_mb": sum(v.nbytes for v in global_params.values()) / 1e6, "data": source,
        "build_s": build_s, "step_s_median": float(np.median(steps[1:])) if len(steps) > 1 else None,
        "client_update_s": update_s, "aggregate_s": aggregate_s, "eval_s": eval_s,
        "eval_tokens_per_s": tokens_per_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "loss_before": loss_before, "loss_after": loss_after,
    }), flush=True)


if __name__ == "__main__":
    main()
