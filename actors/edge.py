"""EdgeServerActor: covers a set of clients, dispatches them onto the pool, aggregates partially.

Per round it gets the global weights as an ObjectRef and a list of (client, instruction,
resource class). It keeps at most ``inflight_per_actor`` assignments queued on each ClientActor
of the client's class (so the next client's arguments arrive while one trains), folds the
updates into the strategy's partial aggregate as they arrive, in the order of the job list (an
update that arrives early waits for its predecessors, so a seeded run sums in the same order
every time; memory stays bounded by the few updates in flight), and returns the partial,
never the raw updates.

A ClientActor whose process dies mid-round (or is restarting when called) does not fail its
clients: each lost assignment is counted (``actor_failures``) and run again on a live actor of its
class, up to ``runtime.actor_retries`` times; the actor is out of service until a probe sees Ray's
restarted process. The client's seed and stored state make the re-run train exactly what the lost
one would have, so the round's result is the undisturbed one. A client that errs by itself
(``RayTaskError``) fails at once.
Every wait has a timeout: what is still running at ``timeout_s`` is cancelled and counted failed.

The actor is threaded (``max_concurrency``) so that it can answer per-batch ``exchange`` calls
from its clients (split learning) while ``run_round`` waits. ``server_step`` calls of one edge
run one at a time when the strategy shares edge state between clients (one top model:
``server_step_concurrency = "edge"``), or one at a time per client (``"client"``). It reserves
``runtime.edge_resources`` (CPUs, GPUs) and runs its server steps on that many torch threads.

The edge's own state (``edge_state``: a top model, per-client compressor state) lives in the run's
state store under ``("edge", edge_id)``: loaded when the edge binds to the run, saved at the end
of each of its rounds. So it is checkpointed with the run, restored by ``--resume``, and a
restarted edge server recovers it. Like every actor of the runtime it is run-agnostic: the run
key comes with each call (``actors.warm``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors.malloc import keep_large_allocations_on_heap
from actors.messages import ClientFailure, ClientJob, EdgeResult, RunRefs
from actors.shm_channel import Inbox, Outbox, ShmMessage
from actors.store import find_store, load_state, save_state
from actors.warm import IdleExit
from pipelines.registry import materialize

log = logging.getLogger("edgeray.edge")


@dataclass
class EdgeRun:
    """One run bound on an edge server: its strategy and the edge's persistent state."""

    strategy: object
    edge_state: dict
    store: object
    had_state: bool
    step_lock: threading.Lock = field(default_factory=threading.Lock)
    client_locks: dict = field(default_factory=lambda: defaultdict(threading.Lock))
    inbox: Inbox = field(default_factory=Inbox)                  # same-node requests (actors.shm_channel)
    outboxes: dict[str, Outbox] = field(default_factory=dict)    # sender -> the segment its replies go in

    def lock_for(self, client_id: int) -> threading.Lock:
        return self.client_locks[client_id] if self.strategy.server_step_concurrency == "client" else self.step_lock

    def close(self) -> None:
        self.inbox.close()
        for outbox in self.outboxes.values():
            outbox.close()


