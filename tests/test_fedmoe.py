"""FedAvg-MoE, HFedMoE and FedAlign-MoE without Ray: the per-expert layout of the peft tensors, the
backward budget, each aggregation rule against a hand-computed example, the semantic filter, the
hand-over between virtual clients, upcycling, the data sets and bad input."""

import json
import math

import numpy as np
import pytest
import torch

from edgeray.errors import UserError
from pipelines.fedmoe.data import ROOT, DRUG_ZIP, load_drug_reviews, load_drug_reviews_instruct, load_topics
from pipelines.fedmoe.layout import extract_experts, insert_rows, moe_layout
from pipelines.fedmoe.settings import FedAlignMoESettings, FedAvgMoESettings, HFedMoESettings
from pipelines.fedmoe.strategy import (FedAlignMoE, FedAvgMoE, HFedMoE, HeldExperts, select_experts)
from pipelines.models import ClientHandover, build_model, get_params, set_params
from pipelines.population import PopulationView, sample_profiles
from pipelines.registry import ModelSpec
from pipelines.strategy import ClientContext, ClientData, ClientUpdate, Rows
from pipelines.tasks.vision import classification_loss

CONFIG = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def topics():
    return load_topics(seq_len=16, train_size=256, test_size=64)


@pytest.fixture(scope="module")
def tiny(topics):
    torch.set_num_threads(1)
    spec = ModelSpec("moe", {"arch": "olmoe", "router_std": 1.0, "config": CONFIG, "lora": {"r": 2, "alpha": 4}},
                     data_info=topics.info)
    model = build_model(spec)
    return model, ClientHandover(model), get_params(model)


def _ctx(model, data, cid, instruction, idx):
    return ClientContext(cid, 1, model, ClientData(data.x_train[idx], data.y_train[idx]), instruction, {},
                         np.random.default_rng(cid), classification_loss)


def _randomised(params, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}


# ---------------------------------------------------------------------------- layout

def test_expert_slices_round_trip_exactly_and_match_peft_delta(tiny):
    model, handover, g = tiny
    layout = moe_layout({k: v.shape for k, v in g.items()})
    assert layout.layers == (0, 1) and layout.experts == 8 and len(layout.tensors) == 8
    params = _randomised(g)
    chosen = {0: [1, 5], 1: [7]}
    rows = extract_experts(params, layout, chosen)
    assert all(isinstance(r, Rows) and k in g for k, r in rows.items())     # peft names, no invented ones
    zeroed = {k: np.zeros_like(v) for k, v in params.items()}
    back = insert_rows(zeroed, rows)
    for t in layout.tensors:
        for e in range(8):
            want = t.slice(params[t.key], e) if e in chosen[t.layer] else np.zeros_like(t.slice(params[t.key], e))
            np.testing.assert_array_equal(t.slice(back[t.key], e), want)
    assert all(np.array_equal(insert_rows(params, rows)[k], params[k]) for k in params)
    # the slices are the ones peft uses: its delta weight of expert e is scaling * B_e @ A_e
    handover.restore()
    set_params(model, params)
    wrappers = {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}
    checked = 0
    for a, b in layout.pairs(0):
        name = a.key.split(".lora_A.")[0]
        module = wrappers[name]
        delta = module.get_delta_weight("default").detach().numpy()
        for e in (0, 3, 7):
            lowrank = module.scaling["default"] * b.slice(params[b.key], e) @ a.slice(params[a.key], e)
            got = delta[e] if delta[e].shape == lowrank.shape else delta[e].T
            np.testing.assert_allclose(got, lowrank, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 6


# ---------------------------------------------------------------------------- backward budget

def test_budget_selection_keeps_the_best_routed_experts():
    probs = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.6, 0.25, 0.05], [0.5, 0.1, 0.35, 0.05]])
    assert select_experts(probs, 2, 4, "ib", 0.5, 0.1).tolist() == [True, True, True, False]   # E_union only
    keep = select_experts(probs, 2, 2, "importance", 0.5, 0.0)
    assert keep.tolist() == [True, True, False, False]
    assert int(select_experts(probs, 2, 1, "random", 0.5, 0.1, torch.Generator().manual_seed(0)).sum()) == 1


