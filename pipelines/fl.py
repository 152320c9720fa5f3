"""The federated-learning pipeline: config, and the driver that wires a strategy onto actors/.

    edgeray run fedavg --config configs/fedavg_mnist.yaml --set rounds=5

The driver is thin: it loads and partitions the data, puts it in the object store once, starts
the ClientActor pool, the edge servers and the aggregator, then asks the aggregator for one
round at a time and writes what comes back (a metrics row) to ``runs/<run_id>/``. Weights and
updates never pass through it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.clock import ClientProfile, VirtualClock, load_trace, sample_profiles, save_trace
from actors.topology import edge_coverage, plan_pool
from edgeray import runs
from edgeray.config import dump_yaml, param, section
from edgeray.errors import UserError
from pipelines.data import DATASETS, PARTITIONS, Dataset, format_histogram, label_histogram, load_dataset, partition, \
    plot_histogram
from pipelines.registry import MODELS, StrategySpec

log = logging.getLogger("edgeray.fl")


@dataclass
class DataConfig:
    """Dataset and how it is split among clients."""

    dataset: str = param("mnist", "dataset name", choices=DATASETS)
    path: str = param("data/mnist.pkl.gz", "local file of the dataset (MNIST; fetched by scripts/setup.sh)")
    num_clients: int = param(100, "number of virtual clients", ge=1)
    partition: str = param("iid", "how samples are split among clients", choices=PARTITIONS)
    alpha: float = param(0.5, "Dirichlet concentration over labels (partition=dirichlet)", gt=0)
    min_size: int = param(10, "minimum samples per client (partition=dirichlet)", ge=1)
    shards_per_client: int = param(2, "label-sorted shards per client (partition=shards)", ge=1)


@dataclass
class StrategyConfig:
    """The FL method's hyper-parameters."""

    clients_per_round: int = param(10, "clients aggregated per round (the target; see clock.over_selection)", ge=1)
    local_epochs: int = param(1, "local epochs per round", ge=1)
    batch_size: int = param(32, "local batch size", ge=1)
    lr: float = param(0.05, "local SGD learning rate", gt=0)
    momentum: float = param(0.9, "local SGD momentum", ge=0, lt=1)
    weight_decay: float = param(0.0, "local SGD weight decay", ge=0)
    mu: float = param(0.01, "FedProx proximal coefficient (fedprox only)", ge=0)
    keep_optimizer_state: bool = param(False, "keep each client's momentum buffers across rounds (client state)")


@dataclass
class ClockConfig:
    """Virtual clock: device profiles, deadline, over-selection, dropouts (simulated, never slept)."""

    trace: str | None = param(None, "CSV/JSON client trace; when unset, profiles are sampled")
    speed_median: float = param(500.0, "median compute speed, examples per simulated second", gt=0)
    speed_sigma: float = param(0.5, "log-normal sigma of compute speed", ge=0)
    uplink_median_mbps: float = param(5.0, "median uplink bandwidth", gt=0)
    downlink_median_mbps: float = param(20.0, "median downlink bandwidth", gt=0)
    bandwidth_sigma: float = param(0.7, "log-normal sigma of bandwidths", ge=0)
    min_availability: float = param(1.0, "availability ~ U(min_availability, 1) per client", ge=0, le=1)
    deadline_s: float | None = param(None, "per-round deadline in simulated seconds (unset: none)", gt=0)
    over_selection: float = param(1.0, "invite ceil(clients_per_round * this) clients", ge=1)
    dropout_prob: float = param(0.0, "probability an invited client drops out mid-round", ge=0, lt=1)


WARM_POOL_MODES = ("auto", "on", "off")


