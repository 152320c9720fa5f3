"""Split learning on a real local Ray: the runtime's metered bytes match the payload formula,
sequential SL's turns make the pool size irrelevant, and resuming a split run (client-side and
edge-side compressor state, the top model, ACP's mask) ends where the uninterrupted run ends."""

from pathlib import Path

import numpy as np
import pytest

from actors.config import FLConfig
from actors.driver import FLRun, prepare
from edgeray.config import load_config

pytestmark = pytest.mark.ray
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "split_mnist.yaml"
DIGITS = ["strategy.name=split", "data.dataset=digits", "data.path=null", "data.num_clients=3",
          "strategy.clients_per_round=3", "strategy.batch_size=64", "runtime.resource_classes={default: {num_cpus: 0.5, num_actors: 1}}"]


def make_run(overrides):
    cfg = load_config(FLConfig, CONFIG, DIGITS + list(overrides))
    prepared = prepare(cfg)
    return FLRun(cfg, cfg.strategy.spec(), prepared), cfg, prepared


def rounds(fl, which):
    return [fl.aggregator.run_round.remote(r) for r in which]


def test_runtime_meters_the_payload_formula(ray_session):
    from actors.metering import payload_bytes

    ray = ray_session
    fl, cfg, prepared = make_run(["strategy.params.compressor=identity", "strategy.params.step_budget_s=null"])
    try:
        before = ray.get(fl.aggregator.global_weights.remote())
        row = ray.get(rounds(fl, [1]))[0]
    finally:
        fl.shutdown()
    sizes = [min(64, len(prepared.parts[c]) - lo) for c in range(3) for lo in range(0, len(prepared.parts[c]), 64)]
    smashed = 32 * 4 * 4                                      # digits 8x8, cut after conv1+pool
    assert row["exchange_calls"] == len(sizes) and row["clients_completed"] == 3
    up_formula = sum(4 * b * smashed + 2 * b for b in sizes)  # fp32 smashed data + int16 labels
    down_formula = sum(4 * b * smashed + 8 for b in sizes)    # fp32 gradient + the loss
    bottom = {k: v for k, v in before.items() if k.startswith("bottom.")}
    update = 3 * payload_bytes(bottom)
    assert 0 <= row["bytes_up"] - update - up_formula < 1024 * (len(sizes) + 3)
    assert 0 <= row["bytes_down"] - update - down_formula < 1024 * (len(sizes) + 3)
    # what the clients report to the planner (next round's estimate) is the same traffic, per example
    assert row["train_exchange_up_bytes_per_example"] * sum(sizes) == pytest.approx(up_formula)
    assert row["train_exchange_down_bytes_per_example"] * sum(sizes) == pytest.approx(down_formula - 8 * len(sizes))


def test_sequential_turns_give_the_same_model_on_one_or_two_actors(ray_session):
    ray = ray_session
    results = []
    for actors in (1, 2):
        fl, _, prepared = make_run(["strategy.params.mode=sequential", "strategy.params.compressor=quant",
                             f"runtime.resource_classes={{default: {{num_cpus: 0.5, num_actors: {actors}}}}}"])
        try:
            rows = ray.get(rounds(fl, [1]))
            results.append((rows, ray.get(fl.aggregator.global_weights.remote())))
        finally:
            fl.shutdown()
    (rows1, w1), (rows2, w2) = results
    for key in w1:
        np.testing.assert_array_equal(w1[key], w2[key], err_msg=key)
    assert [r["bytes_up"] for r in rows1] == [r["bytes_up"] for r in rows2]
    batches = sum(-(-len(prepared.parts[c]) // 64) for c in range(3))
    assert rows1[0]["exchange_calls"] == batches + 3 * 2         # a payload per batch, plus pull and push


@pytest.mark.parametrize("overrides", [
    ["strategy.params.mode=splitfed", "strategy.params.compressor=acp", "strategy.params.acp_warmup_rounds=1"],
    ["strategy.params.mode=sequential", "strategy.params.compressor=nsc", "strategy.params.nsc_ef_mode=step",
     "clock.link_model=rayleigh"],
], ids=["acp-splitfed", "nsc-sequential"])
def test_resume_of_a_split_run_equals_the_uninterrupted_run(ray_session, tmp_path, overrides):
    ray = ray_session
    fl, _, _ = make_run(overrides)                      # the uninterrupted run, checkpointed after round 1
    try:
        full = ray.get(rounds(fl, [1]))
        ray.get(fl.aggregator.save_checkpoint.remote(str(tmp_path / "round_00001.pt"), 1, {}))
        full += ray.get(rounds(fl, [2]))
        full_weights = ray.get(fl.aggregator.global_weights.remote())
    finally:
        fl.shutdown()
    fl, _, _ = make_run(overrides)                      # new actors, a new store: resume after round 1
    try:
        assert ray.get(fl.aggregator.load_checkpoint.remote(str(tmp_path))) == 1
        resumed_row = ray.get(rounds(fl, [2]))[0]
        resumed = ray.get(fl.aggregator.global_weights.remote())
    finally:
        fl.shutdown()
    for key in full_weights:
        np.testing.assert_array_equal(resumed[key], full_weights[key], err_msg=key)
    keep = ("bytes_up", "bytes_down", "exchange_calls", "sim_time_s", "train_loss")
    assert {k: resumed_row[k] for k in keep} == pytest.approx({k: full[1][k] for k in keep})
    if "compressor=acp" in overrides[1]:
        assert full[0]["train_mask_mean"] == 1.0        # warm-up round: every channel
        assert full[1]["train_mask_mean"] < 1.0         # then channels were pruned
