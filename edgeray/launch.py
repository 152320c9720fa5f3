"""`edgeray main` / `edgeray down`: the main job through a local Ray head and Ray Jobs.

    edgeray main [--config FILE] [--set key=value ...] [--address http://HEAD:8265]
    edgeray down

``main`` starts a local Ray head with the dashboard (unless ``--address`` names a running one,
or ours is already up), submits the FL job through the Jobs API, prints the dashboard URL, the
job id and the run directory, and follows the run's rounds with a progress bar until the job
ends. The head stays up afterwards so the dashboard can be browsed; ``edgeray down`` stops it
(only it: never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgeray.argparse_util import ArgumentParser
from edgeray.errors import UserError
from edgeray.localhead import LocalHead, auth_token

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".cache" / "head.json"
DEFAULT_CONFIG = "configs/fedavg_mnist.yaml"


def _job_client(address: str):
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {auth_token()}"})
    except Exception as exc:  # connection refused, 401, wrong URL
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {' '.join(str(exc).split())[:300]}") from None


def _running_head() -> dict | None:
    if not STATE.is_file():
        return None
    state = json.loads(STATE.read_text())
    try:
        os.kill(state["pid"], 0)
    except (ProcessLookupError, PermissionError):
        STATE.unlink()
        return None
    return state


def start_head(dashboard_port: int) -> str:
    state = _running_head()
    if state:
        return state["dashboard_url"]
    print("starting a local Ray head (dashboard, token auth on) ...", flush=True)
    head = LocalHead(gcs_port=6379, dashboard_port=dashboard_port, metrics_port=8090).start()
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"pid": head.proc.pid, "temp_dir": head.temp_dir,
                                 "dashboard_url": head.dashboard_url, "metrics_url": head.metrics_url}))
    return head.dashboard_url


def stop_head() -> int:
    state = _running_head()
    if not state:
        print("no edgeray-started Ray head is running")
        return 0
    try:
        os.killpg(state["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    time.sleep(3)
    subprocess.run(["pkill", "-9", "-f", state["temp_dir"]], check=False)
    STATE.unlink(missing_ok=True)
    print(f"stopped the Ray head at {state['dashboard_url']}")
    return 0


def follow(client, job_id: str, rounds: int, timeout_s: float) -> tuple[str, Path | None]:
    """Wait for the job, showing a bar of completed rounds read from the run's metrics.jsonl."""
    from tqdm import tqdm

    run_dir, bar, status = None, tqdm(total=rounds, desc="rounds", unit="round"), "PENDING"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            status = str(client.get_job_status(job_id)).split(".")[-1]
            if run_dir is None:
                found = re.search(r"run directory: (\S+)", client.get_job_logs(job_id))
                run_dir = Path(found.group(1)) if found else None
            if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
                rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
                done = max((r["round"] for r in rows), default=0)
                bar.update(done - bar.n)
                if rows and "test_accuracy" in rows[-1]:
                    bar.set_postfix(acc=f"{rows[-1]['test_accuracy']:.4f}", status=status)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1.0)
    finally:
        bar.close()
    return status, run_dir


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="edgeray main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"FL config (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--address", help="dashboard URL of a running head (default: start a local one)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the job")
    args = parser.parse_args(argv)

    from actors.config import FLConfig
    from edgeray.config import load_config

    config = (ROOT / args.config) if not Path(args.config).is_absolute() else Path(args.config)
    cfg = load_config(FLConfig, config, args.overrides)          # bad input fails here, before Ray
    data_path = None if cfg.data.path is None else \
        Path(cfg.data.path) if Path(cfg.data.path).is_absolute() else ROOT / cfg.data.path
    if data_path is not None and not data_path.exists():
        raise UserError(f"data file not found: {data_path} (data.path); run scripts/setup.sh to fetch MNIST")
    output_dir = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir

    address = args.address or start_head(args.dashboard_port)
    client = _job_client(address)
    # data/, runs/ and .venv are git-ignored, so Ray leaves them out of the working-dir upload;
    # absolute paths point the job at the data and the run directory on this machine.
    entrypoint = " ".join([sys.executable, "-m", "edgeray.cli", "run", cfg.strategy.name, "--config", str(config),
                           *[f"--set {o}" for o in args.overrides],
                           *([f"--set data.path={data_path}"] if data_path else []),
                           f"--set output_dir={output_dir}", "--no-progress"])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)},
                               metadata={"edgeray": "main"})
    print(f"dashboard:  {address}  (token: ~/.ray/auth_token)\njob id:     {job_id}\n"
          f"follow:     RAY_AUTH_MODE=token ray job logs --address {address} -f {job_id}", flush=True)
    status, run_dir = follow(client, job_id, cfg.rounds, args.timeout)
    if status != "SUCCEEDED":
        tail = client.get_job_logs(job_id)[-3000:]
        print(tail, file=sys.stderr)
        raise UserError(f"job {job_id} ended {status}; its log tail is above")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"results:    {run_dir}  (summary.json, metrics.jsonl, plots/)\n"
          f"accuracy:   {summary['final_test_accuracy']:.4f} after {summary['final_round']} rounds, "
          f"{summary['wall_s']:.0f}s wall, {summary['sim_time_s']:.0f}s simulated\n"
          f"the Ray head keeps running for the dashboard; stop it with: edgeray down", flush=True)
    return 0
