"""Where each expert lives in the global tensors (numpy only, so the aggregator needs no model).

peft 0.21 puts LoRA on the fused expert parameters of transformers 5 MoE blocks
(``mlp.experts.gate_up_proj`` (E, 2f, d) and ``mlp.experts.down_proj`` (E, d, f)) as one pair of
factors per parameter (``ParamWrapper``): ``lora_A`` is (E·r, in), expert-major, so expert e owns
rows ``e*r:(e+1)*r``; ``lora_B`` is (out, r·E), rank-major, so expert e owns columns ``e::E``
(``docs/fedmoe.md``; a test compares these slices with peft's own delta weight). The router of
layer l is ``layers.l.mlp.gate.weight`` (E, d), trained in full.

A per-expert payload is a ``Rows`` of the peft tensor itself (an expert's rows of A along axis 0,
its columns of B along axis 1), never an invented tensor name, so the runtime's ``WeightedSum``
scatters it back where it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipelines.strategy import Rows

EXPERT_KEY = re.compile(r"layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.")
ROUTER_KEY = re.compile(r"layers\.(\d+)\.mlp\.gate\.weight$")


@dataclass(frozen=True)
class ExpertTensor:
    """One LoRA factor of one fused expert parameter of one MoE layer."""

    key: str
    layer: int
    factor: str        # "A" or "B"
    projection: str    # the key with lora_A/lora_B removed: pairs an A with its B
    experts: int
    rank: int

    @property
    def axis(self) -> int:
        return 0 if self.factor == "A" else 1

    def index(self, experts) -> np.ndarray:
        """Positions along ``axis`` of the given experts (in the order given)."""
        e = np.asarray(list(experts), np.int32)
        if self.factor == "A":
            return (e[:, None] * self.rank + np.arange(self.rank)[None, :]).reshape(-1)
        return (e[:, None] + self.experts * np.arange(self.rank)[None, :]).reshape(-1)

    def slice(self, tensor: np.ndarray, expert: int) -> np.ndarray:
        """Expert ``expert``'s factor: (r, in) of A, (out, r) of B."""
        return np.take(tensor, self.index([expert]), axis=self.axis)


@dataclass(frozen=True)
class MoELayout:
    layers: tuple[int, ...]              # MoE layer indices, ascending
    experts: int
    routers: dict                        # layer -> router key
    tensors: tuple[ExpertTensor, ...]

    def of_layer(self, layer: int) -> list[ExpertTensor]:
        return [t for t in self.tensors if t.layer == layer]

    def pairs(self, layer: int) -> list[tuple[ExpertTensor, ExpertTensor]]:
        """(A, B) of each LoRA'd expert parameter of ``layer``."""
        by = {}
        for t in self.of_layer(layer):
            by.setdefault(t.projection, {})[t.factor] = t
        return [(p["A"], p["B"]) for _, p in sorted(by.items()) if "A" in p and "B" in p]

    @property
    def expert_keys(self) -> set[str]:
        return {t.key for t in self.tensors}


def moe_layout(shapes: dict[str, tuple]) -> MoELayout:
    """The layout from tensor names and shapes (``{name: shape}`` of the global tensors)."""
    routers = {}
    for key, shape in shapes.items():
        m = ROUTER_KEY.search(key)
        if m:
            routers[int(m.group(1))] = key
    if not routers:
        raise ValueError("no MoE router (layers.N.mlp.gate.weight) among the trainable tensors")
    experts = {layer: shapes[key][0] for layer, key in routers.items()}
    if len(set(experts.values())) != 1:
        raise ValueError(f"MoE layers with different expert counts: {experts}")
    num = next(iter(experts.values()))
    tensors = []
    for key, shape in shapes.items():
        m = EXPERT_KEY.search(key)
        if not m:
            continue
        layer, factor = int(m.group(1)), m.group(3)
        stacked = shape[0] if factor == "A" else shape[1]
        if stacked % num:
            raise ValueError(f"{key}: {stacked} is not a multiple of {num} experts")
        tensors.append(ExpertTensor(key, layer, factor, key.replace(f"lora_{factor}.", "lora_?."), num, stacked // num))
    return MoELayout(tuple(sorted(routers)), num, routers, tuple(sorted(tensors, key=lambda t: t.key)))


def extract_experts(params: dict[str, np.ndarray], layout: MoELayout, chosen: dict[int, list[int]]) -> dict[str, Rows]:
    """``Rows`` of the chosen experts per layer (``{layer: [experts]}``; a layer absent or empty
    sends nothing)."""
    out = {}
    for t in layout.tensors:
        experts = chosen.get(t.layer) or []
        if experts:
            idx = t.index(experts)
            out[t.key] = Rows(idx, np.take(params[t.key], idx, axis=t.axis), t.axis)
    return out


def insert_rows(params: dict[str, np.ndarray], rows: dict[str, Rows]) -> dict[str, np.ndarray]:
    """Copies of ``params`` with each ``Rows`` written back where it came from."""
    out = dict(params)
    for key, r in rows.items():
        tensor = np.array(params[key], copy=True)
        at = [slice(None)] * tensor.ndim
        at[r.axis] = np.asarray(r.index)
        tensor[tuple(at)] = r.values
        out[key] = tensor
    return out


def rows_of_expert(t: ExpertTensor, rows: Rows, expert: int) -> Rows | None:
    """The part of a multi-expert ``Rows`` payload that belongs to ``expert`` (None if absent)."""
    where = {int(i): j for j, i in enumerate(np.asarray(rows.index).tolist())}
    wanted = t.index([expert])
    if not all(int(i) in where for i in wanted):
        return None
    return Rows(wanted, np.take(rows.values, [where[int(i)] for i in wanted], axis=rows.axis), rows.axis)
