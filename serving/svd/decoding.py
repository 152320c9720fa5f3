"""SVD decoding and scoring on a served model with any number of warm-started tasks.

Per step, for a batch of requests (notes/serving.md §5.2, OUR DESIGN):
  * LoRA tasks and plain requests form one group decoded with ONE forward per step over the
    rows [phi rows of every request] + [base rows of the steered requests], using PEFT
    mixed-adapter batches (`adapter_names=[task, ..., "__base__", ...]`); the KV cache is per
    row, so the paired rows stay in step.
  * IA3 and prompt-tuning tasks cannot share a mixed batch: each such task is a group with two
    cached passes per step (IA3: a merged copy of the model; prompt tuning: the base model with
    the task's virtual-token embeddings prepended at prefill).
  * All groups advance in lockstep; the steering step (`steering.steer_logits`) and the
    request's own greedy / temperature / top-k / top-p choice run on the combined logits.
The teacher-forced counterpart, `option_logits` + `option_logprobs`, scores multiple-choice
options (POST /svd/score and the bench).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeray.errors import UserError
from serving.svd.jsonmode import JSONPrefix, constrained_choice
from serving.svd.steering import CACHE_KEY, SamplingParams, pick_tokens, steer_logits

BASE = "__base__"


@dataclass
class LoadedTask:
    """A ready task as a replica holds it."""

    id: str
    kind: str
    mu_bar: float
    alpha: float
    record: dict
    phi_model: torch.nn.Module | None = None      # IA3: merged copy of the model
    prefix: torch.Tensor | None = None            # prompt tuning: [num_virtual_tokens, hidden]


@dataclass
class DecodeRequest:
    """One sequence to generate. `steer` needs a task; mu / alpha are the resolved values."""

    prompt_ids: list[int]
    max_tokens: int
    task: LoadedTask | None = None
    steer: bool = False
    mu: float = 0.0
    alpha: float = 0.1
    sampling: SamplingParams = field(default_factory=SamplingParams)
    ignore_eos: bool = False          # benchmarks: always produce max_tokens tokens
    top_logprobs: int | None = None   # record the chosen token's log-prob (+ this many alternatives)
    json_mode: bool = False           # response_format json_object: constrained to one JSON object
    json_state: JSONPrefix | None = None   # its recognizer (made by `generate`)
    finish: str | None = None         # set by the caller mid-generation ("stop", "cancelled"): the
                                      # row leaves the batch at the next step


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


class CachedRunner:
    """Prefill once, then one token per row per step, with a KV cache. `forward` is a callable
    with the transformers signature; `prefix` (prompt tuning) is prepended as embeddings."""

    def __init__(self, forward, embed=None, prefix: torch.Tensor | None = None):
        self.forward, self.embed, self.prefix = forward, embed, prefix
        self.cache = self.mask = self.next_position = None

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if self.prefix is not None:
            n = input_ids.shape[0]
            kwargs = {"inputs_embeds": torch.cat([self.prefix.expand(n, -1, -1).to(self.embed.weight.dtype),
                                                  self.embed(input_ids)], dim=1)}
            mask = torch.cat([torch.ones(n, self.prefix.shape[0], dtype=mask.dtype), mask], dim=1)
        positions = _positions(mask)
        out = self.forward(attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        self.cache, self.mask, self.next_position = getattr(out, CACHE_KEY), mask, positions[:, -1:] + 1
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.forward(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_position,
                           use_cache=True, **{CACHE_KEY: self.cache})
        self.cache = getattr(out, CACHE_KEY)
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


class _OnePassGroup:
    """LoRA-task and plain requests: phi rows and base rows in one mixed-adapter forward."""

    def __init__(self, engine: "SVDEngine", requests: list[DecodeRequest]):
        names = [r.task.id if r.task else BASE for r in requests]
        self.steered = [i for i, r in enumerate(requests) if r.steer]
        self.n = len(requests)
        self.runner = CachedRunner(engine.route(names + [BASE] * len(self.steered)))
        self.pad_id = engine.tokenizer.pad_token_id

    def _split(self, logits):
        phi = logits[:self.n]
        theta = phi.clone()
        theta[self.steered] = logits[self.n:]
        return phi, theta

    def prefill(self, prompts):
        rows = prompts + [prompts[i] for i in self.steered]
        return self._split(self.runner.prefill(*left_pad(rows, self.pad_id)))

    def step(self, tokens):
        return self._split(self.runner.step(torch.cat([tokens, tokens[self.steered]])))


class _TwoPassGroup:
    """Requests of one IA3 or prompt-tuning task: an adapted pass and a base pass."""

    def __init__(self, engine: "SVDEngine", task: LoadedTask, requests: list[DecodeRequest]):
        n = len(requests)
        embed = engine.model.get_input_embeddings()
        if task.kind == "ia3":
            self.phi = CachedRunner(task.phi_model)
        else:
            self.phi = CachedRunner(engine.route([BASE] * n), embed=embed, prefix=task.prefix)
        self.theta = CachedRunner(engine.route([BASE] * n)) if any(r.steer for r in requests) else None
        self.pad_id = engine.tokenizer.pad_token_id

    def prefill(self, prompts):
        ids, mask = left_pad(prompts, self.pad_id)
        phi = self.phi.prefill(ids, mask)
        return phi, (self.theta.prefill(ids, mask) if self.theta else phi)

    def step(self, tokens):
        phi = self.phi.step(tokens)
        return phi, (self.theta.step(tokens) if self.theta else phi)


class SVDEngine:
    """One base model (and tokenizer) plus the tasks loaded into it. Thread-safe: every model
    call holds `lock`, so scoring and a running generation interleave step by step."""

    def __init__(self, model, tokenizer, model_name: str, model_loader=None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.model_loader = model_loader      # () -> fresh (model, tokenizer), for IA3 copies
        self.peft = None                      # PeftModel holding every LoRA task, made on the first
        self.tasks: dict[str, LoadedTask] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ tasks
    def load_task(self, record: dict) -> LoadedTask:
        """Load a ready task (adapter + mu_bar) from its persisted record, once."""
        if record["id"] in self.tasks:
            return self.tasks[record["id"]]
        from peft import PeftModel, load_peft_weights

        task_id, kind, path = record["id"], record["peft_type"], record["adapter_path"]
        if not Path(path).is_dir():
            raise UserError(f"task {task_id!r}: adapter files are missing at {path}")
        task = LoadedTask(task_id, kind, float(record["mu_bar"]), float(record["alpha"]), record)
        with self.lock:
            if kind == "lora":
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=task_id).eval()
                else:
                    self.peft.load_adapter(path, adapter_name=task_id)
                    self.peft.eval()
            elif kind == "ia3":
                fresh, _ = self.model_loader()
                task.phi_model = PeftModel.from_pretrained(fresh, path).merge_and_unload().eval()
            else:
                task.prefix = load_peft_weights(path)["prompt_embeddings"].to(self.model.dtype)
        self.tasks[task_id] = task
        return task

    def route(self, names: list[str]):
        """A forward callable whose row i runs with adapter names[i] (BASE = no adapter). It is
        resolved at call time: loading the first LoRA task wraps the model mid-generation, and
        from then on the bare model would apply the active adapter."""
        def forward(**kwargs):
            if self.peft is None:
                if any(name != BASE for name in names):
                    raise RuntimeError("a LoRA task was routed before it was loaded")
                return self.model(**kwargs)
            return self.peft(adapter_names=names, **kwargs)
        return forward

    # ------------------------------------------------------------------ generation
    def _groups(self, requests: list[DecodeRequest]):
        one_pass = [i for i, r in enumerate(requests) if r.task is None or r.task.kind == "lora"]
        groups = [(one_pass, _OnePassGroup(self, [requests[i] for i in one_pass]))] if one_pass else []
        for task_id in dict.fromkeys(r.task.id for r in requests if r.task and r.task.kind != "lora"):
            index = [i for i, r in enumerate(requests) if r.task and r.task.id == task_id]
            groups.append((index, _TwoPassGroup(self, requests[index[0]].task, [requests[i] for i in index])))
        return groups

    @torch.no_grad()
    def generate(self, requests: list[DecodeRequest]):
        """Yield, per step, one entry per request: a token id, or None once it has finished
        (EOS or max_tokens). Ends when all have finished. Stats land in `self.last_stats`."""
        n = len(requests)
        eos = self.tokenizer.eos_token_id
        mu = torch.tensor([r.mu for r in requests])
        alpha = torch.tensor([r.alpha for r in requests])
        steered = torch.tensor([r.steer for r in requests])
        generators = []
        for r in requests:
            gen = None
            if r.sampling.seed is not None:
                gen = torch.Generator().manual_seed(r.sampling.seed)
            generators.append(gen)
        for r in requests:
            r.json_state = JSONPrefix() if r.json_mode else None
        masked_total = torch.zeros(n)
        produced = torch.zeros(n, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        finish_reason: list[str | None] = [None] * n
        self.last_stats = {"mean_masked_vocab": [0.0] * n, "finish_reason": finish_reason, "logprobs": [None] * n}
        with self.lock:
            groups = self._groups(requests)
            phi, theta = self._combine(groups, n, lambda g, idx: g.prefill([requests[i].prompt_ids for i in idx]))
        for _ in range(max(r.max_tokens for r in requests)):
            logits = phi.float()
            if (steered & ~done).any():
                rows = (steered & ~done).nonzero().squeeze(1)
                steer_rows = steer_logits(phi[rows], theta[rows], mu[rows], alpha[rows])
                masked_total[rows] += (torch.isinf(steer_rows).sum(-1) - torch.isinf(phi[rows].float()).sum(-1)).float()
                logits = logits.clone()
                logits[rows] = steer_rows
            tokens = pick_tokens(logits, [r.sampling for r in requests], generators)
            for i, r in enumerate(requests):
                if r.json_mode and not done[i]:
                    tokens[i] = constrained_choice(logits[i], r.json_state, self._token_text, r.sampling.temperature,
                                                   generators[i])
            wants = [i for i, r in enumerate(requests) if r.top_logprobs is not None and not done[i]]
            step_logprobs = [None] * n
            if wants:
                logp = torch.log_softmax(logits[wants].float(), dim=-1)
                for k, i in enumerate(wants):
                    alternatives = []
                    if requests[i].top_logprobs:
                        top = torch.topk(logp[k], requests[i].top_logprobs)
                        alternatives = list(zip(top.indices.tolist(), top.values.tolist()))
                    step_logprobs[i] = (float(logp[k, tokens[i]]), alternatives)
            self.last_stats["logprobs"] = step_logprobs
            out = []
            for i, r in enumerate(requests):
                if not done[i] and r.finish:          # stopped by the caller (stop string, disconnect)
                    done[i], finish_reason[i] = True, r.finish
                if done[i]:
                    out.append(None)
                    continue
                produced[i] += 1
                if int(tokens[i]) == eos and not r.ignore_eos:
                    done[i], finish_reason[i] = True, "stop"
                    out.append(None)
                    continue
                out.append(int(tokens[i]))
                if produced[i] >= r.max_tokens:
                    done[i], finish_reason[i] = True, "length"
            self.last_stats["mean_masked_vocab"] = (masked_total / produced.clamp_min(1)).tolist()
            yield out
            if bool(done.all()):
                return
            feed = tokens.masked_fill(done, eos)
            with self.lock:
                phi, theta = self._combine(groups, n, lambda g, idx: g.step(feed[idx]))

    @staticmethod
    def _combine(groups, n, call):
        phi = theta = None
        for index, group in groups:
            group_phi, group_theta = call(group, index)
            if phi is None:
                phi = torch.empty(n, group_phi.shape[-1], dtype=group_phi.dtype)
                theta = torch.empty_like(phi)
            phi[index], theta[index] = group_phi, group_theta
        return phi, theta

    def _token_text(self, token: int) -> str:
        """A token's text alone (special tokens give their literal text, which JSON mode refuses)."""
        return self.tokenizer.decode([token])

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def option_logits(self, task: LoadedTask | None, prompts: list[list[int]], options: list[list[int]]):
        """Teacher-forced logits for multiple-choice options: (phi, theta, targets), each a list
        over rows of [len(option), V] / [len(option)] tensors. Without a task phi is the base.
        Rows are left-padded so every option ends the row: only the last K+1 positions
        (K = longest option) go through the vocabulary projection."""
        ids, mask = left_pad([p + o for p, o in zip(prompts, options)], self.tokenizer.pad_token_id)
        keep = max(len(o) for o in options) + 1
        n = len(prompts)
        with self.lock:
            if task is None:
                phi = theta = self._last_logits(self.route([BASE] * n), ids, mask, keep)
            elif task.kind == "lora":
                both = self._last_logits(self.route([task.id] * n + [BASE] * n), ids.repeat(2, 1), mask.repeat(2, 1),
                                         keep)
                phi, theta = both[:n], both[n:]
            else:
                theta = self._last_logits(self.route([BASE] * n), ids, mask, keep)
                if task.kind == "ia3":
                    phi = self._last_logits(task.phi_model, ids, mask, keep)
                else:
                    phi = self._last_logits(self.route([BASE] * n), ids, mask, keep, task.prefix)
        out_phi, out_theta, targets = [], [], []
        for i, option in enumerate(options):
            span = slice(keep - 1 - len(option), keep - 1)      # logits at t predict token t + 1
            out_phi.append(phi[i, span])
            out_theta.append(theta[i, span])
            targets.append(torch.tensor(option))
        return out_phi, out_theta, targets

    def _last_logits(self, forward, ids, mask, keep: int, prefix=None):
        kwargs = {"input_ids": ids}
        if prefix is not None:
            embed = self.model.get_input_embeddings()
            n = ids.shape[0]
            kwargs = {"inputs_embeds": torch.cat([prefix.expand(n, -1, -1).to(embed.weight.dtype), embed(ids)], dim=1)}
            mask = torch.cat([torch.ones(n, prefix.shape[0], dtype=mask.dtype), mask], dim=1)
        out = forward(attention_mask=mask, position_ids=_positions(mask), logits_to_keep=keep, **kwargs)
        return out.logits.float()


def option_logprobs(phi: torch.Tensor, theta: torch.Tensor, targets: torch.Tensor, mu: float = 0.0,
                    alpha: float = 0.0, mask_fill: str = "zero", use_base: bool = False) -> float:
    """Summed log-probability of one option's tokens under P_hat (softmax of the steered
    logits). mu = 0, alpha = 0 gives the adapted model; `use_base` the base model; with
    mask_fill="neg_inf" a masked token makes the option -inf (min-p / the paper's lambda)."""
    if use_base:
        logits = theta.float()
    elif mu == 0.0 and alpha == 0.0:
        logits = phi.float()
    else:
        logits = steer_logits(phi, theta, mu, alpha, mask_fill)
    logp = torch.log_softmax(logits, dim=-1)
    return float(logp.gather(-1, targets[:, None]).sum())
