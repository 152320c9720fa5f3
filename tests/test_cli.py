"""The `edgeray` command line: smoke run on digits, resume, and bad input (one line, exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeray import cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "fedavg_digits.yaml")
EDGERAY = [sys.executable, "-m", "edgeray.cli"]


def _run(tmp_path, *extra, strategy="fedavg", config=DIGITS):
    tmp_path.mkdir(parents=True, exist_ok=True)
    before = set(tmp_path.glob("*"))
    code = cli.main(["run", strategy, "--config", config, "--set", f"output_dir={tmp_path}", "--no-progress",
                     *extra])
    assert code == 0
    (run_dir,) = set(tmp_path.glob("*")) - before
    return run_dir


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_smoke_run_writes_the_run_directory(ray_session, tmp_path, capsys):
    run_dir = _run(tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "run.json", "client_profiles.json",
                 "plots/accuracy.png", "plots/label_histogram.png"):
        assert (run_dir / name).is_file(), name
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all("test_accuracy" in r and r["sim_time_s"] >= 0 for r in rows)
    assert rows[2]["sim_time_s"] > rows[1]["sim_time_s"] > 0 and rows[1]["bytes_up"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_round"] == 4 and summary["pool"] == {"default": 2}
    assert summary["final_test_accuracy"] > 0.6 > rows[0]["test_accuracy"]  # it learns
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_00003.pt", "round_00004.pt"]
    assert "label histogram per client" in capsys.readouterr().out


@pytest.mark.ray
def test_resume_ends_where_an_uninterrupted_run_ends(ray_session, tmp_path):
    full = _run(tmp_path / "full", "--set", "rounds=3")
    part = _run(tmp_path / "part", "--set", "rounds=2")
    assert cli.main(["run", "fedavg", "--resume", str(part), "--set", "rounds=3", "--no-progress"]) == 0
    a = torch.load(full / "checkpoints" / "round_00003.pt", weights_only=False)["global_params"]
    b = torch.load(part / "checkpoints" / "round_00003.pt", weights_only=False)["global_params"]
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6)
    keep = ("round", "test_accuracy", "clients_completed", "bytes_up", "bytes_down", "sim_time_s")
    assert [{k: r.get(k) for k in keep} for r in _rows(full)] == [{k: r.get(k) for k in keep} for r in _rows(part)]


@pytest.mark.ray
def test_strategy_server_state_survives_resume(ray_session, tmp_path):
    """FedAvgM's server momentum is cross-round state: it lives in the checkpointed ``state``, so
    2 rounds + --resume to 3 end bit-for-bit where 3 uninterrupted rounds end."""
    momentum = ["--set", "strategy.params.server_momentum=0.7"]
    full = _run(tmp_path / "full", "--set", "rounds=3", *momentum, strategy="fedavgm")
    part = _run(tmp_path / "part", "--set", "rounds=2", *momentum, strategy="fedavgm")
    assert cli.main(["run", "fedavgm", "--resume", str(part), "--set", "rounds=3", "--no-progress"]) == 0
    a = torch.load(full / "checkpoints" / "round_00003.pt", weights_only=False)
    b = torch.load(part / "checkpoints" / "round_00003.pt", weights_only=False)
    assert set(a["server_state"]["momentum"]) == set(a["global_params"])
    for key in a["global_params"]:
        np.testing.assert_array_equal(b["global_params"][key], a["global_params"][key])
        np.testing.assert_array_equal(b["server_state"]["momentum"][key], a["server_state"]["momentum"][key])
    info = json.loads((part / "run.json").read_text())
    assert info["kind"] == "fl" and info["method"] == "fedavgm" and info["run_id"] == part.name
    assert cli.main(["run", "fedavg", "--resume", str(part), "--no-progress"]) == 2   # a run of another method


@pytest.mark.ray
def test_tiny_causal_lm_runs_fedavg_over_lora_end_to_end(ray_session, tmp_path):
    run_dir = _run(tmp_path, config=str(ROOT / "configs" / "fedavg_tiny_lm.yaml"))
    rows = _rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and summary["method"] == "fedavg"
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] and rows[-1]["test_accuracy"] > rows[0]["test_accuracy"]
    ckpt = torch.load(run_dir / "checkpoints" / "round_00003.pt", weights_only=False)["global_params"]
    assert all("lora_" in k or "mlp.gate" in k for k in ckpt)           # the base is never checkpointed
    lora_bytes = sum(v.nbytes for v in ckpt.values())
    assert all(4 * lora_bytes <= r["bytes_down"] < 4 * lora_bytes + 4 * 8192 for r in rows[1:])
    assert not (run_dir / "plots" / "label_histogram.png").exists()     # token targets: no label histogram


@pytest.mark.ray
def test_truncated_checkpoint_falls_back_to_previous(ray_session, tmp_path):
    run_dir = _run(tmp_path, "--set", "rounds=2")
    last = run_dir / "checkpoints" / "round_00002.pt"
    last.write_bytes(last.read_bytes()[:100])
    from edgeray.runs import load_latest_checkpoint
    assert load_latest_checkpoint(run_dir / "checkpoints")["round"] == 1


@pytest.mark.parametrize("args, message", [
    (["run", "fedavgg"], "unknown strategy 'fedavgg' (did you mean fedavg?); choose one of: fedavg, fedprox, fedavgm"),
    (["frobnicate"], "unknown command 'frobnicate'; choose one of: main, down, run, rl, serve"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.alpah=1"], "unknown config key data.alpah (did you mean data.alpha?)"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.alpha=0"], "data.alpha=0.0 is out of range; it must be > 0"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.num_clients=5000"], "is more than the 1437 training samples"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.dataset=mnist", "--set", "data.path=/nope/mnist.pkl.gz"],
     "MNIST file not found: /nope/mnist.pkl.gz; run scripts/setup.sh"),
    (["run", "fedavg", "--config", "/nope.yaml"], "config file not found: /nope.yaml"),
    (["run", "fedavg", "--resume", "/tmp"], "/tmp is not a run directory (it needs config.yaml and run.json)"),
    (["run", "fedprox", "--config", DIGITS, "--set", "strategy.params.muu=1"],
     "strategy 'fedprox' has no setting strategy.params.muu (did you mean strategy.params.mu?); its settings: "
     "momentum, weight_decay, keep_optimizer_state, mu"),
    (["run", "fedavg", "--config", DIGITS, "--set", "strategy.params.mu=0.1"],
     "strategy 'fedavg' has no setting strategy.params.mu; its settings: momentum, weight_decay, keep_optimizer_state"),
    (["run", "fedavg", "--config", DIGITS, "--set", "runtime.warm_pool=of"],
     "runtime.warm_pool='of' is not allowed; choose one of: auto, on, off"),
    (["run", "fedavg", "--config", DIGITS, "--set", "model.name=transformer"],
     "model.name='transformer' is not allowed; choose one of: cnn, mlp, split-cnn, split-resnet8, causal-lm, moe"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.partition=groups"],
     "partition=groups needs a data set with a natural key per row"),
    (["run", "fedprox", "--config", DIGITS, "--set", "strategy.mu=0.1"],
     "unknown config key strategy.mu (it is a setting of strategy 'fedprox': set strategy.params.mu)"),
    (["run", "fedavg", "--config", DIGITS, "--set", "data.args.seq_len=8"],
     "dataset 'digits' takes data.args (none); got seq_len"),
    (["run", "fedavg", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "fedavg", "--config", DIGITS, "--address", "127.0.0.1:1"],
     "cannot attach to the Ray cluster at 127.0.0.1:1: Connection refused; is a head running there"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    proc = subprocess.run(EDGERAY + args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"edgeray: error: {lines[0].removeprefix('edgeray: error: ')}"]
    assert message in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.ray
def test_a_bad_model_found_by_the_actor_is_one_line_exit_2(tmp_path):
    """model.args are checked where the model is built (an actor): the driver still ends with one
    line naming the problem, no traceback."""
    proc = subprocess.run(EDGERAY + ["run", "fedavg", "--config", str(ROOT / "configs" / "fedavg_tiny_lm.yaml"),
                                     "--set", "model.args.lora.rank=4", "--set", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("edgeray: error: model.args.lora has no key 'rank'; allowed: "
                                                    "r, alpha, dropout, target_modules, target_parameters")


@pytest.mark.ray
@pytest.mark.slow
def test_driver_sigkill_then_resume_matches_uninterrupted(ray_session, tmp_path):
    import os
    import signal
    import time

    killed_root = tmp_path / "killed"
    proc = subprocess.Popen(EDGERAY + ["run", "fedavg", "--config", DIGITS, "--set", f"output_dir={killed_root}",
                                       "--set", "rounds=8", "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline:
        dirs = list(killed_root.glob("*")) if killed_root.exists() else []
        if dirs and len(list((dirs[0] / "checkpoints").glob("round_*.pt"))) >= 1 and \
                (dirs[0] / "metrics.jsonl").exists() and len(_rows(dirs[0])) >= 4:
            run_dir = dirs[0]
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    assert run_dir is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(_rows(run_dir)) - 1
    assert done_before < 8

    resumed = subprocess.run(EDGERAY + ["run", "fedavg", "--resume", str(run_dir), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(9))  # no gap, no duplicate

    full = _run(tmp_path / "full", "--set", "rounds=8")
    a = torch.load(full / "checkpoints" / "round_00008.pt", weights_only=False)["global_params"]
    b = torch.load(run_dir / "checkpoints" / "round_00008.pt", weights_only=False)["global_params"]
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6)
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in _rows(full)]
