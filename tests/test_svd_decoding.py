"""SVD decoding on a tiny random Llama (no Ray): one-pass mixed-adapter logits equal two passes,
the KV-cached loop equals full recomputation and the `generate()` LogitsProcessor variant,
warm-start + calibration + persistence for LoRA / IA3 / prompt tuning, and task validation."""

import pytest
import torch

from edgeray.errors import UserError
from serving.svd.decoding import BASE, DecodeRequest, LoadedTask, SVDEngine, option_logprobs
from serving.svd.mctasks import make_task
from serving.svd.model import build_tiny_model
from serving.svd.steering import SamplingParams, SVDLogitsProcessor, steer_logits
from serving.svd.warmstart import (TaskSpec, calibrate, load_config, make_peft_model, new_task_record,
                                   parse_task_request, read_task, run_warm_start, to_dict, write_task)


def _examples(n=24):
    return [item.as_example() for item in make_task("parity", n, 0, 0)["train"]]


def _lora_engine(seed=0):
    """An engine whose LoRA task has random (non-zero) B matrices, so phi != theta."""
    model, tok = build_tiny_model(seed)
    spec = load_config(TaskSpec, data={"peft": {"type": "lora", "r": 4}})
    peft_model = make_peft_model(model, spec.peft)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    engine = SVDEngine(peft_model.get_base_model(), tok, "tiny")
    engine.peft = peft_model.eval()
    record = {"id": "default", "peft_type": "lora", "mu_bar": -0.7, "alpha": 0.1}
    engine.tasks["default"] = LoadedTask("default", "lora", -0.7, 0.1, record)
    return engine, tok


def test_one_pass_mixed_adapter_logits_equal_two_separate_passes():
    engine, tok = _lora_engine()
    ids = tok(["Is 12 odd?", "Hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        both = engine.peft(input_ids=ids.input_ids.repeat(2, 1), attention_mask=ids.attention_mask.repeat(2, 1),
                           adapter_names=["default"] * 2 + [BASE] * 2).logits
        phi = engine.peft(**ids).logits
        with engine.peft.disable_adapter():
            theta = engine.peft(**ids).logits
    assert not torch.allclose(phi, theta, atol=1e-3)
    torch.testing.assert_close(both[:2], phi, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], theta, atol=1e-5, rtol=1e-5)


def _reference_greedy(engine, prompt_ids, steps, mu, alpha):
    """Greedy SVD by recomputing both models on the whole sequence each step (no cache)."""
    seq = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([seq])
            phi = engine.peft(input_ids=ids).logits[:, -1]
            with engine.peft.disable_adapter():
                theta = engine.peft(input_ids=ids).logits[:, -1]
            token = int(steer_logits(phi, theta, mu, alpha).argmax(-1))
            out.append(token)
            seq.append(token)
    return out


def test_cached_batched_decode_equals_full_recompute_and_logits_processor():
    engine, tok = _lora_engine()
    task = engine.tasks["default"]
    prompts = [tok("Is 12 odd?").input_ids, tok("Hi").input_ids]      # different lengths: left padding
    requests = [DecodeRequest(p, 6, task, True, -0.7, 0.1) for p in prompts]
    requests.append(DecodeRequest(prompts[1], 6))                     # a plain request in the same batch
    steps = list(engine.generate(requests))
    got = [[s[i] for s in steps if s[i] is not None] for i in range(3)]
    eos = tok.eos_token_id
    for i in range(2):
        expected = _reference_greedy(engine, prompts[i], 6, -0.7, 0.1)
        expected = expected[:expected.index(eos)] if eos in expected else expected
        assert got[i] == expected
    # the transformers LogitsProcessor variant on generate() gives the same tokens
    for i in range(2):
        ids = torch.tensor([prompts[i]])
        processor = SVDLogitsProcessor(lambda **kw: _base(engine, kw), mu=-0.7, alpha=0.1)
        out = engine.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, logits_processor=[processor], pad_token_id=tok.pad_token_id,
                                   eos_token_id=eos)
        generated = out[0, ids.shape[1]:].tolist()
        generated = generated[:generated.index(eos)] if eos in generated else generated
        assert generated == got[i]
    assert engine.last_stats["mean_masked_vocab"][0] > 0 and engine.last_stats["mean_masked_vocab"][2] == 0


def _base(engine, kwargs):
    with engine.peft.disable_adapter():
        return engine.peft(**kwargs)


def test_mu_zero_without_mask_is_plain_decoding():
    engine, tok = _lora_engine()
    task = engine.tasks["default"]
    prompt = tok("Is 5 odd?").input_ids
    plain = list(engine.generate([DecodeRequest(prompt, 5, task, False)]))
    identity = list(engine.generate([DecodeRequest(prompt, 5, task, True, 0.0, 1e-30)]))
    assert plain == identity


