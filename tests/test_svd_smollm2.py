"""SVD on the real SmolLM2-135M-Instruct (slow; skipped when the asset is not fetched):
the GGUF loads through the safetensors cache, a short LoRA warm-start calibrates a finite
mu_bar, the one-pass mixed-adapter logits match two passes, and steered decoding runs."""

from pathlib import Path

import pytest
import torch

from serving.svd.decoding import BASE, DecodeRequest, SVDEngine
from serving.svd.mctasks import make_task
from serving.svd.model import SMOLLM2_GGUF, load_model, resolve_source
from serving.svd.warmstart import TaskSpec, load_config, new_task_record, read_task, run_warm_start, to_dict, write_task

SOURCE = resolve_source(SMOLLM2_GGUF)
HAVE_MODEL = Path(SOURCE).is_file() or (Path(SOURCE).parent / "hf" / "model.safetensors").is_file()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_MODEL, reason="SmolLM2 asset missing: run `bash scripts/assets/svd.sh`")]


def test_smollm2_warm_start_and_steered_decoding(tmp_path):
    torch.set_num_threads(2)
    split = make_task("parity", 12, 4, 0, seed=1)
    examples = [item.as_example() for item in split["train"] + split["calib"]]
    spec = load_config(TaskSpec, data={"batch_size": 4, "max_steps": 2, "calib_frac": 0.25})
    write_task(tmp_path, "parity", new_task_record("parity", spec, "smollm2-135m", len(examples)))
    record = run_warm_start(str(tmp_path), "parity", SOURCE, "float32", to_dict(spec), examples)
    assert record["status"] == "ready", record
    assert record["n_calib_tokens"] >= 4 and abs(record["mu_bar"]) < 1e6

    engine = SVDEngine(*load_model(SOURCE), "smollm2-135m")
    task = engine.load_task(read_task(tmp_path, "parity"))
    ids = engine.tokenizer(["Question: Is 41 an odd or an even number?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        both = engine.peft(input_ids=ids.input_ids.repeat(2, 1), adapter_names=[task.adapter_name, BASE]).logits
        phi = engine.peft(input_ids=ids.input_ids, adapter_names=[task.adapter_name]).logits
        with engine.peft.disable_adapter():
            theta = engine.peft(input_ids=ids.input_ids).logits
    torch.testing.assert_close(both[:1], phi, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1:], theta, atol=1e-4, rtol=1e-4)

    prompt = ids.input_ids[0].tolist()
    steps = list(engine.generate([DecodeRequest(prompt, 6, task, True, task.mu_bar, 0.1),
                                  DecodeRequest(prompt, 6, task, False)]))
    steered = [s[0] for s in steps if s[0] is not None]
    assert steered, "SVD decoding produced no token"
    assert engine.last_stats["mean_masked_vocab"][0] > 40000   # the mask keeps a handful of 49152 tokens
