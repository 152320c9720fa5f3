"""Benchmark: LEED vs IPPO vs BC-then-PPO on multi-vehicle routing with 4, 16 and 64 agents, and
the quality of the demonstrations per instruction backend.

Each setting trains the methods with the same env, policy layout and PPO settings through the
same code path as `edgeray rl train` (rl.cli.METHODS[method].train, i.e. rl.loop.train_run), one
after another in this process on one Ray (edgeray.connect: RAY_ADDRESS if set, else a local Ray
of 2 CPUs). LEED's training demonstrations come from the shortest-path planner (the non-LLM
fallback): the paper's GPT-3.5 is not reachable here, and SmolLM2-135M's answers are mostly
repaired by shortest paths anyway, which the demonstration-quality part measures separately:
for each backend (planner, the local SmolLM2-135M-Instruct through transformers, and an
OpenAI-compatible endpoint when `--llm-url` is given) the share of valid instructions, the
repairs and the return of the executed demonstrations.

Writes under bench/results/leed[-quick]/: runs/<method>-grid-s<seed>-<stamp>/ (run.json, config,
metrics.jsonl with per-iteration wall time and load average, demos/), demo_quality.json,
table.md, summary.json, returns_<setting>.png (return over env steps per method, IPPO's final
return dashed, the demonstrations' return dotted) and iter_seconds.png (seconds per iteration
over the agent count).
Last stdout line: JSON with steps_ratio_vs_ippo_{4,16,64}, iter_seconds_{4,16,64},
llm_valid_instruction_share, ... and "cut" naming what this run left out.

    python bench/leed.py --quick          # < 2 min on an idle 2-core machine
    python bench/leed.py                  # sized for ~40 min on 2 cores (see FULL / "cut")
    python bench/leed.py --agents 16 --seeds 3 --methods leed   # a partial grid: results/leed-16-s3/
    python bench/leed.py --agents 16 --first-seed 100 --methods leed --no-demo-quality \
        --set expert.decay=0.97 --out bench/results/leed-tune-d097   # tuning on seeds never reported

With several seeds each LEED run is also paired with IPPO's run of the same seed (its own
target): per-seed steps ratios, their mean and a bootstrap 95 % interval over seeds
(``steps_ratio_vs_ippo_<n>_per_seed`` / ``_paired_mean`` / ``_ci``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeray import runs  # noqa: E402
from edgeray.config import load_config  # noqa: E402
from edgeray.errors import UserError  # noqa: E402
from rl.leed.config import LEEDConfig  # noqa: E402

SMOLLM2 = "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

# One setting per agent count: the grid grows with the agents (every vehicle starts at its own
# intersection); 64 agents share one policy (64 separate networks would be 64 optimizers per
# minibatch on 2 cores). Env steps per iteration stay fixed, so agent steps grow with the agents.
SETTINGS = {
    4: {"env": {"grid_rows": 4, "grid_cols": 4, "num_agents": 4, "max_steps": 50},
        "policy": {"sharing": "per_agent"}},
    16: {"env": {"grid_rows": 6, "grid_cols": 6, "num_agents": 16, "max_steps": 60},
         "policy": {"sharing": "per_agent"}},
    64: {"env": {"grid_rows": 8, "grid_cols": 8, "num_agents": 64, "max_steps": 70},
         "policy": {"sharing": "shared"}},
}
COMMON = {"llm": {"backend": "planner"},
          "expert": {"lambda0": 1.0, "decay": 0.9, "refine_every": 5, "bc_pretrain_steps": 200},
          "train": {"env_steps_per_iter": 1000, "minibatch_size": 250, "num_epochs": 4, "lr": 0.001,
                    "checkpoint_every": 100}}
FULL = {"agents": (4, 16, 64), "iters": {4: 30, 16: 25, 64: 20}, "seeds": 1,
        "methods": {4: ("ippo", "leed", "bc-ppo"), 16: ("ippo", "leed", "bc-ppo"), 64: ("ippo", "leed", "bc-ppo")},
        # (agents, prompt scope, new tokens per prompt): a joint answer for 4 agents needs ~250 tokens
        "llm_cases": ((4, "joint", 256), (4, "per_agent", 96), (16, "joint", 256))}
QUICK = {"agents": (4, 16, 64), "iters": {4: 6, 16: 4, 64: 3}, "seeds": 1,
         "methods": {4: ("ippo", "leed"), 16: ("ippo", "leed"), 64: ("ippo", "leed")}, "llm_cases": ((4, "joint", 128),),
         "train": {"env_steps_per_iter": 400, "minibatch_size": 200, "num_epochs": 2}}


def _merge(*parts):
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def setting_config(n_agents: int, plan: dict, seed: int = 0, **extra) -> LEEDConfig:
    data = _merge(COMMON, SETTINGS[n_agents], {"train": {"seed": seed, "stop_iters": plan["iters"][n_agents]}},
                  {"train": plan.get("train", {})}, extra)
    return load_config(LEEDConfig, overrides=plan.get("overrides", ()), data=data)


def demo_quality(plan: dict, llm_url: str | None) -> dict:
    """Round-0 demonstrations per backend and setting: valid share, repairs, return, time."""
    from rl.leed.demonstrations import DemonstrationGenerator
    from rl.leed.llm import OpenAIChatClient, ShortestPathPlanner, TransformersClient

    cases = [("planner", ShortestPathPlanner(), n, "joint") for n in plan["agents"]]
    smollm2 = TransformersClient(SMOLLM2, max_new_tokens=96, temperature=0.0, answer_prefix='[["')
    cases += [("transformers-smollm2-135m", smollm2, n, scope, tokens) for n, scope, tokens in plan["llm_cases"]]
    if llm_url:
        cases += [("http", OpenAIChatClient(llm_url, "smollm2-135m", 300.0, tokens, 0.0), n, scope, tokens)
                  for n, scope, tokens in plan["llm_cases"]]
    rows = {}
    for name, client, n, scope, *tokens in cases:
        if tokens:
            client.max_new_tokens = tokens[0]
        cfg = setting_config(n, plan, llm={"prompt_scope": scope})
        demos = DemonstrationGenerator(cfg, client=client).generate(0)
        summary = demos.summary()
        rows[f"{name}-{scope}-{n}"] = {
            "backend": name, "agents": n, "prompt_scope": scope, "max_new_tokens": tokens[0] if tokens else None,
            **{k: summary[k] for k in ("valid_share", "parsed", "valid", "malformed", "unknown_command",
                                       "unknown_agent", "hallucinated_node", "bad_parameter", "expanded_moves",
                                       "agents_without_instructions", "agents_completed_by_shortest_path",
                                       "expert_episode_return", "expert_arrived_share", "generation_s")},
            "answer_example": demos.raw_answers[0][:300]}
        print(f"demo quality {name} {scope} x{n}: valid share {summary['valid_share']:.2f}, "
              f"demo return {summary['expert_episode_return']:.2f}, {summary['generation_s']:.1f}s", flush=True)
    return rows


def train_all(plan: dict, out: Path) -> list[Path]:
    from rl.cli import METHODS

    run_dirs = []
    for n in plan["agents"]:
        for seed in range(plan["first_seed"], plan["first_seed"] + plan["seeds"]):
            for method in plan["methods"][n]:
                cfg = setting_config(n, plan, seed)
                run_dir = runs.new_run_dir(out / "runs", f"{method}-grid{n}-s{seed}", kind="rl", method=method,
                                           argv=["bench/leed.py"])
                METHODS[method].train(cfg, run_dir, log=lambda line: print(line, flush=True))
                run_dirs.append(run_dir)
    return run_dirs


def plot_iter_seconds(summary: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_method: dict[str, list] = {}
    for entry_key, entry in summary.items():
        n = int(entry_key.rsplit("-", 1)[1])
        for method, m in entry["methods"].items():
            if m["iter_seconds"] is not None:
                by_method.setdefault(method, []).append((n, m["iter_seconds"]))
    for method, points in sorted(by_method.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xlabel("agents")
    ax.set_ylabel("seconds per iteration")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "iter_seconds.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def summarize(out: Path, plan: dict, quality: dict, quick: bool, load_start, wall_s: float) -> dict:
    from rl.leed.analysis import markdown_table, plot_returns, summarize as summarize_runs
    from rl.leed.config import LEED_METHODS
    from rl.loop import load_run

    finished = [load_run(d, LEEDConfig, LEED_METHODS)
                for d in sorted((out / "runs").iterdir()) if (d / "metrics.jsonl").is_file()]
    summary = summarize_runs(finished)
    plots = plot_returns(finished, out) + [plot_iter_seconds(summary, out)]
    (out / "table.md").write_text(markdown_table(summary))

    def method_value(n, method, key):
        entry = summary.get(f"grid-{n}", {}).get("methods", {}).get(method, {})
        return entry.get(key)

    llm_rows = [r for r in quality.values() if r["backend"] != "planner"]
    line = {}
    for n in (4, 16, 64):
        line[f"steps_ratio_vs_ippo_{n}"] = method_value(n, "leed", "steps_ratio_vs_ippo")
        line[f"bc_ppo_steps_ratio_vs_ippo_{n}"] = method_value(n, "bc-ppo", "steps_ratio_vs_ippo")
        line[f"iter_seconds_{n}"] = method_value(n, "leed", "iter_seconds")
        line[f"ippo_iter_seconds_{n}"] = method_value(n, "ippo", "iter_seconds")
        line[f"final_return_leed_{n}"] = method_value(n, "leed", "final_return")
        line[f"final_return_ippo_{n}"] = method_value(n, "ippo", "final_return")
        line[f"final_return_bc_ppo_{n}"] = method_value(n, "bc-ppo", "final_return")
        line[f"steps_to_ippo_final_leed_{n}"] = method_value(n, "leed", "steps_to_target")
        line[f"steps_to_ippo_final_ippo_{n}"] = method_value(n, "ippo", "steps_to_target")
        line[f"steps_ratio_vs_ippo_{n}_per_seed"] = method_value(n, "leed", "steps_ratio_vs_ippo_per_seed")
        line[f"steps_ratio_vs_ippo_{n}_paired_mean"] = method_value(n, "leed", "steps_ratio_vs_ippo_paired_mean")
        line[f"steps_ratio_vs_ippo_{n}_ci"] = method_value(n, "leed", "steps_ratio_vs_ippo_ci")
        line[f"steps_ratio_vs_ippo_{n}_90pct_per_seed"] = method_value(n, "leed", "steps_ratio_vs_ippo_90pct_per_seed")
        line[f"steps_ratio_vs_ippo_{n}_90pct_paired_mean"] = method_value(n, "leed",
                                                                         "steps_ratio_vs_ippo_90pct_paired_mean")
        line[f"steps_ratio_vs_ippo_{n}_90pct_ci"] = method_value(n, "leed", "steps_ratio_vs_ippo_90pct_ci")
        line[f"final_return_leed_minus_ippo_{n}_ci"] = method_value(n, "leed", "final_return_minus_ippo_ci")
    llm_items = sum(r["parsed"] + r["malformed"] for r in llm_rows)
    line["llm_valid_instruction_share"] = sum(r["valid"] for r in llm_rows) / llm_items if llm_items else (
        0.0 if llm_rows else None)
    line["llm_backend"] = "transformers: SmolLM2-135M-Instruct, greedy, answer prefix '[[\"'" if llm_rows else None
    line["demo_quality"] = {k: {f: v for f, v in r.items() if f != "answer_example"} for k, r in quality.items()}
    line["leed_training_demo_backend"] = "planner (shortest paths, not an LLM)"
    small, large = min(plan["agents"]), max(plan["agents"])
    if small < large and line[f"iter_seconds_{small}"] and line.get(f"iter_seconds_{large}"):
        growth = line[f"iter_seconds_{large}"] / line[f"iter_seconds_{small}"]
        line["iter_time_growth"] = growth
        line["iter_time_at_most_linear"] = growth <= large / small
    for n in (4, 16, 64):
        ratio = line[f"steps_ratio_vs_ippo_{n}"]
        line[f"target_steps_ratio_met_{n}"] = None if ratio is None else ratio <= 0.5
    line["cut"] = plan_cuts(plan, quick)
    line["quick"] = quick
    line["agents"] = list(plan["agents"])
    line["iterations"] = {str(k): v for k, v in plan["iters"].items()}
    line["seeds"] = list(range(plan["first_seed"], plan["first_seed"] + plan["seeds"]))
    line["overrides"] = list(plan.get("overrides", ()))
    line["env_steps_per_iter"] = setting_config(small, plan).train.env_steps_per_iter
    line["policy_sharing"] = {str(n): SETTINGS[n]["policy"]["sharing"] for n in plan["agents"]}
    line["load_avg_1m_start_end"] = [load_start, os.getloadavg()[0]]
    line["wall_s"] = wall_s
    line["plots"] = plots
    (out / "summary.json").write_text(json.dumps({"line": line, "settings": summary}, indent=2))
    return line


def plan_cuts(plan: dict, quick: bool) -> list[str]:
    cuts = (["1 seed per setting (no spread across seeds)"] if plan["seeds"] == 1 else []) + [
            "LEED trains on planner demonstrations, not on an LLM's "
            "(GPT-3.5 unreachable; SmolLM2 measured for demonstration quality only)",
            "the SUMO backend is not benchmarked (the light graph simulator is)"]
    if 64 not in plan["agents"]:
        cuts.append("no 64-agent setting (its keys are null)")
    for method in ("ippo", "leed", "bc-ppo"):
        without = [n for n in plan["agents"] if method not in plan["methods"][n]]
        if without:
            cuts.append(f"no {method} runs at {without} agents (its keys there are null)")
    missing_llm = [n for n in plan["agents"] if n not in {case[0] for case in plan["llm_cases"]}]
    if missing_llm:
        cuts.append(f"no SmolLM2 demonstrations at {missing_llm} agents "
                    f"(prompts of the larger grids take minutes on 2 cores)")
    caps = ", ".join(f"{t} tokens ({s}, {n} agents)" for n, s, t in plan["llm_cases"])
    cuts.append(f"SmolLM2 answers are capped at {caps}; what is cut off is completed by shortest paths and counted")
    if not plan.get("demo_quality", True):
        cuts.append("no demonstration-quality part (--no-demo-quality): its keys are null")
    if quick:
        cuts.append(f"quick: {plan['train']['env_steps_per_iter']} env steps per iteration, iterations {plan['iters']}")
    return cuts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 min) with the same JSON keys")
    parser.add_argument("--llm-url", help="also measure an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--out", help="output folder (default bench/results/leed[-quick])")
    parser.add_argument("--agents", type=int, nargs="+", choices=sorted(SETTINGS), help="agent counts (default: all)")
    parser.add_argument("--seeds", type=int, help="seeds first..first+N-1 per setting (default 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="first seed (tune on seeds that are never reported, e.g. 100)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of every run (e.g. expert.decay=0.97); repeatable")
    parser.add_argument("--no-demo-quality", action="store_true",
                        help="skip the per-backend demonstration-quality part (its keys are null)")
    parser.add_argument("--methods", nargs="+", choices=("ippo", "leed", "bc-ppo"),
                        help="methods (default: the plan's; ippo is always run, it sets the target)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    if args.agents:
        plan["agents"] = tuple(args.agents)
        plan["llm_cases"] = tuple(c for c in plan["llm_cases"] if c[0] in args.agents)
    if args.seeds:
        plan["seeds"] = args.seeds
    plan["first_seed"] = args.first_seed
    plan["overrides"] = args.set
    try:                                  # a bad --set is one line before anything runs
        setting_config(min(plan["agents"]), plan)
    except UserError as exc:
        raise SystemExit(f"bench/leed.py: {exc}") from None
    plan["demo_quality"] = not args.no_demo_quality
    if args.methods:
        plan["methods"] = {n: tuple(dict.fromkeys(["ippo", *args.methods])) for n in plan["agents"]}
    name = "leed-quick" if args.quick else "leed"
    # a partial grid (or a tuning run) never overwrites the full run's folder
    if args.agents or args.seeds or args.methods or args.first_seed or args.set:
        name += "-" + "-".join(map(str, plan["agents"])) + f"-s{plan['seeds']}"
        name += f"-from{args.first_seed}" if args.first_seed else ""
        name += "-set" if args.set else ""
    out = Path(args.out or Path(__file__).resolve().parent / "results" / name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(2)
    quality = {} if args.no_demo_quality else demo_quality(plan, args.llm_url)
    (out / "demo_quality.json").write_text(json.dumps(quality, indent=2))

    from edgeray.connect import connect
    connection = connect(None, num_cpus=2, log_to_driver=False)
    try:
        train_all(plan, out)
    finally:
        if connection is not None:
            import ray
            ray.shutdown()
    line = summarize(out, plan, quality, args.quick, load_start, time.perf_counter() - t0)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
