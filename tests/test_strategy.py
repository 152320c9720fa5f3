"""FedAvg / FedProx / FedAvgM and the partial-aggregate algebra, on plain tensors (no Ray)."""

import numpy as np
import pytest

from pipelines.data import load_dataset, partition
from pipelines.fedavg.settings import FedAvgMSettings, FedAvgSettings, FedProxSettings
from pipelines.fedavg.strategy import FedAvg, FedAvgM, FedProx
from pipelines.models import build_model, get_params, set_params
from pipelines.registry import ModelSpec
from pipelines.strategy import ClientContext, ClientData, ClientUpdate, Rows, WeightedSum
from pipelines.tasks.vision import classification_loss, evaluate_classification

DIGITS_INFO = {"input_shape": [1, 8, 8], "num_classes": 10}


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
    ctx = ClientContext(0, rnd, model, data, strategy.configure_round(rnd, {}, [0], None)[0],
                        state if state is not None else {}, np.random.default_rng([0, rnd]), classification_loss)
    return strategy.client_update(ctx), ctx


def _loss(model, d):
    sums = evaluate_classification(model, d.x_test, d.y_test)
    return sums["test_loss"] / sums["count"]


def test_client_update_is_seeded_and_learns(digits_client):
    d, data = digits_client
    model = build_model(ModelSpec("cnn", data_info=DIGITS_INFO))
    start = get_params(model)
    before = _loss(model, d)
    u1, _ = _train(FedAvg(FedAvgSettings(local_epochs=3, batch_size=16)), model, data)
    after = _loss(model, d)
    set_params(model, start)
    u2, _ = _train(FedAvg(FedAvgSettings(local_epochs=3, batch_size=16)), model, data)
    assert u1.num_examples == len(data) and set(u1.params) == set(start)
    for k in start:
        np.testing.assert_array_equal(u1.params[k], u2.params[k])
    assert after < before  # test loss goes down


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_to_global(digits_client):
    _, data = digits_client
    model = build_model(ModelSpec("cnn", data_info=DIGITS_INFO))
    start = get_params(model)
    runs = {}
    for name, strategy in {"avg": FedAvg(FedAvgSettings(local_epochs=2)),
                           "prox0": FedProx(FedProxSettings(local_epochs=2, mu=0.0)),
                           "prox": FedProx(FedProxSettings(local_epochs=2, mu=5.0))}.items():
        set_params(model, start)
        runs[name] = _train(strategy, model, data)[0].params
    for k in start:
        np.testing.assert_allclose(runs["avg"][k], runs["prox0"][k], rtol=1e-5, atol=1e-6)

    def drift(params):
        return sum(float(((params[k] - start[k]) ** 2).sum()) for k in start)

    assert drift(runs["prox"]) < drift(runs["avg"])


def test_optimizer_state_is_kept_in_client_state(digits_client):
    _, data = digits_client
    model = build_model(ModelSpec("mlp", data_info=DIGITS_INFO))
    state = {}
    stateful = FedAvg(FedAvgSettings(keep_optimizer_state=True))
    _train(stateful, model, data, state)
    assert state["rounds_trained"] == 1 and "optimizer" in state
    _train(stateful, model, data, state, rnd=2)
    assert state["rounds_trained"] == 2
    stateless = {}
    _train(FedAvg(), model, data, stateless)
    assert stateless == {}


def test_per_tensor_and_per_row_weights_against_a_hand_computed_example():
    old = {"w": np.full((3, 2), 9.0, np.float32), "b": np.full(2, 9.0, np.float32)}
    partial = WeightedSum()
    # client 0: weight 1 on w (every row), 3 on b; client 1: rows weighted 0, 1, 3 on w; default (n=2) on b
    partial.add(ClientUpdate(0, 4, {"w": np.full((3, 2), 1.0, np.float32), "b": np.full(2, 1.0, np.float32)}),
                weight={"w": 1.0, "b": 3.0})
    partial.add(ClientUpdate(1, 2, {"w": np.full((3, 2), 5.0, np.float32), "b": np.full(2, 5.0, np.float32)}),
                weight={"w": np.array([[0.0], [1.0], [3.0]])})
    new = partial.average(old)
    np.testing.assert_allclose(new["w"][:, 0], [1.0, (1 + 5) / 2, (1 + 15) / 4])
    np.testing.assert_allclose(new["b"], (3 * 1 + 2 * 5) / 5)
    # an element nobody weighted keeps its previous value
    lone = WeightedSum().add(ClientUpdate(2, 1, {"w": np.full((3, 2), 7.0, np.float32)}),
                             weight=np.array([[1.0], [0.0], [0.0]]))
    np.testing.assert_allclose(lone.average(old)["w"], [[7, 7], [9, 9], [9, 9]])


