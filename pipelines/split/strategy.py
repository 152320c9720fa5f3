"""Split learning on the strategy protocol: sequential SL and SplitFed-v1, with compressed
smashed data and gradients (settings: ``settings.py``; compressors: ``compressors.py``).

Split learning: Gupta & Raskar, "Distributed learning of deep neural network over multiple
agents" (arXiv:1810.06060); Vepakomma et al. (arXiv:1812.00564). SplitFed-v1: Thapa et al.,
"SplitFed: When Federated Learning Meets Split Learning", AAAI 2022 (arXiv:2004.12088).
The compressors: ACP-SL (arXiv:2603.09792) and NSC-SL (arXiv:2602.02696), with vanilla SL,
quantization and RandTopK (arXiv:2305.18469) as baselines; see ``compressors.py``.

Per batch, inside ``client_update``: the client runs the bottom model to the cut, compresses the
smashed data A (with the labels, which the client owns) and calls ``ctx.exchange(payload)``; the
client's edge server runs ``server_step``: it decodes Â, runs the top model, the task's loss and
backward, steps the top optimizer and returns the compressed gradient ∂L/∂Â; the client decodes
it, calls ``A.backward(Ĝ)`` and steps the bottom optimizer. Every payload is metered by the
runtime and counted in the round's bytes and simulated time (bits / this round's link rate).

Modes (``mode``):
- ``sequential`` (vanilla SL): an edge's clients take turns in the order the edge dispatches them;
  each pulls the bottom weights the previous client pushed (the first one: the round's global
  bottom; both exchanges metered, and nothing else is downloaded) and trains against the edge's
  one top model. The clock times an edge's round as the sum of its clients' times
  (``clients_take_turns``).
  At the end of the round the edge sends its last bottom and its top to the aggregator
  (several edges: averaged, weighted by the examples they trained).
- ``splitfed`` (SplitFed-v1): clients run in parallel; each has its own copy of the top on its
  edge, copied from the global top at its first step; bottoms are uploaded and averaged (FedAvg),
  the per-client tops are averaged at the end of the edge's round, both weighted by examples.
  No shared top under parallel clients: it would not be bit-reproducible.

The whole model (bottom, top and ACP's mask) is the run's global state, so evaluation,
checkpoints and ``--resume`` work unchanged. Client-side compressor state (ACP scores, NSC
residuals and bases, random streams) lives in the client state store; the edge-side state (per
client: the decoder's and the gradient encoder's) lives in the edge state.

The round planner's estimate of a client's exchange traffic (``estimate_traffic``: deadlines and
stragglers are planned with it) is what the clients metered last round, per example trained,
plus the sequential relay of the bottom weights: the aggregator keeps it in its state and sends it
with each instruction (``exchange_estimate``). Round 1 knows only the relay.

Our choices (not from the papers): SGD with momentum on both sides, optimizers re-created each
round; the order of turns in sequential mode is the edge's dispatch order, and a client whose
predecessor failed takes over after ``turn_timeout_s``; the per-exchange bit budget is the link
rate of this round times ``step_budget_s``; ACP's evaluation mask (``acp_eval_mask``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time

import numpy as np
import torch

from pipelines.split.compressors import ACP, NSC, Identity, StepInfo, build_compressor, payload_formula
from pipelines.split.settings import SplitSettings
from pipelines.strategy import ClientContext, ClientUpdate, Strategy

log = logging.getLogger("edgeray.split")
BOTTOM, TOP, MASK = "bottom.", "top.", "mask"


def _state_seed(client_id: int, side: int, direction: int) -> int:
    return int(np.random.SeedSequence([client_id, side, direction]).generate_state(1)[0])


def codec_state(client_id: int, side: int) -> dict:
    """A fresh per-client compressor state, one sub-dict per direction, each seeded (side 0: client, 1: edge)."""
    return {"up": {"seed": _state_seed(client_id, side, 0)}, "down": {"seed": _state_seed(client_id, side, 1)}}


class SplitLearning(Strategy):
    name = "split"
    settings: SplitSettings
    # server steps of different clients may run concurrently: SplitFed's tops are per client, and
    # sequential mode serializes its clients by turns (and guards its one top with its own lock)
    server_step_concurrency = "client"

    def clients_take_turns(self) -> bool:
        return self.settings.mode == "sequential"

    def __init__(self, settings: SplitSettings | None = None):
        super().__init__(settings if settings is not None else SplitSettings())
        self.compressor = build_compressor(self.settings)
        self.down = self.compressor if self.settings.compress_down else Identity()
        self.top_proto = None        # the edge's top model as built (bind_task)
        self.loss = None
        self._cond = threading.Condition()
        self._round_state = None     # edge side, one round: tops, optimizers, turns, relay

    # ------------------------------------------------------------------ edge side
    def bind_task(self, task) -> None:
        """Called by the edge server when it binds a run: build the top model and the task's loss."""
        from pipelines.models import build_model
        from pipelines.registry import EVALUATIONS, load

        self.top_proto = build_model(task.model, "cpu").top
        self.loss = load(EVALUATIONS[task.evaluation].loss)

    def begin_edge_round(self, rnd, edge_state, client_ids, global_params):
        if self.top_proto is None:
            raise RuntimeError("split learning: the edge server has no top model (bind_task was not called)")
        top = {k[len(TOP):]: v for k, v in global_params.items() if k.startswith(TOP)}
        bottom = {k: v for k, v in global_params.items() if k.startswith(BOTTOM)}
        edge_state.setdefault("codec", {})
        with self._cond:
            self._round_state = {"round": rnd, "global_top": top, "tops": {}, "seen": {}, "order": list(client_ids),
                                 "turn": 0, "relay": None, "relayed": False, "global_bottom": bottom,
                                 "compress_s": 0.0, "steps": 0, "top_lock": threading.Lock()}

    def download_keys(self, instruction, global_params):
        """SplitFed clients download the bottom; sequential ones get it by the relay (``pull``)."""
        return [k for k in global_params if k.startswith(BOTTOM)] if self.settings.mode == "splitfed" else []

    def _top_for(self, client_id: int):
        """(top module, optimizer) of this client: its own copy (splitfed) or the edge's one (sequential)."""
        rs = self._round_state
        key = client_id if self.settings.mode == "splitfed" else -1
        with self._cond:
            if key not in rs["tops"]:
                top = copy.deepcopy(self.top_proto)
                with torch.no_grad():
                    for name, p in top.named_parameters():
                        p.copy_(torch.from_numpy(np.array(rs["global_top"][name])))
                top.train()
                rs["tops"][key] = (top, torch.optim.SGD(top.parameters(), lr=self.settings.lr,
                                                        momentum=self.settings.momentum))
            return rs["tops"][key]

    def server_step(self, edge_state, client_id, payload):
        op = payload.get("op", "step")
        if op == "pull":
            return {"bottom": self._wait_turn(client_id)}
        if op == "push":
            self._end_turn(client_id, payload["bottom"], payload["examples"])
            return {}
        rs = self._round_state
        sstate = edge_state["codec"].setdefault(client_id, codec_state(client_id, 1))
        info = StepInfo(rs["round"], payload.get("budget_down"), sample_ids=payload.get("sid"))
        started = time.perf_counter()
        smashed = self.compressor.decode_up(payload, sstate, info).requires_grad_(True)
        decode_s = time.perf_counter() - started
        top, optimizer = self._top_for(client_id)
        with rs["top_lock"] if self.settings.mode == "sequential" else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss(top, smashed, torch.from_numpy(payload["y"].astype(np.int64)))
            loss.backward()
            optimizer.step()
        started = time.perf_counter()
        reply = self.down.encode_down(smashed.grad, sstate, info, smashed=smashed.detach())
        with self._cond:
            rs["compress_s"] += decode_s + time.perf_counter() - started
            rs["steps"] += 1
            rs["seen"][client_id] = rs["seen"].get(client_id, 0) + len(payload["y"])
        reply["loss"] = float(loss.detach())
        return reply

    def _wait_turn(self, client_id: int):
        """Sequential mode: block until every client before this one pushed its bottom (or
        ``turn_timeout_s`` passed: a predecessor failed, this one takes over); the relayed bottom."""
        rs = self._round_state
        with self._cond:
            position = rs["order"].index(client_id)
            if not self._cond.wait_for(lambda: rs["turn"] >= position, timeout=self.settings.turn_timeout_s):
                log.warning("split: client %d took its turn after %.0fs (a predecessor failed)", client_id,
                            self.settings.turn_timeout_s)
                rs["turn"] = position
            return rs["relay"] if rs["relayed"] else rs["global_bottom"]

    def _end_turn(self, client_id: int, bottom: dict, examples: int) -> None:
        rs = self._round_state
        with self._cond:
            rs["relay"], rs["relayed"] = bottom, True
            rs["turn"] = max(rs["turn"], rs["order"].index(client_id) + 1)
            rs["seen"].setdefault(-1, 0)
            rs["seen"][-1] += examples
            self._cond.notify_all()

    def end_edge_round(self, rnd, edge_state, partial):
        rs, self._round_state = self._round_state, None
        if self.settings.mode == "splitfed":
            for c, (top, _) in sorted(rs["tops"].items()):
                params = {TOP + k: v.detach().numpy().copy() for k, v in top.named_parameters()}
                partial.add(ClientUpdate(c, 0, params), weight=float(rs["seen"].get(c, 0)))
        elif rs["relayed"]:
            top = rs["tops"][-1][0] if -1 in rs["tops"] else None
            params = dict(rs["relay"])
            if top is not None:
                params.update({TOP + k: v.detach().numpy().copy() for k, v in top.named_parameters()})
            partial.add(ClientUpdate(-1, 0, params), weight=float(rs["seen"].get(-1, 1)))
        partial.stats.append((-1, 0, {"server_compress_s": rs["compress_s"], "server_steps": rs["steps"]}))
        return partial

    # ------------------------------------------------------------------ aggregator
    def init_state(self, global_params):
        """The first round's traffic estimate: the relayed bottom (sequential mode) and no steps yet."""
        relay = (payload_formula({k: v for k, v in global_params.items() if k.startswith(BOTTOM)})
                 if self.settings.mode == "sequential" else 0)
        return {"exchange_estimate": [0.0, 0.0, float(relay), float(relay)]}

    def configure_round(self, rnd, state, client_ids, population):
        estimate = state.get("exchange_estimate")
        return {c: ({"exchange_estimate": list(estimate)} if estimate else {}) for c in client_ids}

    def estimate_traffic(self, instruction, num_examples):
        """(down, up) bytes: last round's metered bytes per example trained times this client's work,
        plus the relay. Without an estimate in the instruction: none."""
        estimate = instruction.get("exchange_estimate")
        if not estimate:
            return 0.0, 0.0
        down_per_example, up_per_example, relay_down, relay_up = estimate
        work = self.work(instruction, num_examples)
        return down_per_example * work + relay_down, up_per_example * work + relay_up

    def aggregate(self, rnd, global_params, state, partial):
        new, state, metrics = super().aggregate(rnd, global_params, state, partial)
        if "exchange_up_bytes_per_example" in metrics:
            state = {**state, "exchange_estimate": [float(metrics[k]) for k in (
                "exchange_down_bytes_per_example", "exchange_up_bytes_per_example",
                "relay_down_bytes", "relay_up_bytes")]}
        if self.settings.compressor == "acp" and self.settings.acp_eval_mask == "majority":
            new[MASK] = (new[MASK] >= 0.5).astype(new[MASK].dtype)
        edges = [s for c, _, s in partial.stats if c == -1]
        steps = sum(s["server_steps"] for s in edges)
        if steps:
            metrics["server_compress_s_per_step"] = sum(s["server_compress_s"] for s in edges) / steps
        if MASK in new:
            metrics["mask_mean"] = float(new[MASK].mean())
        return new, state, metrics

    # ------------------------------------------------------------------ client side
    def client_update(self, ctx: ClientContext) -> ClientUpdate:
        s = self.settings
        if ctx.exchange is None:
            raise RuntimeError("split learning needs the runtime's per-batch exchange (an edge server)")
        model = ctx.model
        model.train()
        relay_down = relay_up = step_down = step_up = 0
        if s.mode == "sequential":
            relayed = ctx.exchange({"op": "pull"})["bottom"]
            relay_down = payload_formula(relayed)
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, value in relayed.items():
                    params[name].copy_(torch.from_numpy(np.array(value)))
        optimizer = torch.optim.SGD(model.bottom.parameters(), lr=ctx.instruction.get("lr", s.lr), momentum=s.momentum)
        cstate = ctx.state.setdefault("codec", codec_state(ctx.client_id, 0))
        up_budget = down_budget = None
        if s.step_budget_s is not None and ctx.link is not None:
            up_budget = ctx.link.up_mbps * 1e6 * s.step_budget_s
            down_budget = ctx.link.down_mbps * 1e6 * s.step_budget_s
        loss_sum = compress_s = step_s = 0.0
        seen = steps = 0
        up_ratio = []
        for _ in range(ctx.instruction.get("local_epochs", s.local_epochs)):
            order = ctx.rng.permutation(len(ctx.data))
            for lo in range(0, len(order), s.batch_size):
                step_started = time.perf_counter()
                idx = order[lo:lo + s.batch_size]
                xb = torch.from_numpy(ctx.data.x[idx]).to(ctx.device)
                yb = torch.from_numpy(ctx.data.y[idx])
                smashed = model.bottom(xb)
                info = StepInfo(ctx.round, up_budget, yb, idx)
                started = time.perf_counter()
                payload = self.compressor.encode_up(smashed.detach().cpu(), cstate, info)
                compress_s += time.perf_counter() - started
                up_ratio.append(payload_formula(payload) / (4 * smashed.numel()))
                payload["y"] = yb.numpy().astype(np.int16)
                if down_budget is not None:
                    payload["budget_down"] = down_budget
                if s.compressor == "nsc" and s.nsc_ef_mode == "sample":
                    payload["sid"] = idx.astype(np.int32)
                reply = ctx.exchange(payload)
                step_up += payload_formula(payload)
                step_down += payload_formula(reply)
                started = time.perf_counter()
                grad = self.down.decode_down(reply, cstate, info)
                if not s.compress_down:
                    grad = self.compressor.restrict(grad, cstate)
                compress_s += time.perf_counter() - started
                optimizer.zero_grad(set_to_none=True)
                smashed.backward(grad.to(smashed.device))
                optimizer.step()
                loss_sum += reply["loss"] * len(idx)
                seen += len(idx)
                steps += 1
                step_s += time.perf_counter() - step_started
        bottom = {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if n.startswith(BOTTOM)}
        params = {}
        if s.mode == "sequential":
            ctx.exchange({"op": "push", "bottom": bottom, "examples": seen})
            relay_up = payload_formula(bottom)
        else:
            params.update(bottom)
        metrics = {"train_loss": loss_sum / max(seen, 1), "compress_s_per_step": compress_s / max(steps, 1),
                   "step_s_per_step": step_s / max(steps, 1), "up_ratio": float(np.mean(up_ratio or [0.0])),
                   "exchange_down_bytes_per_example": step_down / max(seen, 1),
                   "exchange_up_bytes_per_example": step_up / max(seen, 1),
                   "relay_down_bytes": float(relay_down), "relay_up_bytes": float(relay_up)}
        if isinstance(self.compressor, ACP):
            usage = ACP.take_usage(cstate)
            if usage is not None:
                params[MASK] = usage
                metrics["acp_kept"] = float(len(cstate["up"]["keep"]) / len(usage))
        if isinstance(self.compressor, NSC):
            metrics["nsc_rank"] = float(cstate["up"].get("last_rank", 0))
        return ClientUpdate(ctx.client_id, len(ctx.data), params, metrics=metrics)
