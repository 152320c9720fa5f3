"""edgeray vs Flower 1.42's simulation engine on the same FedAvg task, in one run.

The task of notes/flower_anchor.md: MNIST (data/mnist.pkl.gz), the CNN of pipelines.models, IID
partition, 10 clients per round, 1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, seed 0; with
10 and with 100 clients. Both systems train the same clients each round (drawn by edgeray's own
selection code: ``Strategy.select_clients`` seeded by (seed, round, 3) over
``VirtualClock.available(round)``, passed to Flower as a schedule), with the same initial weights,
the same local training code and per-(round, client) seeds, on 2 single-CPU actors each:

- Flower: ``run_simulation`` with ``client_resources={"num_cpus": 1, "num_gpus": 0}`` (2 actors,
  the anchor's best setting), in a subprocess of bench/.flwr-venv (Flower pins another Ray);
  the ServerApp/ClientApp are in bench/flower_app.py.
- edgeray, 100 clients: ``edgeray run fedavg`` in a subprocess, as a user runs it (2 single-CPU
  ClientActors); 10 clients: the same runtime (actors.driver.FLRun, its AggregatorActor's run_round
  / evaluate) on a local Ray in this process, because --quick trains that setting on a subset of
  the data, which the CLI cannot express.

Order (one Ray at a time, interleaved so a change in the machine's load hits both alike): Flower
100, edgeray 100, Flower 10, edgeray 10.
Round time = median over rounds 2..R of one round's wall time, measured by each system's
server-side orchestrator, evaluation excluded: Flower from configure_train's start to
aggregate_train's end; edgeray the AggregatorActor's round_wall_s (selection to aggregated
weights; the driver's view of the in-process rounds is kept beside it in the raw rows).
Start-up (100 clients) = from launching the command to the start of round 1: Flower from starting
the Python process that calls ``run_simulation`` (imports, Ray start, nodes, one QUERY per node to
map partition ids, which also starts the actors and loads the data in them, initial central
evaluation); edgeray from launching ``edgeray run fedavg ...`` to its round-0 metrics row (imports,
data, Ray start, actors, initial evaluation; written right before round 1).

    python bench/vs_flower.py [--quick]

--quick (same keys, < 2 min on an idle machine): 2 rounds per setting, evaluation after the last
one only, and the 10-client setting on the first 5,000 training rows (500 per client, as the
100-client setting); the JSON says so (``reduced``).
Creates bench/.flwr-venv when missing (CPU torch first, then flwr[simulation]==1.42.0; 2-3 min).
Writes bench/results/vs_flower{,_quick}.json and .png, the Flower and `edgeray run` logs beside
them, and prints one JSON line last: ratio_10, ratio_100 (edgeray / Flower round time),
startup_ratio, the final accuracies of both, the raw times, rounds, load averages.

Start-up is measured three ways for edgeray: cold (``startup_ratio``: the command starts its own
Ray, as Flower's simulation does), on a running head (``startup_ratio_head``: the first run after
`edgeray main` / `ray start`; it starts the warm actor pool) and with the warm pool
(``startup_ratio_warm``: every later run of the same code on that head, see actors/warm.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fl_round import config, median_after_first  # bench/fl_round.py: the same task's config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA_PATH = ROOT / "data" / "mnist.pkl.gz"
FLOWER_VENV = ROOT / "bench" / ".flwr-venv"
FLOWER_PYTHON = FLOWER_VENV / "bin" / "python"
FLOWER_PACKAGES = (["torch==2.13.0"],  # first, and exactly this spec: any other pulls a CUDA build
                   ["flwr[simulation]==1.42.0"])


def ensure_flower_venv() -> dict:
    """Create bench/.flwr-venv when missing; returns the seconds each step took ({} if present)."""
    check = [str(FLOWER_PYTHON), "-c", "import flwr, ray, torch; assert torch.version.cuda is None"]
    if FLOWER_PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return {}
    timings = {}
    steps = [("venv_s", ["python3", "-m", "venv", str(FLOWER_VENV)])]
    steps += [(f"pip_{spec[0].split('=')[0].split('[')[0]}_s", [str(FLOWER_PYTHON), "-m", "pip", "install", *spec])
              for spec in FLOWER_PACKAGES]
    for key, cmd in steps:
        print(f"vs_flower: {' '.join(cmd)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        timings[key] = time.perf_counter() - started
    subprocess.run(check, check=True)
    return timings


@dataclasses.dataclass
class Setting:
    num_clients: int
    rounds: int
    train_rows: int  # first N training rows only (0: all 50,000)

    @property
    def name(self) -> str:
        return str(self.num_clients)


def prepare_setting(setting: Setting):
    """(config, prepared data, client schedule) with edgeray's own data, partition and selection code."""
    from actors.clock import VirtualClock
    from actors.driver import prepare
    from pipelines.data import partition

    cfg = config(setting.num_clients, setting.rounds)
    prepared = prepare(cfg)
    if setting.train_rows:
        data = dataclasses.replace(prepared.data, x_train=prepared.data.x_train[:setting.train_rows],
                                   y_train=prepared.data.y_train[:setting.train_rows])
        prepared = dataclasses.replace(prepared, data=data, parts=partition(
            data.y_train, cfg.data.num_clients, cfg.data.partition, seed=cfg.seed))
    # What AggregatorActor.run_round draws (no deadline, dropouts or over-selection in this task,
    # so every invited client is kept).
    strategy = cfg.strategy.spec().build()
    clock = VirtualClock(prepared.profiles, cfg.seed)
    schedule = [strategy.select_clients(rnd, {}, clock.available(rnd),
                                        clock.invite_count(cfg.strategy.clients_per_round),
                                        np.random.default_rng([cfg.seed, rnd, 3]))
                for rnd in range(1, setting.rounds + 1)]
    return cfg, prepared, schedule


