"""FedAvg / FedProx and the partial-aggregate algebra, on plain tensors (no Ray)."""

import numpy as np
import pytest

from pipelines.data import load_dataset, partition
from pipelines.fedavg import FedAvg, FedProx
from pipelines.models import build_model, evaluate, get_params, set_params
from pipelines.strategy import ClientContext, ClientData, ClientUpdate, WeightedSum


def _update(cid, n, value, keys=("w", "b")):
    return ClientUpdate(cid, n, {k: np.full(3, value, np.float32) for k in keys}, metrics={"train_loss": value})


def test_fedavg_is_example_weighted_mean():
    strategy = FedAvg()
    partial = strategy.init_partial()
    for u in (_update(0, 10, 1.0), _update(1, 30, 2.0)):
        partial = strategy.accumulate(partial, u)
    old = {"w": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}
    new, _, metrics = strategy.aggregate(1, old, {}, partial)
    np.testing.assert_allclose(new["w"], 1.75)
    assert new["w"].dtype == np.float32
    assert metrics["train_loss"] == pytest.approx(1.75)


def test_partial_updates_keep_untouched_tensors_and_weigh_per_tensor():
    partial = WeightedSum()
    partial.add(_update(0, 10, 1.0, keys=("w",)))
    partial.add(_update(1, 30, 3.0, keys=("w", "b")))
    old = {"w": np.zeros(3, np.float32), "b": np.zeros(3, np.float32), "frozen": np.ones(2, np.float32)}
    new = partial.average(old)
    np.testing.assert_allclose(new["w"], 2.5)      # (10*1 + 30*3) / 40
    np.testing.assert_allclose(new["b"], 3.0)      # only client 1 sent b
    assert new["frozen"] is old["frozen"]          # nobody sent it


def test_hierarchical_merge_equals_flat():
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(c, int(rng.integers(5, 50)), {"w": rng.normal(size=(4, 4)).astype(np.float32)},
                            stats={"usage": rng.random(3)}) for c in range(9)]
    strategy = FedAvg()
    flat = strategy.init_partial()
    for u in updates:
        strategy.accumulate(flat, u)
    edges = []
    for group in (updates[:2], updates[2:7], updates[7:]):
        p = strategy.init_partial()
        for u in group:
            strategy.accumulate(p, u)
        edges.append(p)
    merged = strategy.merge(edges)
    old = {"w": np.zeros((4, 4), np.float32)}
    np.testing.assert_allclose(merged.average(old)["w"], flat.average(old)["w"], rtol=1e-6)
    assert merged.num_clients == 9 and len(merged.stats) == 9  # statistics travel beside the update


@pytest.fixture(scope="module")
def digits_client():
    d = load_dataset("digits")
    idx = partition(d.y_train, 5, "iid", seed=0)[0]
    return d, ClientData(d.x_train[idx], d.y_train[idx])


def _train(strategy, model, data, state=None, rnd=1):
    ctx = ClientContext(0, rnd, model, data, strategy.configure_round(rnd, {}, [0])[0], state if state is not None else {},
                        np.random.default_rng([0, rnd]))
    return strategy.client_update(ctx), ctx


def test_client_update_is_seeded_and_learns(digits_client):
    d, data = digits_client
    model = build_model("cnn", (1, 8, 8), 10)
    start = get_params(model)
    before = evaluate(model, d.x_test, d.y_test)[1]
    u1, _ = _train(FedAvg(local_epochs=3, batch_size=16), model, data)
    after = evaluate(model, d.x_test, d.y_test)[1]
    set_params(model, start)
    u2, _ = _train(FedAvg(local_epochs=3, batch_size=16), model, data)
    assert u1.num_examples == len(data) and set(u1.params) == set(start)
    for k in start:
        np.testing.assert_array_equal(u1.params[k], u2.params[k])
    assert after < before  # test loss goes down


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_to_global(digits_client):
    _, data = digits_client
    model = build_model("cnn", (1, 8, 8), 10)
    start = get_params(model)
    runs = {}
    for name, strategy in {"avg": FedAvg(local_epochs=2), "prox0": FedProx(local_epochs=2, mu=0.0),
                           "prox": FedProx(local_epochs=2, mu=5.0)}.items():
        set_params(model, start)
        runs[name] = _train(strategy, model, data)[0].params
    for k in start:
        np.testing.assert_allclose(runs["avg"][k], runs["prox0"][k], rtol=1e-5, atol=1e-6)

    def drift(params):
        return sum(float(((params[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(runs["prox"]) < drift(runs["avg"])


def test_optimizer_state_is_kept_in_client_state(digits_client):
    _, data = digits_client
    model = build_model("mlp", (1, 8, 8), 10)
    state = {}
    _train(FedAvg(keep_optimizer_state=True), model, data, state)
    assert state["rounds_trained"] == 1 and "optimizer" in state
    _train(FedAvg(keep_optimizer_state=True), model, data, state, rnd=2)
    assert state["rounds_trained"] == 2
    stateless = {}
    _train(FedAvg(), model, data, stateless)
    assert stateless == {}
