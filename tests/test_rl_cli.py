"""`edgeray rl` bad input, no Ray: one line `edgeray: error: ...`, exit code 2, no traceback, and
nothing started or created (the config and the run directory are checked before Ray is joined)."""


import pytest

from edgeray import runs
from edgeray.cli import main
from edgeray.config import dump_yaml


def _run(root, *, kind, method):
    from rl.deer.config import ExperimentConfig

    run_dir = runs.new_run_dir(root, f"{method}-run", kind=kind, method=method, argv=["test"])
    dump_yaml(ExperimentConfig(), run_dir / "config.yaml")
    return str(run_dir)



@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    # connect() sets RAY_AUTH_MODE when attaching: keep that out of the other tests' environment
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("argv, message", [
    (["train", "dqn"], "unknown RL method 'dqn'; choose one of: deer, per, uniform"),
    (["train", "deer", "--env", "ns-nope"], "env.name='ns-nope' is not allowed"),
    (["train", "deer", "--set", "replay.alpha=-1"], "replay.alpha"),
    (["train", "deer", "--set", "deer.detector.windw=10"], "did you mean"),
    (["train", "deer", "--stop-iters", "0"], "--stop-iters must be >= 1"),
    (["train", "deer", "--num-cpus", "0"], "--num-cpus must be >= 1"),
    (["train", "deer", "--resume", "{empty}"], "is not a run directory"),
    (["train", "deer", "--resume", "{per}"], "is a 'per' run, not 'deer'"),
    (["train", "deer", "--resume", "{fl}"], "is a 'fl' run, not 'rl'"),
    (["train", "deer", "--resume", "{deer}", "--set", "train.seed=1"], "drop --config/--set/--env"),
    (["eval", "deer", "--runs", "{empty}/nonexistent"], "is not a run directory"),
    (["eval", "deer", "--runs", "{fl}"], "is a 'fl' run, not 'rl'"),
    (["eval", "deer", "--runs", "{crp}"], "is a 'crp' run, not one of: deer, per, uniform"),
    (["eval", "dqn", "--runs", "{deer}"], "unknown RL method"),
    (["frobnicate"], "invalid choice"),
    (["train", "deer", "--address", "127.0.0.1:1", "--runs-root", "{empty}"], "cannot attach to the Ray cluster"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": str(tmp_path / "empty"),
             **{m: _run(tmp_path, kind="rl", method=m) for m in ("deer", "per", "crp")},
             "fl": _run(tmp_path, kind="fl", method="fedavg")}
    assert main(["rl", *[a.format(**paths) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeray: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not any((tmp_path / "empty").iterdir())  # no run directory left behind


def test_list_names_every_method(capsys):
    assert main(["rl", "list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["deer", "per", "uniform", "leed", "ippo", "bc-ppo", "rl-crp", "rl-no-crp"]
