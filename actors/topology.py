"""Who talks to whom: the client actor pool plan and edge-server coverage (no Ray).

- ``plan_pool``: how many ClientActors of each resource class to start, from the cluster's
  resources and the per-class request (``num_actors: 0`` means "as many as fit").
- ``edge_coverage``: each client is covered by its home edge server (client id mod S) plus
  ``overlap`` extra servers drawn with a seed, so coverage sets may overlap.
- ``assign_edges``: per round, each kept client goes to the covering server with the fewest
  clients so far (balanced; ties to the lower id).
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


def edge_coverage(num_clients: int, num_edges: int, overlap: int, seed: int) -> list[list[int]]:
    if overlap >= num_edges and num_edges > 1:
        raise UserError(f"runtime.edge_overlap={overlap} must be < runtime.num_edge_servers={num_edges}")
    rng = np.random.default_rng([seed, 104729])
    coverage = []
    for cid in range(num_clients):
        home = cid % num_edges
        others = [e for e in range(num_edges) if e != home]
        extra = rng.choice(others, size=overlap, replace=False).tolist() if overlap and others else []
        coverage.append(sorted([home, *extra]))
    return coverage


def assign_edges(clients: list[int], coverage: list[list[int]], num_edges: int) -> dict[int, list[int]]:
    load = {e: [] for e in range(num_edges)}
    for cid in sorted(clients, key=lambda c: (len(coverage[c]), c)):
        edge = min(coverage[cid], key=lambda e: (len(load[e]), e))
        load[edge].append(cid)
    return load
