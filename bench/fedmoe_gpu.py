"""The prepared GPU check of the MoE strategies (no Ray): the client updates and the aggregation of
FedAvg-MoE, HFedMoE and FedAlign-MoE through the pure ``pipelines/fedmoe`` code, on a larger OLMoE
config with a bf16 base on CUDA, a few simulated clients in sequence on the synthetic topic task.

    python bench/fedmoe_gpu.py            # on a GPU machine (<= 8 minutes)
    python bench/fedmoe_gpu.py --tiny     # the same path on CPU, seconds (a check of the script)

Prints one JSON line last: per strategy the median local step time, tokens/s, aggregation time,
peak GPU memory and test accuracy after the rounds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipelines.fedmoe.data import load_topics
from pipelines.models import ClientHandover, build_model, get_params, set_params
from pipelines.population import PopulationView, sample_profiles
from pipelines.registry import ModelSpec, StrategySpec
from pipelines.strategy import ClientContext, ClientData
from pipelines.tasks.vision import classification_loss, evaluate_classification

LARGE = {"hidden_size": 1024, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 16,
         "num_key_value_heads": 16, "num_experts": 32, "num_experts_per_tok": 4, "max_position_embeddings": 256}
TINY = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    seq = 32 if args.tiny else 128
    data = load_topics(num_topics=8, seq_len=seq, train_size=400 if args.tiny else 4000, test_size=200)
    spec = ModelSpec("moe", {"arch": "olmoe", "router_std": 1.0, "config": TINY if args.tiny else LARGE,
                             "lora": {"r": 8, "alpha": 16}},
                     dtype="float32" if device == "cpu" else "bfloat16", data_info=data.info)
    model = build_model(spec, device)
    handover = ClientHandover(model)
    initial = get_params(model)
    parts = np.array_split(np.random.default_rng(0).permutation(len(data.y_train)), args.clients)
    population = PopulationView(tuple(sample_profiles(args.clients, 0)), tuple(len(p) for p in parts))
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "config": spec.args["config"],
           "trainable_params": int(sum(v.size for v in initial.values()))}
    for name in ("fedavg-moe", "hfedmoe", "fedalign-moe"):
        strategy = StrategySpec(name, {"lr": 3e-3, "batch_size": 16, "local_epochs": 1}).build()
        global_params, state = initial, strategy.init_state(initial)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps, tokens, agg, train_s = [], 0, [], 0.0
        for rnd in range(1, args.rounds + 1):
            instructions = strategy.configure_round(rnd, state, list(range(args.clients)), population)
            partial = strategy.init_partial()
            for cid, idx in enumerate(parts):
                handover.restore()
                set_params(model, global_params)
                ctx = ClientContext(cid, rnd, model, ClientData(data.x_train[idx], data.y_train[idx]), instructions[cid],
                                    {}, np.random.default_rng([rnd, cid]), classification_loss, device=device)
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                update = strategy.client_update(ctx)
                if device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t
                train_s += elapsed
                steps.append(elapsed / -(-len(idx) // 16))
                tokens += len(idx) * seq
                partial = strategy.accumulate(partial, update)
            t = time.perf_counter()
            global_params, state, metrics = strategy.aggregate(rnd, global_params, state, strategy.merge([partial]))
            agg.append(time.perf_counter() - t)
        handover.restore()
        set_params(model, global_params)
        acc = evaluate_classification(model, data.x_test, data.y_test, device)
        out[name] = {"step_s_median": float(np.median(steps)), "tokens_per_s": tokens / train_s,
                     "aggregate_s_median": float(np.median(agg)), "test_accuracy": acc["test_accuracy"] / acc["count"],
                     "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                     "budget_violations": metrics.get("budget_violations")}
        print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
