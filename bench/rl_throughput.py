"""Benchmark: RLlib DQN + PER throughput vs a lean single-file torch DQN + PER, same env, same updates.

What DEER's benchmark (bench/deer.py) pays for is RLlib's off-policy loop: env stepping through
the env runner and its connectors, episode bookkeeping, replay sampling and the learner's update.
RLlib's stock PrioritizedEpisodeReplayBuffer samples in a Python loop that builds one-step
episodes per item, which its learner connector pipeline turns back into a batch;
`train.replay_impl=fast` (rl.deer.fast_replay, the default) replaces exactly that with a
vectorized subclass of the buffer and a DQN training_step that hands the learner a batch.
This measures both against `LeanDQN` below, a reference loop (a bench helper, not a product path):
one gymnasium env, a numpy sum-tree PER (alpha 0.6, beta 0.4), double DQN with a [64, 64] MLP
(RLlib's default DQN module is dueling; the lean one is not), Adam, the same batch size and the
same number of updates per env step (RLlib's training_intensity = batch / env steps per update).

Everything runs on ns-cartpole (rl.envs.nonstationary, no shift) in this process, one after the
other, torch single-threaded, with configs/deer_cartpole.yaml's network and detector settings.
Rows: lean (first and last, the load drifts), RLlib PER fast with 1 and with `--num-envs`
vectorized env copies (32 env steps per sampling round), the same with 32 steps per copy per round
(fewer weight syncs and env-runner calls), 2 x `--num-envs` copies with 16 steps each, RLlib PER
stock and DEER (fast path, reward detector on) with `--num-envs` copies and 32 steps per round.
The fast path hands each update to the learner through `rl.deer.fast_replay.lean_learner_update`
(the same gradient step and target updates as `Learner.update`, without its per-update
bookkeeping); two rows with `lean_update` off (`Learner.update()` per update, as before) measure
that change side by side in the same run (`lean_update_speedup`).
`--quick` drops the 1-env row and measures fewer steps.
Last stdout line: JSON with rllib_vs_lean_steps_ratio (best fast PER row), rllib_steps_per_s,
lean_steps_per_s, rllib_updates_per_s, lean_updates_per_s, the stock and DEER rows' ratios,
per-config rows and the load average.

    python bench/rl_throughput.py --quick     # ~2 min
    python bench/rl_throughput.py             # ~4 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SumTree:
    """Array sum tree over `capacity` leaves with vectorized prefix-sum retrieval."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity:
            self.size *= 2
        self.tree = np.zeros(2 * self.size)

    def update(self, idx: np.ndarray, values: np.ndarray) -> None:
        pos = idx + self.size
        self.tree[pos] = values
        pos = np.unique(pos // 2)
        while pos[0] >= 1:
            self.tree[pos] = self.tree[2 * pos] + self.tree[2 * pos + 1]
            if pos[0] == 1:
                break
            pos = np.unique(pos // 2)

    def find(self, mass: np.ndarray) -> np.ndarray:
        pos = np.ones(len(mass), dtype=np.int64)
        while pos[0] < self.size:
            left = self.tree[2 * pos]
            go_right = mass > left
            mass = np.where(go_right, mass - left, mass)
            pos = 2 * pos + go_right
        return pos - self.size


class LeanDQN:
    def __init__(self, env, *, hidden=(64, 64), lr=1e-3, gamma=0.99, batch=64, capacity=50_000, alpha=0.6,
                 beta=0.4, target_every=500, learning_starts=500, seed=0):
        torch.manual_seed(seed)
        self.env, self.gamma, self.batch, self.alpha, self.beta = env, gamma, batch, alpha, beta
        self.target_every, self.learning_starts = target_every, learning_starts
        n_obs, n_act = env.observation_space.shape[0], env.action_space.n
        layers, width = [], n_obs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.q = nn.Sequential(*layers, nn.Linear(width, n_act))
        self.target = copy.deepcopy(self.q)
        self.opt = torch.optim.Adam(self.q.parameters(), lr=lr)
        self.cap = capacity
        self.obs = np.zeros((capacity, n_obs), np.float32)
        self.next_obs = np.zeros((capacity, n_obs), np.float32)
        self.act = np.zeros(capacity, np.int64)
        self.rew = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.tree, self.max_p, self.n, self.ptr = SumTree(capacity), 1.0, 0, 0
        self.rng = np.random.default_rng(seed)
        self.updates = 0

    def add(self, o, a, r, o2, d):
        i = self.ptr
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i], self.done[i] = o, a, r, o2, d
        self.tree.update(np.array([i]), np.array([self.max_p ** self.alpha]))
        self.ptr, self.n = (i + 1) % self.cap, min(self.n + 1, self.cap)

    def update(self):
        total = self.tree.tree[1]
        seg = total / self.batch
        idx = self.tree.find((np.arange(self.batch) + self.rng.random(self.batch)) * seg)
        idx = np.minimum(idx, self.n - 1)
        p = self.tree.tree[idx + self.tree.size] / total
        w = (self.n * p) ** -self.beta
        w = torch.as_tensor(w / w.max(), dtype=torch.float32)
        o, a, r = torch.as_tensor(self.obs[idx]), torch.as_tensor(self.act[idx]), torch.as_tensor(self.rew[idx])
        o2, d = torch.as_tensor(self.next_obs[idx]), torch.as_tensor(self.done[idx])
        with torch.no_grad():
            a2 = self.q(o2).argmax(-1, keepdim=True)
            y = r + self.gamma * (1 - d) * self.target(o2).gather(-1, a2).squeeze(-1)
        q = self.q(o).gather(-1, a.view(-1, 1)).squeeze(-1)
        td = y - q
        loss = (w * nn.functional.huber_loss(q, y, reduction="none")).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        prio = td.abs().detach().numpy() + 1e-6
        self.max_p = max(self.max_p, float(prio.max()))
        self.tree.update(idx, prio ** self.alpha)
        self.updates += 1

    def run(self, steps: int, steps_per_update: float, epsilon: float = 0.1, seed: int = 0) -> dict:
        env = self.env
        o, _ = env.reset(seed=seed)
        owed = 0.0
        t0 = time.perf_counter()
        for t in range(steps):
            if self.rng.random() < epsilon:
                a = int(env.action_space.sample())
            else:
                with torch.no_grad():
                    a = int(self.q(torch.as_tensor(o[None], dtype=torch.float32)).argmax())
            o2, r, term, trunc, _ = env.step(a)
            self.add(o, a, r, o2, float(term))
            o = o2
            if term or trunc:
                o, _ = env.reset()
            if self.n >= self.learning_starts:
                owed += 1.0 / steps_per_update
                while owed >= 1.0:
                    self.update()
                    owed -= 1.0
                    if self.updates % self.target_every == 0:
                        self.target.load_state_dict(self.q.state_dict())
        return {"seconds": time.perf_counter() - t0, "steps": steps, "updates": self.updates}


def measure_lean(steps: int, batch: int, intensity: float, seed: int) -> dict:
    from rl.envs.nonstationary import make_ns_env

    env = make_ns_env("ns-cartpole", {"shift_every": 10**9, "magnitudes": [0.0], "max_episode_steps": 200})
    agent = LeanDQN(env, batch=batch, seed=seed)
    agent.run(600, batch / intensity)  # warm-up: fills learning_starts and starts updating
    u0 = agent.updates
    out = agent.run(steps, batch / intensity)
    return {"impl": "lean", "num_envs": 1, "steps_per_s": steps / out["seconds"],
            "updates_per_s": (agent.updates - u0) / out["seconds"], "seconds": out["seconds"]}


def measure_rllib(steps: int, batch: int, intensity: float, num_envs: int, fragment: int, seed: int,
                  impl: str = "fast", method: str = "per", lean_update: bool = True) -> dict:
    from edgeray.config import load_config
    from rl.deer.algorithms import build_algo_config
    from rl.deer.config import ExperimentConfig

    per_iter = max(fragment * num_envs, steps // 4)
    # the DEER benchmark's config (its detector settings, network, lr), with this bench's schedule
    cfg = load_config(ExperimentConfig, Path(__file__).resolve().parents[1] / "configs" / "deer_cartpole.yaml", [
        "env.name=ns-cartpole", "env.shift_every=1000000000", "env.magnitudes=[0.0]", f"train.seed={seed}",
        f"train.env_steps_per_iter={per_iter}", f"train.rollout_fragment_length={fragment}",
        f"train.num_envs={num_envs}", f"train.training_intensity={intensity}", f"train.train_batch_size={batch}",
        "train.learning_starts=500", f"train.replay_impl={impl}", "eval.every_iters=0"])
    config = build_algo_config(method, cfg)
    if not lean_update:  # the fast path as before: Learner.update() per update, env-runner module toggled per step
        config.replay_buffer_config = {**config.replay_buffer_config, "lean_update": False}
    algo = config.build_algo()
    try:
        algo.train()  # warm-up: build, fill learning_starts, first updates
        r0 = algo.train()
        t0 = time.perf_counter()
        last = r0
        while last["num_env_steps_sampled_lifetime"] - r0["num_env_steps_sampled_lifetime"] < steps:
            last = algo.train()
        seconds = time.perf_counter() - t0
        done = last["num_env_steps_sampled_lifetime"] - r0["num_env_steps_sampled_lifetime"]
        trained = (last["learners"]["default_policy"]["num_module_steps_trained_lifetime"]
                   - r0["learners"]["default_policy"]["num_module_steps_trained_lifetime"])
        return {"impl": f"rllib-{impl}" + ("" if lean_update else "-learner-update"), "method": method, "algo_class": type(algo).__name__,
                "buffer_class": type(algo.local_replay_buffer).__name__,
                "num_envs": num_envs, "fragment": fragment, "steps_per_s": done / seconds,
                "updates_per_s": trained / batch / seconds, "seconds": seconds,
                "timers": {k: v for k, v in last.get("timers", {}).items() if k.endswith("timer") or k == "training_step"}}
    finally:
        algo.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, help="measured env steps per config (default 4000, quick 2000)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--intensity", type=float, default=16.0,
                        help="RLlib training_intensity (replayed / sampled); 16 with batch 64 = 1 update per 4 env steps")
    parser.add_argument("--num-envs", type=int, default=4, help="vectorized env copies for the second RLlib config")
    args = parser.parse_args()
    if args.batch < 1 or args.intensity <= 0 or args.num_envs < 1:
        parser.error("--batch and --num-envs must be >= 1 and --intensity > 0")
    steps = args.steps or (2000 if args.quick else 4000)
    torch.set_num_threads(1)
    load_start = list(os.getloadavg())
    rows = [measure_lean(steps, args.batch, args.intensity, 0)]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    vec = (args.num_envs, max(1, 32 // args.num_envs))
    # fragment 32 per copy: 4x fewer weight syncs and env-runner calls per env step (the policy lags by up to
    # 32 x num_envs env steps instead of 32); the other rows keep 32 env steps per sampling round in all
    # (impl, method, env copies, fragment per copy, lean learner update); the lean_update=False rows are the fast
    # path as it was before the lean learner update (Learner.update() per update), side by side in the same run
    plan = [("fast", "per", 1, 32, True), ("fast", "per", *vec, True), ("fast", "per", args.num_envs, 32, True),
            ("fast", "per", 2 * args.num_envs, 16, True), ("fast", "per", args.num_envs, 32, False),
            ("fast", "per", *vec, False), ("stock", "per", *vec, True), ("fast", "deer", *vec, True)]
    if args.quick:
        plan = plan[1:]
    try:
        for impl, method, num_envs, fragment, lean_update in plan:
            rows.append(measure_rllib(steps, args.batch, args.intensity, num_envs, fragment, 0, impl=impl, method=method,
                                      lean_update=lean_update))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    rows.append(measure_lean(steps, args.batch, args.intensity, 1))  # again, after: load drifts
    lean = [r for r in rows if r["impl"] == "lean"]
    lean_steps = float(np.mean([r["steps_per_s"] for r in lean]))
    lean_updates = float(np.mean([r["updates_per_s"] for r in lean]))

    def best_of(impl, method):
        return max((r for r in rows if r["impl"] == f"rllib-{impl}" and r.get("method") == method),
                   key=lambda r: r["steps_per_s"])

    best, stock, deer = best_of("fast", "per"), best_of("stock", "per"), best_of("fast", "deer")
    out = {"rllib_vs_lean_steps_ratio": best["steps_per_s"] / lean_steps,
           "rllib_vs_lean_updates_ratio": best["updates_per_s"] / lean_updates,
           "rllib_steps_per_s": best["steps_per_s"], "rllib_updates_per_s": best["updates_per_s"],
           "rllib_best_num_envs": best["num_envs"], "lean_steps_per_s": lean_steps, "lean_updates_per_s": lean_updates,
           "rllib_stock_vs_lean_steps_ratio": stock["steps_per_s"] / lean_steps,
           "rllib_stock_steps_per_s": stock["steps_per_s"],
           "rllib_best_fragment": best["fragment"],
           # fast vs stock with the same env copies and fragment
           "fast_vs_stock_speedup": next(r["steps_per_s"] for r in rows if r["impl"] == "rllib-fast"
                                         and r.get("method") == "per" and r["num_envs"] == stock["num_envs"]
                                         and r["fragment"] == stock["fragment"]) / stock["steps_per_s"],
           "deer_vs_lean_steps_ratio": deer["steps_per_s"] / lean_steps, "deer_steps_per_s": deer["steps_per_s"],
           # DEER against fast PER with the same env copies and fragment
           "deer_vs_per_time_ratio": next(r["steps_per_s"] for r in rows if r["impl"] == "rllib-fast"
                                          and r.get("method") == "per" and r["num_envs"] == deer["num_envs"]
                                          and r["fragment"] == deer["fragment"]) / deer["steps_per_s"],
           # the lean learner update against Learner.update() per update, same env copies and fragment
           "lean_update_speedup": {f"{r['num_envs']}x{r['fragment']}": next(
               q["steps_per_s"] for q in rows if q["impl"] == "rllib-fast" and q.get("method") == "per"
               and q["num_envs"] == r["num_envs"] and q["fragment"] == r["fragment"]) / r["steps_per_s"]
               for r in rows if r["impl"] == "rllib-fast-learner-update"},
           "updates_per_env_step": args.intensity / args.batch, "batch": args.batch, "env": "ns-cartpole",
           "measured_steps": steps, "rows": rows, "load_avg_start": load_start, "load_avg_end": list(os.getloadavg())}
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / ("rl_throughput-quick.json" if args.quick else "rl_throughput.json")).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
