"""AggregatorActor: holds the global state and the strategy, runs rounds, writes checkpoints.

One round: ask the virtual clock who is online, let the strategy select and instruct clients
(it sees the read-only population view),
let the clock decide who drops out or is too slow (they are not trained), ``ray.put`` the
global weights once, hand each kept client to one of its covering edge servers, merge the
edges' partial aggregates, let the strategy aggregate, evaluate on the pool (test set split
across the ClientActors), advance the clock. The driver only receives the metrics row.

The global state is the model's trainable tensors only (``pipelines.models``): the aggregator
never builds the model; it asks one ClientActor, which builds it anyway, for the initial
trainable tensors. Checkpoints hold those tensors, the strategy's server state, the clock and
the client states.

The actor is placed on the driver's node, so checkpoints land in the run directory the driver
reads, also when the run is submitted to a cluster. It is run-agnostic (``actors.warm``): each
run opens an ``AggregatorRun`` on it, and every call names its run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.clock import VirtualClock
from actors.messages import ClientFailure, ClientJob, EdgeResult, RunSpec
from actors.metering import payload_bytes
from actors.metrics import RoundMetrics
from actors.topology import assign_edges
from actors.warm import IdleExit
from edgeray.runs import load_latest_checkpoint
from pipelines.population import LinkModel
from pipelines.registry import SELECTORS, load, materialize
from pipelines.selection import (ClientOutcome, RoundObservation, SelectionRequest, edge_observations,
                                 resolve_conflicts)

log = logging.getLogger("edgeray.aggregator")


@ray.remote(num_cpus=0)
class AggregatorActor(IdleExit):
    """Hosts the ``AggregatorRun`` of each open run; every method takes the run key first."""

    def __init__(self, idle_exit_s: float | None = None):
        self.runs: dict[str, AggregatorRun] = {}
        self.start_idle_exit(idle_exit_s)

    def open_run(self, spec: RunSpec) -> None:
        self.runs[spec.run] = AggregatorRun(spec)

    def close_run(self, run: str) -> None:
        self.runs.pop(run, None)

    def _run(self, run: str) -> "AggregatorRun":
        if run not in self.runs:
            raise RuntimeError(f"run {run} is not open on this aggregator (it was restarted or the run closed); "
                               "resume the run with --resume")
        return self.runs[run]

    def run_round(self, run: str, rnd: int) -> dict:
        with self.busy():
            return self._run(run).run_round(rnd)

    def evaluate(self, run: str) -> dict:
        with self.busy():
            return self._run(run).evaluate()

    def global_weights(self, run: str) -> dict:
        return self._run(run).global_params

    def save_checkpoint(self, run: str, path: str, rnd: int, extra: dict) -> str:
        with self.busy():
            return self._run(run).save_checkpoint(path, rnd, extra)

    def load_checkpoint(self, run: str, checkpoint_dir: str) -> int:
        with self.busy():
            return self._run(run).load_checkpoint(checkpoint_dir)


class AggregatorRun:
    """The server side of one run: global weights, server state, clock, rounds, checkpoints."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.run = spec.run
        self.settings = spec.settings
        self.strategy = materialize(ray.get(spec.refs.binding).strategy)
        self.global_params = self._initial_params()
        self.server_state = self.strategy.init_state(self.global_params)
        profiles = list(spec.population.profiles)
        links = LinkModel(profiles, self.settings.seed, self.settings.link_model, self.settings.link_min_gain,
                          self.settings.link_trace)
        self.clock = VirtualClock(profiles, self.settings.seed, deadline_s=self.settings.deadline_s,
                                  over_selection=self.settings.over_selection, dropout_prob=self.settings.dropout_prob,
                                  links=links)
        method = self.settings.selection_method
        self.selector = None if method == "default" else \
            load(SELECTORS[method].target)(spec.population, self.settings.seed, **(self.settings.selection_settings or {}))
        self.histories: dict[int, list[RoundObservation]] = {}   # each edge's own observations (checkpointed)
        self.metrics = RoundMetrics(spec.method, spec.run_id)

    def _initial_params(self) -> dict:
        """The model's initial trainable tensors, built by the first pool actor that answers: a
        ClientActor that dies (or is restarting) while it binds costs a retry, not the run."""
        actors = [a for group in self.spec.pool.values() for a in group]
        deadline = time.monotonic() + self.settings.round_timeout_s
        for attempt in range(2 * len(actors)):
            try:
                return ray.get(actors[attempt % len(actors)].initial_params.remote(self.run, self.spec.refs),
                               timeout=max(1.0, deadline - time.monotonic()))
            except (RayActorError, GetTimeoutError) as exc:
                log.warning("binding the run on a pool actor failed (%s); trying another actor", type(exc).__name__)
        raise RuntimeError(f"no pool actor of {len(actors)} could bind the run (initial parameters)")

    # ------------------------------------------------------------------ one round
    def run_round(self, rnd: int) -> dict:
        started = time.perf_counter()
        spec, settings = self.spec, self.settings
        available = self.clock.available(rnd)
        live = self._live_edges()
        coverage = [[e for e in cov if e in live] for cov in spec.coverage]  # home edge first while it lives
        invited, picks, resolution = self._select(rnd, available, coverage)
        share = resolution.share if resolution else {}
        instructions = self.strategy.configure_round(rnd, self.server_state, invited, spec.population)
        key_bytes = {k: payload_bytes(v) for k, v in self.global_params.items()}
        model_down = {c: sum(key_bytes[k] for k in self.strategy.download_keys(instructions[c], self.global_params))
                      for c in invited}
        down = {c: model_down[c] + payload_bytes(instructions[c]) for c in invited}
        work = {c: self.strategy.work(instructions[c], spec.population.sizes[c]) for c in invited}
        traffic = {c: self.strategy.estimate_traffic(instructions[c], spec.population.sizes[c]) for c in invited}
        # The upload is only known after training: plan with an update the size of the download,
        # plus the exchange traffic the strategy expects.
        plan = self.clock.plan_round(rnd, invited, settings.clients_per_round, work,
                                     {c: down[c] + traffic[c][0] for c in invited},
                                     {c: model_down[c] + traffic[c][1] for c in invited}, share)

        global_ref = ray.put(self.global_params)
        if resolution is not None:
            by_edge = {}
            for c in plan.kept:
                by_edge.setdefault(resolution.aggregate_at[c], []).append(c)
            stranded = []
        else:
            stranded = [c for c in plan.kept if not coverage[c]]
            by_edge = {e: clients for e, clients in assign_edges([c for c in plan.kept if coverage[c]], coverage,
                                                                 len(spec.edges), settings.sticky_edges).items()
                       if clients}
        live_pool = self._live_pool()
        budget_s = settings.round_timeout_s - (time.perf_counter() - started)
        calls = {e: spec.edges[e].run_round.remote(
                     self.run, spec.refs, rnd, [global_ref],
                     [ClientJob(c, instructions[c], spec.population.profiles[c].resource_class,
                                self.clock.link(rnd, c), budget_s) for c in clients],
                     live_pool, budget_s, settings.inflight_per_actor, settings.actor_retries)
                 for e, clients in sorted(by_edge.items())}
        results = self._collect_edges(rnd, calls, by_edge)
        if stranded:
            results.append(EdgeResult(None, self.strategy.init_partial(),
                                      failures=tuple(ClientFailure(c, "no live edge server covers it")
                                                     for c in stranded)))

        agg_started = time.perf_counter()
        partial = self.strategy.merge([r.partial for r in results])
        self.global_params, self.server_state, train_metrics = self.strategy.aggregate(
            rnd, self.global_params, self.server_state, partial)
        aggregate_s = time.perf_counter() - agg_started

        reports = [rep for r in results for rep in r.reports]
        failures = [f for r in results for f in r.failures]
        completed = {rep.client_id: self.clock.timing(rnd, rep.client_id, work[rep.client_id],
                                                      down[rep.client_id] + rep.exchange_down_bytes,
                                                      rep.upload_bytes + rep.exchange_up_bytes,
                                                      share.get(rep.client_id, 1.0)) for rep in reports}
        served_by = resolution.served_by if resolution else {c: (e,) for e, cs in by_edge.items() for c in cs}
        in_turn = self.strategy.clients_take_turns()
        edge_round_s = {}
        for e in range(len(spec.edges)):
            times = [completed[c].total_s for c in completed if e in served_by.get(c, ())]
            edge_round_s[e] = (sum(times) if in_turn else max(times)) if times else 0.0
        edge_upload_s = max((payload_bytes(r.partial) * 8 / (settings.edge_uplink_mbps * 1e6)
                             for r in results if r.reports), default=0.0)
        sim_round_s = self.clock.round_time(list(completed.values()), settings.clients_per_round, edge_upload_s,
                                            list(edge_round_s.values()) if in_turn else None)
        sim_now = self.clock.advance(sim_round_s)
        self._observe(rnd, invited, plan, completed, failures, picks, resolution, edge_round_s, sim_round_s)
        round_s = time.perf_counter() - started
        for f in failures:
            log.warning("round %d: client %d failed (%s)", rnd, f.client_id, f.error)
        row = {
            "round": rnd,
            "clients_available": len(available),
            "clients_selected": len(invited),
            "clients_completed": len(reports),
            "clients_failed": len(failures),
            "actor_failures": sum(r.actor_failures for r in results),
            "clients_by_node": dict(sorted(Counter(rep.node for rep in reports).items())),
            "clients_dropout": plan.count("dropout"),
            "clients_straggler": plan.count("straggler"),
            "conflicts": resolution.conflicts if resolution else 0,
            "bytes_down": int(sum(down[c] for c in plan.kept) + sum(rep.exchange_down_bytes for rep in reports)),
            "bytes_up": int(sum(rep.upload_bytes + rep.exchange_up_bytes for rep in reports)),
            "exchange_calls": int(sum(rep.exchange_calls for rep in reports)),
            "sim_round_s": sim_round_s,
            "sim_time_s": sim_now,
            "edge_round_s": [edge_round_s[e] for e in range(len(spec.edges))],
            "round_wall_s": round_s,
            "aggregate_s": aggregate_s,
            "client_train_s": float(sum(rep.train_s for rep in reports)),
            "client_update_s": float(sum(rep.update_s for rep in reports)),
            "exchange_wall_s": float(sum(rep.exchange_wall_s for rep in reports)),
            "actor_calls": 1 + len(calls) + sum(r.actor_calls for r in results),
            **{f"train_{k}" if not k.startswith("train_") else k: v for k, v in train_metrics.items()},
        }
        self.metrics.record(row)
        return row

    def _select(self, rnd: int, available: list[int], coverage: list[list[int]]):
        """(invited clients, per-edge picks, conflict resolution): the strategy's one global call, or
        each live edge's selector among the available clients it covers (picks and resolution None
        for the former)."""
        settings = self.settings
        invite = self.clock.invite_count(settings.clients_per_round)
        if self.selector is None:
            rng = np.random.default_rng([settings.seed, rnd, 3])
            return self.strategy.select_clients(rnd, self.server_state, available, invite, rng), None, None
        edges = sorted({e for cov in coverage for e in cov})
        per_edge = math.ceil(invite / max(len(edges), 1))
        requests = [SelectionRequest(e, tuple(c for c in available if e in coverage[c]), per_edge,
                                     tuple(self.histories.get(e, ()))) for e in edges]
        picks = self.selector.select_all(requests, rnd)
        resolution = resolve_conflicts(picks, settings.conflict_rule, np.random.default_rng([settings.seed, rnd, 5]))
        return sorted(resolution.aggregate_at), picks, resolution

    def _observe(self, rnd, invited, plan, completed, failures, picks, resolution, edge_round_s, sim_round_s):
        """Tell the strategy (and each edge's selector history) how the round went."""
        failed = {f.client_id for f in failures}
        outcomes = {}
        for c in invited:
            status = "ok" if c in completed else "failed" if c in failed else plan.timings[c].status
            outcomes[c] = ClientOutcome(c, resolution.aggregate_at[c] if resolution else None, status,
                                        completed[c].total_s if c in completed else 0.0)
        whole = RoundObservation(rnd, None, tuple(outcomes[c] for c in invited), sim_round_s)
        self.server_state = self.strategy.observe_round(rnd, self.server_state, whole)
        if picks is not None:
            for e, observation in edge_observations(rnd, picks, outcomes, edge_round_s, resolution).items():
                self.histories.setdefault(e, []).append(observation)

    def _live_edges(self, timeout_s: float = 60.0) -> set[int]:
        """Edge servers that answer a ping; one that Ray is restarting refuses calls for a moment,
        so it is asked again until ``timeout_s``. Clients are assigned only to live edges, so with
        overlapping coverage a dead edge's clients move to another."""
        live, deadline = set(), time.monotonic() + timeout_s
        for e, edge in enumerate(self.spec.edges):
            while True:
                try:
                    ray.get(edge.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                    live.add(e)
                    break
                except (RayActorError, GetTimeoutError) as exc:
                    if isinstance(exc, GetTimeoutError) or time.monotonic() >= deadline:
                        log.warning("edge server %d is down (%s); its clients go to others that cover them",
                                    e, type(exc).__name__)
                        break
                    time.sleep(0.2)
        return live

    def _live_pool(self) -> dict[str, list]:
        """The pool actors the GCS reports alive. One that is restarting with no room to start (its
        node was lost and the others are full) would hold every call sent to it until the round's
        timeout; a class with no live actor keeps them all, so its calls wait for a restart."""
        from ray._private.state import actors as actor_table   # one GCS call for the round

        try:
            alive = set(actor_table(actor_state_name="ALIVE"))
        except Exception:   # the GCS did not answer: assume all alive, the edge's retries cover it
            return dict(self.spec.pool)
        live = {cls: [a for a in actors if a._actor_id.hex() in alive] for cls, actors in self.spec.pool.items()}
        return {cls: live[cls] or actors for cls, actors in self.spec.pool.items()}

    def _collect_edges(self, rnd: int, calls: dict, by_edge: dict) -> list[EdgeResult]:
        """Each edge's result; an edge that dies or overruns degrades the round instead of failing
        it: its clients count as failed and Ray restarts the edge server for the next round."""
        results, deadline = [], time.monotonic() + self.settings.round_timeout_s + 30
        for e, ref in calls.items():
            try:
                results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except (RayActorError, RayTaskError, GetTimeoutError) as exc:
                reason = f"edge server {e} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                log.warning("round %d: %s; its %d clients count as failed", rnd, reason, len(by_edge[e]))
                if isinstance(exc, GetTimeoutError):
                    ray.cancel(ref, force=False)
                results.append(EdgeResult(e, self.strategy.init_partial(),
                                          failures=tuple(ClientFailure(c, reason) for c in by_edge[e])))
        return results

    def evaluate(self, attempts: int = 3) -> dict:
        """Central evaluation with the task's evaluation: the test set is split across every
        ClientActor of the pool; each returns sums over its slice, which are added and divided
        by the total count. A slice whose actor dies (or is restarting) is evaluated again on
        another actor, so a lost process costs time, not the run."""
        actors = [a for group in self.spec.pool.values() for a in group]
        global_ref = ray.put(self.global_params)
        cuts = np.linspace(0, self.settings.test_size, len(actors) + 1).astype(int)
        slices = [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
        parts, deadline = [], time.monotonic() + self.settings.round_timeout_s
        for attempt in range(attempts):
            calls = {actors[(i + attempt) % len(actors)].evaluate.remote(self.run, self.spec.refs, global_ref, lo, hi):
                     (lo, hi) for i, (lo, hi) in enumerate(slices)}
            slices = []
            for ref, (lo, hi) in calls.items():
                try:
                    parts.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
                except (RayActorError, GetTimeoutError) as exc:
                    log.warning("evaluation of test rows %d:%d failed (%s); trying another actor", lo, hi,
                                type(exc).__name__)
                    slices.append((lo, hi))
            if not slices:
                break
        if slices:
            raise RuntimeError(f"evaluation failed on every actor for {len(slices)} slices of the test set")
        count = sum(p["count"] for p in parts)
        return {key: sum(p[key] for p in parts) / count for key in parts[0] if key != "count"}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str, rnd: int, extra: dict) -> str:
        """Atomic: written to a temp file, then renamed over the final name."""
        import torch
        ckpt = {"round": rnd, "global_params": self.global_params, "server_state": self.server_state,
                "selection_history": self.histories,
                "sim_time_s": self.clock.now_s, "client_states": ray.get(self.spec.store.snapshot.remote()),
                "extra": extra}
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return str(path)

    def load_checkpoint(self, checkpoint_dir: str) -> int:
        """Restore from the newest readable checkpoint; returns its round (0 when there is none)."""
        ckpt = load_latest_checkpoint(checkpoint_dir)
        if ckpt is None:
            return 0
        if set(ckpt["global_params"]) != set(self.global_params):
            raise RuntimeError(f"the checkpoint in {checkpoint_dir} holds other trainable tensors than the model "
                               f"of this run (was model.* changed?); resume with the run's own model settings")
        self.global_params = ckpt["global_params"]
        self.server_state = ckpt["server_state"]
        self.histories = ckpt.get("selection_history", {})
        self.clock.now_s = ckpt["sim_time_s"]
        ray.get(self.spec.store.restore.remote(ckpt["client_states"]))
        return ckpt["round"]
