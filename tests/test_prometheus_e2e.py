"""A real Prometheus server scraping a real Ray head through Ray's generated service-discovery
file: an FL job through Ray Jobs, then `edgeray_round_seconds` and the client counters read back
through Prometheus' HTTP API and compared with the run's own metrics.jsonl; the dashboard's
Prometheus health check answers through RAY_PROMETHEUS_HOST. Skipped, with the reason, where no
`prometheus` binary is installed (scripts/setup.sh installs Debian's package when run as root)."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeray.launch import PROMETHEUS_MISSING, LocalPrometheus, end_head_tree, prometheus_config, session_dir
from edgeray.localhead import LocalHead, auth_token, client_env

ROOT = Path(__file__).resolve().parents[1]
PROM_PORT = 19097
DASHBOARD = ROOT / "ops" / "grafana" / "edgeray_dashboard.json"


@pytest.fixture(scope="module")
def head():
    head = LocalHead(gcs_port=6397, dashboard_port=8282, metrics_port=8102, client_port=20208, agent_port=52408,
                     num_cpus=2, extra_env={"RAY_metrics_report_interval_ms": "2000",
                                            "RAY_PROMETHEUS_HOST": f"http://127.0.0.1:{PROM_PORT}"}).start()
    yield head
    end_head_tree(head.proc.pid)   # the head's whole tree in seconds; stop() sweeps what names its temp dir
    head.stop()


@pytest.fixture(scope="module")
def prometheus(head, tmp_path_factory):
    prom = LocalPrometheus(head.temp_dir, PROM_PORT, tmp_path_factory.mktemp("prom"), scrape_interval_s=2).start()
    yield prom
    prom.stop()


def _poll(fn, timeout_s=180, every_s=2):
    deadline, value = time.time() + timeout_s, None
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every_s)
    return value


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason=PROMETHEUS_MISSING)
def test_prometheus_scrapes_ray_through_its_service_discovery_file(head, prometheus):
    discovery = session_dir(head.temp_dir) / "prom_metrics_service_discovery.json"

    def node_listed():   # Ray rewrites the file every few seconds; the head's node joins it once registered
        targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
        return [t for t in targets if t.endswith(f":{head.metrics_port}")]
    assert _poll(node_listed, timeout_s=60), discovery.read_text()
    config = prometheus_config(head.temp_dir)
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(discovery.resolve())]

    def healthy_targets():
        with urllib.request.urlopen(f"{prometheus.url}/api/v1/targets", timeout=10) as response:
            active = json.loads(response.read())["data"]["activeTargets"]
        return [t for t in active if t["health"] == "up" and t["labels"]["job"] == "ray"
                and t["scrapeUrl"].endswith(f":{head.metrics_port}/metrics")]
    assert _poll(healthy_targets, timeout_s=90)   # the head node's export port, scraped and up
    # The dashboard reaches this Prometheus through RAY_PROMETHEUS_HOST (its metric charts use it).
    request = urllib.request.Request(f"{head.dashboard_url}/api/prometheus_health",
                                     headers={"Authorization": f"Bearer {auth_token()}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert json.loads(response.read())["result"] is True


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason=PROMETHEUS_MISSING)
def test_fl_job_metrics_through_prometheus_http_api(head, prometheus, tmp_path):
    rounds = 3
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url,
         "--working-dir", str(ROOT), "--no-wait", "--",
         sys.executable, "-m", "edgeray.cli", "run", "fedavg", "--config", "configs/fedavg_digits.yaml",
         "--set", f"rounds={rounds}", "--set", f"output_dir={tmp_path}", "--no-progress"],
        capture_output=True, text=True, env=client_env(), timeout=300)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)

    def finished():
        request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {auth_token()}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            status = json.loads(response.read())["status"]
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None
    assert _poll(finished, timeout_s=600) == "SUCCEEDED"
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["round"] >= 1]   # round 0: the initial evaluation, not a round
    assert len(rows) == rounds
    completed = sum(r["clients_completed"] for r in rows)
    selector = f'run_id="{run_dir.name}",method="fedavg"'

    # The warm aggregator outlives the job and keeps exporting; a sample may lag by one scrape.
    def value(promql, want):
        result = prometheus.query(promql)
        return result if result and float(result[0]["value"][1]) == want else None
    got = _poll(lambda: value(f"last_over_time(ray_edgeray_round_seconds_count{{{selector}}}[15m])", rounds))
    assert got, prometheus.query(f"ray_edgeray_round_seconds_count{{{selector}}}")
    got = _poll(lambda: value(f"last_over_time(ray_edgeray_clients_completed_total{{{selector}}}[15m])", completed))
    assert got, prometheus.query(f"ray_edgeray_clients_completed_total{{{selector}}}")
    # Histogram buckets reach Prometheus: a quantile over the run's rounds is a finite time.
    quantile = prometheus.query(
        f"histogram_quantile(0.5, sum by (le) (last_over_time(ray_edgeray_round_seconds_bucket{{{selector}}}[15m])))")
    assert quantile and 0 < float(quantile[0]["value"][1]) < 600
    selected = prometheus.query(f"last_over_time(ray_edgeray_clients_selected{{{selector}}}[15m])")
    assert selected and float(selected[0]["value"][1]) == rows[-1]["clients_selected"]
    # No per-client label reaches Prometheus (cardinality).
    labels = prometheus.query(f"ray_edgeray_clients_completed_total{{{selector}}}")[0]["metric"]
    assert "client_id" not in labels and labels["method"] == "fedavg"
    # Every panel of the shipped Grafana dashboard is a valid query on this Prometheus, and the
    # run's panels show the run.
    for expr in _dashboard_queries(method="fedavg", run_id=run_dir.name):
        result = prometheus.query(expr)
        if "round_seconds_count" in expr:
            assert float(result[0]["value"][1]) == rounds, expr
        # A rate() panel needs two scrapes that saw the counter rise: a 3-round job can end
        # between two scrapes (then the rate is 0 or absent), so only the other panels must show it.
        if ("(ray_edgeray_bytes" in expr or "(ray_edgeray_clients_completed" in expr) and "rate(" not in expr:
            assert result and float(result[0]["value"][1]) > 0, expr


def _dashboard_queries(**variables) -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for name, value in variables.items():
        exprs = [e.replace(f"${name}", value) for e in exprs]
    return exprs


def test_grafana_dashboard_shows_only_the_metrics_edgeray_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "edgeray-fl" and len(dashboard["panels"]) >= 6
    def base(name):   # a Prometheus series name -> the name given to ray.util.metrics (counters: +_total)
        return re.sub(r"_(bucket|count|sum|total)$", "", name)
    defined = {base(m) for m in re.findall(r'"(edgeray_\w+)"', (ROOT / "actors" / "metrics.py").read_text())}
    used = {base(m) for e in _dashboard_queries() for m in re.findall(r"ray_(edgeray_\w+)", e)}
    assert used == defined   # every exported metric has a panel, and no panel shows something else
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "$method" in target["expr"] and "$run_id" in target["expr"], target["expr"]
