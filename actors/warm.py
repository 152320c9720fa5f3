"""Warm actors: keep the runtime's processes alive between runs on a long-lived cluster.

Starting a run's actors costs seconds on a small machine: every actor is a new Python process
that imports torch (about 1 s of CPU each). On a cluster that outlives the run (the head that
``edgeray main`` starts, or any ``--address``), the actors are instead *detached* and named by a
fingerprint of the code they run, so the next run finds them already started and only binds
them to its own data.

What makes this safe:
- Every actor is run-agnostic: a run is a key (the name of its ``ClientStateStore``) passed in
  every call with the refs of the run's data and binding (strategy, model spec, seed); an actor
  (re)binds to that run lazily, on the first call it gets for it. A restarted actor therefore
  needs nothing but its next call, and two runs sharing the pool at the same time stay correct
  (each call uses its own run's strategy, model and data).
- The fingerprint covers the source of ``actors/``, ``pipelines/``, ``edgeray/`` and ``rl/``, the
  modules of the run's strategy, model and evaluation wherever they live, and the versions of
  Python and of the libraries a run may import (torch, transformers, peft, hmmlearn, numpy,
  ray): edit the code or upgrade a library and the next run gets a fresh pool (the stale one
  exits when idle).
- A warm actor ends itself after ``idle_exit_s`` without calls, so it does not hold CPUs on a
  shared cluster for longer than that; ``edgeray down`` ends them with the head.
- Pools of another code version hold CPUs the new pool needs: every run starts by retiring the
  pools that no live run uses (a run's store is named ``edgeray-run-<fingerprint>-<id>`` and dies
  with the run's driver, so a crashed driver does not keep its pool alive).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

NAMESPACE = "edgeray"  # stores and warm actors live here, so actors of any job can find them
PACKAGES = ("actors", "pipelines", "edgeray", "rl")
LIBRARIES = ("torch", "transformers", "peft", "hmmlearn", "numpy", "ray")
ROOT = Path(__file__).resolve().parents[1]


def library_versions() -> str:
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name}=absent")
    return "|".join(versions)


def code_fingerprint(strategy, task) -> str:
    """12 hex digits over the runtime's source, the modules of the strategy (a built strategy or a
    ``pipelines.registry.StrategySpec``) and the task (a ``TaskSpec``), and the library versions."""
    digest = hashlib.sha256(f"{sys.version}|{library_versions()}".encode())
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    extra = strategy.source_files() if hasattr(strategy, "source_files") else [inspect.getsourcefile(type(strategy))]
    known = {f.resolve() for f in files}
    files += [Path(f) for f in sorted({*extra, *task.source_files()} - {None}) if Path(f).resolve() not in known]
    for path in files:
        digest.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_key(fingerprint: str | None) -> str:
    """A new run's key (its store's name); ``cold`` for a run that uses no warm pool."""
    return f"edgeray-run-{fingerprint or 'cold'}-{uuid.uuid4().hex[:12]}"


def warm_options(fingerprint: str, kind: str) -> dict:
    """``.options(...)`` of a warm actor: detached, named, found again by the next run."""
    return {"name": f"edgeray-warm-{fingerprint}-{kind}", "namespace": NAMESPACE, "lifetime": "detached",
            "get_if_exists": True}


def retire_unused_pools(keep: str | None = None) -> list[str]:
    """Kill the warm actors of every fingerprint but ``keep`` that no live run's store names;
    returns their names."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    in_use = {name.split("-")[2] for name in names if name.startswith("edgeray-run-")} | {keep}
    retired = [name for name in names if name.startswith("edgeray-warm-") and name.split("-")[2] not in in_use]
    for name in retired:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # it ended on its own meanwhile
            pass
    return retired


class IdleExit:
    """Mixin for actors: ``busy()`` around every call; after ``idle_exit_s`` with no call in
    progress the actor kills itself for good (no restart). ``idle_exit_s=None``: never."""

    def start_idle_exit(self, idle_exit_s: float | None) -> None:
        self._calls_in_progress = 0
        self._last_call = time.monotonic()
        self._idle_lock = threading.Lock()
        if idle_exit_s:
            threading.Thread(target=self._exit_when_idle, args=(idle_exit_s,), daemon=True).start()

    def pid(self) -> int:
        """A probe: the run starting on this actor calls it first (which also resets the idle clock)."""
        with self.busy():
            return os.getpid()

    @contextmanager
    def busy(self):
        with self._idle_lock:
            self._calls_in_progress += 1
        try:
            yield
        finally:
            with self._idle_lock:
                self._calls_in_progress -= 1
                self._last_call = time.monotonic()

    def _exit_when_idle(self, idle_exit_s: float) -> None:
        import ray

        while True:
            time.sleep(min(5.0, idle_exit_s / 4))
            with self._idle_lock:
                idle = self._calls_in_progress == 0 and time.monotonic() - self._last_call > idle_exit_s
            if idle:
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


class RunHandle:
    """An actor handle with the run key bound as the first argument of every method:
    ``RunHandle(aggregator, run).run_round.remote(3)`` calls ``run_round(run, 3)``."""

    def __init__(self, actor, run: str):
        self.actor, self.run = actor, run

    def __getattr__(self, method: str) -> "_BoundMethod":
        return _BoundMethod(getattr(self.actor, method), self.run)


class _BoundMethod:
    def __init__(self, method, run: str):
        self.method, self.run = method, run

    def remote(self, *args, **kwargs):
        return self.method.remote(self.run, *args, **kwargs)