@pytest.fixture(scope="module")
def trained_tasks(tmp_path_factory):
    """One persisted task per PEFT type, trained by the same function the Ray task runs."""
    tasks_dir = tmp_path_factory.mktemp("tasks")
    records = {}
    for kind in ("lora", "ia3", "prompt_tuning"):
        spec = load_config(TaskSpec, data={"peft": {"type": kind}, "batch_size": 8, "lr": 0.01, "epochs": 1})
        write_task(tasks_dir, kind, new_task_record(kind, spec, "tiny", 24))
        records[kind] = run_warm_start(str(tasks_dir), kind, "tiny-random", "float32", to_dict(spec), _examples())
    return tasks_dir, records


def test_warm_start_calibrates_and_persists(trained_tasks):
    tasks_dir, records = trained_tasks
    for kind, record in records.items():
        assert record["status"] == "ready", record
        assert read_task(tasks_dir, kind)["mu_bar"] == record["mu_bar"]
        assert record["n_train"] == 19 and record["n_calib"] == 5
        assert record["n_calib_tokens"] > 5                 # content tokens: EOS and spaces left out
        assert record["n_calib_tokens_excluded"] >= 10      # 5 x (lone space + EOS)
        assert record["mu_bar"] == record["mu_ratio"]       # Eq. 46 is the default estimator
        assert (tasks_dir / kind / "adapter" / "adapter_config.json").is_file()


def test_every_peft_type_serves_from_disk(trained_tasks):
    tasks_dir, records = trained_tasks
    engine = SVDEngine(*build_tiny_model(0), "tiny", model_loader=lambda: build_tiny_model(0))
    tasks = {kind: engine.load_task(read_task(tasks_dir, kind)) for kind in records}
    prompt = engine.tokenizer("Question: Is 7 an odd or an even number?\nAnswer:").input_ids
    requests = [DecodeRequest(prompt, 4, task, True, task.mu_bar, 0.1) for task in tasks.values()]
    requests.append(DecodeRequest(prompt, 4, tasks["ia3"], False))
    steps = list(engine.generate(requests))
    assert 1 <= len(steps) <= 4
    options = [engine.tokenizer(o).input_ids for o in (" odd", " even")]
    for kind, task in tasks.items():
        phi, theta, targets = engine.option_logits(task, [prompt] * 2, options)
        assert not torch.allclose(phi[0], theta[0])
        alone = SVDEngine(*build_tiny_model(0), "tiny", model_loader=lambda: build_tiny_model(0))
        base_phi, _, _ = alone.option_logits(None, [prompt] * 2, options)
        torch.testing.assert_close(theta[0], base_phi[0], atol=1e-4, rtol=1e-4)
        scores = [option_logprobs(p, t, y, task.mu_bar, 0.1, "zero") for p, t, y in zip(phi, theta, targets)]
        assert all(s < 0 for s in scores)


def test_calibration_estimator_choice(trained_tasks):
    from peft import PeftModel

    tasks_dir, records = trained_tasks
    model, tok = build_tiny_model(0)
    peft_model = PeftModel.from_pretrained(model, str(tasks_dir / "lora" / "adapter")).eval()
    calib = _examples(24)[-5:]
    values = {est: calibrate(peft_model, tok, load_config(TaskSpec, data={"mu_estimator": est}), calib)["mu_bar"]
              for est in ("mean", "median", "ratio")}
    assert len(set(values.values())) == 3
    no_mask = calibrate(peft_model, tok, load_config(TaskSpec, data={"calib_mask": "none"}), calib)
    assert no_mask["mu_bar"] != values["mean"]


def test_task_request_validation():
    spec, examples = parse_task_request({"train": _examples(10), "peft": {"type": "ia3"}}, 8, 100)
    assert spec.peft.type == "ia3" and len(examples) == 10
    bad = [
        {"train": _examples(3)},                                       # too few
        {"train": _examples(10), "peft": {"type": "bitfit"}},          # unknown PEFT
        {"train": _examples(10), "epochz": 1},                         # unknown key
        {"train": _examples(10), "calib_frac": 1.5},                   # out of range
        {"train": [{"prompt": "x", "target": ""}] * 10},              # empty target
        {"train": _examples(10), "name": "../etc"},                    # unsafe id
        {"prompt": "x"},                                               # no train
    ]
    for body in bad:
        with pytest.raises(UserError):
            parse_task_request(body, 8, 100)


def test_sampling_respects_seed():
    engine = SVDEngine(*build_tiny_model(0), "tiny")
    prompt = engine.tokenizer("abc").input_ids
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=3)
    runs = [list(engine.generate([DecodeRequest(prompt, 8, sampling=params)])) for _ in range(2)]
    assert runs[0] == runs[1]


