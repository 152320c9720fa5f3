"""Split learning without Ray: compressors (round trips, bytes, lossless settings, ACP's channel
choice, NSC's low-rank recovery and error feedback), split models and cut points, settings, and
the strategy's client and server steps wired together in-process (a lossless compressor trains
exactly like the unsplit model)."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.metering import payload_bytes
from edgeray.errors import UserError
from pipelines.registry import ModelSpec, strategy_settings
from pipelines.settings import StrategySettings
from pipelines.split.compressors import (ACP, NSC, Identity, Quant, RandTopK, StepInfo, energy_rank,
                                         fisher_scores, pack_bits, payload_formula, select_channels, unfold,
                                         unpack_bits)
from pipelines.split.models import build_split_cnn, build_split_resnet8
from pipelines.split.settings import SplitSettings, check_cut
from pipelines.split.strategy import SplitLearning, codec_state
from pipelines.strategy import ClientContext, ClientData, WeightedSum

MNIST = {"input_shape": [1, 28, 28], "num_classes": 10}
B, C, H, W = 16, 32, 12, 12


def smashed(seed=0, shape=(B, C, H, W)):
    return torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def round_trip(comp, a, labels=None, rnd=2, budget=None):
    """One step both ways: (payload up, Â, payload down, Ĝ, G)."""
    client, edge = codec_state(0, 0), codec_state(0, 1)
    info = StepInfo(rnd, budget, labels if labels is not None else torch.arange(len(a)) % 10, np.arange(len(a)))
    up = comp.encode_up(a, client, info)
    a_hat = comp.decode_up(pickle.loads(pickle.dumps(up)), edge, info)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    down = comp.encode_down(g, edge, info, smashed=a_hat)
    g_hat = comp.decode_down(pickle.loads(pickle.dumps(down)), client, info)
    return up, a_hat, down, g_hat, g


COMPRESSORS = [Identity(), Quant(8), Quant(4), Quant(2), RandTopK(0.1, 0.1), ACP(), ACP(scorer="taylor"),
               NSC(), NSC(unfold_mode="batch", ef_mode="step"), NSC(unfold_mode="spatial", center=False)]


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: f"{c.name}-{getattr(c, 'bits', '')}"
                         f"{getattr(c, 'unfold_mode', '')}{getattr(c, 'scorer', '')}")
@pytest.mark.parametrize("shape", [(B, C, H, W), (5, 8, 1, 1)])
def test_round_trips_keep_shapes_and_dtypes_and_payloads_are_plain_arrays(comp, shape):
    a = smashed(1, shape)
    up, a_hat, down, g_hat, g = round_trip(comp, a)
    assert a_hat.shape == a.shape and g_hat.shape == g.shape
    assert a_hat.dtype == g_hat.dtype == torch.float32
    for payload in (up, down):
        assert all(not torch.is_tensor(v) for v in payload.values())   # numpy: metered exactly as sent
        assert 0 <= payload_bytes(payload) - payload_formula(payload) < 1024


def expected_bytes(comp, a, up, down):
    """The bytes formula of each compressor, from the tensor and the chosen k or r."""
    b, n = len(a), a[0].numel()
    if isinstance(comp, Identity):
        return 4 * a.numel(), 4 * a.numel()
    if isinstance(comp, Quant):
        return math.ceil(a.numel() * comp.bits / 8), math.ceil(a.numel() * comp.bits / 8)
    if isinstance(comp, RandTopK):
        k = max(1, round(comp.ratio * n))
        return b * k * (2 + 4), b * k * 4
    if isinstance(comp, ACP):
        k, hw = len(up["idx"]), a[0, 0].numel()
        return 2 * k + 4 * b * k * hw, 4 * b * k * hw + (4 * k if comp.scorer == "taylor" else 0)
    m = unfold(a, comp.unfold_mode)
    r_up, r_down = up["P"].shape[1], down["P"].shape[1]
    mean = 4 * m.shape[0] if comp.center else 0                     # the row means
    return 4 * r_up * sum(m.shape) + mean, 4 * r_down * sum(m.shape) + mean


@pytest.mark.parametrize("comp", COMPRESSORS, ids=lambda c: c.name)
def test_metered_bytes_match_the_formula_within_1kb(comp):
    a = smashed(2)
    up, _, down, _, _ = round_trip(comp, a)
    want_up, want_down = expected_bytes(comp, a, up, down)
    assert abs(payload_bytes(up) - want_up) < 1024
    assert abs(payload_bytes(down) - want_down) < 1024


def test_quant_packs_bits_and_rounds_without_bias():
    q = np.random.default_rng(0).integers(0, 4, 1001).astype(np.uint8)
    assert len(pack_bits(q, 2)) == 251 and np.array_equal(unpack_bits(pack_bits(q, 2), 2, 1001), q)
    x = torch.full((4, 1000), 0.3)
    x[0, 0], x[0, 1] = 0.0, 1.0                       # range [0, 1]: 0.3 lies between the 2-bit levels 0 and 1/3
    comp, state = Quant(2), {"seed": 3}
    draws = torch.stack([comp.decode(comp.encode(x, state, StepInfo()), {}, StepInfo()) for _ in range(50)])
    values = draws[:, 1:]
    assert (torch.isclose(values, torch.tensor(0.0)) | torch.isclose(values, torch.tensor(1 / 3))).all()
    assert abs(float(draws[:, 1:].mean()) - 0.3) < 0.01
    with pytest.raises(ValueError, match="bits=3"):
        Quant(3)


def test_tau_one_and_full_rank_are_lossless():
    a = smashed(3)
    for comp in (ACP(tau=1.0, rho_min=0.25), NSC(energy=1.0, rank_max=C, ef_mode="none"), Identity()):
        _, a_hat, _, g_hat, g = round_trip(comp, a, rnd=5)
        torch.testing.assert_close(a_hat, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g_hat, g, atol=1e-4, rtol=1e-4)
    up = round_trip(ACP(tau=1.0), a, rnd=5)[0]
    assert len(up["idx"]) == C


def test_acp_keeps_the_one_channel_that_predicts_the_label():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    a = torch.rand(64, 8, 6, 6, generator=gen)                     # seven channels of noise
    a[:, 5] = labels.view(-1, 1, 1).float() + 0.1 * torch.rand(64, 6, 6, generator=gen)
    scores = fisher_scores(a, labels)
    assert int(np.argmax(scores)) == 5 and scores[5] > 100 * np.delete(scores, 5).max()
    comp = ACP(tau=0.5, rho_min=0.1, warmup_rounds=1)
    client, edge = codec_state(0, 0), codec_state(0, 1)
    assert len(comp.encode_up(a, client, StepInfo(1, labels=labels))["idx"]) == 8    # warm-up: every channel
    up = comp.encode_up(a, client, StepInfo(2, labels=labels))
    assert up["idx"].tolist() == [5]
    a_hat = comp.decode_up(up, edge, StepInfo(2))
    assert torch.equal(a_hat[:, 5], a[:, 5]) and not a_hat[:, :5].any()
    # the floor and the bandwidth cap
    assert len(select_channels(scores, 0.5, 0.5)) == 4
    assert len(select_channels(np.ones(8), 1.0, 0.1, cap=3)) == 3
    with pytest.raises(ValueError, match="tau"):
        ACP(tau=1.5)


def test_acp_taylor_scores_come_back_with_the_gradient():
    comp = ACP(scorer="taylor", warmup_rounds=1)
    a = smashed(4)
    up, a_hat, down, _, g = round_trip(comp, a, rnd=1)
    assert "taylor" in down and down["taylor"].shape == (C,)


def test_nsc_centering_keeps_the_rank_off_the_mean():
    """Post-ReLU activations: a large common offset plus a rank-4 signal. On the raw matrix the
    offset alone holds 95 % of the energy (rank 1); centered, the rank is the signal's."""
    gen = torch.Generator().manual_seed(2)
    signal = torch.randn(C, 4, generator=gen) @ torch.randn(4, B * H * W, generator=gen)
    a = (5.0 + 0.3 * signal).reshape(C, B, H, W).permute(1, 0, 2, 3).contiguous()
    m = unfold(a, "channel")
    assert energy_rank(m, 0.95) == 1 and energy_rank(m - m.mean(1, keepdim=True), 0.95) == 4
    raw, centered = NSC(energy=0.95, center=False), NSC(energy=0.95)
    assert raw.encode(a, {"seed": 0}, StepInfo())["P"].shape[1] == 1
    payload = centered.encode(a, {"seed": 0}, StepInfo())
    assert payload["P"].shape[1] == 4 and payload["mean"].shape == (C,)
    torch.testing.assert_close(centered.decode(payload, {}, StepInfo()), a, atol=1e-3, rtol=1e-4)