@dataclass
class RuntimeConfig:
    """Ray placement: the actor pool, edge servers and timeouts."""

    address: str | None = param(None, "Ray address to attach to (default: RAY_ADDRESS, else a local Ray)")
    resource_classes: dict = param(
        {"default": {"num_cpus": 1, "num_gpus": 0, "num_actors": 0, "share": 1.0}},
        "ClientActor classes: name -> {num_cpus, num_gpus per actor, num_actors (0 = as many as fit), "
        "share (fraction of clients in this class)}")
    num_edge_servers: int = param(1, "edge servers (1 = flat FL)", ge=1)
    edge_overlap: int = param(0, "extra edge servers covering each client", ge=0)
    edge_uplink_mbps: float = param(100.0, "edge server to aggregator bandwidth (simulated)", gt=0)
    inflight_per_actor: int = param(2, "assignments queued per ClientActor (prefetches the next client)", ge=1)
    round_timeout_s: float = param(600.0, "wall-clock limit of one round; later clients count as failed", gt=0)
    warm_pool: str = param("auto", "keep the actors running between runs (detached, found again by the next run "
                           "of the same code): auto = when attaching to a running cluster", choices=WARM_POOL_MODES)
    warm_idle_exit_s: float = param(600.0, "a warm actor ends itself after this long without calls", gt=0)
    actor_start_timeout_s: float = param(120.0, "wall-clock limit for the run's actors to start", gt=0)


RESOURCE_CLASS_KEYS = {"num_cpus": float, "num_gpus": float, "num_actors": int, "share": float}


@dataclass
class FLConfig:
    name: str = param("fedavg", "run name (prefix of the run id)")
    rounds: int = param(10, "number of rounds", ge=1)
    seed: int = param(0, "seed of every random draw (partition, profiles, selection, shuffles)")
    model: str = param("cnn", "model architecture", choices=MODELS)
    output_dir: str = param("runs", "where run directories are created")
    eval_every: int = param(1, "evaluate the global model every N rounds", ge=1)
    checkpoint_every: int = param(1, "checkpoint every N rounds", ge=1)
    keep_checkpoints: int = param(2, "checkpoints kept (older ones are deleted)", ge=1)
    data: DataConfig = section(DataConfig)
    strategy: StrategyConfig = section(StrategyConfig)
    clock: ClockConfig = section(ClockConfig)
    runtime: RuntimeConfig = section(RuntimeConfig)

    def validate(self) -> None:
        if self.strategy.clients_per_round > self.data.num_clients:
            raise UserError(f"strategy.clients_per_round={self.strategy.clients_per_round} exceeds "
                            f"data.num_clients={self.data.num_clients}")
        if not self.runtime.resource_classes:
            raise UserError("runtime.resource_classes must name at least one class")
        for name, spec in self.runtime.resource_classes.items():
            if not isinstance(spec, dict):
                raise UserError(f"runtime.resource_classes.{name} must be a mapping of "
                                f"{', '.join(RESOURCE_CLASS_KEYS)}")
            unknown = set(spec) - set(RESOURCE_CLASS_KEYS)
            if unknown:
                raise UserError(f"unknown key runtime.resource_classes.{name}.{sorted(unknown)[0]}; "
                                f"allowed: {', '.join(RESOURCE_CLASS_KEYS)}")
            for key, kind in RESOURCE_CLASS_KEYS.items():
                value = spec.get(key, {"num_cpus": 1, "num_gpus": 0, "num_actors": 0, "share": 1.0}[key])
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise UserError(f"runtime.resource_classes.{name}.{key}={value!r} must be a number >= 0")
                spec[key] = kind(value)
            if spec["num_cpus"] == 0 and spec["num_gpus"] == 0:
                raise UserError(f"runtime.resource_classes.{name} needs num_cpus or num_gpus > 0")


def strategy_spec(name: str, cfg: StrategyConfig) -> StrategySpec:
    """The strategy ``name`` with the config's hyper-parameters, built where it runs."""
    kwargs = dict(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                  weight_decay=cfg.weight_decay, keep_optimizer_state=cfg.keep_optimizer_state)
    if name == "fedprox":
        kwargs["mu"] = cfg.mu
    return StrategySpec(name, kwargs)


def build_strategy(name: str, cfg: StrategyConfig):
    return strategy_spec(name, cfg).build()