def test_backward_budget_updates_exactly_the_selected_experts(tiny, topics):
    model, handover, g = tiny
    layout = moe_layout({k: v.shape for k, v in g.items()})
    strategy = HFedMoE(HFedMoESettings(lr=0.01, batch_size=64, local_epochs=1))
    handover.restore()
    set_params(model, g)
    update = strategy.client_update(_ctx(model, topics, 0, {"budget": 2, "rho": 0.25, "lr": 0.01},
                                         np.arange(64)))               # one batch: one selection per layer
    new = get_params(model)
    for i, layer in enumerate(layout.layers):
        changed = np.zeros(8, bool)
        for t in layout.of_layer(layer):
            changed |= [not np.array_equal(t.slice(new[t.key], e), t.slice(g[t.key], e)) for e in range(8)]
        assert changed.sum() == 2, changed
        np.testing.assert_array_equal(changed, update.stats["trained"][i])
    assert update.stats["max_trained_experts"] == 2
    assert any(not np.array_equal(new[k], g[k]) for k in layout.routers.values())   # the router trains in full


def test_clients_in_a_row_with_different_budgets_do_not_leak(tiny, topics):
    model, handover, g = tiny
    strategy = HFedMoE(HFedMoESettings(lr=0.01, batch_size=32))

    def run(cid, budget):
        handover.restore()
        set_params(model, g)
        torch.manual_seed(cid)
        return strategy.client_update(_ctx(model, topics, cid, {"budget": budget, "rho": budget / 8, "lr": 0.01},
                                           np.arange(cid * 64, cid * 64 + 64)))

    alone = run(1, 8)
    run(0, 2)                           # a budgeted client first, on the same model object
    after = run(1, 8)
    assert after.stats["max_trained_experts"] > 2
    for key, value in alone.params.items():
        a = value.values if isinstance(value, Rows) else value
        b = after.params[key].values if isinstance(after.params[key], Rows) else after.params[key]
        np.testing.assert_array_equal(a, b, err_msg=key)


# ---------------------------------------------------------------------------- aggregation rules

R, D = "m.layers.0.mlp.gate.weight", "m.layers.0.self_attn.q_proj.lora_A.default.weight"
A, B = "m.layers.0.mlp.experts.lora_A.default.weight", "m.layers.0.mlp.experts.lora_B.default.weight"


def _global():
    # E=2 experts, rank 1, in=out=2
    return {R: np.zeros((2, 2), np.float32), D: np.zeros((1, 2), np.float32),
            A: np.zeros((2, 2), np.float32), B: np.zeros((2, 2), np.float32)}


def _update(cid, n, value, usage, importance, experts, a_rows=None, b_cols=None, descriptors=None):
    layout = moe_layout({k: v.shape for k, v in _global().items()})
    full = {R: np.full((2, 2), value, np.float32), D: np.full((1, 2), value, np.float32),
            A: np.full((2, 2), value, np.float32) if a_rows is None else a_rows,
            B: np.full((2, 2), value, np.float32) if b_cols is None else b_cols}
    rows = extract_experts(full, layout, {0: experts})
    stats = {"usage": np.array([usage], np.float32), "importance": np.array([importance], np.float32),
             "gate_kl": 0.0, "load": np.zeros((1, 2)), "trained": np.ones((1, 2), bool), "entropy": 0.5,
             "token_entropy": 0.1, "uploaded_experts": len(experts), "backward_expert_tokens": 1.0,
             "max_trained_experts": 2, "budget": None}
    if descriptors is not None:
        stats["descriptors"] = descriptors
    return ClientUpdate(cid, n, {R: full[R], D: full[D], **rows}, stats=stats)


def _aggregate(strategy, updates):
    g = _global()
    state = strategy.init_state(g)
    partial = strategy.init_partial()
    for u in updates:
        strategy.accumulate(partial, u)
    return strategy.aggregate(1, g, state, strategy.merge([partial]))