def test_nsc_recovers_an_exactly_low_rank_matrix():
    gen = torch.Generator().manual_seed(1)
    left, right = torch.randn(C, 3, generator=gen), torch.randn(3, B * H * W, generator=gen)
    m = left @ right                                              # rank 3 in the channel unfolding
    a = m.reshape(C, B, H, W).permute(1, 0, 2, 3).contiguous()
    assert energy_rank(unfold(a, "channel"), 0.999999) == 3
    comp, state = NSC(energy=0.999999, ef_mode="none", iters=2), {"seed": 0}
    payload = comp.encode(a, state, StepInfo())
    assert payload["P"].shape == (C, 3)
    torch.testing.assert_close(comp.decode(payload, {}, StepInfo()), a, atol=1e-3, rtol=1e-3)


def test_nsc_rank_follows_the_bit_budget():
    a = smashed(5)
    comp, m = NSC(energy=1.0), unfold(a, "channel")
    per_rank = 32 * sum(m.shape)
    for r in (1, 4, 9):
        payload = comp.encode(a, {"seed": 0}, StepInfo(budget_bits=r * per_rank + 8 * 512 + 32 * C + 1))
        assert payload["P"].shape[1] == r
    state = {"seed": 0}
    comp.encode(a, state, StepInfo(budget_bits=10.0))            # below one rank: rank 1, counted
    assert state["budget_violations"] == 1 and state["last_rank"] == 1


