"""Live run metrics for the Ray dashboard and its Prometheus endpoint (``ray.util.metrics``).

Tagged by method and run id only: never per client (label cardinality). Ray exports them with
the ``ray_`` prefix, e.g. ``ray_edgeray_round_seconds_bucket{method="fedavg",run_id="..."}``.
"""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram

TAG_KEYS = ("method", "run_id")
SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600]


@cache
def _instruments():
    """Registered once per process (a warm aggregator records many runs)."""
    return _Instruments()


class _Instruments:
    def __init__(self):
        self.round_seconds = Histogram("edgeray_round_seconds", "wall time of one FL round", SECONDS, TAG_KEYS)
        self.aggregate_seconds = Histogram("edgeray_aggregate_seconds", "wall time of the server aggregation",
                                           SECONDS, TAG_KEYS)
        self.clients_selected = Gauge("edgeray_clients_selected", "clients invited in the last round", TAG_KEYS)
        self.clients_completed = Counter("edgeray_clients_completed", "client updates aggregated", TAG_KEYS)
        self.clients_failed = Counter("edgeray_clients_failed", "client assignments that failed", TAG_KEYS)
        self.bytes_up = Counter("edgeray_bytes_up_total", "bytes sent by clients", TAG_KEYS)
        self.bytes_down = Counter("edgeray_bytes_down_total", "bytes sent to clients", TAG_KEYS)


class RoundMetrics:
    def __init__(self, method: str, run_id: str):
        self.tags = {"method": method, "run_id": run_id}

    def record(self, row: dict) -> None:
        m = _instruments()
        m.round_seconds.observe(row["round_wall_s"], self.tags)
        m.aggregate_seconds.observe(row["aggregate_s"], self.tags)
        m.clients_selected.set(row["clients_selected"], self.tags)
        # Counter.inc rejects 0, so only positive increments are sent.
        for counter, key in ((m.clients_completed, "clients_completed"), (m.clients_failed, "clients_failed"),
                             (m.bytes_up, "bytes_up"), (m.bytes_down, "bytes_down")):
            if row[key] > 0:
                counter.inc(row[key], self.tags)
