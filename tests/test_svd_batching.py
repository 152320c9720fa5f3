"""Continuous batching in the SVD engine (tiny random Llama, no Ray): requests that join a
running batch at a decode-step boundary (KV caches merged with left padding, per-row masks and
position ids) produce exactly the greedy tokens they produce alone, with per-row steering and
LoRA / IA3 / prompt-tuning tasks side by side; a request arriving mid-generation finishes
before an earlier long one; a cancelled row leaves within one decode step and frees its slot."""

import threading
import time

import torch

from edgeray.hf_models import build_tiny_model
from serving.svd.decoding import BASE, ContinuousBatcher, DecodeBatch, DecodeRequest, LoadedTask, SVDEngine
from serving.svd.steering import SamplingParams
from serving.svd.warmstart import PeftSpec, load_config, make_peft_model
from test_svd_decoding import _lora_engine


def _engine_with_every_kind():
    """The LoRA engine of test_svd_decoding plus an IA3 task (a perturbed merged copy of the
    model, as load_task makes it) and a prompt-tuning task (random virtual tokens)."""
    engine, tok = _lora_engine()
    fresh, _ = build_tiny_model(0)
    ia3 = make_peft_model(fresh, load_config(PeftSpec, data={"type": "ia3"}))
    torch.manual_seed(2)
    for name, param in ia3.named_parameters():
        if "ia3_l" in name:
            param.data.uniform_(0.3, 1.7)
    engine.tasks["ia3"] = LoadedTask("ia3", "ia3", 0.5, 0.1, {}, phi_model=ia3.merge_and_unload().eval())
    hidden = engine.model.get_input_embeddings().weight.shape[1]
    engine.tasks["pt"] = LoadedTask("pt", "prompt_tuning", -0.4, 0.1, {}, prefix=torch.randn(3, hidden) * 0.5)
    return engine, tok


def _requests(engine, tok):
    t = engine.tasks
    prompts = ["Is 12 odd?", "Hi", "Question: what is two plus two? Answer:", "abc", "x y z", "Tell me"]
    specs = [(t["default"], True, -0.7), (None, False, 0.0), (t["ia3"], True, 0.5), (t["pt"], True, -0.4),
             (t["default"], False, 0.0), (t["pt"], False, 0.0)]
    return [DecodeRequest(tok(p).input_ids, 6 + 2 * i, task, steer, mu, 0.1, ignore_eos=True)
            for i, (p, (task, steer, mu)) in enumerate(zip(prompts, specs))]


def _alone(engine, request):
    clone = DecodeRequest(request.prompt_ids, request.max_tokens, request.task, request.steer, request.mu,
                          request.alpha, request.sampling, ignore_eos=request.ignore_eos)
    return [step[0] for step in engine.generate([clone]) if step[0] is not None]


def test_rows_joining_mid_generation_decode_exactly_as_alone():
    engine, tok = _engine_with_every_kind()
    requests = _requests(engine, tok)
    expected = [_alone(engine, r) for r in requests]
    assert len({tuple(e) for e in expected}) > 1
    batch = DecodeBatch(engine)
    got = {id(r): [] for r in requests}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}      # step -> requests that join then
    step = 0
    while step == 0 or len(batch) or any(s > step for s in arrivals):
        if step in arrivals:
            batch.admit([requests[i] for i in arrivals[step]])
        for request, event in batch.advance():
            if "token" in event:
                got[id(request)].append(event["token"])
        step += 1
    assert [got[id(r)] for r in requests] == expected
    assert not batch.lanes                                  # every row left, every cache freed


def test_batched_equals_unbatched_with_eos_and_sampling_seeds():
    engine, tok = _lora_engine()
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=5)
    requests = [DecodeRequest(tok(p).input_ids, 12, engine.tasks["default"], steer, -0.7, 0.1, sampling)
                for p, steer, sampling in [("Is 5 odd?", True, SamplingParams()), ("Hello", False, sampled),
                                           ("A much longer prompt than the others here", True, sampled)]]
    expected = [_alone(engine, r) for r in requests]
    batch = DecodeBatch(engine)
    got = [[] for _ in requests]
    batch.admit(requests[:1])
    for step in range(40):
        if step == 2:
            batch.admit(requests[1:])
        for request, event in batch.advance():
            if "token" in event:
                got[requests.index(request)].append(event["token"])
        if not len(batch):
            break
    assert got == expected


def test_cache_is_trimmed_when_a_long_row_leaves():
    engine, tok = _lora_engine()
    batch = DecodeBatch(engine)
    long_prompt = DecodeRequest(tok("one two three four five six seven eight nine ten").input_ids, 3, ignore_eos=True)
    short = DecodeRequest(tok("Hi").input_ids, 8, ignore_eos=True)
    batch.admit([long_prompt, short])
    width = batch.lanes[("mixed", None)].mask.shape[1]
    while long_prompt.finish is None and any(r.request is long_prompt for r in batch.rows):
        batch.advance()
    lane = batch.lanes[("mixed", None)]
    assert lane.mask.all() and lane.mask.shape[1] < width     # only the short row's real tokens remain
    assert lane.cache.layers[0].keys.shape[2] == lane.mask.shape[1]


