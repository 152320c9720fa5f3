"""Models of the runtime (no Ray): only trainable tensors are global state, a bf16 base with
fp32 trainable tensors, and a clean hand-over between virtual clients sharing one model."""

import numpy as np
import pytest
import torch

from pipelines.fedavg.settings import FedAvgSettings
from pipelines.fedavg.strategy import FedAvg
from pipelines.models import ClientHandover, build_model, get_params, set_params, trainable_names
from pipelines.registry import ModelSpec
from pipelines.strategy import ClientContext, ClientData
from pipelines.tasks.lm import evaluate_next_token, next_token_loss

TINY_OLMOE = {"arch": "olmoe", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
                                          "num_experts_per_tok": 2, "max_position_embeddings": 128},
              "lora": {"r": 4}, "trainable": ["mlp.gate"]}
LM_INFO = {"vocab_size": 256, "seq_len": 32}


def tiny_lm(dtype="bfloat16", seed=0):
    return build_model(ModelSpec("causal-lm", args=TINY_OLMOE, dtype=dtype, seed=seed, data_info=LM_INFO))


def test_bf16_base_with_fp32_lora_trains_and_round_trips(tmp_path):
    model = tiny_lm()
    names = trainable_names(model)
    tensors = dict(model.named_parameters())
    assert names and all("lora_" in n or "mlp.gate" in n for n in names)
    assert {tensors[n].dtype for n in names} == {torch.float32}
    assert {p.dtype for n, p in tensors.items() if n not in names} == {torch.bfloat16}
    frozen_bytes = sum(p.numel() * 2 for n, p in tensors.items() if n not in names)
    params = get_params(model)
    assert set(params) == set(names) and all(v.dtype == np.float32 for v in params.values())
    assert sum(v.nbytes for v in params.values()) < frozen_bytes / 4   # what travels is a small part

    tokens = np.random.default_rng(0).integers(0, 256, size=(24, 32)).astype(np.int64)
    strategy = FedAvg(FedAvgSettings(batch_size=8, lr=0.5, momentum=0.0))
    update = strategy.client_update(ClientContext(0, 1, model, ClientData(tokens, tokens),
                                                  strategy.configure_round(1, {}, [0], None)[0], {},
                                                  np.random.default_rng(0), next_token_loss))
    assert set(update.params) == set(names)
    assert any(not np.array_equal(update.params[n], params[n]) for n in names)   # it trained
    assert np.isfinite(update.metrics["train_loss"])

    torch.save(update.params, tmp_path / "global.pt")                       # a checkpoint of the global state
    fresh = tiny_lm()                                                        # same seed: the same frozen base
    set_params(fresh, torch.load(tmp_path / "global.pt", weights_only=False))
    with torch.no_grad():
        x = torch.from_numpy(tokens[:4])
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)
    sums = evaluate_next_token(fresh, tokens, tokens)
    assert sums["count"] == 24 * 31 and 0 <= sums["test_accuracy"] <= sums["count"]


def test_full_fine_tuning_without_lora_makes_every_parameter_trainable():
    args = {k: v for k, v in TINY_OLMOE.items() if k not in ("lora", "trainable")}
    model = build_model(ModelSpec("causal-lm", args=args, data_info=LM_INFO))
    assert trainable_names(model) == [n for n, _ in model.named_parameters()]


def test_bad_model_args_are_one_line_errors():
    from edgeray.errors import UserError

    with pytest.raises(UserError, match="model causal-lm has no model.args.layers"):
        build_model(ModelSpec("causal-lm", args={"layers": 2}, data_info=LM_INFO))
    with pytest.raises(UserError, match="model.args.arch='gpt5' is not one of"):
        build_model(ModelSpec("causal-lm", args={"arch": "gpt5"}, data_info=LM_INFO))
    with pytest.raises(UserError, match="model.path=.* is not a transformers checkpoint folder"):
        build_model(ModelSpec("causal-lm", path="/nonexistent", data_info=LM_INFO))
    with pytest.raises(UserError, match="model.args.lora has no key 'rank'"):
        build_model(ModelSpec("causal-lm", args={**TINY_OLMOE, "lora": {"rank": 4}}, data_info=LM_INFO))


def test_handover_restores_the_model_between_clients():
    model = build_model(ModelSpec("mlp", data_info={"input_shape": [1, 8, 8], "num_classes": 10}))
    handover = ClientHandover(model)
    built = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(4, 1, 8, 8)
    reference = model(x).detach()

    # client A: trains only the last layer, scales the output with a hook, leaves gradients behind
    first = next(model.parameters())
    first.requires_grad_(False)
    model[-1].register_forward_hook(lambda _m, _i, out: out * 100)
    model[-1].weight.register_hook(lambda g: g * 0)
    model(x).sum().backward()
    model.eval()
    assert model[-1].weight.grad is not None

    handover.restore()                                      # client B starts from the model as built
    assert {n: p.requires_grad for n, p in model.named_parameters()} == built
    assert all(p.grad is None for p in model.parameters()) and model.training
    torch.testing.assert_close(model(x).detach(), reference)
    model(x).sum().backward()
    assert model[-1].weight.grad.abs().sum() > 0            # the zeroing gradient hook is gone too


def test_handover_keeps_the_hooks_the_builder_registered():
    model = tiny_lm()                                       # the router's float32 casts are builder hooks
    handover = ClientHandover(model)
    handover.restore()
    x = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(input_ids=x).logits).all()