def test_hfedmoe_expert_and_router_aggregation_by_hand():
    # tau = 0.5 / 2 = 0.25: client 1 qualifies for both experts, client 2 only for expert 1
    u1 = _update(1, 10, 1.0, [0.6, 0.4], [0.5, 0.3], [0, 1])
    u2 = _update(2, 30, 3.0, [0.1, 0.9], [0.2, 0.8], [1])
    new, state, metrics = _aggregate(HFedMoE(HFedMoESettings()), [u1, u2])
    np.testing.assert_allclose(new[A][0], 1.0)                        # expert 0: client 1 only (eq. 17)
    np.testing.assert_allclose(new[A][1], (10 * 1 + 30 * 3) / 40)      # expert 1: n-weighted
    np.testing.assert_allclose(new[B][:, 0], 1.0)
    np.testing.assert_allclose(new[B][:, 1], 2.5)
    w1, w2 = 0.6 * 0.5 + 0.4 * 0.3, 0.9 * 0.8                          # alpha(c) before / |S_global| (eq. 20)
    np.testing.assert_allclose(new[R], (w1 * 1 + w2 * 3) / (w1 + w2), rtol=1e-6)   # normalised alpha (eq. 21)
    np.testing.assert_allclose(new[D], 2.5)                             # FedAvg for the rest
    raw, _, _ = _aggregate(HFedMoE(HFedMoESettings(router_alpha="raw")), [u1, u2])
    np.testing.assert_allclose(raw[R], (w1 * 1 + w2 * 3) / 2, rtol=1e-6)           # |S_global| = 2
    np.testing.assert_allclose(state["p_glob"][0], (10 * np.array([0.6, 0.4]) + 30 * np.array([0.1, 0.9])) / 40,
                               rtol=1e-6)
    assert metrics["experts_uploaded_per_client"] == [2, 1]


def test_fedavg_moe_is_example_weighted():
    new, _, _ = _aggregate(FedAvgMoE(), [_update(1, 10, 1.0, [0.5, 0.5], [0.5, 0.5], [0, 1]),
                                        _update(2, 30, 3.0, [0.5, 0.5], [0.5, 0.5], [0, 1])])
    for key in (R, D, A, B):
        np.testing.assert_allclose(new[key], 2.5)


def test_fedalign_router_rows_are_weighted_by_routing_mass():
    u1 = _update(1, 10, 1.0, [0.8, 0.2], [0.5, 0.5], [0, 1])
    u2 = _update(2, 30, 3.0, [0.2, 0.8], [0.5, 0.5], [0, 1])
    new, _, _ = _aggregate(FedAlignMoE(FedAlignMoESettings(semantic_filter=False, descriptor="update")), [u1, u2])
    s = np.array([[10 * 0.8, 10 * 0.2], [30 * 0.2, 30 * 0.8]])        # s_i(e) = n_i u_i(e)
    for e in range(2):
        np.testing.assert_allclose(new[R][e], (s[0, e] * 1 + s[1, e] * 3) / s[:, e].sum(), rtol=1e-6)
    np.testing.assert_allclose(new[D], 2.5)
    plain, _, _ = _aggregate(FedAlignMoE(FedAlignMoESettings(router_weighting="examples", descriptor="update")),
                             [u1, u2])
    np.testing.assert_allclose(plain[R], 2.5)


def test_fedalign_drops_a_misaligned_client():
    rng = np.random.default_rng(0)
    base_a, base_b = rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32)
    updates = []
    for cid in range(6):
        sign = -1.0 if cid == 5 else 1.0                            # client 5 moves its experts the other way
        a = base_a + 0.01 * rng.normal(size=(2, 2)).astype(np.float32)
        b = sign * base_b + 0.01 * rng.normal(size=(2, 2)).astype(np.float32)
        updates.append(_update(cid, 10, 1.0, [0.5, 0.5], [0.5, 0.5], [0, 1], a_rows=a, b_cols=b))
    new, _, metrics = _aggregate(FedAlignMoE(FedAlignMoESettings(descriptor="update")), updates)
    assert metrics["expert_slices_dropped"] == 2 and metrics["expert_slices_held"] == 12   # client 5, both experts
    aligned_b = np.mean([u.params[B].values for u in updates[:5]], 0)
    layout = moe_layout({k: v.shape for k, v in _global().items()})
    tb = next(t for t in layout.tensors if t.key == B)
    for e in range(2):
        np.testing.assert_allclose(new[B][:, tb.index([e])],
                                   aligned_b[:, [list(updates[0].params[B].index).index(i) for i in tb.index([e])]],
                                   rtol=1e-5)
    kept, _, metrics = _aggregate(FedAlignMoE(FedAlignMoESettings(semantic_filter=False, descriptor="update")),
                                  updates)
    assert metrics["expert_slices_dropped"] == 0


