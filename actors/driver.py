"""The FL driver: prepare a run, start its actors, ask for one round at a time, write the results.

    edgeray run fedavg --config configs/fedavg_mnist.yaml --set rounds=5      (actors.cli)

The driver is thin: it loads and partitions the data, puts it in the object store once, starts
the ClientActor pool, the edge servers and the aggregator, then asks the aggregator for one
round at a time and writes what comes back (a metrics row) to ``runs/<run_id>/``. Weights and
updates never pass through it, and it never imports torch or the model's code: the strategy and
the model travel as specs (``pipelines.registry``) and are built in the actors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actors.config import FLConfig
from actors.topology import plan_pool
from edgeray import runs
from edgeray.connect import connect
from edgeray.errors import UserError
from pipelines.data import Dataset, format_histogram, label_histogram, load_dataset, partition, plot_histogram
from pipelines.population import (ClientProfile, PopulationView, disc_coverage, load_link_trace, load_trace,
                                  modulo_coverage, sample_profiles, save_trace)
from pipelines.registry import ModelSpec, TaskSpec

log = logging.getLogger("edgeray.fl")


@dataclass
class Prepared:
    """What the driver computes before touching Ray (so bad input fails in a second, not after
    Ray started): the data, its partition, the client profiles and the task."""

    data: Dataset
    parts: list[np.ndarray]
    profiles: list[ClientProfile]
    task: TaskSpec
    coverage: list[list[int]]        # the edges covering each client, its home edge first
    link_trace: dict | None          # per-round rates (clock.link_model=trace)

    @property
    def population(self) -> PopulationView:
        return PopulationView(tuple(self.profiles), tuple(len(p) for p in self.parts))


def prepare(cfg: FLConfig, run_dir: Path | None = None) -> Prepared:
    data = load_dataset(cfg.data.dataset, cfg.data.path, cfg.seed, cfg.data.args)
    parts = partition(data.y_train, cfg.data.num_clients, cfg.data.partition, seed=cfg.seed,
                      alpha=cfg.data.alpha, min_size=cfg.data.min_size,
                      shards_per_client=cfg.data.shards_per_client, groups=data.groups)
    if cfg.model.path and not Path(cfg.model.path).exists():
        raise UserError(f"model.path={cfg.model.path} does not exist; put the checkpoint folder there "
                        f"or unset model.path to build the model from model.args")
    task = TaskSpec(ModelSpec(cfg.model.name, cfg.model.args, cfg.model.path, cfg.model.dtype, cfg.seed, data.info),
                    cfg.data.evaluation_name)
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
    rt = cfg.runtime
    coverage = modulo_coverage(cfg.data.num_clients, rt.num_edge_servers, rt.edge_overlap, cfg.seed) \
        if rt.coverage == "modulo" else disc_coverage(cfg.data.num_clients, rt.num_edge_servers, rt.coverage_radius,
                                                       cfg.seed)
    link_trace = load_link_trace(cfg.clock.link_trace) if cfg.clock.link_model == "trace" else None
    if run_dir is not None:
        if "num_classes" in data.info:
            hist = label_histogram(data.y_train, parts, data.info["num_classes"])
            print(f"label histogram per client ({cfg.data.partition}, {cfg.data.num_clients} clients):\n"
                  + format_histogram(hist), flush=True)
            np.save(run_dir / "label_histogram.npy", hist)  # plotted with the curves at the end (matplotlib: ~1 s)
        save_trace(profiles, run_dir / "client_profiles.json")
    return Prepared(data, parts, profiles, task, coverage, link_trace)


class FLRun:
    """The actors of one run: ClientActor pool, state store, edge servers, aggregator.

    ``strategy``: a ``pipelines.registry.StrategySpec`` (built in the actors) or a built strategy.
    ``warm``: take the actors from the warm pool of this code (detached, named by
    ``actors.warm.code_fingerprint``), starting only those that are missing; at the end they are
    released, not killed. Otherwise they are started for this run and killed at its end.
    ``self.aggregator`` has the run key bound (``RunHandle``): ``fl.aggregator.run_round.remote(1)``.
    """

    def __init__(self, cfg: FLConfig, strategy, prepared: Prepared, run_id: str = "", warm: bool = False):
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from actors.aggregator import AggregatorActor
        from actors.client import ClientActor
        from actors.edge import EdgeServerActor
        from actors.messages import RoundSettings, RunBinding, RunRefs, RunSpec
        from actors.store import ClientStateStore
        from actors.warm import NAMESPACE, RunHandle, code_fingerprint, retire_unused_pools, run_key, warm_options

        data, parts = prepared.data, prepared.parts
        classes = cfg.runtime.resource_classes
        resources = ray.cluster_resources()
        counts = plan_pool(classes, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        self.warm = warm
        fingerprint = code_fingerprint(strategy, prepared.task) if warm else None
        idle_exit_s = cfg.runtime.warm_idle_exit_s if warm else None
        retire_unused_pools(keep=fingerprint)
        self.run = run_key(fingerprint)
        self.refs = RunRefs(binding=ray.put(RunBinding(strategy, prepared.task, cfg.seed)),
                            train=ray.put({"x": data.x_train, "y": data.y_train}),
                            test=ray.put({"x": data.x_test, "y": data.y_test}), partition=ray.put(parts))
        # The store and the aggregator stay on the driver's node: a lost worker node takes neither
        # the clients' state nor the global weights with it.
        on_this_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.store = ClientStateStore.options(name=self.run, namespace=NAMESPACE,
                                              scheduling_strategy=on_this_node).remote()

        def named(kind: str) -> dict:
            return warm_options(fingerprint, kind) if warm else {}

        def start_actors() -> list:
            self.pool = {
                name: [ClientActor.options(num_cpus=spec["num_cpus"], num_gpus=spec["num_gpus"],
                                           **named(f"client-{name}-c{spec['num_cpus']:g}-g{spec['num_gpus']:g}-{i}"))
                       .remote(threads=max(1, int(spec["num_cpus"])), idle_exit_s=idle_exit_s)
                       for i in range(counts[name])]
                for name, spec in classes.items()}
            edge = cfg.runtime.edge_resources
            self.edges = [EdgeServerActor.options(
                              num_cpus=edge["num_cpus"], num_gpus=edge["num_gpus"],
                              **named(f"edge-{e}-c{edge['num_cpus']:g}-g{edge['num_gpus']:g}-t{edge['threads']}"))
                          .remote(e, idle_exit_s=idle_exit_s, threads=edge["threads"])
                          for e in range(cfg.runtime.num_edge_servers)]
            node = ray.get_runtime_context().get_node_id()
            self.aggregator_actor = AggregatorActor.options(
                scheduling_strategy=on_this_node, **named(f"aggregator-{node[:12]}")).remote(idle_exit_s=idle_exit_s)
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
        opened = self.aggregator_actor.open_run.remote(RunSpec(
            run=self.run, run_id=run_id or self.run, method=strategy.name, refs=self.refs,
            population=prepared.population, coverage=tuple(map(tuple, prepared.coverage)), edges=tuple(self.edges),
            pool=self.pool, store=self.store,
            settings=RoundSettings(
                clients_per_round=cfg.strategy.clients_per_round, deadline_s=cfg.clock.deadline_s,
                over_selection=cfg.clock.over_selection, dropout_prob=cfg.clock.dropout_prob,
                test_size=len(data.x_test), seed=cfg.seed, round_timeout_s=cfg.runtime.round_timeout_s,
                inflight_per_actor=cfg.runtime.inflight_per_actor, edge_uplink_mbps=cfg.runtime.edge_uplink_mbps,
                actor_retries=cfg.runtime.actor_retries,
                link_model=cfg.clock.link_model, link_min_gain=cfg.clock.link_min_gain,
                link_trace=prepared.link_trace, sticky_edges=cfg.runtime.sticky_edges,
                selection_method=cfg.selection.method, conflict_rule=cfg.selection.conflict_rule,
                selection_settings=cfg.selection.settings)))
        try:
            ray.get(opened)  # the first ClientActor builds the model here: a bad model.* fails now
        except RayTaskError as exc:
            self.shutdown()
            cause = exc
            while isinstance(cause, RayTaskError):   # the actor's own error, unwrapped from Ray's nesting
                cause = cause.cause
            raise (UserError(str(cause)) if isinstance(cause, UserError) else exc) from None
        self.aggregator = RunHandle(self.aggregator_actor, self.run)
        self.pool_sizes = counts

    def clients(self) -> list:
        return [a for group in self.pool.values() for a in group]

    def shutdown(self) -> None:
        """Kill this run's actors; warm ones are only told to drop the run (best effort), which
        frees the run's model (and its GPU memory) in each of them."""
        import ray

        from actors.shm_channel import remove_run_segments

        if self.warm:
            calls = [self.aggregator_actor.close_run.remote(self.run),
                     *(a.release.remote(self.run) for a in (*self.edges, *self.clients()))]
            ray.wait(calls, num_returns=len(calls), timeout=10)
        else:
            for actor in (self.aggregator_actor, *self.edges, *self.clients()):
                ray.kill(actor)
        ray.kill(self.store)
        remove_run_segments(self.run)   # left by a killed actor of this node (the others unlink their own)