def on_flower(cfg, setting: Setting, schedule: list[list[int]], evaluate_rounds: str, log_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'bench'}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env.pop("RAY_ADDRESS", None)
    s = cfg.strategy
    cmd = [str(FLOWER_PYTHON), "-c", "import sys, flower_app; sys.exit(flower_app.main(sys.argv[1:]))",
           "--num-clients", str(setting.num_clients), "--schedule", json.dumps(schedule),
           "--data-path", str(DATA_PATH), "--train-rows", str(setting.train_rows), "--seed", str(cfg.seed),
           "--local-epochs", str(s.local_epochs), "--batch-size", str(s.batch_size), "--lr", str(s.lr),
           "--momentum", str(s.params["momentum"]), "--evaluate-rounds", evaluate_rounds, "--num-cpus", "1"]
    launched = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    exited = time.time()
    log_path.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"Flower run failed (exit {proc.returncode}); see {log_path}:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["startup_s"] = out["round1_start_epoch"] - launched
    out["process_s"] = exited - launched
    return out


def on_edgeray_cli(setting: Setting, evaluate_rounds: str, log_path: Path, address: str | None = None) -> dict:
    """`edgeray run fedavg` as a user runs it. Start-up: launch to the round-0 metrics row, which
    run_fl writes after Ray start, the actors and the initial evaluation, right before round 1.
    Its metrics rows give each round's wall time as the AggregatorActor measures it (selection to
    aggregated weights, as Flower's configure_train to aggregate_train) and the accuracy."""
    script = Path(sys.executable).with_name("edgeray")  # the console script, as a user types it
    edgeray = [str(script)] if script.exists() else [sys.executable, "-m", "edgeray.cli"]
    eval_every = 1 if evaluate_rounds == "all" else setting.rounds
    with tempfile.TemporaryDirectory(prefix="vs_flower-") as out_dir:
        cmd = [*edgeray, "run", "fedavg", "--config", str(ROOT / "configs" / "fedavg_mnist.yaml"), "--no-progress",
               "--set", f"rounds={setting.rounds}", "--set", f"data.num_clients={setting.num_clients}",
               "--set", f"data.path={DATA_PATH}", "--set", f"output_dir={out_dir}",
               "--set", f"eval_every={eval_every}", *(["--address", address] if address else [])]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        launched = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            row0_written = None
            while row0_written is None and proc.poll() is None:
                for path in glob.glob(os.path.join(out_dir, "*", "metrics.jsonl")):
                    if os.path.getsize(path) > 0:
                        row0_written = os.stat(path).st_mtime
                time.sleep(0.02)
            proc.wait(timeout=3600)
        exited = time.time()
        if proc.returncode != 0 or row0_written is None:
            raise RuntimeError(f"edgeray run failed (exit {proc.returncode}); see {log_path}")
        run_dir = Path(glob.glob(os.path.join(out_dir, "*", "summary.json"))[0]).parent
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [r for r in rows if r["round"] >= 1], "initial_evaluation": rows[0],
            "startup_s": row0_written - launched, "startup_s_in_run_fl": summary["startup_s"],
            "process_s": exited - launched}


