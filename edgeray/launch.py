"""`edgeray main` / `edgeray down`: the whole service from one command.

    edgeray main [--config FILE] [--set key=value ...] [--no-serve] [--serve-config FILE]
                 [--address http://HEAD:8265] [--dashboard-port 8265] [--serve-port 8000] ...
    edgeray down

``main`` checks the FL config and the Serve deploy config first (bad input fails before any Ray
starts), then:

1. starts a local Ray head with the dashboard and token auth (unless ``--address`` names a
   running one, or ours is already up), and a Prometheus server on Ray's generated
   service-discovery file when the ``prometheus`` binary is installed (else it says so);
2. deploys the Serve apps from a ``serve deploy`` config (``serving/deploy.yaml``: SVD's OpenAI
   API under ``/v1``, SIDeR under ``/sider``) with the apps' CPU requests fitted to the machine
   (``fit_serve``), and prints each endpoint with a ready-to-paste ``curl`` and ``openai`` call;
   ``--no-serve`` skips this;
3. submits the FL job through Ray Jobs with its actor pool fitted to the CPUs Serve leaves
   (``fit_pool``), prints the dashboard URL, the job id and the run directory, and follows the
   rounds with a progress bar until the job ends.

The head, Prometheus and the Serve apps stay up afterwards; ``edgeray down`` stops what ``main``
started (only it: never `ray stop`, which would end every Ray on the machine).

Sizing (our design, not Ray's): Ray CPUs are a reservation, and an app or a job that reserves
more than the machine has waits forever (on 2 cores, ``edgeray serve all`` left SVD's warm-start
tasks queued). When the FL job shares the machine with Serve, the replicas together reserve at
most ``SERVE_CPU_SHARE`` of the CPUs (scaled down proportionally, fractional CPUs), and the FL
pool keeps the actor count it would get on the whole machine with each actor's CPU request
scaled to what is left. Anything that would drop below ``MIN_REPLICA_CPUS`` /
``MIN_ACTOR_CPUS`` is refused with the numbers, before anything starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from edgeray.argparse_util import ArgumentParser
from edgeray.errors import UserError
from edgeray.localhead import LocalHead, answers, auth_token, client_env, start_daemon

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/fedavg_mnist.yaml"
DEFAULT_SERVE_CONFIG = "serving/deploy.yaml"
# Where `main` records what it started, for `down`; EDGERAY_STATE moves it (tests use their own).
STATE = Path(os.environ.get("EDGERAY_STATE", ROOT / ".cache" / "head.json"))

SERVE_CPU_SHARE = 0.25   # most of the machine's CPUs the Serve replicas reserve beside the FL job
MIN_REPLICA_CPUS = 0.05  # below this a replica's reservation means nothing: refuse instead
MIN_ACTOR_CPUS = 0.1     # below this a ClientActor would be starved by the replicas: refuse instead
# The app argument that holds one replica's CPU request, per app builder (their own documented args).
CPU_ARG = {"serving.svd.app:app_builder": "serve.num_cpus", "serving.sider.app:app_builder": "num_cpus"}
READY_STATES = ("RUNNING",)
FAILED_STATES = ("DEPLOY_FAILED", "UNHEALTHY")


# ----------------------------------------------------------------------------- sizing

def _floor2(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def load_deploy_config(path: Path) -> dict:
    """A `serve deploy` config, checked against Serve's own schema (a bad file fails here)."""
    if not path.is_file():
        raise UserError(f"Serve deploy config not found: {path} (--serve-config)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"Serve deploy config {path} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
            else ServeDeploySchema.parse_obj(raw)
    except (ValidationError, Exception) as exc:  # pydantic v1/v2 both end up here
        first = " ".join(str(exc).split())[:300]
        raise UserError(f"Serve deploy config {path} does not match Serve's schema: {first}") from None
    return raw


def absolute_configs(deploy: dict) -> dict:
    """The deploy config with each app's relative ``config`` path made absolute (from the repo
    root): Serve builds the apps in its controller, whose working directory is not ours."""
    for app in deploy.get("applications", []):
        args = app.get("args") or {}
        if isinstance(args.get("config"), str) and not Path(args["config"]).is_absolute():
            args["config"] = str(_resolve(args["config"]))
    return deploy


def serve_cpu_requests(deploy: dict) -> list[tuple[str, int, float]]:
    """(app name, replicas, CPUs per replica) of every app, read from the app args."""
    out = []
    for app in deploy.get("applications", []):
        args = app.get("args") or {}
        key = CPU_ARG.get(app["import_path"])
        cpus = float(args.get(key, 1.0)) if key else 1.0
        out.append((app["name"], int(args.get("num_replicas", 1)), cpus))
    return out


def fit_serve(deploy: dict, total_cpus: float, share: float = SERVE_CPU_SHARE) -> tuple[dict, float]:
    """The deploy config with each replica's CPU request scaled so that all replicas together
    reserve at most ``share * total_cpus``; returns (config, CPUs the replicas reserve)."""
    deploy = json.loads(json.dumps(deploy))
    requests = serve_cpu_requests(deploy)
    asked = sum(r * c for _, r, c in requests)
    cap = share * total_cpus
    scale = min(1.0, cap / asked) if asked > 0 else 1.0
    reserved = 0.0
    for app, (name, replicas, cpus) in zip(deploy.get("applications", []), requests):
        key = CPU_ARG.get(app["import_path"])
        if key is None:
            if cpus * scale < cpus:
                raise UserError(f"Serve app {name!r} ({app['import_path']}) has no known CPU argument; "
                                f"edgeray can fit only {', '.join(CPU_ARG)}")
            continue
        fitted = _floor2(cpus * scale) if scale < 1 else cpus
        if cpus > 0 and fitted < MIN_REPLICA_CPUS:
            raise UserError(f"the Serve apps ask {asked:g} CPUs but beside the FL job they may reserve "
                            f"{cap:g} of this machine's {total_cpus:g}: app {name!r} would get {fitted:g} CPU per "
                            f"replica (< {MIN_REPLICA_CPUS}); use fewer replicas, a bigger machine, or --no-serve")
        app.setdefault("args", {})[key] = fitted
        reserved += replicas * fitted
    return deploy, reserved


def fit_pool(classes: dict, total_cpus: float, total_gpus: float, budget: float) -> dict | None:
    """The FL job's resource classes fitted into ``budget`` CPUs: the actor count the whole
    machine would give (so the run is the same run), each actor's CPUs scaled down. None when
    the classes fit as they are."""
    from actors.topology import plan_pool

    counts = plan_pool(classes, total_cpus, total_gpus)
    demand = sum(counts[n] * c["num_cpus"] for n, c in classes.items())
    if demand <= budget + 1e-9:
        return None
    scale = budget / demand
    fitted = {}
    for name, c in classes.items():
        cpus = _floor2(c["num_cpus"] * scale) if c["num_cpus"] > 0 else 0.0
        if c["num_cpus"] > 0 and cpus < MIN_ACTOR_CPUS and c["num_gpus"] == 0:
            raise UserError(f"the FL job's {counts[name]} ClientActors of class {name!r} would get {cpus:g} CPU each "
                            f"({budget:g} of {total_cpus:g} CPUs are left beside Serve; < {MIN_ACTOR_CPUS}); "
                            f"set runtime.resource_classes.{name}.num_actors lower, or use --no-serve")
        fitted[name] = {**c, "num_cpus": cpus, "num_actors": counts[name]}
    return fitted


# ----------------------------------------------------------------------------- state and the head

def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _running_head() -> dict | None:
    if not STATE.is_file():
        return None
    state = json.loads(STATE.read_text())
    if not _alive(state.get("pid")):
        _stop_prometheus(state)
        STATE.unlink()
        return None
    return state


def _save_state(state: dict) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state))