def run_fl(cfg: FLConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the FL job of ``cfg`` in ``run_dir``; returns the summary."""
    from tqdm import tqdm

    started = time.perf_counter()
    if not resume:
        from edgeray.config import dump_yaml
        dump_yaml(cfg, run_dir / "config.yaml")
    strategy = cfg.strategy.spec()
    prepared = prepare(cfg, run_dir)
    connected = connect(cfg.runtime.address, num_cpus=cfg.runtime.num_cpus)
    import ray

    # auto: warm actors only pay off on a cluster that outlives this run
    warm = cfg.runtime.warm_pool == "on" or (cfg.runtime.warm_pool == "auto" and connected == "attached")
    fl = None
    try:
        fl = FLRun(cfg, strategy, prepared, run_id=run_dir.name, warm=warm)
        first_round = ray.get(fl.aggregator.load_checkpoint.remote(str(run_dir / "checkpoints"))) + 1 \
            if resume else 1
        rows = [r for r in runs.read_metrics(run_dir) if r["round"] < first_round]
        runs.rewrite_metrics(run_dir, rows)
        if not rows:
            rows.append({"round": 0, "sim_time_s": 0.0, "wall_s": time.perf_counter() - started,
                         **ray.get(fl.aggregator.evaluate.remote())})
            runs.append_metrics(run_dir, rows[-1])
        startup_s = time.perf_counter() - started
        bar = tqdm(range(first_round, cfg.rounds + 1), desc=f"{strategy.name} rounds", unit="round",
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
        summary = summarize(cfg, rows, startup_s, time.perf_counter() - started, fl.pool_sizes)
        runs.write_json(run_dir / "summary.json", summary)
        runs.plot_curves(rows, [("round", "round"), ("sim_time_s", "simulated time (s)")], "test_accuracy",
                         run_dir / "plots" / "accuracy.png", f"{cfg.name}: test accuracy")
        if (run_dir / "label_histogram.npy").is_file():
            plot_histogram(np.load(run_dir / "label_histogram.npy"), run_dir / "plots" / "label_histogram.png",
                           f"{cfg.data.dataset}: {cfg.data.partition} over {cfg.data.num_clients} clients")
        return summary
    finally:
        if fl is not None:
            fl.shutdown()
        if connected:
            ray.shutdown()


def summarize(cfg: FLConfig, rows: list[dict], startup_s: float, wall_s: float, pool_sizes: dict) -> dict:
    evaluated = [r for r in rows if "test_accuracy" in r]
    trained = [r for r in rows if r["round"] > 0]
    final = evaluated[-1] if evaluated else {}
    target = cfg.target_accuracy
    return {
        "method": cfg.strategy.name,
        "rounds": cfg.rounds,
        "final_round": rows[-1]["round"] if rows else 0,
        "final_test_accuracy": final.get("test_accuracy"),
        "final_test_loss": final.get("test_loss"),
        "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
        "target_accuracy": target,
        "rounds_to_target": None if target is None else
        next((r["round"] for r in evaluated if r["test_accuracy"] >= target), None),
        "sim_time_s": rows[-1]["sim_time_s"] if rows else 0.0,
        "wall_s": wall_s,
        "startup_s": startup_s,
        "median_round_wall_s": float(np.median([r["round_wall_s"] for r in trained])) if trained else None,
        "clients_failed_total": int(sum(r["clients_failed"] for r in trained)),
        "bytes_up_total": int(sum(r["bytes_up"] for r in trained)),
        "bytes_down_total": int(sum(r["bytes_down"] for r in trained)),
        "pool": pool_sizes,
    }