def test_fedalign_anchor_hidden_states_drop_a_misaligned_client_and_personalise_by_gamma():
    # descriptors = hidden-state changes on the anchors; client 5 moves expert 0 the other way,
    # expert 1 all agree. Rows of client c hold the value c+1 so every mix is checkable by hand.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2, 12))
    n = [10, 20, 30, 40, 50, 60]
    updates = []
    for cid in range(6):
        desc = {0: {e: ((-1.0 if cid == 5 and e == 0 else 1.0) * base[e] + 0.05 * rng.normal(size=12))
                    .astype(np.float16) for e in range(2)}}
        updates.append(_update(cid, n[cid], cid + 1.0, [0.5, 0.5], [0.5, 0.5], [0, 1], descriptors=desc))
    strategy = FedAlignMoE(FedAlignMoESettings(expert_mode="personalised"))
    new, state, metrics = _aggregate(strategy, updates)
    assert metrics["expert_slices_held"] == 12 and metrics["expert_slices_dropped"] == 1   # client 5, expert 0
    layout = moe_layout({k: v.shape for k, v in _global().items()})
    ta = next(t for t in layout.tensors if t.key == A)
    np.testing.assert_allclose(new[A][ta.index([0])], sum(n[c] * (c + 1) for c in range(5)) / sum(n[:5]), rtol=1e-6)
    np.testing.assert_allclose(new[A][ta.index([1])], sum(n[c] * (c + 1) for c in range(6)) / sum(n), rtol=1e-6)
    # gamma_ij ∝ n_j·1[S_ij >= tau]: for expert 0 the aligned clients mix among themselves, client 5 keeps its own
    for e in range(2):
        desc = np.stack([u.stats["descriptors"][0][e].astype(np.float64) for u in updates])
        sim = desc @ desc.T / np.outer(np.linalg.norm(desc, axis=1), np.linalg.norm(desc, axis=1))
        off = sim[~np.eye(6, dtype=bool)]
        tau = off.mean() - off.std()
        for cid in range(6):
            mine = state["personal"][cid][A]
            got = dict(zip(mine["index"].tolist(), mine["values"][:, 0].tolist()))
            gamma = np.array([n[j] * (sim[cid, j] >= tau or j == cid) for j in range(6)], float)
            np.testing.assert_allclose(got[ta.index([e])[0]], (gamma * np.arange(1, 7)).sum() / gamma.sum(), rtol=1e-5)
            if e == 0 and cid == 5:
                assert got[ta.index([0])[0]] == 6.0          # nobody is close to client 5: it keeps its own
    assert state["personal"][5][A]["values"][ta.index([0])[0] == state["personal"][5][A]["index"]][0, 0] == 6.0
    inst = strategy.configure_round(2, state, [5], None)[5]
    assert inst["personal_experts"] is state["personal"][5]
    _, global_state, _ = _aggregate(FedAlignMoE(FedAlignMoESettings()), updates)
    assert "personal" not in global_state
    assert "personal_experts" not in FedAlignMoE(FedAlignMoESettings()).configure_round(2, state, [5], None)[5]