def start_head(dashboard_port: int, gcs_port: int, metrics_port: int, prometheus_port: int) -> dict:
    state = _running_head()
    if state:
        return state
    print("starting a local Ray head (dashboard, token auth on) ...", flush=True)
    offset = gcs_port - 6379   # the Ray client and dashboard agent ports move with the GCS port
    head = LocalHead(gcs_port=gcs_port, dashboard_port=dashboard_port, metrics_port=metrics_port,
                     client_port=20201 + offset, agent_port=52401 + offset,
                     extra_env={"RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{prometheus_port}"}).start()
    state = {"pid": head.proc.pid, "temp_dir": head.temp_dir, "dashboard_url": head.dashboard_url,
             "metrics_url": head.metrics_url, "gcs_address": f"127.0.0.1:{gcs_port}"}
    _save_state(state)
    state.update(_start_prometheus(head.temp_dir, prometheus_port))
    state["grafana_dashboards"] = str(install_grafana_dashboard(head.temp_dir) or "")
    _save_state(state)
    return state


def end_head_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM a head's process group, then SIGKILL what of its tree (GCS, raylet, dashboard, and
    the workers: Serve, jobs, the warm pool) is left after ``grace_s``."""
    import psutil

    try:
        head = psutil.Process(pid)
        tree = [*head.children(recursive=True), head]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:   # a worker renames itself (ray::ServeReplica...), so only its pid finds it
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def stop_head() -> int:
    """`edgeray down`: Prometheus, then the head (and with it Serve, the warm pool, the jobs)."""
    state = _running_head()
    if not state:
        print("no edgeray-started Ray head is running")
        return 0
    _stop_prometheus(state)
    end_head_tree(state["pid"])
    # Ray's daemons may have left the process group: end only what names our own temp dir.
    subprocess.run(["pkill", "-9", "-f", state["temp_dir"]], check=False)
    STATE.unlink(missing_ok=True)
    print(f"stopped the Ray head at {state['dashboard_url']} (with its Serve apps and jobs)")
    return 0


# ----------------------------------------------------------------------------- Prometheus

PROMETHEUS_MISSING = ("prometheus: not installed, so the dashboard's metric charts stay empty "
                      "(scripts/setup.sh installs Debian's package when run as root; or put a `prometheus` "
                      "binary on PATH)")


def session_dir(temp_dir: str | Path) -> Path:
    return Path(temp_dir) / "session_latest"


def prometheus_config(temp_dir: str | Path, scrape_interval_s: float = 10.0) -> dict:
    """Ray's generated Prometheus config for the head whose ``--temp-dir`` is ``temp_dir``: one
    scrape job over Ray's service-discovery file, which lists every node's metrics export port
    (and follows nodes that join or leave)."""
    session = session_dir(temp_dir).resolve()
    generated = session / "metrics" / "prometheus" / "prometheus.yml"
    discovery = session / "prom_metrics_service_discovery.json"
    config = yaml.safe_load(generated.read_text()) if generated.is_file() else {
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(discovery)]}]}]}
    config.setdefault("global", {}).update(scrape_interval=f"{scrape_interval_s:g}s",
                                           evaluation_interval=f"{scrape_interval_s:g}s")
    return config


class LocalPrometheus:
    """A Prometheus server on 127.0.0.1 scraping one Ray head, its data under ``data_dir``."""

    def __init__(self, temp_dir: str | Path, port: int = 9090, data_dir: str | Path | None = None,
                 scrape_interval_s: float = 10.0):
        self.temp_dir, self.port, self.scrape_interval_s = Path(temp_dir), port, scrape_interval_s
        self.data_dir = Path(data_dir) if data_dir else self.temp_dir / "prometheus"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "LocalPrometheus":
        binary = shutil.which("prometheus")
        if binary is None:
            raise UserError(PROMETHEUS_MISSING)
        discovery = session_dir(self.temp_dir) / "prom_metrics_service_discovery.json"
        deadline = time.monotonic() + timeout_s
        while not discovery.is_file():   # the head's metrics agent writes it within seconds
            if time.monotonic() > deadline:
                raise UserError(f"Ray wrote no service-discovery file at {discovery} within {timeout_s:.0f}s")
            time.sleep(0.5)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(self.temp_dir, self.scrape_interval_s)))
        self.proc = start_daemon([binary, f"--config.file={config}", f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{self.port}"],
                                 self.data_dir / "prometheus.log", lambda: answers(self.url + "/-/ready"), "prometheus",
                                 max(1.0, deadline - time.monotonic()))
        return self

    def query(self, promql: str) -> list[dict]:
        """The result vector of an instant query through Prometheus' HTTP API."""
        from urllib.parse import quote

        with urllib.request.urlopen(f"{self.url}/api/v1/query?query={quote(promql)}", timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


GRAFANA_DASHBOARD = ROOT / "ops" / "grafana" / "edgeray_dashboard.json"


def install_grafana_dashboard(temp_dir: str | Path) -> Path | None:
    """Put the edgeray dashboard beside the ones Ray generates for its Grafana provisioning
    (``session_latest/metrics/grafana/dashboards``); a Grafana started with Ray's generated
    ``grafana.ini`` then shows it next to Ray's own."""
    target = session_dir(temp_dir) / "metrics" / "grafana" / "dashboards"
    if not target.is_dir():
        return None
    shutil.copy(GRAFANA_DASHBOARD, target / GRAFANA_DASHBOARD.name)
    return target / GRAFANA_DASHBOARD.name


def _start_prometheus(temp_dir: str, port: int) -> dict:
    if shutil.which("prometheus") is None:
        print(PROMETHEUS_MISSING, flush=True)
        return {}
    try:
        prom = LocalPrometheus(temp_dir, port).start()
    except UserError as exc:   # a port in use, a broken install: the service runs without it
        print(f"prometheus: not started ({exc})", flush=True)
        return {}
    return {"prometheus_pid": prom.proc.pid, "prometheus_url": prom.url}


def _stop_prometheus(state: dict) -> None:
    pid = state.get("prometheus_pid")
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)