def test_nsc_error_feedback_sums_to_the_dense_signal():
    comp, state = NSC(energy=0.5, rank_max=2, ef_mode="step"), {"seed": 0}
    signals = [smashed(10 + t) for t in range(6)]
    sent = sum(comp.decode(comp.encode(s, state, StepInfo()), {}, StepInfo()) for s in signals)
    residual = torch.from_numpy(state["E"])
    torch.testing.assert_close(sent + residual, sum(signals), atol=1e-3, rtol=1e-4)
    # per sample: a sample's residual comes back when the sample does
    comp, state = NSC(energy=0.5, rank_max=2, ef_mode="sample"), {"seed": 0}
    ids = np.arange(B)
    first = comp.decode(comp.encode(signals[0], state, StepInfo(sample_ids=ids)), {}, StepInfo())
    again = comp.decode(comp.encode(signals[0], state, StepInfo(sample_ids=ids)), {}, StepInfo())
    res = torch.stack([torch.from_numpy(state["res"][i].astype(np.float32)) for i in ids])
    torch.testing.assert_close(first + again + res, 2 * signals[0], atol=2e-2, rtol=1e-3)


def test_split_models_and_cut_points():
    cnn = build_split_cnn(ModelSpec("split-cnn", {"cut": 1}, data_info=MNIST))
    assert cnn.smashed_shape == (32, 12, 12)
    assert build_split_cnn(ModelSpec("split-cnn", {"cut": 2}, data_info=MNIST)).smashed_shape == (64, 4, 4)
    net = build_split_resnet8(ModelSpec("split-resnet8", {"cut": 3}, data_info=MNIST))
    assert net.smashed_shape == (32, 14, 14) and net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert not list(net.buffers())                                  # GroupNorm: nothing local to an actor
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(cnn(x), cnn.top(cnn.bottom(x)))      # mask of ones: the plain model
    with torch.no_grad():
        cnn.mask[3:] = 0
    masked = cnn.bottom(x).clone()
    masked[:, 3:] = 0
    torch.testing.assert_close(cnn(x), cnn.top(masked))
    assert check_cut("split-resnet8", 3) == 3
    for bad in (0, 3, "1", True):
        with pytest.raises(UserError, match="beyond model split-cnn"):
            check_cut("split-cnn", bad)
    with pytest.raises(UserError, match="model.args.depth"):
        build_split_cnn(ModelSpec("split-cnn", {"depth": 3}, data_info=MNIST))


