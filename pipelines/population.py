"""The client population, on plain data (no Ray): who the clients are and what strategies may
know of them.

- ``ClientProfile``: compute speed (examples per simulated second), uplink / downlink, availability
  and resource class of one virtual client; sampled from seeded log-normal distributions (the
  defaults are our choice, loosely after FedScale's device traces: a few-fold spread in speed
  and bandwidth) or loaded from a CSV / JSON trace with columns client_id, compute_speed,
  uplink_mbps, downlink_mbps, availability and optionally resource_class.
- ``PopulationView``: the read-only view a strategy gets in ``configure_round`` (profiles, local
  data sizes), so it can set per-client budgets from device profiles.

The virtual clock that turns profiles into simulated time is the runtime's (``actors.clock``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeray.errors import UserError

TRACE_COLUMNS = ("client_id", "compute_speed", "uplink_mbps", "downlink_mbps", "availability")


@dataclass(frozen=True)
class ClientProfile:
    client_id: int
    compute_speed: float      # examples per simulated second
    uplink_mbps: float
    downlink_mbps: float
    availability: float       # probability of being online in a round
    resource_class: str = "default"



@dataclass(frozen=True)
class PopulationView:
    """What a strategy may know of the clients: read-only (tuples of frozen profiles)."""

    profiles: tuple[ClientProfile, ...]
    sizes: tuple[int, ...]           # local training examples per client

    def __len__(self) -> int:
        return len(self.profiles)

    @property
    def resource_classes(self) -> tuple[str, ...]:
        return tuple(p.resource_class for p in self.profiles)


def sample_profiles(num_clients: int, seed: int, *, speed_median: float = 500.0, speed_sigma: float = 0.5,
                    uplink_median: float = 5.0, downlink_median: float = 20.0, bandwidth_sigma: float = 0.7,
                    min_availability: float = 1.0, resource_classes: dict[str, float] | None = None
                    ) -> list[ClientProfile]:
    """Seeded profiles; ``resource_classes`` maps class name -> fraction of clients."""
    rng = np.random.default_rng([seed, 7919])
    speeds = speed_median * rng.lognormal(0.0, speed_sigma, num_clients)
    up = uplink_median * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    down = downlink_median * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    avail = rng.uniform(min_availability, 1.0, num_clients) if min_availability < 1 else np.ones(num_clients)
    classes = ["default"] * num_clients
    if resource_classes:
        names = list(resource_classes)
        probs = np.array([resource_classes[n] for n in names], dtype=float)
        classes = [names[i] for i in rng.choice(len(names), size=num_clients, p=probs / probs.sum())]
    return [ClientProfile(i, float(speeds[i]), float(up[i]), float(down[i]), float(avail[i]), classes[i])
            for i in range(num_clients)]


def load_trace(path: str | Path, num_clients: int) -> list[ClientProfile]:
    """Profiles from a CSV or JSON trace; the trace must cover every client id 0..num_clients-1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"client trace not found: {path}")
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    elif path.suffix == ".csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
    else:
        raise UserError(f"client trace {path} must be .csv or .json")
    profiles = {}
    for i, row in enumerate(rows):
        missing = [c for c in TRACE_COLUMNS if c not in row]
        if missing:
            raise UserError(f"client trace {path} row {i} lacks {', '.join(missing)}; "
                            f"columns needed: {', '.join(TRACE_COLUMNS)}")
        try:
            p = ClientProfile(int(row["client_id"]), float(row["compute_speed"]), float(row["uplink_mbps"]),
                              float(row["downlink_mbps"]), float(row["availability"]),
                              str(row.get("resource_class") or "default"))
        except ValueError as exc:
            raise UserError(f"client trace {path} row {i}: {exc}") from None
        if min(p.compute_speed, p.uplink_mbps, p.downlink_mbps) <= 0 or not 0 <= p.availability <= 1:
            raise UserError(f"client trace {path} row {i}: speeds must be > 0 and availability in [0, 1]")
        profiles[p.client_id] = p
    absent = [c for c in range(num_clients) if c not in profiles]
    if absent:
        raise UserError(f"client trace {path} has no row for {len(absent)} of {num_clients} clients "
                        f"(first: {absent[:5]})")
    return [profiles[c] for c in range(num_clients)]


def save_trace(profiles: list[ClientProfile], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(p) for p in profiles]))