def _collect(batcher, request):
    events, done = [], threading.Event()

    def on_event(event):
        events.append((time.monotonic(), event))
        if event.get("done") or "error" in event:
            done.set()
    batcher.submit(request, on_event)
    return events, done


def test_a_request_arriving_mid_generation_finishes_first():
    engine, tok = _lora_engine()
    batcher = ContinuousBatcher(engine, max_rows=8)
    try:
        long_events, long_done = _collect(batcher, DecodeRequest(tok("Tell me a story").input_ids, 120,
                                                                 ignore_eos=True))
        while len(long_events) < 3:
            time.sleep(0.005)
        short = DecodeRequest(tok("Hi").input_ids, 4, engine.tasks["default"], True, -0.7, 0.1, ignore_eos=True)
        short_events, short_done = _collect(batcher, short)
        assert short_done.wait(60)
        assert not long_done.is_set()                    # the earlier, long request is still running
        assert [e["token"] for _, e in short_events if "token" in e] == _alone(engine, short)
        assert long_done.wait(120)
        assert long_events[-1][1]["finish_reason"] == "length"
        assert batcher.stats()["admitted"] == 2
    finally:
        batcher.close()


def test_a_cancelled_row_frees_its_slot_within_one_decode_step():
    engine, tok = _lora_engine()
    batcher = ContinuousBatcher(engine, max_rows=1)          # one slot: the second request waits for it
    try:
        first = DecodeRequest(tok("Tell me a story").input_ids, 500, ignore_eos=True)
        first_events, first_done = _collect(batcher, first)
        second_events, second_done = _collect(batcher, DecodeRequest(tok("Hi").input_ids, 3, ignore_eos=True))
        while len(first_events) < 5:
            time.sleep(0.005)
        assert not second_events and batcher.stats()["queued"] == 1
        batcher.cancel(first)                              # e.g. the client disconnected
        assert first_done.wait(30) and second_done.wait(30)
        final = first_events[-1][1]
        assert final["finish_reason"] == "cancelled" and final["completion_tokens"] < 500
        stats = batcher.stats()
        assert stats["cancelled_rows"] == 1 and stats["cancel_lag_steps_max"] <= 1
        assert stats["running"] == 0 and stats["queued"] == 0
        assert [e["finish_reason"] for _, e in second_events if e.get("done")] == ["length"]
    finally:
        batcher.close()


def test_a_failed_forward_answers_every_row_and_the_batcher_goes_on():
    engine, tok = _lora_engine()
    batcher = ContinuousBatcher(engine)
    try:
        broken = DecodeRequest(tok("Hi").input_ids, 4, LoadedTask("gone", "lora", 0.0, 0.1, {}), True)
        events, done = _collect(batcher, broken)              # adapter "gone" is not in the PEFT model
        assert done.wait(30) and "error" in events[-1][1]
        events, done = _collect(batcher, DecodeRequest(tok("Hi").input_ids, 3, ignore_eos=True))
        assert done.wait(30) and events[-1][1]["finish_reason"] == "length"
    finally:
        batcher.close()


def test_base_name_is_the_theta_row_of_every_steered_kind():
    engine, tok = _engine_with_every_kind()
    batch = DecodeBatch(engine)
    batch.admit(_requests(engine, tok)[:4])
    mixed = batch.lanes[("mixed", None)]
    # phi rows: LoRA + plain; theta rows: the LoRA, IA3 and prompt-tuning steered requests
    assert sorted(mixed.names) == sorted(["default", BASE, BASE, BASE, BASE])
    assert set(batch.lanes) == {("mixed", None), ("ia3", "ia3"), ("prefix", "pt")}


def test_a_task_registered_again_with_another_rank_loads_under_a_fresh_adapter(tmp_path):
    """Task ids may hold '.', which PEFT adapter names may not, and a deleted task's LoRA adapter
    can outlive it (PEFT keeps a model's last adapter): each load gets its own adapter name."""
    from serving.svd.warmstart import TaskSpec

    model, tok = build_tiny_model(0)
    engine = SVDEngine(model, tok, "tiny")
    for rank in (4, 6):
        peft_model = make_peft_model(build_tiny_model(0)[0], load_config(TaskSpec, data={"peft": {"r": rank}}).peft)
        path = tmp_path / f"r{rank}"
        peft_model.save_pretrained(path)
        task = engine.load_task({"id": "my.task", "peft_type": "lora", "adapter_path": str(path), "mu_bar": 0.1,
                                 "alpha": 0.1})
        out = list(engine.generate([DecodeRequest(tok("Hi").input_ids, 3, task, True, 0.1, 0.1, ignore_eos=True)]))
        assert len(out) == 3
        engine.unload_task("my.task")
    assert "my.task" not in engine.tasks
