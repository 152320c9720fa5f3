"""Run directories, one scheme for FL and RL runs::

    runs/<run_id>/
      run.json        what the run is: {"run_id", "kind" ("fl" | "rl"), "method", "argv", "created"}
      config.yaml     the resolved config (what `--resume` reads back)
      metrics.jsonl   one row per round / iteration (numpy scalars and arrays are written as numbers / lists)
      checkpoints/    summary.json    plots/

``new_run_dir`` creates one, ``open_run_dir`` checks one before a resume (is it a run, of this
kind and method?), so every entry point fails on a wrong directory with the same one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from edgeray.errors import UserError

log = logging.getLogger("edgeray.runs")


RUN_INFO = "run.json"
KINDS = ("fl", "rl")


def new_run_dir(root: str | Path, name: str, *, kind: str, method: str, argv: list[str] | None = None) -> Path:
    """A fresh ``<root>/<name>-<date>-<time>-<pid>`` with run.json, checkpoints/ and plots/."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"
    path, k = Path(root) / base, 1
    while path.exists():
        path, k = Path(root) / f"{base}-{k}", k + 1
    (path / "checkpoints").mkdir(parents=True)
    (path / "plots").mkdir()
    write_json(path / RUN_INFO, {"run_id": path.name, "kind": kind, "method": method,
                                 "argv": list(sys.argv if argv is None else argv),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return path


def run_info(path: str | Path) -> dict:
    """The run.json of a run directory (UserError when it is not one)."""
    path = Path(path)
    if not (path / "config.yaml").is_file() or not (path / RUN_INFO).is_file():
        raise UserError(f"{path} is not a run directory (it needs config.yaml and {RUN_INFO}); "
                        f"pass a runs/<run_id> folder")
    try:
        return json.loads((path / RUN_INFO).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / RUN_INFO} is not valid JSON: {exc}") from None


def open_run_dir(path: str | Path, *, kind: str, method: str | None = None) -> Path:
    """Check that ``path`` is a run of ``kind`` (and ``method``, when given) before resuming it."""
    info = run_info(path)
    if info.get("kind") != kind:
        raise UserError(f"{path} is a {info.get('kind')!r} run, not {kind!r}")
    if method is not None and info.get("method") != method:
        raise UserError(f"{path} is a {info.get('method')!r} run, not {method!r}")
    return Path(path)


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


def _plain(value):
    """json.dumps' fallback: numpy scalars and arrays as numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, default=_plain) + "\n" for r in rows))
    os.replace(tmp, path / "metrics.jsonl")


def append_metrics(path: Path, row: dict) -> None:
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, default=_plain) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain))
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