# ----------------------------------------------------------------------------- Ray Jobs and Serve

def _headers() -> dict:
    return {"Authorization": f"Bearer {auth_token()}"}


def _get_json(url: str, timeout: float = 10.0):
    request = urllib.request.Request(url, headers=_headers())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _job_client(address: str):
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_headers())
    except Exception as exc:  # connection refused, 401, wrong URL
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {' '.join(str(exc).split())[:300]}") from None


def cluster_resources(address: str, timeout_s: float = 180.0) -> tuple[float, float]:
    """(CPUs, GPUs) of the live nodes of the cluster behind the dashboard ``address`` (Ray's
    state API); waits for the first node, which registers seconds after the dashboard answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nodes = _get_json(f"{address}/api/v0/nodes?limit=1000", timeout=30)["data"]["result"]["result"]
        except (urllib.error.URLError, KeyError, ValueError, TimeoutError) as exc:
            raise UserError(f"cannot read the cluster's nodes from {address}: {exc}") from None
        alive = [n for n in nodes if n.get("state") == "ALIVE"]
        if alive or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if not alive:
        raise UserError(f"the cluster at {address} has no live node after {timeout_s:.0f}s")
    return (sum(n.get("resources_total", {}).get("CPU", 0.0) for n in alive),
            sum(n.get("resources_total", {}).get("GPU", 0.0) for n in alive))


def deploy_serve(address: str, deploy: dict, path: Path, timeout_s: float) -> dict:
    """`serve deploy` the config on the head at ``address`` and wait until every app runs;
    returns Serve's application status. A failed app is a UserError with Serve's message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deploy, sort_keys=False))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    done = subprocess.run([serve_cli, "deploy", "--address", address, str(path)], env=client_env(),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise UserError(f"serve deploy {path} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    names = [app["name"] for app in deploy["applications"]]
    deadline, apps = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        apps = _get_json(f"{address}/api/serve/applications/").get("applications", {})
        failed = {n: apps[n] for n in names if n in apps and apps[n]["status"] in FAILED_STATES}
        if failed:
            name, app = next(iter(failed.items()))
            message = " ".join((app.get("message") or "").split())
            for dep in app.get("deployments", {}).values():
                message = message or " ".join((dep.get("message") or "").split())
            raise UserError(f"Serve app {name!r} is {app['status']}: {message[-600:]}")
        if all(n in apps and apps[n]["status"] in READY_STATES for n in names):
            return apps
        time.sleep(2.0)
    states = {n: apps.get(n, {}).get("status", "absent") for n in names}
    raise UserError(f"the Serve apps did not all run within {timeout_s:.0f}s: {states} "
                    f"(the dashboard's Serve tab says why)")


def endpoint_lines(deploy: dict, apps: dict) -> list[str]:
    """What to paste: the URL of every app with a curl (and, for SVD, an openai) example."""
    http = deploy.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"
    lines = []
    for app in deploy["applications"]:
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        if app["import_path"] == "serving.svd.app:app_builder":
            model = _served_model(base + prefix)
            body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 16})
            lines += [f"{app['name']}:  {base}{prefix}/v1  (OpenAI API; docs {base}{prefix}/docs)",
                      f"  curl -s {base}{prefix}/v1/completions -H 'Content-Type: application/json' -d '{body}'",
                      f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}{prefix}/v1', "
                      f"api_key='none'); print(c.completions.create(model='{model}', "
                      f"prompt='The capital of France is', max_tokens=16).choices[0].text)\""]
        elif app["import_path"] == "serving.sider.app:app_builder":
            face = str(ROOT / "data" / "sider_faces" / "obama2.jpg")
            lines += [f"{app['name']}:  {base}{prefix}  (docs {base}{prefix}/docs)",
                      f"  curl -s {base}{prefix}/protect -F image=@{face} -F 'password=correct horse battery staple' "
                      f"-F seed=0 | python -c \"import json, sys; r = json.load(sys.stdin); "
                      f"print({{k: v for k, v in r['samples'][0].items() if k != 'image_b64'}} if 'samples' in r else r)\"",
                      f"  curl -s {base}{prefix}/verify -F image_a=@{face} "
                      f"-F image_b=@{ROOT / 'data' / 'sider_faces' / 'obama.jpg'}"]
        else:
            lines += [f"{app['name']}:  {base}{prefix}/"]
    return lines