def test_the_driver_checks_the_model_and_cut_without_torch():
    from actors.config import FLConfig
    from edgeray.config import load_config

    base = ["strategy.name=split", "data.dataset=digits", "data.path=null"]
    config = Path(__file__).resolve().parents[1] / "configs" / "split_mnist.yaml"
    load_config(FLConfig, config, base)
    for override, words in (("model.args={cut: 5}", "model.args.cut=5 is beyond model split-cnn"),
                            ("model.name=cnn", "strategy split needs a split model"),
                            ("model.args={depth: 2}", "no model.args.depth")):
        with pytest.raises(UserError, match=words):
            load_config(FLConfig, config, base + [override])


@pytest.mark.parametrize("key, value, words", [("acp_tau", 0.0, "acp_tau"), ("acp_rho_min", 1.2, "acp_rho_min"),
                                               ("bits", 3, "bits"), ("step_budget_s", -1.0, "step_budget_s"),
                                               ("nsc_energy", 2.0, "nsc_energy"), ("compressor", "topk", "compressor")])
def test_bad_settings_name_the_field(key, value, words):
    common = {f: getattr(StrategySettings(), f) for f in ("clients_per_round", "local_epochs", "batch_size", "lr")}
    with pytest.raises(UserError, match=words):
        strategy_settings("split", common, {key: value})


# ----------------------------------------------------------------------------- the strategy, in-process

def wired(settings, seed=0, n=48, num_clients=1):
    """A split run without Ray: the full model, an edge with the top, ctx.exchange calling server_step."""
    from pipelines.registry import TaskSpec

    task = TaskSpec(ModelSpec("split-cnn", {"cut": 1}, seed=seed, data_info=MNIST), "classification")
    strategy = SplitLearning(settings)
    strategy.bind_task(task)
    torch.manual_seed(seed)
    model = build_split_cnn(task.model)
    rng = np.random.default_rng(seed)
    data = ClientData(rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n))
    return strategy, model, data


def client_round(strategy, model, data, edge_state, cid=0, rnd=1, client_state=None, link=None, server_state=None):
    """One client's round through edge and aggregator; ``server_state`` (a dict) is updated in place."""
    from pipelines.models import get_params
    from pipelines.tasks.vision import classification_loss

    global_params = get_params(model)
    strategy.begin_edge_round(rnd, edge_state, [cid], global_params)
    metered = []

    def exchange(payload):
        metered.append(payload_bytes(payload))
        return pickle.loads(pickle.dumps(strategy.server_step(edge_state, cid, pickle.loads(pickle.dumps(payload)))))

    ctx = ClientContext(cid, rnd, model, data, {}, client_state if client_state is not None else {},
                        np.random.default_rng(0), classification_loss, exchange, link=link)
    update = strategy.client_update(ctx)
    partial = strategy.end_edge_round(rnd, edge_state, WeightedSum().add(update))
    new, new_state, metrics = strategy.aggregate(rnd, global_params, dict(server_state or {}), partial)
    if server_state is not None:
        server_state.update(new_state)
    return new, metrics, metered