def test_fedalign_client_sends_expert_output_changes_on_the_global_anchor_region(tiny, topics):
    from pipelines.fedmoe.model import anchor_regions, expert_output
    model, handover, g = tiny
    handover.restore()
    set_params(model, g)
    torch.manual_seed(0)
    strategy = FedAlignMoE(FedAlignMoESettings(lr=0.02, batch_size=32, anchor_tokens=6))
    update = strategy.client_update(_ctx(model, topics, 0, {"p_glob": np.full((2, 8), 1 / 8, np.float32),
                                                            "lr": 0.02}, np.arange(64)))
    desc = update.stats["descriptors"]
    layout = moe_layout({k: v.shape for k, v in g.items()})
    handover.restore()
    set_params(model, g)
    regions = anchor_regions(model, 2, 6)
    assert all(len(r.inputs) <= 6 for r in regions) and sum(len(r.inputs) for r in regions) > 0
    trained = insert_rows({**g, **{k: v for k, v in update.params.items() if not isinstance(v, Rows)}},
                          {k: v for k, v in update.params.items() if isinstance(v, Rows)})
    set_params(model, trained)
    uploaded = {(t.layer, e) for t in layout.tensors for e in range(8)
                if update.stats["usage"][t.layer][e] > 0.01}
    assert {(layer, e) for layer, d in desc.items() for e in d} == uploaded
    tap = model.fedmoe_tap
    changed = 0
    with torch.no_grad():
        for r in regions:
            if (r.layer, r.expert) in uploaded:
                want = (expert_output(tap.experts[r.layer], r.inputs, r.expert) - r.global_output).reshape(-1)
                got = torch.from_numpy(desc[r.layer][r.expert].astype(np.float32))
                torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
                changed += int(want.abs().max() > 1e-3)
    assert changed > 0


def test_a_personalised_client_starts_from_its_own_experts(tiny, topics):
    model, handover, g = tiny
    handover.restore()
    set_params(model, g)
    layout = moe_layout({k: v.shape for k, v in g.items()})
    t = layout.tensors[0]
    idx = t.index([3])
    values = np.full(np.take(g[t.key], idx, axis=t.axis).shape, 0.5, np.float32)
    strategy = FedAlignMoE(FedAlignMoESettings(lr=0.0, descriptor="update", gate_reg=0.0))
    update = strategy.client_update(_ctx(model, topics, 0, {"p_glob": np.full((2, 8), 1 / 8, np.float32), "lr": 0.0,
                                                            "personal_experts": {t.key: {"index": idx, "values": values,
                                                                                         "axis": t.axis}}},
                                         np.arange(32)))
    sent = update.params[t.key]
    where = [list(sent.index).index(i) for i in idx]
    np.testing.assert_array_equal(np.take(sent.values, where, axis=t.axis), values)       # lr 0: it starts there
    rest = [list(sent.index).index(i) for i in t.index([e for e in range(8) if e != 3]) if i in set(sent.index)]
    np.testing.assert_array_equal(np.take(sent.values, rest, axis=t.axis),        # the other experts: global
                                  np.take(g[t.key], np.asarray(sent.index)[rest], axis=t.axis))


def test_fedalign_gating_regulariser_pulls_toward_the_global_marginal(tiny, topics):
    model, handover, g = tiny
    p_glob = np.full((2, 8), 1 / 8, np.float32)
    out = {}
    for lam in (0.0, 5.0):
        handover.restore()
        set_params(model, g)
        torch.manual_seed(0)
        strategy = FedAlignMoE(FedAlignMoESettings(lr=0.02, batch_size=32, gate_reg=lam))
        update = strategy.client_update(_ctx(model, topics, 0, {"p_glob": p_glob, "lr": 0.02},
                                             np.flatnonzero(topics.y_train == 0)[:64]))
        out[lam] = update.stats["gate_kl"]
    assert out[5.0] < out[0.0]


def test_partial_of_fedalign_merges_like_flat():
    a, b = HeldExperts(), HeldExperts()
    a.held.append((1, 10, None, {}))
    b.held.append((2, 20, None, {}))
    assert [h[0] for h in HeldExperts().merge(a).merge(b).held] == [1, 2]


# ---------------------------------------------------------------------------- configuration, bad input

def _config(overrides):
    from actors.config import FLConfig
    from edgeray.config import load_config
    return load_config(FLConfig, ROOT / "configs" / "fedmoe_topics.yaml", overrides)