def connect_ray(address: str | None) -> str | None:
    """Attach to ``address`` / RAY_ADDRESS (returns "attached"), or start a local Ray ("local");
    None when this process is already connected.
    Call it before anything imports ray: attaching sets RAY_AUTH_MODE=token (Ray 2.60 heads
    require the token, and a driver without it retries forever), which Ray reads at import."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        return None
    if not address:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        return "local"
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    return "attached"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when HOST:PORT does not answer."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # "auto", ray://...: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address}: {exc.strerror or exc}; "
                        f"is a head running there (`ray start --head`, `edgeray main`)?") from None


@dataclass
class Prepared:
    """What the driver computes before touching Ray (so bad input fails in a second, not after
    Ray started): the data, its partition and the client profiles."""

    data: Dataset
    parts: list[np.ndarray]
    profiles: list[ClientProfile]


def prepare(cfg: FLConfig, run_dir: Path | None = None) -> Prepared:
    data = load_dataset(cfg.data.dataset, cfg.data.path, cfg.seed)
    parts = partition(data.y_train, cfg.data.num_clients, cfg.data.partition, seed=cfg.seed,
                      alpha=cfg.data.alpha, min_size=cfg.data.min_size,
                      shards_per_client=cfg.data.shards_per_client)
    classes = cfg.runtime.resource_classes
    if cfg.clock.trace:
        profiles = load_trace(cfg.clock.trace, cfg.data.num_clients)
        unknown = {p.resource_class for p in profiles} - set(classes)
        if unknown:
            raise UserError(f"client trace uses resource class {sorted(unknown)[0]!r}, not in "
                            f"runtime.resource_classes ({', '.join(classes)})")
    else:
        c = cfg.clock
        profiles = sample_profiles(cfg.data.num_clients, cfg.seed, speed_median=c.speed_median,
                                   speed_sigma=c.speed_sigma, uplink_median=c.uplink_median_mbps,
                                   downlink_median=c.downlink_median_mbps, bandwidth_sigma=c.bandwidth_sigma,
                                   min_availability=c.min_availability,
                                   resource_classes={n: s["share"] for n, s in classes.items()})
    if run_dir is not None:
        hist = label_histogram(data.y_train, parts, data.num_classes)
        print(f"label histogram per client ({cfg.data.partition}, {cfg.data.num_clients} clients):\n"
              + format_histogram(hist), flush=True)
        np.save(run_dir / "label_histogram.npy", hist)  # plotted with the curves at the end (matplotlib: ~1 s)
        save_trace(profiles, run_dir / "client_profiles.json")
    return Prepared(data, parts, profiles)


class FLRun:
    """The actors of one run: ClientActor pool, state store, edge servers, aggregator.

    ``warm``: take the actors from the warm pool of this code (detached, named by
    ``actors.warm.code_fingerprint``), starting only those that are missing; at the end they are
    released, not killed. Otherwise they are started for this run and killed at its end.
    ``self.aggregator`` has the run key bound (``RunHandle``): ``fl.aggregator.run_round.remote(1)``.
    """

    def __init__(self, cfg: FLConfig, strategy, prepared: "Prepared", run_id: str = "", warm: bool = False):
        import ray
        from ray.exceptions import RayActorError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors.aggregator import AggregatorActor
        from actors.client import ClientActor
        from actors.edge import EdgeServerActor
        from actors.store import ClientStateStore
        from actors.warm import NAMESPACE, RunHandle, code_fingerprint, retire_unused_pools, run_key, warm_options

        data, parts, profiles = prepared.data, prepared.parts, prepared.profiles
        classes = cfg.runtime.resource_classes
        clock = VirtualClock(profiles, cfg.seed, deadline_s=cfg.clock.deadline_s,
                             over_selection=cfg.clock.over_selection, dropout_prob=cfg.clock.dropout_prob)
        resources = ray.cluster_resources()
        counts = plan_pool(classes, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        model_spec = {"name": cfg.model, "input_shape": tuple(data.x_train.shape[1:]),
                      "num_classes": data.num_classes, "seed": cfg.seed}
        self.warm = warm
        fingerprint = code_fingerprint(strategy) if warm else None
        idle_exit_s = cfg.runtime.warm_idle_exit_s if warm else None
        retire_unused_pools(keep=fingerprint)
        self.run = run_key(fingerprint)
        self.data_refs = {"train": ray.put({"x": data.x_train, "y": data.y_train}),
                          "test": ray.put({"x": data.x_test, "y": data.y_test}), "partition": ray.put(parts),
                          "binding": ray.put({"strategy": strategy, "model_spec": model_spec, "seed": cfg.seed})}
        self.store = ClientStateStore.options(name=self.run, namespace=NAMESPACE).remote()

        def named(kind: str) -> dict:
            return warm_options(fingerprint, kind) if warm else {}

        def start_actors() -> list:
            self.pool = {
                name: [ClientActor.options(num_cpus=spec["num_cpus"], num_gpus=spec["num_gpus"],
                                           **named(f"client-{name}-c{spec['num_cpus']:g}-g{spec['num_gpus']:g}-{i}"))
                       .remote(threads=max(1, int(spec["num_cpus"])), idle_exit_s=idle_exit_s)
                       for i in range(counts[name])]
                for name, spec in classes.items()}
            self.edges = [EdgeServerActor.options(**named(f"edge-{e}")).remote(e, idle_exit_s=idle_exit_s)
                          for e in range(cfg.runtime.num_edge_servers)]
            node = ray.get_runtime_context().get_node_id()
            self.aggregator_actor = AggregatorActor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                **named(f"aggregator-{node[:12]}")).remote(idle_exit_s=idle_exit_s)
            return [a.pid.remote() for a in (*self.clients(), *self.edges, self.aggregator_actor)]

        for attempt in (1, 2):
            started = start_actors()
            ready, _ = ray.wait(started, num_returns=len(started), timeout=cfg.runtime.actor_start_timeout_s)
            if len(ready) < len(started):
                self.shutdown()
                raise UserError(
                    f"{len(started) - len(ready)} of {len(started)} actors did not start within "
                    f"runtime.actor_start_timeout_s={cfg.runtime.actor_start_timeout_s:g}: the cluster has "
                    f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs in all, and other jobs "
                    f"or actors hold some (see `ray status`); lower runtime.resource_classes.*.num_actors")
            try:
                ray.get(started)
                break
            except RayActorError:  # a warm actor ended itself (idle) between lookup and use: look again
                if not warm or attempt == 2:
                    raise
        ray.get(self.aggregator_actor.open_run.remote(
            self.run, refs=self.data_refs, strategy=strategy, model_spec=model_spec, clock=clock,
            client_sizes=[len(p) for p in parts], client_classes=[p.resource_class for p in profiles],
            coverage=edge_coverage(cfg.data.num_clients, cfg.runtime.num_edge_servers, cfg.runtime.edge_overlap,
                                   cfg.seed),
            edges=self.edges, pool=self.pool, store=self.store, clients_per_round=cfg.strategy.clients_per_round,
            test_size=len(data.y_test), seed=cfg.seed, round_timeout_s=cfg.runtime.round_timeout_s,
            inflight_per_actor=cfg.runtime.inflight_per_actor, edge_uplink_mbps=cfg.runtime.edge_uplink_mbps,
            pipeline=strategy.name, run_id=run_id or self.run))
        self.aggregator = RunHandle(self.aggregator_actor, self.run)
        self.pool_sizes = counts

    def clients(self) -> list:
        return [a for group in self.pool.values() for a in group]

    def shutdown(self) -> None:
        """Kill this run's actors; warm ones are only told to drop the run (best effort)."""
        import ray

        if self.warm:
            calls = [self.aggregator_actor.close_run.remote(self.run),
                     *(a.release.remote(self.run) for a in (*self.edges, *self.clients()))]
            ray.wait(calls, num_returns=len(calls), timeout=10)
        else:
            for actor in (self.aggregator_actor, *self.edges, *self.clients()):
                ray.kill(actor)
        ray.kill(self.store)