def test_option_logprobs_equal_teacher_forced_sums():
    engine, tok = _lora_engine()
    prompts = [tok("Is 4 odd?").input_ids, tok("Q: 2+2=").input_ids]
    options = [tok(" even").input_ids, tok(" 4").input_ids]
    phi, theta, targets = engine.option_logits(engine.tasks["default"], prompts, options)
    with torch.no_grad():
        for i, (p, o) in enumerate(zip(prompts, options)):
            logits = engine.peft(input_ids=torch.tensor([p + o])).logits[0]
            logp = torch.log_softmax(logits[len(p) - 1:len(p) + len(o) - 1].float(), -1)
            expected = float(logp.gather(-1, torch.tensor(o)[:, None]).sum())
            assert option_logprobs(phi[i], theta[i], targets[i]) == pytest.approx(expected, abs=1e-3)


def test_shared_prompt_option_logits_equal_one_row_per_option(trained_tasks):
    """prompt_option_logits (each prompt once, options on its KV cache) gives the logits of
    option_logits (prompt + option per row) for every PEFT type and for the bare model, with
    prompts and options of different lengths and a different number of options per prompt."""
    tasks_dir, records = trained_tasks
    engine = SVDEngine(*build_tiny_model(0), "tiny", model_loader=lambda: build_tiny_model(0))
    tok = engine.tokenizer
    prompts = [tok("Question: Is 7 an odd or an even number?\nAnswer:").input_ids, tok("Q: 2+2=").input_ids]
    options = [[tok(o).input_ids for o in (" odd", " even, surely not odd", " neither")],
               [tok(o).input_ids for o in (" 4", " four or so")]]
    flat_prompts = [p for p, group in zip(prompts, options) for _ in group]
    flat_options = [o for group in options for o in group]
    for kind in (None, *records):
        task = engine.load_task(read_task(tasks_dir, kind)) if kind else None
        phi, theta, targets = engine.prompt_option_logits(task, prompts, options)
        ref_phi, ref_theta, ref_targets = engine.option_logits(task, flat_prompts, flat_options)
        assert len(phi) == len(ref_phi) == 5
        for a, b in zip(phi + theta, ref_phi + ref_theta):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(targets, ref_targets))


def test_loading_a_lora_task_mid_generation_leaves_plain_rows_unadapted(trained_tasks):
    tasks_dir, _ = trained_tasks
    reference = SVDEngine(*build_tiny_model(0), "tiny")
    prompt = reference.tokenizer("Question: Is 8 odd?").input_ids
    expected = list(reference.generate([DecodeRequest(prompt, 6, ignore_eos=True)]))
    engine = SVDEngine(*build_tiny_model(0), "tiny")
    steps = engine.generate([DecodeRequest(prompt, 6, ignore_eos=True)])
    got = [next(steps)]
    engine.load_task(read_task(tasks_dir, "lora"))       # wraps the model in a PeftModel
    got += list(steps)
    assert got == expected


def test_a_stopped_row_leaves_the_batch_at_the_next_step():
    engine, tok = _lora_engine()
    task = engine.tasks["default"]
    prompt = tok("Is 5 odd?").input_ids
    requests = [DecodeRequest(prompt, 20, task, True, -0.7, 0.1, ignore_eos=True),
                DecodeRequest(prompt, 20, None, ignore_eos=True)]
    steps = engine.generate(requests)
    for _ in range(3):
        assert all(t is not None for t in next(steps))
    requests[0].finish = "cancelled"                 # e.g. the client hung up
    assert next(steps)[0] is None
    assert engine.last_stats["finish_reason"][0] == "cancelled"
    requests[1].finish = "stop"                      # e.g. a stop string was reached
    assert next(steps) == [None, None]
    with pytest.raises(StopIteration):               # nothing left: the batch ends
        next(steps)


def test_cancelled_warm_start_writes_nothing(tmp_path):
    import threading

    spec = load_config(TaskSpec, data={"batch_size": 4, "epochs": 3})
    write_task(tmp_path, "gone", new_task_record("gone", spec, "tiny", 24))
    cancel = threading.Event()
    cancel.set()
    assert run_warm_start(str(tmp_path), "gone", "tiny-random", "float32", to_dict(spec), _examples(),
                          cancel=cancel)["status"] == "cancelled"
    assert read_task(tmp_path, "gone")["status"] == "queued"     # untouched; DELETE removes the folder


def test_json_mode_decodes_one_object():
    import json

    from serving.svd.jsonmode import JSONPrefix

    engine, tok = _lora_engine()
    request = DecodeRequest(tok("Give JSON:").input_ids, 40, None, json_mode=True)
    ids = [t for step in engine.generate([request]) for t in step if t is not None]
    text = tok.decode(ids)
    assert JSONPrefix().feed(text) and text.startswith("{")
    if request.json_state.complete:
        assert isinstance(json.loads(text), dict)
    for prefix, ok in [('{"a": [1, 2.5e3, true, null, {"b": "x\\"y"}]}', True), ("{}", True), (" {", False),
                       ('{"a" 1', False), ('{"a":01', False), ('{"a":tru', True), ("[1]", False), ("{} ", False)]:
        assert JSONPrefix().feed(prefix) is ok, prefix