@pytest.mark.parametrize("mode", ["splitfed", "sequential"])
def test_the_planner_expects_what_the_clients_metered_last_round(mode):
    from pipelines.models import get_params

    settings = SplitSettings(batch_size=16, mode=mode, compressor="identity")
    strategy, model, data = wired(settings)
    state = strategy.init_state(get_params(model))
    relay = sum(v.nbytes for k, v in get_params(model).items() if k.startswith("bottom."))
    first = strategy.configure_round(1, state, [0], None)[0]
    assert strategy.estimate_traffic(first, len(data)) == ((relay, relay) if mode == "sequential" else (0, 0))
    _, _, metered = client_round(strategy, model, data, {}, server_state=state)
    down, up = strategy.estimate_traffic(strategy.configure_round(2, state, [0], None)[0], len(data))
    steps = metered[1:-1] if mode == "sequential" else metered  # not the pull and the push
    assert len(steps) == 3
    assert 0 < sum(steps) - (up - (relay if mode == "sequential" else 0)) < 1024 * len(steps)
    assert down - (relay if mode == "sequential" else 0) == 4 * len(data) * 32 * 12 * 12  # fp32 gradients
    assert strategy.estimate_traffic(strategy.configure_round(2, state, [0], None)[0], 2 * len(data))[1] > 1.9 * up


@pytest.mark.parametrize("compressor, extra", [("identity", {}), ("acp", {"acp_tau": 1.0}),
                                               ("nsc", {"nsc_energy": 1.0, "nsc_ef_mode": "none"})])
@pytest.mark.parametrize("mode", ["splitfed", "sequential"])
def test_a_lossless_compressor_trains_like_the_unsplit_model(compressor, extra, mode):
    from pipelines.models import get_params

    settings = SplitSettings(batch_size=16, lr=0.1, momentum=0.9, mode=mode, compressor=compressor, **extra)
    strategy, model, data = wired(settings)
    new, metrics, metered = client_round(strategy, model, data, {})
    # the same SGD steps on the whole model in one process, the same batches
    _, reference, _ = wired(settings)
    optimizer = torch.optim.SGD([p for n, p in reference.named_parameters() if n != "mask"], lr=0.1, momentum=0.9)
    order = np.random.default_rng(0).permutation(len(data))
    for lo in range(0, len(order), 16):
        idx = order[lo:lo + 16]
        optimizer.zero_grad()
        logits = reference(torch.from_numpy(data.x[idx]))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.y[idx])).backward()
        optimizer.step()
    want = get_params(reference)
    for key in want:
        np.testing.assert_allclose(new[key], want[key], atol=2e-4, rtol=1e-3, err_msg=key)
    assert len(metered) == 3 + 2 * (mode == "sequential")          # a payload per batch (+ pull and push)
    assert metrics["mask_mean"] == 1.0


def test_acp_mask_is_global_state_and_evaluation_applies_it():
    settings = SplitSettings(batch_size=16, compressor="acp", acp_tau=0.3, acp_rho_min=0.25, acp_warmup_rounds=0,
                             mode="splitfed")
    strategy, model, data = wired(settings)
    new, metrics, metered = client_round(strategy, model, data, {})
    kept = new["mask"] > 0
    assert 8 <= kept.sum() < 32 and set(np.unique(new["mask"])) <= {0.0, 1.0}
    assert metrics["acp_kept"] == kept.mean()
    assert max(metered) < 0.8 * 16 * 32 * 12 * 12 * 4                  # fewer channels on the wire
    from pipelines.models import set_params
    set_params(model, new)
    x = torch.from_numpy(data.x[:4])
    smashed_x = model.bottom(x) * torch.from_numpy(new["mask"]).view(1, -1, 1, 1)
    torch.testing.assert_close(model(x), model.top(smashed_x))


def test_nsc_rank_follows_this_rounds_link():
    from pipelines.population import Link

    settings = SplitSettings(batch_size=16, compressor="nsc", nsc_energy=1.0, step_budget_s=0.1, mode="splitfed")
    ranks, sizes = {}, {}
    for mbps in (2.0, 8.0):
        strategy, model, data = wired(settings)
        _, metrics, metered = client_round(strategy, model, data, {}, link=Link(mbps, mbps))
        ranks[mbps], sizes[mbps] = metrics["nsc_rank"], max(metered)
    per_rank = 32 * (32 + 16 * 12 * 12)                              # fp32 factors of a 32 x 2304 unfolding
    header = 4096 + 32 * 32                                          # pickle header and the row means
    assert ranks[2.0] == (2e6 * 0.1 - header) // per_rank == 2 and ranks[8.0] == (8e6 * 0.1 - header) // per_rank == 10
    assert sizes[8.0] > 3 * sizes[2.0]