def test_budget_below_top_k_threshold_out_of_range_and_non_moe_paths_fail_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"tiers.*below top_k=2"):
        _config(["strategy.name=hfedmoe", "strategy.params.tiers=[0.1, 1.0]"])
    with pytest.raises(UserError, match="usage_share"):
        _config(["strategy.name=hfedmoe", "strategy.params.usage_share=1.5"])
    with pytest.raises(UserError, match="semantic_beta"):
        _config(["strategy.name=fedalign-moe", "strategy.params.semantic_beta=-1"])
    with pytest.raises(UserError, match="no config.json"):
        _config(["strategy.name=fedalign-moe", f"model.path={tmp_path}", "model.args={}"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UserError, match="not a mixture-of-experts checkpoint"):
        _config(["strategy.name=fedavg-moe", f"model.path={tmp_path}", "model.args={}"])
    with pytest.raises(UserError, match="needs model.name=moe"):
        _config(["strategy.name=hfedmoe", "model.name=cnn", "model.args={}"])
    with pytest.raises(UserError, match="router_init='bogus'"):     # checked without torch, before Ray
        _config(["strategy.name=fedalign-moe", "model.args={upcycle: {router_init: bogus}}"])
    with pytest.raises(UserError, match="router_scale"):
        _config(["strategy.name=fedalign-moe", "model.args={upcycle: {router_init: kmeans, router_scale: 0}}"])
    with pytest.raises(UserError, match="expert_mode"):
        _config(["strategy.name=fedalign-moe", "strategy.params.expert_mode=local"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_experts": 4,
                                                      "num_experts_per_tok": 2}))
    cfg = _config(["strategy.name=hfedmoe", f"model.path={tmp_path}", "strategy.params.tiers=[0.5]"])
    assert cfg.strategy.params["tiers"] == [0.5]