def run_fl(cfg: FLConfig, strategy_name: str, run_dir: Path, resume: bool = False,
           progress: bool = True) -> dict:
    """Run (or resume) an FL job in ``run_dir``; returns the summary."""
    from tqdm import tqdm

    started = time.perf_counter()
    if not resume:
        dump_yaml(cfg, run_dir / "config.yaml")
    prepared = prepare(cfg, run_dir)
    connected = connect_ray(cfg.runtime.address)
    import ray

    # auto: warm actors only pay off on a cluster that outlives this run
    warm = cfg.runtime.warm_pool == "on" or (cfg.runtime.warm_pool == "auto" and connected == "attached")
    fl = None
    try:
        fl = FLRun(cfg, strategy_spec(strategy_name, cfg.strategy), prepared, run_id=run_dir.name, warm=warm)
        first_round = ray.get(fl.aggregator.load_checkpoint.remote(str(run_dir / "checkpoints"))) + 1 \
            if resume else 1
        rows = [r for r in runs.read_metrics(run_dir) if r["round"] < first_round]
        runs.rewrite_metrics(run_dir, rows)
        if not rows:
            rows.append({"round": 0, "sim_time_s": 0.0, "wall_s": time.perf_counter() - started,
                         **ray.get(fl.aggregator.evaluate.remote())})
            runs.append_metrics(run_dir, rows[-1])
        startup_s = time.perf_counter() - started
        bar = tqdm(range(first_round, cfg.rounds + 1), desc=f"{strategy_name} rounds", unit="round",
                   disable=not progress, initial=first_round - 1, total=cfg.rounds)
        for rnd in bar:
            row = ray.get(fl.aggregator.run_round.remote(rnd))
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                row.update(ray.get(fl.aggregator.evaluate.remote()))
            row["wall_s"] = time.perf_counter() - started
            runs.append_metrics(run_dir, row)
            rows.append(row)
            if rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds:
                ray.get(fl.aggregator.save_checkpoint.remote(str(runs.checkpoint_path(run_dir, rnd)), rnd, {}))
                runs.prune_checkpoints(run_dir / "checkpoints", cfg.keep_checkpoints)
            bar.set_postfix(acc=f"{row.get('test_accuracy', float('nan')):.4f}",
                            sim=f"{row['sim_time_s']:.0f}s", failed=row["clients_failed"])
        bar.close()
        summary = summarize(cfg, strategy_name, rows, startup_s, time.perf_counter() - started, fl.pool_sizes)
        runs.write_json(run_dir / "summary.json", summary)
        runs.plot_curves(rows, [("round", "round"), ("sim_time_s", "simulated time (s)")], "test_accuracy",
                         run_dir / "plots" / "accuracy.png", f"{cfg.name}: test accuracy")
        plot_histogram(np.load(run_dir / "label_histogram.npy"), run_dir / "plots" / "label_histogram.png",
                       f"{cfg.data.dataset}: {cfg.data.partition} over {cfg.data.num_clients} clients")
        return summary
    finally:
        if fl is not None:
            fl.shutdown()
        if connected:
            ray.shutdown()


def summarize(cfg: FLConfig, strategy_name: str, rows: list[dict], startup_s: float, wall_s: float,
              pool_sizes: dict) -> dict:
    evaluated = [r for r in rows if "test_accuracy" in r]
    trained = [r for r in rows if r["round"] > 0]
    final = evaluated[-1] if evaluated else {}
    return {
        "pipeline": strategy_name,
        "rounds": cfg.rounds,
        "final_round": rows[-1]["round"] if rows else 0,
        "final_test_accuracy": final.get("test_accuracy"),
        "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
        "rounds_to_97": next((r["round"] for r in evaluated if r["test_accuracy"] >= 0.97), None),
        "sim_time_s": rows[-1]["sim_time_s"] if rows else 0.0,
        "wall_s": wall_s,
        "startup_s": startup_s,
        "median_round_wall_s": float(np.median([r["round_wall_s"] for r in trained])) if trained else None,
        "clients_failed_total": int(sum(r["clients_failed"] for r in trained)),
        "bytes_up_total": int(sum(r["bytes_up"] for r in trained)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in trained)),
        "pool": pool_sizes,
    }