@ray.remote(num_cpus=0, max_concurrency=32, max_restarts=-1, max_task_retries=0)
class EdgeServerActor(IdleExit):
    def __init__(self, edge_id: int, idle_exit_s: float | None = None, threads: int = 1):
        self.edge_id = edge_id
        self.state_key = ("edge", edge_id)   # its key in the run's state store
        self.runs: dict[str, EdgeRun] = {}   # bound lazily (actors.warm)
        self._lock = threading.Lock()
        self._self = ray.get_runtime_context().current_actor
        self.node_id = ray.get_runtime_context().get_node_id()
        keep_large_allocations_on_heap()   # server steps allocate batch-sized arrays (actors.malloc)
        if threads > 1:  # server steps (a top model) run torch; by default the edge reserves no CPU
            import torch
            torch.set_num_threads(threads)
        self.start_idle_exit(idle_exit_s)

    def _bound(self, run: str, refs: RunRefs | None = None) -> EdgeRun:
        with self._lock:
            if run not in self.runs:
                if refs is None:
                    raise RuntimeError(f"edge server {self.edge_id} has no run {run} (it was restarted mid-round)")
                store = find_store(run)
                state = load_state(store, self.state_key)
                binding = ray.get(refs.binding)
                strategy = materialize(binding.strategy)
                if hasattr(strategy, "bind_task"):   # a strategy with a model on the edge (split learning's top)
                    strategy.bind_task(binding.task)
                self.runs[run] = EdgeRun(strategy, state, store, bool(state))
            return self.runs[run]

    def release(self, run: str) -> None:
        with self._lock:
            bound = self.runs.pop(run, None)
        if bound is not None:
            bound.close()

    def ping(self) -> int:
        return self.edge_id

    def exchange(self, run: str, client_id: int, payload):
        with self.busy():
            bound = self._bound(run)
            with bound.lock_for(client_id):
                return bound.strategy.server_step(bound.edge_state, client_id, payload)

    def exchange_shm(self, run: str, client_id: int, message: ShmMessage) -> ShmMessage:
        """``exchange`` for a client on this node: the payload and the reply travel in shared memory."""
        with self.busy():
            bound = self._bound(run)
            payload = bound.inbox.read(message)
            with bound.lock_for(client_id):
                reply = bound.strategy.server_step(bound.edge_state, client_id, payload)
            with self._lock:
                outbox = bound.outboxes.get(message.sender)
                if outbox is None:
                    outbox = bound.outboxes[message.sender] = Outbox(f"{message.sender}-e{self.edge_id}")
            return outbox.write(reply)

    def run_round(self, run: str, refs: RunRefs, rnd: int, wrapped_global: list, jobs: list[ClientJob],
                  pool: dict[str, list], timeout_s: float, inflight_per_actor: int, actor_retries: int
                  ) -> EdgeResult:
        with self.busy():
            bound = self._bound(run, refs)
            with bound.step_lock:
                bound.strategy.begin_edge_round(rnd, bound.edge_state, [job.client_id for job in jobs],
                                                ray.get(wrapped_global[0]))
            result = self._run_round(run, refs, bound.strategy, rnd, wrapped_global[0], jobs, pool, timeout_s,
                                     inflight_per_actor, actor_retries)
            with bound.step_lock:
                partial = bound.strategy.end_edge_round(rnd, bound.edge_state, result.partial)
                if bound.edge_state or bound.had_state:   # stateless strategies cost no store call
                    save_state(bound.store, self.state_key, bound.edge_state)
                    bound.had_state = True
            return dataclasses.replace(result, partial=partial)

    def _run_round(self, run, refs, strategy, rnd, global_ref, jobs, pool, timeout_s, inflight_per_actor,
                   actor_retries) -> EdgeResult:
        queues = {cls: deque() for cls in pool}
        for job in jobs:
            queues[job.resource_class].append(job)
        inflight: dict[ray.ObjectRef, tuple[ClientJob, int, object]] = {}
        load = {id(a): 0 for actors in pool.values() for a in actors}
        position = {job.client_id: i for i, job in enumerate(jobs)}
        # A ClientActor whose process died is out of service until a probe (``pid``) answers, which
        # Ray holds until the restarted process is up; a probe that fails retires it for the round.
        probes: dict[ray.ObjectRef, object] = {}
        out_of_service: set[int] = set()
        retries: dict[int, int] = defaultdict(int)
        calls = actor_failures = 0

        def submit():
            nonlocal calls
            for cls, queue in queues.items():
                for actor in pool[cls]:
                    while queue and load[id(actor)] < inflight_per_actor and id(actor) not in out_of_service:
                        job = queue.popleft()
                        ref = actor.train.remote(run, refs, rnd, job, global_ref, self._self, self.node_id)
                        inflight[ref] = (job, position[job.client_id], actor)
                        load[id(actor)] += 1
                        calls += 1

        partial = strategy.init_partial()
        reports, failures = [], []
        arrived: dict[int, object] = {}   # position -> update, waiting for its predecessors
        settled: set[int] = set()         # positions that arrived or failed
        next_position = 0

        def fold_in_order():
            nonlocal partial, next_position
            while next_position in settled:
                if next_position in arrived:
                    partial = strategy.accumulate(partial, arrived.pop(next_position))
                next_position += 1

        def waiting_for_an_actor() -> bool:
            return bool(probes) and any(queues.values())

        deadline = time.monotonic() + timeout_s
        timed_out = False
        submit()
        while inflight or waiting_for_an_actor():
            ready, _ = ray.wait([*inflight, *probes], num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for ref, (job, _, _) in inflight.items():
                    ray.cancel(ref, force=False)
                    failures.append(ClientFailure(job.client_id, f"timeout after {timeout_s:.0f}s"))
                log.warning("edge %d round %d: %d clients timed out", self.edge_id, rnd, len(inflight))
                timed_out = True
                break
            ref = ready[0]
            if ref in probes:
                actor = probes.pop(ref)
                try:
                    ray.get(ref)
                    out_of_service.discard(id(actor))     # restarted: back in service
                except RayActorError:
                    log.warning("edge %d round %d: a ClientActor did not come back this round", self.edge_id, rnd)
                submit()
                continue
            job, pos, actor = inflight.pop(ref)
            load[id(actor)] -= 1
            cid = job.client_id
            try:
                update, report = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except RayActorError as exc:  # the process died or is restarting: the client did nothing wrong
                actor_failures += 1
                if id(actor) not in out_of_service:
                    out_of_service.add(id(actor))
                    probes[actor.pid.options(max_task_retries=-1).remote()] = actor   # waits out a restart
                if retries[cid] < actor_retries:
                    retries[cid] += 1
                    queues[job.resource_class].appendleft(job)
                    log.warning("edge %d round %d: client %d lost with its actor (%s); running it again",
                                self.edge_id, rnd, cid, type(exc).__name__)
                else:
                    settled.add(pos)
                    failures.append(ClientFailure(cid, f"{type(exc).__name__} on {retries[cid] + 1} actors"))
            except (RayTaskError, GetTimeoutError) as exc:
                settled.add(pos)
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                failures.append(ClientFailure(cid, reason))
                log.warning("edge %d round %d: client %d failed: %s", self.edge_id, rnd, cid, reason)
            else:
                settled.add(pos)
                arrived[pos] = update
                reports.append(report)
            fold_in_order()
            submit()
        for pos in sorted(arrived):  # after a timeout: what did arrive, still in order
            partial = strategy.accumulate(partial, arrived.pop(pos))
        # Assignments never submitted: the round ran out of time, or every actor of their class is dead.
        for queue in queues.values():
            failures += [ClientFailure(job.client_id, "timeout" if timed_out else "no live actor") for job in queue]
        return EdgeResult(self.edge_id, partial, tuple(reports), tuple(failures),
                          actor_calls=calls + sum(r.store_calls for r in reports), actor_failures=actor_failures)
