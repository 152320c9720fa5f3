"""SVD on multiple-choice benchmarks (no Ray): the loaders read the shipped arrow/json files
(a tiny sample written here, and the real data/mc files when scripts/assets/mc_data.sh has
run), the splits are disjoint and fixed, calibration leaves format tokens out and defaults to
the ratio estimator (Eq. 46), the evaluator counts every letter-format fallback and never
puts -inf on a cloze option, and the paired bootstrap brackets the mean."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.svd.mcdata import (BENCHMARKS, MC_DIR, cloze_item, letter_item, load_benchmark, split_questions,
                                truthfulqa_mc1_options)
from serving.svd.mceval import evaluate
from serving.svd.mctasks import MCItem
from serving.svd.model import build_tiny_model
from serving.svd.warmstart import TaskSpec, calibrate, format_token_ids, load_config, make_peft_model

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / MC_DIR
HAVE_REAL = (REAL / "MANIFEST.json").is_file()


def _write_arrow(folder: Path, rows: list[dict]):
    import pyarrow as pa

    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture
def sample_root(tmp_path):
    """A tiny data/mc tree in the shipped formats: PIQA and ARC arrow streams, TruthfulQA json."""
    _write_arrow(tmp_path / "piqa", [{"goal": f"goal {i}", "sol1": f"first {i}", "sol2": f"second {i}",
                                      "label": str(i % 2)} for i in range(12)])
    _write_arrow(tmp_path / "arc_easy", [{"id": "q1", "question": "Which is a metal?",
                                          "choices": {"text": ["wood", "iron", "glass"], "label": ["A", "B", "C"]},
                                          "answerKey": "B"}])
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "task_mc.json").write_text(json.dumps({"examples": [
        {"input": "Is the sky green?", "target_scores": {"No, it is blue.": 1, "Yes.": 0, "Always.": 0}}]}))
    (tmp_path / "truthfulqa" / "questions.json").write_text(json.dumps({"examples": [
        {"Question": "Is the sky green?", "True answers": ["No.", "No, it is blue."],
         "False answers": ["Yes.", "It is green at noon."], "Best answer": "No, it is blue."}]}))
    return tmp_path


def test_loaders_read_the_file_formats(sample_root):
    piqa = load_benchmark("piqa", sample_root)
    assert len(piqa) == 12 and piqa[1].answer == 1 and piqa[0].options == ("first 0", "second 0")
    assert piqa[0].context == "Goal: goal 0\nSolution:"
    arc = load_benchmark("arc_easy", sample_root)
    assert arc[0].options == ("wood", "iron", "glass") and arc[0].answer == 1
    letter = letter_item(arc[0])
    assert letter.prompt == "Question: Which is a metal?\nA. wood\nB. iron\nC. glass\nAnswer:"
    assert letter.options == (" A", " B", " C") and letter.answer == 1
    assert cloze_item(arc[0]).options == (" wood", " iron", " glass")
    tqa = load_benchmark("truthfulqa", sample_root)[0]
    assert tqa.options[tqa.answer] == "No, it is blue."
    assert [tqa.options[i] for i in tqa.true_options] == ["No.", "No, it is blue."]
    mc1 = truthfulqa_mc1_options(tqa, sample_root)
    assert sorted(tqa.options[i] for i in mc1) == ["Always.", "No, it is blue.", "Yes."]
    with pytest.raises(FileNotFoundError, match="mc_data.sh"):
        load_benchmark("hellaswag", sample_root)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", sample_root)


def test_splits_are_disjoint_and_fixed(sample_root):
    questions = load_benchmark("piqa", sample_root)
    a = split_questions(questions, 4, 3, 0, seed=1)
    assert [len(a[k]) for k in ("train", "calib", "test")] == [4, 3, 5]
    assert a == split_questions(questions, 4, 3, 0, seed=1)
    assert a != split_questions(questions, 4, 3, 0, seed=2)
    contexts = [q.context for k in ("train", "calib", "test") for q in a[k]]
    assert len(set(contexts)) == 12
    with pytest.raises(ValueError, match="cannot give"):
        split_questions(questions, 10, 3, 1)


@pytest.mark.skipif(not HAVE_REAL, reason="data/mc missing: run `bash scripts/assets/mc_data.sh`")
def test_shipped_benchmark_files():
    manifest = json.loads((REAL / "MANIFEST.json").read_text())
    sizes = {"arc_easy": 570, "piqa": 1838, "sciq": 1000, "siqa": 1954, "openbookqa": 500, "commonsense_qa": 1221,
             "boolq": 3270, "hellaswag": 10042, "winogrande": 1267, "arc_challenge": 299}
    for name in BENCHMARKS:
        assert manifest["benchmarks"][name]["licence"]
        questions = load_benchmark(name, REAL)
        if name in sizes:
            assert len(questions) == sizes[name], name
        assert all(0 <= q.answer < len(q.options) and all(q.options) for q in questions[:200]), name
    tqa = load_benchmark("truthfulqa", REAL)
    assert len(tqa) >= 290 and all(q.answer in q.true_options for q in tqa)


def _examples():
    return [{"prompt": f"Is {k} odd or even? Answer:", "target": " odd" if k % 2 else " even"} for k in range(8)]


def test_calibration_leaves_format_tokens_out_and_defaults_to_ratio():
    model, tok = build_tiny_model(0)
    assert format_token_ids(tok, tok(" odd").input_ids + [tok.eos_token_id]) == {tok(" ").input_ids[0],
                                                                                 tok.eos_token_id}
    spec = load_config(TaskSpec, data={"peft": {"type": "lora", "r": 4}})
    assert spec.mu_estimator == "ratio" and spec.calib_tokens == "content"
    peft_model = make_peft_model(model, spec.peft)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    content = calibrate(peft_model.eval(), tok, spec, _examples())
    everything = calibrate(peft_model, tok, load_config(TaskSpec, data={"calib_tokens": "all"}), _examples())
    # " odd"/" even" + EOS: the lone space and the EOS of each of the 8 targets are left out
    assert content["n_calib_tokens_excluded"] == 16
    assert everything["n_calib_tokens"] == content["n_calib_tokens"] + 16
    assert content["mu_bar"] == content["mu_ratio"] and content["mu_ratio"] != everything["mu_ratio"]
    for key in ("mu_mean", "mu_median", "mu_ratio"):
        assert np.isfinite(content[key])


@pytest.fixture(scope="module")
def lora_engine():
    from test_svd_decoding import _lora_engine   # the same tiny engine with a random (non-zero) LoRA task

    engine, _ = _lora_engine(0)
    return engine, engine.tasks["default"]


def _items(n=10):
    return [MCItem(f"Question {k}: pick one.\nA. x\nB. y\nC. z\nAnswer:", (" A", " B", " C"), k % 3)
            for k in range(n)]


def test_letter_fallbacks_are_counted(lora_engine):
    engine, task = lora_engine
    items = _items()
    # alpha = 1 keeps only p_phi's argmax: an item falls back exactly when that argmax is no letter
    out = evaluate(engine, task, items, "letter", {"a": -0.5, "zero": 0.0}, alpha=1.0, batch_rows=4)
    phi, _, _ = engine.option_logits(task, [engine.tokenizer(i.prompt).input_ids for i in items], [[65]] * len(items))
    letters = [engine.tokenizer(o).input_ids[-1] for o in items[0].options]
    expected = sum(int(torch.argmax(p[0])) not in letters for p in phi)
    assert out["fallbacks"]["svd:a"] == out["fallbacks"]["minp"] == expected
    assert out["fallbacks"]["warmstart"] == out["fallbacks"]["base"] == 0
    # mu = 0: the steered ranking is the warm start's wherever a letter survives, and the warm
    # start's choice where none does -> identical correctness
    np.testing.assert_array_equal(out["correct"]["svd:zero"], out["correct"]["warmstart"])
    assert out["n"] == 10 and set(out["correct"]) == {"base", "warmstart", "minp", "svd:a", "svd:zero"}


def test_cloze_never_uses_neg_inf_and_scores_mc2(lora_engine):
    engine, task = lora_engine
    items = [MCItem(f"Story {k} ends", (" well enough", " badly", " in a long and winding way"), k % 3)
             for k in range(6)]
    out = evaluate(engine, task, items, "cloze", {"ratio": -0.5, "zero": 0.0}, alpha=0.1, batch_rows=5,
                   true_options=[(0, 1)] * 6)
    assert all(v == 0 for v in out["fallbacks"].values())
    assert 0 <= out["neginf_all_masked"] <= 6 and "minp" not in out["correct"]
    np.testing.assert_array_equal(out["correct"]["svd:zero"], out["correct"]["warmstart"])
    for values in out["mc2"].values():
        assert np.all((values >= 0) & (values <= 1))
    mc1 = evaluate(engine, task, items, "cloze", {"ratio": -0.5}, mc1_options=[[0, 1]] * 6)
    with pytest.raises(ValueError, match="format"):
        evaluate(engine, task, items, "essay", {})
    assert mc1["n"] == 6
