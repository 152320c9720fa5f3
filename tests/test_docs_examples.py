"""The worked example of docs/strategies.md ("Add a method") works as written, without Ray.

The blocks marked ``<!-- example: PATH -->`` are written to a temporary tree that is added to the
search path of the ``pipelines`` package, and the registry block's entries are put in the
registry's tables for the test. Then: the driver's side (config, strategy settings, data set)
runs in a fresh process and imports no torch; FedNova trains the tabular task for two rounds
in-process, as the runtime would, and its aggregate matches the paper's formula computed by hand.
"""

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "strategies.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```\w+\n(.*?)```", re.S)
STRATEGY, SETTINGS, TASK = "pipelines/fednova/strategy.py", "pipelines/fednova/settings.py", "pipelines/tasks/tabular.py"
CONFIG = "configs/fednova_breast_cancer.yaml"


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall(DOC.read_text()))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The example's files under a temporary root (the registry block is not a file)."""
    blocks = examples()
    assert set(blocks) == {SETTINGS, STRATEGY, TASK, CONFIG, "registry"}, sorted(blocks)
    root = tmp_path_factory.mktemp("add_a_method")
    for path, text in blocks.items():
        if path != "registry":
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
    (root / "pipelines" / "fednova" / "__init__.py").write_text("")
    return root


# What the ``registry`` fixture does, as source for the driver's fresh process: the example's
# folders join the packages' search paths and its registry lines are read into ``tables``.
REGISTER = """
import importlib, sys
import pipelines, pipelines.tasks
from pipelines import registry
pipelines.__path__.append(ROOT + "/pipelines")
pipelines.tasks.__path__.append(ROOT + "/pipelines/tasks")
importlib.invalidate_caches()
tables = {}
exec(REGISTRY, {"Entry": registry.Entry}, tables)
"""


@pytest.fixture
def registry(tree, monkeypatch):
    import pipelines
    import pipelines.tasks
    from pipelines import registry

    monkeypatch.setattr(pipelines, "__path__", [*pipelines.__path__, str(tree / "pipelines")])
    monkeypatch.setattr(pipelines.tasks, "__path__", [*pipelines.tasks.__path__, str(tree / "pipelines" / "tasks")])
    tables = {}
    exec(examples()["registry"], {"Entry": registry.Entry}, tables)
    assert set(tables) == {"STRATEGIES", "MODELS", "DATASETS"}
    for table, entries in tables.items():
        for name, entry in entries.items():
            monkeypatch.setitem(getattr(registry, table), name, entry)
    yield registry
    for name in [m for m in sys.modules if m.startswith(("pipelines.fednova", "pipelines.tasks.tabular"))]:
        del sys.modules[name]


