"""Federated LoRA fine-tuning of mixture-of-experts LMs: FedAvg-MoE, HFedMoE, FedAlign-MoE.

Reading order: ``settings.py`` (what a user can set, the torch-free model check), ``layout.py``
(where each expert lives in the peft tensors; ``Rows`` payloads), ``model.py`` (the ``moe`` model:
OLMoE / Mixtral / Qwen2-MoE from a config or a checkpoint, or SmolLM2 upcycled; the router tap),
``strategy.py`` (the three methods, paper rules vs ours), ``data.py`` (the synthetic topic task
and the drug reviews). docs/fedmoe.md has the commands and the measured numbers.
"""