def test_rows_are_scattered_with_their_weights_and_hierarchical_equals_flat():
    rng = np.random.default_rng(1)
    old = {"A": rng.normal(size=(4, 3)).astype(np.float32), "B": rng.normal(size=(3, 4)).astype(np.float32)}
    updates = [  # one expert's rows of A (axis 0) and its columns of B (axis 1), as HFedMoE sends them
        ClientUpdate(0, 10, {"A": Rows(np.array([0, 2]), np.ones((2, 3), np.float32)),
                             "B": Rows(np.array([1]), np.full((3, 1), 2.0, np.float32), axis=1)}),
        ClientUpdate(1, 30, {"A": Rows(np.array([2, 3]), np.full((2, 3), 3.0, np.float32)),
                             "B": np.full((3, 4), 4.0, np.float32)}),
        ClientUpdate(2, 5, {"A": Rows(np.array([3]), np.full((1, 3), 5.0, np.float32))}),
    ]
    weights = [None, {"A": np.array([1.0, 2.0])}, None]   # client 1: one weight per slice
    flat = WeightedSum()
    for u, w in zip(updates, weights):
        flat.add(u, w)
    expected_a = old["A"].copy()
    expected_a[0] = 1.0                                    # only client 0
    expected_a[1] = old["A"][1]                            # nobody
    expected_a[2] = (10 * 1 + 1 * 3) / 11
    expected_a[3] = (2 * 3 + 5 * 5) / 7
    expected_b = np.full((3, 4), 4.0)
    expected_b[:, 1] = (10 * 2 + 30 * 4) / 40
    got = flat.average(old)
    np.testing.assert_allclose(got["A"], expected_a, rtol=1e-6)
    np.testing.assert_allclose(got["B"], expected_b, rtol=1e-6)
    edges = [WeightedSum().add(updates[0], weights[0]), WeightedSum().add(updates[1], weights[1]).add(updates[2])]
    merged = FedAvg().merge(edges)
    for key in old:
        np.testing.assert_allclose(merged.average(old)[key], got[key], rtol=1e-6)


def test_metrics_may_be_numpy_arrays():
    partial = WeightedSum()
    partial.add(ClientUpdate(0, 1, {}, metrics={"expert_load": np.array([1.0, 0.0]), "loss": np.float32(2.0)}))
    partial.add(ClientUpdate(1, 3, {}, metrics={"expert_load": np.array([0.0, 1.0]), "loss": np.float32(1.0)}))
    metrics = partial.mean_metrics()
    np.testing.assert_allclose(metrics["expert_load"], [0.25, 0.75])
    assert metrics["loss"] == pytest.approx(1.25) and isinstance(metrics["loss"], float)


def test_fedavgm_server_momentum():
    old = {"w": np.zeros(2, np.float32)}
    strategy = FedAvgM(FedAvgMSettings(server_lr=1.0, server_momentum=0.5))
    state = strategy.init_state(old)
    params = old
    for _ in range(2):   # every client moves to +1 from wherever the global is
        partial = WeightedSum().add(ClientUpdate(0, 1, {"w": params["w"] + 1}))
        params, state, _ = strategy.aggregate(1, params, state, partial)
    np.testing.assert_allclose(params["w"], 1 + (1 + 0.5))   # step 1: +1; step 2: +1 + 0.5·1
    np.testing.assert_allclose(state["momentum"]["w"], -1.5)
    plain = FedAvgM(FedAvgMSettings(server_lr=1.0, server_momentum=0.0))
    new, _, _ = plain.aggregate(1, old, plain.init_state(old), WeightedSum().add(ClientUpdate(0, 1, {"w": old["w"] + 3})))
    np.testing.assert_allclose(new["w"], 3.0)   # beta 0, lr 1: FedAvg