def test_the_driver_checks_the_example_config_and_loads_its_data_without_torch(tree):
    code = REGISTER + """
for table, entries in tables.items():
    getattr(registry, table).update(entries)
import json
from edgeray.config import load_config
from edgeray.errors import UserError
from actors.config import FLConfig
from actors.driver import prepare
cfg = load_config(FLConfig, CONFIG, ["strategy.name=fednova"])
baseline = load_config(FLConfig, CONFIG, ["strategy.name=fednova", "strategy.params.normalize=false"])
try:
    load_config(FLConfig, CONFIG, ["strategy.name=fednova", "strategy.params.budget=1"])
    error = None
except UserError as exc:
    error = str(exc)
spec = cfg.strategy.spec()
prepared = prepare(cfg)
print(json.dumps({"params": cfg.strategy.params, "baseline": baseline.strategy.params, "settings": spec.settings,
                  "error": error, "sizes": list(prepared.population.sizes), "info": prepared.data.info,
                  "torch": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""
    source = f"ROOT = {str(tree)!r}\nREGISTRY = {examples()['registry']!r}\nCONFIG = {str(tree / CONFIG)!r}\n" + code
    proc = subprocess.run([sys.executable, "-c", source], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] == []                     # the settings file and the loader import no torch
    assert out["params"] == {"budget_s": 0.1, "normalize": True}
    assert out["baseline"]["normalize"] is False
    assert out["settings"]["batch_size"] == 8 and out["settings"]["budget_s"] == 0.1
    assert "strategy.params.budget (did you mean strategy.params.budget_s?)" in out["error"]
    assert out["info"] == {"input_shape": [30], "num_classes": 2}
    assert len(out["sizes"]) == 10 and sum(out["sizes"]) == 455 and min(out["sizes"]) >= 10


def test_fednova_trains_the_tabular_task_and_aggregates_as_the_paper_says(registry):
    from pipelines.data import load_dataset, partition
    from pipelines.models import ClientHandover, build_model, get_params, set_params
    from pipelines.population import PopulationView, sample_profiles
    from pipelines.settings import StrategySettings
    from pipelines.strategy import ClientContext, ClientData

    cfg = yaml.safe_load(examples()[CONFIG])
    seed, data_cfg, strategy_cfg = cfg["seed"], cfg["data"], cfg["strategy"]
    common = {f.name: strategy_cfg[f.name] for f in dataclasses.fields(StrategySettings)}
    settings = registry.strategy_settings("fednova", common, strategy_cfg["params"])
    strategy = registry.StrategySpec("fednova", dataclasses.asdict(settings)).build()  # as an actor builds it
    assert strategy.name == "fednova" and not strategy.uses_client_state

    data = load_dataset(data_cfg["dataset"], None, seed, data_cfg["args"])
    n_clients = data_cfg["num_clients"]
    parts = partition(data.y_train, n_clients, data_cfg["partition"], seed=seed, alpha=data_cfg["alpha"],
                      min_size=data_cfg["min_size"])
    population = PopulationView(tuple(sample_profiles(n_clients, seed)), tuple(len(p) for p in parts))
    evaluation = registry.EVALUATIONS[registry.DATASETS[data_cfg["dataset"]].evaluation]
    loss_fn, evaluate = registry.load(evaluation.loss), registry.load(evaluation.target)
    model = build_model(registry.ModelSpec(cfg["model"]["name"], seed=seed, data_info=data.info))
    handover = ClientHandover(model)
    global_params = get_params(model)
    state = strategy.init_state(global_params)

    def test_metrics(params):
        set_params(model, params)
        sums = evaluate(model, data.x_test, data.y_test)
        return sums["test_accuracy"] / sums["count"], sums["test_loss"] / sums["count"]

    _, initial_loss = test_metrics(global_params)
    for rnd in (1, 2):
        clients = strategy.select_clients(rnd, state, list(range(n_clients)), strategy_cfg["clients_per_round"],
                                          np.random.default_rng([seed, rnd, 3]))
        instructions = strategy.configure_round(rnd, state, clients, population)
        steps = {c: instructions[c]["steps"] for c in clients}
        for c in clients:
            assert 1 <= steps[c] <= settings.local_epochs * math.ceil(population.sizes[c] / settings.batch_size)
            assert strategy.work(instructions[c], population.sizes[c]) == steps[c] * settings.batch_size
        assert len(set(steps.values())) > 1       # the device profiles give unequal budgets
        updates, edges = [], [strategy.init_partial(), strategy.init_partial()]
        for i, c in enumerate(clients):           # two edge servers, as hierarchical FL folds them
            handover.restore()
            set_params(model, global_params)
            ctx = ClientContext(c, rnd, model, ClientData(data.x_train[parts[c]], data.y_train[parts[c]]),
                                instructions[c], {}, np.random.default_rng([seed, rnd, c]), loss_fn)
            updates.append(strategy.client_update(ctx))
            strategy.accumulate(edges[i % 2], updates[-1])
        new, state, metrics = strategy.aggregate(rnd, global_params, state, strategy.merge(edges))

        n = sum(u.num_examples for u in updates)
        tau_eff = sum(u.num_examples * steps[u.client_id] for u in updates) / n
        assert metrics["tau_eff"] == pytest.approx(tau_eff)
        assert np.isfinite(metrics["train_loss"])
        for key, w in global_params.items():      # w - tau_eff * sum_i p_i d_i
            direction = sum(u.num_examples * u.params[key] for u in updates) / n
            np.testing.assert_allclose(new[key], w - tau_eff * direction, rtol=1e-5, atol=1e-6)
            assert new[key].dtype == w.dtype
        global_params = new

    accuracy, loss = test_metrics(global_params)
    assert np.isfinite(loss) and loss < initial_loss
    assert accuracy > 0.85


def test_fednova_keeps_the_weights_when_every_client_failed(registry):
    strategy = registry.StrategySpec("fednova").build()
    weights = {"weight": np.ones((2, 3), np.float32)}
    new, state, metrics = strategy.aggregate(1, weights, {}, strategy.init_partial())
    assert new is weights and metrics == {}
