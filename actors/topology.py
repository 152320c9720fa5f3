"""Who talks to whom: the client actor pool plan and edge-server coverage (no Ray).

- ``plan_pool``: how many ClientActors of each resource class to start, from the cluster's
  resources and the per-class request (``num_actors: 0`` means "as many as fit").
- ``assign_edges``: per round, each kept client goes to the covering server with the fewest
  clients so far (balanced; ties to the lower id); with ``sticky`` to its home edge (the first
  of its coverage) while that edge lives.
Coverage geometry itself is the population's (``pipelines.population``).
"""

from __future__ import annotations

import numpy as np

from edgeray.errors import UserError


def plan_pool(classes: dict[str, dict], total_cpus: float, total_gpus: float) -> dict[str, int]:
    """``classes``: name -> {"num_cpus", "num_gpus", "num_actors"}; returns name -> actor count."""
    counts, cpus_left, gpus_left = {}, total_cpus, total_gpus
    for name, c in classes.items():
        if c["num_gpus"] > total_gpus:
            raise UserError(f"resource class {name!r} asks {c['num_gpus']} GPU per actor but the cluster has "
                            f"{total_gpus:g} GPUs; lower runtime.resource_classes.{name}.num_gpus")
        if c["num_cpus"] > total_cpus:
            raise UserError(f"resource class {name!r} asks {c['num_cpus']} CPUs per actor but the cluster has "
                            f"{total_cpus:g}; lower runtime.resource_classes.{name}.num_cpus")
        if c["num_actors"] > 0:
            counts[name] = c["num_actors"]
            cpus_left -= c["num_actors"] * c["num_cpus"]
            gpus_left -= c["num_actors"] * c["num_gpus"]
    auto = [n for n, c in classes.items() if c["num_actors"] <= 0]
    for name in auto:
        c = classes[name]
        share_cpu, share_gpu = max(cpus_left, 0) / len(auto), max(gpus_left, 0) / len(auto)
        fit = [share_cpu / c["num_cpus"]] if c["num_cpus"] > 0 else []
        fit += [share_gpu / c["num_gpus"]] if c["num_gpus"] > 0 else []
        counts[name] = max(1, int(min(fit) + 1e-9)) if fit else 1
    return counts


def assign_edges(clients: list[int], coverage: list[list[int]], num_edges: int, sticky: bool = False
                 ) -> dict[int, list[int]]:
    """``coverage``: the live edges covering each client, its home edge first when it lives."""
    load = {e: [] for e in range(num_edges)}
    for cid in sorted(clients, key=lambda c: (len(coverage[c]), c)):
        edge = coverage[cid][0] if sticky else min(coverage[cid], key=lambda e: (len(load[e]), e))
        load[edge].append(cid)
    return load