def test_cli_answers_bad_input_with_exit_2(capsys):
    from edgeray.cli import main
    code = main(["run", "hfedmoe", "--config", str(ROOT / "configs" / "fedmoe_topics.yaml"),
                 "--set", "strategy.params.tiers=[0.1]", "--set", "output_dir=/tmp/fedmoe-bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tiers" in err[0]


def test_hfedmoe_budgets_from_tiers_and_from_profiles():
    pop = PopulationView(tuple(sample_profiles(6, 0)), (10,) * 6)
    state = {"p_glob": np.full((1, 8), 1 / 8)}
    tiers = HFedMoE(HFedMoESettings(tiers=[0.25, 0.5, 1.0])).configure_round(1, state, list(range(6)), pop)
    assert [tiers[c]["budget"] for c in range(6)] == [2, 4, 8, 2, 4, 8]
    prof = HFedMoE(HFedMoESettings(budget_source="profile")).configure_round(1, state, list(range(6)), pop)
    speed = {c: pop.profiles[c].compute_speed for c in range(6)}
    slowest, fastest = min(speed, key=speed.get), max(speed, key=speed.get)
    assert prof[slowest]["budget"] == 2 and prof[fastest]["budget"] == 8
    assert HFedMoE().work(prof[slowest], 100) < HFedMoE().work(prof[fastest], 100)


# ---------------------------------------------------------------------------- data, upcycling

def test_topic_data_is_seeded_and_labelled(topics):
    again = load_topics(seq_len=16, train_size=256, test_size=64)
    np.testing.assert_array_equal(topics.x_train, again.x_train)
    assert topics.x_train.min() >= 1 and topics.x_train.max() < topics.info["vocab_size"]
    assert set(np.unique(topics.y_train)) == {0, 1, 2, 3}


@pytest.mark.skipif(not (ROOT / DRUG_ZIP).is_file() or not (ROOT / "data/models/smollm2-135m-instruct/hf/tokenizer.json").is_file(),
                    reason="drug reviews or the SmolLM2 tokenizer not fetched (scripts/assets/fedmoe.sh, svd.sh)")
def test_drug_reviews_classification_and_instruction_forms():
    data = load_drug_reviews(seq_len=32)
    assert data.x_train.shape == (600, 32) and data.x_test.shape == (379, 32)
    assert np.bincount(data.y_train).tolist() == [161, 54, 385] and data.groups.max() > 50
    assert data.info["pad_id"] == 0 and data.x_train.max() < data.info["vocab_size"]
    inst = load_drug_reviews_instruct(seq_len=32)
    assert ((inst.y_train != -100).sum(1) == 1).all()
    assert len(np.unique(inst.y_train[inst.y_train != -100])) == 3


def test_upcycled_moe_computes_the_dense_model(tmp_path):
    from edgeray.hf_models import build_tiny_model
    dense, tokenizer = build_tiny_model(seed=0, hidden_size=32, num_layers=2)
    dense.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    info = {"vocab": "full", "vocab_size": dense.config.vocab_size}
    spec = ModelSpec("moe", {"upcycle": {"experts": 4, "top_k": 2, "layers": [-1], "noise": 0.0}},
                     path=str(tmp_path), data_info=info)
    moe = build_model(spec).eval()
    x = torch.randint(0, dense.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = dense.eval()(input_ids=x).logits
        got = moe(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layout = moe_layout({k: tuple(p.shape) for k, p in moe.named_parameters() if p.requires_grad})
    assert layout.layers == (1,) and layout.experts == 4


def test_a_checkpoint_folder_loads_through_the_same_builder(tmp_path, topics):
    import transformers
    config = transformers.OlmoeConfig(vocab_size=topics.info["vocab_size"], **CONFIG)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    spec = ModelSpec("moe", {"arch": "olmoe", "config": {"hidden_size": 999}, "lora": {"r": 2}}, path=str(tmp_path),
                     data_info=topics.info)           # the checkpoint's config.json replaces arch/config
    model = build_model(spec)
    layout = moe_layout({k: tuple(p.shape) for k, p in model.named_parameters() if p.requires_grad})
    assert layout.experts == 8 and layout.layers == (0, 1)
    assert model(torch.from_numpy(topics.x_test[:2])).shape == (2, 4)


def test_kmeans_router_init_makes_the_upcycled_routing_sharp_and_keeps_the_dense_function(tmp_path):
    # normal init (router_std 0.02) routes uniformly and stays so (identical experts give the router
    # ~no gradient); k-means init on the public anchors gives each expert its own token region
    from edgeray.hf_models import build_tiny_model
    dense, tokenizer = build_tiny_model(seed=0, hidden_size=32, num_layers=2)
    dense.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    vocab = dense.config.vocab_size
    rng = np.random.default_rng(0)
    anchors = rng.integers(1, vocab, size=(16, 12))
    x, y = rng.integers(1, vocab, size=(64, 12)), rng.integers(0, 2, size=64)
    ratio = {}
    for init in ("normal", "kmeans"):
        up = {"experts": 4, "top_k": 2, "layers": [-1], "noise": 0.0, "router_init": init, "router_scale": 2.0}
        info = {"vocab": "full", "vocab_size": vocab, "anchors": anchors, "num_classes": 2}
        clf = build_model(ModelSpec("moe", {"upcycle": up, "router_std": 0.02}, path=str(tmp_path), data_info=info))
        probe = torch.from_numpy(x[:4])
        with torch.no_grad():
            clf.eval()
            torch.testing.assert_close(clf.lm(input_ids=probe).logits, dense.eval()(input_ids=probe).logits,
                                       rtol=1e-4, atol=1e-4)          # still the dense model
            clf.train()
        update = FedAvgMoE(FedAvgMoESettings(lr=1e-3, batch_size=16)).client_update(
            ClientContext(0, 1, clf, ClientData(x, y), {}, {}, np.random.default_rng(0), classification_loss))
        ratio[init] = update.stats["token_entropy"] / math.log(4)
    assert ratio["normal"] > 0.95 and ratio["kmeans"] < 0.8, ratio
    with pytest.raises(UserError, match="router_init=kmeans.*anchor"):
        build_model(ModelSpec("moe", {"upcycle": {"router_init": "kmeans", "layers": [-1]}}, path=str(tmp_path),
                              data_info={"vocab": "full", "vocab_size": vocab}))
    with pytest.raises(UserError, match="router_init='bogus'"):
        build_model(ModelSpec("moe", {"upcycle": {"router_init": "bogus", "layers": [-1]}}, path=str(tmp_path),
                              data_info={"vocab": "full", "vocab_size": vocab}))


# ---------------------------------------------------------------------------- Mixtral, Qwen2-MoE, causal-LM loss

ARCH_CONFIGS = {
    "mixtral": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
                "max_position_embeddings": 32},
    "qwen2_moe": {"hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                  "max_position_embeddings": 32},
}


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_mixtral_and_qwen2_moe_slices_round_trip_and_the_budget_holds(arch, topics):
    torch.manual_seed(0)
    model = build_model(ModelSpec("moe", {"arch": arch, "router_std": 1.0, "config": ARCH_CONFIGS[arch],
                                          "lora": {"r": 2, "alpha": 4}}, data_info=topics.info))
    g = get_params(model)
    layout = moe_layout({k: v.shape for k, v in g.items()})
    assert layout.layers == (0, 1) and layout.experts == 4
    assert all("shared_expert" not in k for k in layout.routers.values())   # Qwen2-MoE's shared gate is no router
    params = _randomised(g)
    rows = extract_experts(params, layout, {0: [2], 1: [0, 3]})
    back = insert_rows({k: np.zeros_like(v) for k, v in params.items()}, rows)
    for t in layout.tensors:
        for e in range(4):
            kept = e in ({0: [2], 1: [0, 3]}[t.layer])
            np.testing.assert_array_equal(t.slice(back[t.key], e),
                                          t.slice(params[t.key], e) if kept else 0 * t.slice(params[t.key], e))
    update = HFedMoE(HFedMoESettings(lr=0.01, batch_size=64)).client_update(
        _ctx(model, topics, 0, {"budget": 2, "rho": 0.5, "lr": 0.01}, np.arange(64)))
    new = get_params(model)
    for i, layer in enumerate(layout.layers):
        changed = np.zeros(4, bool)
        for t in layout.of_layer(layer):
            changed |= [not np.array_equal(t.slice(new[t.key], e), t.slice(g[t.key], e)) for e in range(4)]
        assert changed.sum() == 2 and np.array_equal(changed, update.stats["trained"][i]), (arch, changed)


@pytest.mark.skipif(not (ROOT / DRUG_ZIP).is_file() or not (ROOT / "data/models/smollm2-135m-instruct/hf/tokenizer.json").is_file(),
                    reason="drug reviews or the SmolLM2 tokenizer not fetched (scripts/assets/fedmoe.sh, svd.sh)")
def test_instruction_data_trains_the_answer_token_with_the_causal_lm_loss():
    from pipelines.fedmoe.model import evaluate_answer
    from pipelines.tasks.lm import next_token_loss
    data = load_drug_reviews_instruct(seq_len=32, vocab="compact")
    torch.manual_seed(0)
    lm = build_model(ModelSpec("moe", {"arch": "qwen2_moe", "router_std": 1.0, "config": ARCH_CONFIGS["qwen2_moe"],
                                       "lora": {"r": 2, "alpha": 4}}, data_info=data.info))
    assert not hasattr(lm, "head")                          # no num_classes: the causal LM itself
    x, y = data.x_train[:32], data.y_train[:32]
    before = evaluate_answer(lm, x, y)
    assert before["count"] == 32                            # one answer token per example
    update = FedAvgMoE(FedAvgMoESettings(lr=0.01, batch_size=8, local_epochs=4)).client_update(
        ClientContext(0, 1, lm, ClientData(x, y), {"lr": 0.01, "local_epochs": 4}, {}, np.random.default_rng(0),
                      next_token_loss))
    after = evaluate_answer(lm, x, y)
    assert after["test_loss"] < before["test_loss"]          # the answer token is what the loss trains
    assert update.stats["usage"].shape == (2, 4) and update.stats["budget"] is None
    np.testing.assert_allclose(update.stats["usage"].sum(1), 1.0, rtol=1e-5)


def test_cli_rejects_a_missing_or_dense_model_path_with_exit_2(tmp_path, capsys):
    from edgeray.cli import main
    base = ["run", "fedalign-moe", "--config", str(ROOT / "configs" / "fedmoe_topics.yaml"),
            "--set", f"output_dir={tmp_path / 'runs'}", "--set", "model.args={}"]
    code = main([*base, "--set", f"model.path={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nowhere" in err[0] and "config.json" in err[0]
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    code = main([*base, "--set", f"model.path={tmp_path / 'dense'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a mixture-of-experts" in err[0]
    code = main([*base, "--set", "strategy.params.min_usage=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "min_usage" in err[0]