def _served_model(base: str) -> str:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (urllib.error.URLError, KeyError, IndexError, ValueError, TimeoutError):
        return "smollm2-135m"


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


def _resolve(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else ROOT / path


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="edgeray main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"FL config (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="FL config override")
    parser.add_argument("--no-serve", action="store_true", help="only the FL job: no Serve apps")
    parser.add_argument("--serve-config", default=DEFAULT_SERVE_CONFIG,
                        help=f"`serve deploy` config of the apps (default {DEFAULT_SERVE_CONFIG})")
    parser.add_argument("--serve-port", type=int, help="HTTP port of Serve (default: the deploy config's, 8000)")
    parser.add_argument("--serve-timeout", type=float, default=900.0, help="seconds for the apps to run")
    parser.add_argument("--address", help="dashboard URL of a running head (default: start a local one)")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--gcs-port", type=int, default=6379, help="GCS port of the local head (the Ray client "
                        "and dashboard agent ports, 20201 and 52401, move by as much)")
    parser.add_argument("--metrics-port", type=int, default=8090, help="the head's Prometheus export port")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="port of the Prometheus server "
                        "started beside a local head (when `prometheus` is installed)")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the job")
    args = parser.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"   # read by Ray when it is imported

    from actors.config import FLConfig
    from edgeray.config import load_config

    config = _resolve(args.config)
    cfg = load_config(FLConfig, config, args.overrides)          # bad input fails here, before Ray
    data_path = None if cfg.data.path is None else _resolve(cfg.data.path)
    if data_path is not None and not data_path.exists():
        raise UserError(f"data file not found: {data_path} (data.path); run scripts/setup.sh to fetch MNIST")
    output_dir = _resolve(cfg.output_dir)
    deploy = None
    if not args.no_serve:
        deploy = absolute_configs(load_deploy_config(_resolve(args.serve_config)))
        if args.serve_port is not None:
            deploy.setdefault("http_options", {})["port"] = args.serve_port

    if args.address:
        state, address = {}, args.address.rstrip("/")
    else:
        state = start_head(args.dashboard_port, args.gcs_port, args.metrics_port, args.prometheus_port)
        address = state["dashboard_url"]
    total_cpus, total_gpus = cluster_resources(address)
    print(f"dashboard:  {address}  (token: ~/.ray/auth_token; {total_cpus:g} CPUs)", flush=True)
    if state.get("prometheus_url"):
        print(f"prometheus: {state['prometheus_url']}  (scraping the head through Ray's service discovery)",
              flush=True)
    if state.get("grafana_dashboards"):
        print(f"grafana:    dashboards (Ray's + edgeray's) in {Path(state['grafana_dashboards']).parent}; "
              f"see docs/operations.md, 'Prometheus and Grafana'", flush=True)

    budget = total_cpus
    if deploy is not None:
        deploy, reserved = fit_serve(deploy, total_cpus)
        budget = total_cpus - reserved
        fitted_pool = fit_pool(cfg.runtime.resource_classes, total_cpus, total_gpus, budget)   # refuse early
        apps = deploy_serve(address, deploy, STATE.parent / "serve_deploy.yaml", args.serve_timeout)
        sizes = ", ".join(f"{n} {r}x{c:g} CPU" for n, r, c in serve_cpu_requests(deploy))
        print(f"serve:      {sizes} (fitted to {total_cpus:g} CPUs; config {STATE.parent / 'serve_deploy.yaml'})")
        for line in endpoint_lines(deploy, apps):
            print(line, flush=True)
    else:
        fitted_pool = fit_pool(cfg.runtime.resource_classes, total_cpus, total_gpus, budget)

    client = _job_client(address)
    # data/, runs/ and .venv are git-ignored, so Ray leaves them out of the working-dir upload;
    # absolute paths point the job at the data and the run directory on this machine.
    sets = [*args.overrides, *([f"data.path={data_path}"] if data_path else []), f"output_dir={output_dir}"]
    if fitted_pool is not None:
        sets.append(f"runtime.resource_classes={json.dumps(fitted_pool)}")
    entrypoint = " ".join([shlex.quote(sys.executable), "-m", "edgeray.cli", "run", cfg.strategy.name,
                           "--config", shlex.quote(str(config)),
                           *[f"--set {shlex.quote(s)}" for s in sets], "--no-progress"])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)},
                               metadata={"edgeray": "main"})
    print(f"job id:     {job_id}" + (f"  (pool fitted beside Serve: {json.dumps(fitted_pool)})" if fitted_pool else "")
          + f"\nfollow:     RAY_AUTH_MODE=token ray job logs --address {address} -f {job_id}\n"
          f"results in: {output_dir}/<run id>/", flush=True)
    status, run_dir = follow(client, job_id, cfg.rounds, args.timeout)
    if status != "SUCCEEDED":
        tail = client.get_job_logs(job_id)[-3000:]
        print(tail, file=sys.stderr)
        raise UserError(f"job {job_id} ended {status}; its log tail is above")
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"results:    {run_dir}  (summary.json, metrics.jsonl, plots/)\n"
          f"accuracy:   {summary['final_test_accuracy']:.4f} after {summary['final_round']} rounds, "
          f"{summary['wall_s']:.0f}s wall, {summary['sim_time_s']:.0f}s simulated", flush=True)
    if not args.address:
        print("the Ray head" + (", Prometheus" if state.get("prometheus_url") else "")
              + (" and the Serve apps" if deploy is not None else "")
              + " keep running; stop them with: edgeray down", flush=True)
    return 0
