"""Two Ray nodes on this machine — a head and a worker node, separate `ray start` processes with
their own CPUs, ports and temp dirs (never `ray stop`) — and the FL job through Ray Jobs: its
client pool spans both nodes, the metrics say which node trained how many clients, and when the
worker node's raylet is SIGKILLed mid-run the run completes on the head's actors, counting what was
lost. A driver killed mid-run and resumed ends where an uninterrupted run ends."""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgeray.localhead import LocalHead, LocalNode, auth_token

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
# 4 half-CPU ClientActors: 2 on each 1-CPU node. Rounds of ~1-2 s, so a kill lands mid-run.
JOB = ["--config", "configs/fedavg_digits.yaml", "--set", "rounds=8", "--set", "data.num_clients=16",
       "--set", "strategy.clients_per_round=8", "--set", "strategy.local_epochs=6",
       "--set", "runtime.num_edge_servers=2", "--set", "runtime.edge_overlap=0",
       "--set", "runtime.resource_classes.default.num_actors=4", "--set", "runtime.warm_pool=off"]


@pytest.fixture(scope="module")
def head():
    head = LocalHead(gcs_port=6393, dashboard_port=8278, metrics_port=8098, client_port=20204, agent_port=52404,
                     num_cpus=1).start()
    yield head
    head.stop()


@pytest.fixture
def worker_node(head):
    node = LocalNode(head, num_cpus=1, node_manager_port=6411, object_manager_port=6412, metrics_port=8099,
                     agent_port=52405, min_worker_port=21100, max_worker_port=21199).start()
    yield node
    node.stop()


def _api(head, path: str, body: dict | None = None, method: str = "GET") -> dict:
    request = urllib.request.Request(f"{head.dashboard_url}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {auth_token()}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read().decode() or "{}")


def submit(head, output_dir: Path | None = None, resume: Path | None = None) -> str:
    run = ["--resume", str(resume)] if resume else [*JOB, "--set", f"output_dir={output_dir}"]
    entrypoint = " ".join([sys.executable, "-m", "edgeray.cli", "run", "fedavg", *run, "--no-progress"])
    return jobs_client(head).submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})


def jobs_client(head):
    import os

    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_AUTH_MODE"] = "token"
    return JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {auth_token()}"})


def wait(head, job_id: str, until=None, timeout_s: float = 900) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = _api(head, f"/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or (until is not None and until()):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s:.0f}s")


def rows(output_dir: Path) -> list[dict]:
    found = list(output_dir.glob("*/metrics.jsonl"))
    return [json.loads(x) for x in found[0].read_text().splitlines() if x.strip()] if found else []


def test_pool_spans_both_nodes_and_survives_losing_one(head, worker_node, tmp_path):
    def alive_nodes() -> int:
        return sum(n["raylet"]["state"] == "ALIVE" for n in _api(head, "/nodes?view=summary")["data"]["summary"])

    deadline = time.time() + 60
    while alive_nodes() < 2:                                 # the dashboard learns of the node a little later
        assert time.time() < deadline, "the worker node never showed in the dashboard"
        time.sleep(1)
    job = submit(head, tmp_path)
    status = wait(head, job, until=lambda: len(rows(tmp_path)) >= 3)        # round 0 (evaluation) + 2 rounds
    assert status == "RUNNING", (_api(head, f"/api/jobs/{job}")["message"], _api(head, f"/api/jobs/{job}/logs")["logs"][-3000:])
    worker_node.kill()
    killed_after = len(rows(tmp_path)) - 1
    status = wait(head, job)
    assert status == "SUCCEEDED", _api(head, f"/api/jobs/{job}/logs")["logs"][-3000:]

    metrics = rows(tmp_path)[1:]
    assert len({node for r in metrics[:killed_after] for node in r["clients_by_node"]}) == 2  # both nodes trained
    after = metrics[killed_after:]
    assert sum(r["actor_failures"] + r["clients_failed"] for r in after) >= 1                  # the loss is counted
    assert len(after[-1]["clients_by_node"]) == 1                                             # the head carries on
    assert all(r["clients_completed"] + r["clients_failed"] == r["clients_selected"] for r in metrics)
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["final_round"] == 8 and summary["final_test_accuracy"] > 0.8


def test_resume_after_driver_kill_matches_uninterrupted_on_two_nodes(head, worker_node, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert wait(head, submit(head, whole)) == "SUCCEEDED"
    job = submit(head, broken)                                              # checkpoints every round
    wait(head, job, until=lambda: len(rows(broken)) >= 4)
    _api(head, f"/api/jobs/{job}/stop", {}, "POST")                         # the driver is killed
    assert wait(head, job) == "STOPPED"
    (run_dir,) = broken.iterdir()
    assert len(rows(broken)) < 9
    resumed = submit(head, resume=run_dir)
    assert wait(head, resumed) == "SUCCEEDED", _api(head, f"/api/jobs/{resumed}/logs")["logs"][-3000:]
    want, got = rows(whole), rows(broken)
    assert [r["round"] for r in got] == list(range(9))
    for a, b in zip(want, got):
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-6)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)


def test_serve_app_with_a_replica_on_each_node_keeps_answering_when_one_node_dies(head, worker_node, tmp_path):
    """SVD (tiny model) with two replicas, at most one per node, deployed with `serve deploy`: requests
    keep being answered while the worker node's raylet is SIGKILLed."""
    import os
    import threading

    port = 18131
    config = tmp_path / "serve.yaml"
    config.write_text(json.dumps({   # JSON is YAML
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "svd-two-nodes", "route_prefix": "/", "import_path": "serving.svd.app:app_builder",
                          "args": {"config": str(ROOT / "configs" / "svd_tiny.yaml"), "serve.num_cpus": 0.25},
                          "deployments": [{"name": "SVDServer", "num_replicas": 2, "max_replicas_per_node": 1}]}]}))
    serve = [str(Path(sys.executable).with_name("serve"))]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    deployed = subprocess.run([*serve, "deploy", str(config), "-a", head.dashboard_url], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stderr[-2000:]

    def complete() -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                         data=json.dumps({"model": "tiny", "prompt": "1 2 3", "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def replica_nodes() -> set[str]:
        apps = _api(head, "/api/serve/applications/")["applications"]
        deployment = apps.get("svd-two-nodes", {}).get("deployments", {}).get("SVDServer", {})
        return {r["node_id"] for r in deployment.get("replicas", []) if r["state"] == "RUNNING"}

    try:
        deadline = time.time() + 300
        while len(replica_nodes()) < 2 or complete() != 200:
            assert time.time() < deadline, f"two replicas on two nodes never ran: {replica_nodes()}"
            time.sleep(2)
        statuses, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                statuses.append(complete())

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(3)
        before = len(statuses)
        worker_node.kill()
        time.sleep(20)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        after = statuses[before:]
        assert len(after) >= 10, f"only {len(after)} requests finished after the node died"
        assert after.count(200) >= 0.9 * len(after), f"status counts after the kill: {sorted(set(after))}"
        assert set(after[-10:]) == {200}                               # the survivor carries the load
    finally:
        subprocess.run([*serve, "shutdown", "-a", head.dashboard_url, "-y"], env=env, capture_output=True,
                       timeout=120)