def on_running_head(setting: Setting, evaluate_rounds: str, suffix: str) -> dict:
    """`edgeray run --address` on a Ray head that is already up (as `edgeray main` leaves it): the
    first run starts the warm actor pool, the second finds it (actors.warm). The head is up only
    for these two runs (its own ports and temp dir), then stopped."""
    from edgeray.localhead import LocalHead

    head = LocalHead(gcs_port=6391, dashboard_port=8266, metrics_port=8091, client_port=20202,
                     agent_port=52402).start()
    try:
        address = f"127.0.0.1:{head.gcs_port}"
        return {name: on_edgeray_cli(setting, evaluate_rounds,
                                     RESULTS / f"vs_flower{suffix}_edgeray_{name}.log", address)
                for name in ("first", "warm")}
    finally:
        head.stop()


def on_edgeray(cfg, prepared, rounds: int, evaluate_rounds: str) -> tuple[list[dict], dict]:
    """The runtime on a local Ray of this process (up only while it runs, so that it never runs
    beside Flower's), for a setting the CLI cannot express (a subset of the data). Round time as
    the AggregatorActor measures it (as on_edgeray_cli), the driver's view beside it. Also returns
    how long Ray's start and the actors' start took (parts of edgeray's start-up)."""
    import ray

    from actors.driver import FLRun

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    setup = {"ray_init_s": time.perf_counter() - started}
    started = time.perf_counter()
    fl = FLRun(cfg, cfg.strategy.spec(), prepared)
    setup["actors_start_s"] = time.perf_counter() - started
    rows = []
    try:
        for rnd in range(1, rounds + 1):
            started = time.perf_counter()
            row = ray.get(fl.aggregator.run_round.remote(rnd))
            row["round_wall_s_driver"] = time.perf_counter() - started
            if evaluate_rounds == "all" or rnd == rounds:
                started = time.perf_counter()
                row.update(ray.get(fl.aggregator.evaluate.remote()))
                row["eval_s"] = time.perf_counter() - started
            rows.append(row)
    finally:
        fl.shutdown()
        ray.shutdown()
    return rows, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 min on an idle machine), same keys")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    install = ensure_flower_venv()

    if args.quick:
        settings = [Setting(100, 2, 0), Setting(10, 2, 5_000)]
        evaluate_rounds = "first-last"
    else:
        settings = [Setting(100, 3, 0), Setting(10, 3, 0)]
        evaluate_rounds = "all"
    loads = {"before": os.getloadavg()}
    prepared = {s.name: prepare_setting(s) for s in settings}

    # Interleaved, so that a change in the machine's load hits both systems alike; one Ray at a time.
    flower, edgeray, edgeray_setup, startup = {}, {}, {}, None
    for s in settings:
        cfg, prep, schedule = prepared[s.name]
        flower[s.name] = on_flower(cfg, s, schedule, evaluate_rounds,
                                   RESULTS / f"vs_flower{suffix}_flower_{s.name}.log")
        loads[f"after_flower_{s.name}"] = os.getloadavg()
        if s.num_clients == 100 and not s.train_rows:
            startup = on_edgeray_cli(s, evaluate_rounds, RESULTS / f"vs_flower{suffix}_edgeray_run.log")
            edgeray[s.name] = startup.pop("rows")
            on_head = on_running_head(s, evaluate_rounds, suffix)
        else:
            edgeray[s.name], edgeray_setup[s.name] = on_edgeray(cfg, prep, s.rounds, evaluate_rounds)
        loads[f"after_edgeray_{s.name}"] = os.getloadavg()
    loads["after"] = os.getloadavg()

    result = {"quick": args.quick, "rounds": {s.name: s.rounds for s in settings},
              "reduced": ({"10": "first 5000 training rows (500 per client)", "rounds": 2,
                           "evaluation": "round 0 (Flower start-up) and the last round only"}
                          if args.quick else None)}
    for s in settings:
        n = s.name
        result[f"round_s_edgeray_{n}"] = median_after_first(edgeray[n])
        result[f"round_s_flower_{n}"] = median_after_first(flower[n]["rows"])
        result[f"ratio_{n}"] = result[f"round_s_edgeray_{n}"] / result[f"round_s_flower_{n}"]
        result[f"accuracy_edgeray_{n}"] = edgeray[n][-1]["test_accuracy"]
        result[f"accuracy_flower_{n}"] = flower[n]["rows"][-1]["test_accuracy"]
        result[f"round_times_edgeray_{n}"] = [r["round_wall_s"] for r in edgeray[n]]
        result[f"round_times_flower_{n}"] = [r["round_wall_s"] for r in flower[n]["rows"]]
        result[f"startup_s_flower_{n}"] = flower[n]["startup_s"]
    result.update({
        "startup_s_edgeray": startup["startup_s"],
        "startup_s_flower": flower["100"]["startup_s"],
        "startup_ratio": startup["startup_s"] / flower["100"]["startup_s"],
        "startup_s_edgeray_head": on_head["first"]["startup_s"],
        "startup_s_edgeray_warm": on_head["warm"]["startup_s"],
        "startup_ratio_head": on_head["first"]["startup_s"] / flower["100"]["startup_s"],
        "startup_ratio_warm": on_head["warm"]["startup_s"] / flower["100"]["startup_s"],
        "accuracy_edgeray_warm_100": on_head["warm"]["rows"][-1]["test_accuracy"],
        "round_s_edgeray_warm_100": median_after_first(on_head["warm"]["rows"]),
        "flower_query_s_100": flower["100"]["query_s"],
        "flower_call_to_round1_s_100": flower["100"]["call_to_round1_s"],
        "edgeray_startup_in_run_fl_s": startup["startup_s_in_run_fl"],
        "edgeray_in_process_ray_init_s_10": edgeray_setup["10"]["ray_init_s"],
        "edgeray_in_process_actors_start_s_10": edgeray_setup["10"]["actors_start_s"],
        "flower_venv_install_s": install or None,
        "versions": flower["100"]["versions"],
        "loadavg_before": loads["before"], "loadavg_after": loads["after"],
    })
    raw = {"result": result, "loadavg": loads, "settings": [dataclasses.asdict(s) for s in settings],
           "flower": flower, "edgeray": edgeray, "edgeray_run": startup, "edgeray_on_head": on_head,
           "edgeray_in_process_setup": edgeray_setup}
    (RESULTS / f"vs_flower{suffix}.json").write_text(json.dumps(raw, indent=2, default=str))
    plot(result, settings, RESULTS / f"vs_flower{suffix}.png")
    print(json.dumps(result), flush=True)


