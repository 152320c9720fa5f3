"""Run directories: ``runs/<run_id>/`` with config.yaml, metrics.jsonl, checkpoints/, summary.json,
plots/. Shared by every pipeline and RL method.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from edgeray.errors import UserError

log = logging.getLogger("edgeray.runs")


def new_run_dir(root: str | Path, name: str) -> Path:
    run_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
    path = Path(root) / run_id
    (path / "checkpoints").mkdir(parents=True)
    (path / "plots").mkdir()
    return path


def existing_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UserError(f"cannot resume {path}: it is not a run directory (no config.yaml)")
    return path


def read_metrics(path: Path) -> list[dict]:
    file = path / "metrics.jsonl"
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a row cut off by a crash: everything after it is dropped
    return rows


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path / "metrics.jsonl")


def append_metrics(path: Path, row: dict) -> None:
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def checkpoint_path(run_dir: str | Path, rnd: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{rnd:05d}.pt"


def load_latest_checkpoint(checkpoint_dir: str | Path) -> dict | None:
    """The newest checkpoint that loads; a truncated or corrupt one is skipped (and logged)."""
    import torch  # only the processes that read checkpoints pay for it

    for file in sorted(Path(checkpoint_dir).glob("round_*.pt"), reverse=True):
        try:
            return torch.load(file, weights_only=False)
        except Exception as exc:  # truncated zip, bad pickle: fall back to the previous one
            log.warning("checkpoint %s is unreadable (%s); using the previous one", file, type(exc).__name__)
    return None


def prune_checkpoints(checkpoint_dir: str | Path, keep: int) -> None:
    for file in sorted(Path(checkpoint_dir).glob("round_*.pt"))[:-keep]:
        file.unlink()


def plot_curves(rows: list[dict], x_keys: list[tuple[str, str]], y_key: str, path: Path, title: str) -> None:
    """One PNG with a panel per x axis (e.g. round and simulated time) for ``y_key``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if y_key in r]
    fig, axes = plt.subplots(1, len(x_keys), figsize=(5 * len(x_keys), 3.6), squeeze=False)
    for ax, (x_key, label) in zip(axes[0], x_keys):
        ax.plot([r[x_key] for r in rows], [r[y_key] for r in rows], marker="o", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel(y_key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