def plot(result: dict, settings: list[Setting], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for s, marker in zip(settings, "os"):
        for system, color in (("flower", "tab:orange"), ("edgeray", "tab:blue")):
            times = result[f"round_times_{system}_{s.name}"]
            ax1.plot(range(1, len(times) + 1), times, marker=marker, color=color,
                     ls="-" if s.num_clients == 100 else "--",
                     label=f"{system}, {s.num_clients} clients (acc {result[f'accuracy_{system}_{s.name}']:.3f})")
    ax1.set_xticks(range(1, max(s.rounds for s in settings) + 1))
    ax1.set_xlabel("round")
    ax1.set_ylabel("round wall time (s, excl. evaluation)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.bar(["flower", "edgeray\ncold", "edgeray\nhead up", "edgeray\nwarm pool"],
            [result["startup_s_flower"], result["startup_s_edgeray"], result["startup_s_edgeray_head"],
             result["startup_s_edgeray_warm"]], color=["tab:orange", "tab:blue", "tab:blue", "tab:blue"])
    ax2.set_ylabel("command to round 1 (s), 100 clients")
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"FedAvg MNIST CNN, 10 clients/round; load avg {result['loadavg_before'][0]:.1f} -> "
                 f"{result['loadavg_after'][0]:.1f}" + (" (quick)" if result["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
