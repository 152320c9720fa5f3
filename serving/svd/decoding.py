"""SVD decoding and scoring on a served model with any number of warm-started tasks
(SVDecode, arXiv 2509.15888), with continuous batching.

Per decode step, for the running batch (notes/serving.md §5.2, OUR DESIGN):
  * one "mixed" lane decodes with ONE forward the phi rows of LoRA and plain requests and the
    base (theta) rows of every steered request, using PEFT mixed-adapter batches
    (`adapter_names=[task, ..., "__base__", ...]`); the KV cache is per row, so a request's
    phi and theta rows stay in step;
  * IA3 and prompt-tuning tasks cannot share a mixed batch: the phi rows of each such task are
    a lane of their own (IA3: a merged copy of the model; prompt tuning: the base model with
    the task's virtual-token embeddings prepended at prefill);
  * the steering step (`steering.steer_logits`, per-row mu / alpha / on-off) and each request's
    own greedy / temperature / top-k / top-p choice run on the combined logits.
Continuous batching (`DecodeBatch`, `ContinuousBatcher`, OUR DESIGN, in the manner of Orca /
vLLM iteration-level scheduling but with a padded dense KV cache instead of paged blocks): a
request arriving mid-generation is prefilled alone at the next step boundary and its KV cache
is merged into the running lanes (left-padded in time, masked, its own position ids), so its
greedy tokens equal those of decoding it alone; rows leave when done or cancelled, and the
cache is trimmed of padding nobody needs any more.
The teacher-forced counterpart, `option_logits` + `option_logprobs`, scores multiple-choice
options (POST /svd/score and the bench).
"""

from __future__ import annotations

import threading
import time
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
    adapter: str | None = None                    # LoRA: its adapter name in the PeftModel (default: id)

    @property
    def adapter_name(self) -> str:
        return self.adapter or self.id


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


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- KV-cache surgery
# A lane's cache is a transformers DynamicCache: per layer, keys / values of shape
# [rows, heads, time, head_dim], time aligned with the lane's 2-D attention mask. Rows are
# left-padded: a row's real tokens end at the right edge, padding columns are 0 in the mask.

def _cache_layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in layers):
        raise RuntimeError("continuous batching needs a full-attention DynamicCache (one DynamicLayer per layer); "
                           f"got {type(cache).__name__}")
    return layers


def _pad_time(x: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad dim -2 (time) of [rows, heads, time, dim] with zeros to `width`."""
    missing = width - x.shape[-2]
    return torch.nn.functional.pad(x, (0, 0, missing, 0)) if missing else x


def merge_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of `other` to `cache` (in place). The shorter of the two is left-padded
    in time with zero keys / values that its mask hides; returns the merged mask."""
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, new in zip(_cache_layers(cache), _cache_layers(other), strict=True):
        layer.keys = torch.cat([_pad_time(layer.keys, width), _pad_time(new.keys, width)])
        layer.values = torch.cat([_pad_time(layer.values, width), _pad_time(new.values, width)])
    pad = torch.nn.functional.pad
    return torch.cat([pad(mask, (width - mask.shape[1], 0)), pad(other_mask, (width - other_mask.shape[1], 0))])


def select_cache_rows(cache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` of the cache (in place), then drop leading time columns that every
    kept row masks out (the padding a longer, departed row needed); returns the new mask."""
    index = torch.tensor(rows, dtype=torch.long)
    mask = mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in _cache_layers(cache):
        layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
    return mask[:, start:]


class _Lane:
    """One cached forward over a changing set of rows (continuous batching). Kinds:
      * "mixed": the base model / PEFT mixed-adapter batch; row i runs adapter names[i] (a LoRA
        task, or BASE): the phi rows of LoRA and plain requests and the theta (base) rows of
        every steered request;
      * "ia3": a task's merged IA3 copy of the model (phi rows of that task);
      * "prefix": the base model with a prompt-tuning task's virtual tokens prepended at
        prefill (phi rows of that task).
    `owners[k]` is the (row, role) whose logits row k of a forward gives."""

    def __init__(self, engine: "SVDEngine", kind: str, task: LoadedTask | None = None):
        self.engine, self.kind, self.task = engine, kind, task
        self.names: list[str] = []
        self.owners: list[tuple["_Row", str]] = []
        self.cache = self.mask = self.next_position = None

    def _forward(self, names: list[str]):
        return self.task.phi_model if self.kind == "ia3" else self.engine.route(names)

    def add(self, prompts: list[list[int]], names: list[str], owners: list[tuple["_Row", str]]) -> torch.Tensor:
        """Prefill new rows on their own and merge their cache into the lane's; returns their
        next-token logits [len(prompts), V]."""
        ids, mask = left_pad(prompts, self.engine.tokenizer.pad_token_id)
        kwargs = {"input_ids": ids}
        if self.kind == "prefix":
            embed = self.engine.model.get_input_embeddings()
            n, prefix = ids.shape[0], self.task.prefix
            kwargs = {"inputs_embeds": torch.cat([prefix.expand(n, -1, -1).to(embed.weight.dtype), embed(ids)], 1)}
            mask = torch.cat([torch.ones(n, prefix.shape[0], dtype=mask.dtype), mask], dim=1)
        positions = _positions(mask)
        out = self._forward(names)(attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                                   **kwargs)
        cache = getattr(out, CACHE_KEY)
        if self.cache is None:
            self.cache, self.mask, self.next_position = cache, mask, positions[:, -1:] + 1
        else:
            self.mask = merge_caches(self.cache, self.mask, cache, mask)
            self.next_position = torch.cat([self.next_position, positions[:, -1:] + 1])
        self.names += names
        self.owners += owners
        return out.logits[:, -1, :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self._forward(self.names)(input_ids=tokens[:, None], attention_mask=self.mask,
                                        position_ids=self.next_position, use_cache=True, **{CACHE_KEY: self.cache})
        self.cache = getattr(out, CACHE_KEY)
        self.next_position = self.next_position + 1
        return out.logits[:, -1, :]

    def keep(self, live: set[int]) -> None:
        """Drop the rows of requests not in `live` (ids of rows still running)."""
        rows = [k for k, (row, _) in enumerate(self.owners) if id(row) in live]
        if len(rows) == len(self.owners):
            return
        self.owners = [self.owners[k] for k in rows]
        self.names = [self.names[k] for k in rows]
        if rows:
            self.mask = select_cache_rows(self.cache, self.mask, rows)
            self.next_position = self.next_position[torch.tensor(rows, dtype=torch.long)]
        else:
            self.cache = self.mask = self.next_position = None


@dataclass(eq=False)
class _Row:
    """A request's state in the running batch."""

    request: DecodeRequest
    generator: torch.Generator | None
    phi: torch.Tensor | None = None        # next-token logits of the adapted model (or the base)
    theta: torch.Tensor | None = None      # of the base model (steered rows only)
    produced: int = 0
    masked_total: float = 0.0
    last_token: int = 0


class DecodeBatch:
    """The running batch of continuous batching, without threads (SVDEngine.generate and
    ContinuousBatcher drive it). At a decode-step boundary:
      * `admit(requests)` prefills newcomers alone and merges their KV caches into the running
        lanes (left padding, a per-row attention mask and per-row position ids keep every row
        exactly as it would be decoded alone);
      * `advance()` removes rows the caller stopped (`DecodeRequest.finish`: stop string,
        disconnect), picks one token per row (steering per row: mu, alpha, steer on / off),
        removes rows that finished (EOS, max_tokens, a complete JSON object), then runs ONE
        forward per lane for the rest. It returns (request, event) pairs:
        {"token", "logprob"} per produced token and {"done", "finish_reason",
        "completion_tokens", "mean_masked_vocab"} once per request."""

    def __init__(self, engine: "SVDEngine"):
        self.engine = engine
        self.lanes: dict[tuple, _Lane] = {}
        self.rows: list[_Row] = []
        self.steps = 0                    # forwards run so far (one per decode step)

    def __len__(self) -> int:
        return len(self.rows)

    def _lane(self, kind: str, task: LoadedTask | None = None) -> _Lane:
        key = (kind, task.id if kind != "mixed" else None)
        if key not in self.lanes:
            self.lanes[key] = _Lane(self.engine, kind, task)
        return self.lanes[key]

    @torch.no_grad()
    def admit(self, requests: list[DecodeRequest]) -> None:
        plan: dict[int, tuple[_Lane, list]] = {}
        rows = []
        for request in requests:
            row = _Row(request, torch.Generator().manual_seed(request.sampling.seed)
                       if request.sampling.seed is not None else None)
            request.json_state = JSONPrefix() if request.json_mode else None
            task = request.task
            if task is None or task.kind == "lora":
                lane, name = self._lane("mixed"), task.adapter_name if task else BASE
            else:
                lane, name = self._lane("ia3" if task.kind == "ia3" else "prefix", task), BASE
            plan.setdefault(id(lane), (lane, []))[1].append((row, "phi", name))
            if request.steer:
                base = self._lane("mixed")
                plan.setdefault(id(base), (base, []))[1].append((row, "theta", BASE))
            rows.append(row)
        with self.engine.lock:
            for lane, entries in plan.values():
                logits = lane.add([row.request.prompt_ids for row, _, _ in entries], [n for _, _, n in entries],
                                  [(row, role) for row, role, _ in entries])
                for k, (row, role, _) in enumerate(entries):
                    setattr(row, role, logits[k])
        self.rows += rows

    def _remove(self, leaving: list[_Row]) -> None:
        if not leaving:
            return
        gone = {id(row) for row in leaving}
        self.rows = [row for row in self.rows if id(row) not in gone]
        live = {id(row) for row in self.rows}
        for key in list(self.lanes):
            self.lanes[key].keep(live)
            if not self.lanes[key].owners:
                del self.lanes[key]

    def _done(self, row: _Row, reason: str) -> dict:
        """The final event of a row; `left_at_step` = forwards run before it left the batch."""
        return {"done": True, "finish_reason": reason, "completion_tokens": row.produced,
                "mean_masked_vocab": row.masked_total / max(row.produced, 1), "left_at_step": self.steps}

    @torch.no_grad()
    def advance(self) -> list[tuple[DecodeRequest, dict]]:
        events = []
        stopped = [row for row in self.rows if row.request.finish]
        for row in stopped:
            events.append((row.request, self._done(row, row.request.finish)))
        self._remove(stopped)
        if not self.rows:
            return events
        phi = torch.stack([row.phi for row in self.rows]).float()
        logits = phi
        steered = [k for k, row in enumerate(self.rows) if row.request.steer]
        if steered:
            requests = [self.rows[k].request for k in steered]
            theta = torch.stack([self.rows[k].theta for k in steered])
            steer_rows = steer_logits(phi[steered], theta, torch.tensor([r.mu for r in requests]),
                                      torch.tensor([r.alpha for r in requests]))
            masked = (torch.isinf(steer_rows).sum(-1) - torch.isinf(phi[steered]).sum(-1)).tolist()
            for k, m in zip(steered, masked):
                self.rows[k].masked_total += m
            logits = phi.clone()
            logits[steered] = steer_rows
        tokens = pick_tokens(logits, [row.request.sampling for row in self.rows], [row.generator for row in self.rows])
        finished = []
        eos = self.engine.tokenizer.eos_token_id
        for k, row in enumerate(self.rows):
            r = row.request
            if r.json_mode:
                tokens[k] = constrained_choice(logits[k], r.json_state, self.engine._token_text, r.sampling.temperature,
                                               row.generator)
            token = int(tokens[k])
            row.produced += 1
            if token == eos and not r.ignore_eos:
                row.produced -= 1
                events.append((r, self._done(row, "stop")))
                finished.append(row)
                continue
            logprob = None
            if r.top_logprobs is not None:
                logp = torch.log_softmax(logits[k], dim=-1)
                alternatives = []
                if r.top_logprobs:
                    top = torch.topk(logp, r.top_logprobs)
                    alternatives = list(zip(top.indices.tolist(), top.values.tolist()))
                logprob = (float(logp[token]), alternatives)
            events.append((r, {"token": token, "logprob": logprob}))
            row.last_token = token
            reason = None
            if row.produced >= r.max_tokens:
                reason = "length"
            elif r.json_state is not None and r.json_state.complete:
                reason = "stop"
            if reason:
                events.append((r, self._done(row, reason)))
                finished.append(row)
        self._remove(finished)
        if self.rows:
            with self.engine.lock:
                for lane in self.lanes.values():
                    logits = lane.step(torch.tensor([row.last_token for row, _ in lane.owners]))
                    for k, (row, role) in enumerate(lane.owners):
                        setattr(row, role, logits[k])
            self.steps += 1
        return events


class ContinuousBatcher:
    """Continuous batching on a thread: `submit(request, on_event)` queues a request; it joins
    the running batch at the next decode-step boundary (at most `max_rows` rows run at once;
    the rest wait in arrival order). `on_event(event)` is called from the batcher thread with
    every event of that request (`DecodeBatch.advance`), or {"error": exception} when a forward
    failed. `cancel(request)` makes the row leave at the next boundary: a row is part of at most
    one more forward after it is cancelled (`stats()["cancel_lag_steps"]` records how many)."""

    def __init__(self, engine: "SVDEngine", max_rows: int = 8, gather_s: float = 0.0):
        self.engine, self.max_rows, self.gather_s = engine, max_rows, gather_s
        self.batch = DecodeBatch(engine)
        self.pending: list[tuple[DecodeRequest, object]] = []
        self.callbacks: dict[int, object] = {}
        self.cancelled_at: dict[int, int] = {}
        self.cancel_lags: list[int] = []
        self.admitted = 0
        self.cv = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="svd-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: DecodeRequest, on_event) -> None:
        with self.cv:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            self.pending.append((request, on_event))
            self.cv.notify()

    def cancel(self, request: DecodeRequest) -> None:
        with self.cv:
            if request.finish is None:
                request.finish = "cancelled"
                self.cancelled_at[id(request)] = self.batch.steps
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return {"running": len(self.batch), "queued": len(self.pending), "steps": self.batch.steps,
                    "admitted": self.admitted, "max_rows": self.max_rows,
                    "cancel_lag_steps_max": max(self.cancel_lags, default=None),
                    "cancelled_rows": len(self.cancel_lags)}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def _take(self) -> list[tuple[DecodeRequest, object]]:
        """Newcomers for this boundary (caller holds cv); requests cancelled while queued are
        answered at once."""
        room = self.max_rows - len(self.batch)
        take, keep = [], []
        for request, on_event in self.pending:
            if request.finish:
                on_event({"done": True, "finish_reason": request.finish, "completion_tokens": 0,
                          "mean_masked_vocab": 0.0})
                self.cancelled_at.pop(id(request), None)
            elif len(take) < room:
                take.append((request, on_event))
            else:
                keep.append((request, on_event))
        self.pending = keep
        return take

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.closed and not self.pending and not len(self.batch):
                    self.cv.wait()
                if self.closed:
                    break
                idle = not len(self.batch)
            if idle and self.gather_s > 0:             # an idle batcher waits briefly for company
                time.sleep(self.gather_s)
            with self.cv:
                newcomers = self._take()
            try:
                if newcomers:
                    for request, on_event in newcomers:
                        self.callbacks[id(request)] = on_event
                    self.batch.admit([request for request, _ in newcomers])
                    self.admitted += len(newcomers)
                events = self.batch.advance()
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                self._fail(exc)
                continue
            for request, event in events:
                callback = self.callbacks.get(id(request))
                if event.get("done"):
                    self.callbacks.pop(id(request), None)
                    if id(request) in self.cancelled_at:
                        with self.cv:
                            self.cancel_lags.append(event["left_at_step"] - self.cancelled_at.pop(id(request)))
                if callback is not None:
                    try:
                        callback(event)
                    except Exception:  # noqa: BLE001 - a consumer that went away must not stop the batcher
                        pass

    def _fail(self, exc: Exception) -> None:
        callbacks = list(self.callbacks.values())
        self.callbacks.clear()
        self.cancelled_at.clear()
        self.batch = DecodeBatch(self.engine)
        for callback in callbacks:
            try:
                callback({"error": exc})
            except Exception:  # noqa: BLE001
                pass


class SVDEngine:
    """One base model (and tokenizer) plus the tasks loaded into it. Thread-safe: every model
    call holds `lock`, so scoring and a running generation interleave step by step."""

    def __init__(self, model, tokenizer, model_name: str, model_loader=None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.model_loader = model_loader      # () -> fresh (model, tokenizer), for IA3 copies
        self.peft = None                      # PeftModel holding every LoRA task, made on the first
        self.tasks: dict[str, LoadedTask] = {}
        self.adapters_loaded = 0
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
                # a fresh adapter name per load: a task id may hold '.', which PEFT's module dicts
                # refuse, and a task deleted and registered again (another rank) must not meet
                # its old adapter (PEFT cannot delete a model's last adapter)
                self.adapters_loaded += 1
                task.adapter = f"task{self.adapters_loaded}"
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=task.adapter).eval()
                else:
                    self.peft.load_adapter(path, adapter_name=task.adapter)
                    self.peft.eval()
            elif kind == "ia3":
                fresh, _ = self.model_loader()
                task.phi_model = PeftModel.from_pretrained(fresh, path).merge_and_unload().eval()
            else:
                task.prefix = load_peft_weights(path)["prompt_embeddings"].to(self.model.dtype)
        self.tasks[task_id] = task
        return task

    def unload_task(self, task_id: str) -> None:
        """Forget a task; a LoRA adapter is deleted from the PeftModel unless it is the last one
        (PEFT keeps one; it is never routed to again)."""
        task = self.tasks.pop(task_id, None)
        if task is not None and task.kind == "lora" and self.peft is not None:
            with self.lock:
                if task.adapter_name in self.peft.peft_config and len(self.peft.peft_config) > 1:
                    self.peft.delete_adapter(task.adapter_name)

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
    def generate(self, requests: list[DecodeRequest]):
        """Decode a fixed set of requests together (a DecodeBatch admitted once). Yields, per
        step, one entry per request: a token id, or None once it has finished (EOS, max_tokens,
        or `finish` set by the caller). Ends when all have finished. Per-request stats (finish
        reason, mean masked vocabulary, this step's log-probs) land in `self.last_stats`."""
        batch = DecodeBatch(self)
        batch.admit(requests)
        index = {id(r): i for i, r in enumerate(requests)}
        n = len(requests)
        stats = {"mean_masked_vocab": [0.0] * n, "finish_reason": [None] * n, "logprobs": [None] * n}
        self.last_stats = stats
        while len(batch):
            out = [None] * n
            stats["logprobs"] = [None] * n
            for request, event in batch.advance():
                i = index[id(request)]
                if event.get("done"):
                    stats["finish_reason"][i] = event["finish_reason"]
                    stats["mean_masked_vocab"][i] = event["mean_masked_vocab"]
                else:
                    out[i] = event["token"]
                    stats["logprobs"][i] = event["logprob"]
            yield out

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
                both = self._last_logits(self.route([task.adapter_name] * n + [BASE] * n), ids.repeat(2, 1), mask.repeat(2, 1),
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

    @torch.no_grad()
    def prompt_option_logits(self, task: LoadedTask | None, prompts: list[list[int]], options: list[list[list[int]]]):
        """`option_logits` for multiple-choice items with a shared prompt: each prompt runs once and
        its options continue from its KV cache (a prompt with k options costs one prompt plus k
        options instead of k copies of the prompt). `options[b]` are prompt b's options; returns
        (phi, theta, targets) flat over (prompt, option) pairs in order, as `option_logits` does."""
        owner = [b for b, group in enumerate(options) for _ in group]
        flat = [o for group in options for o in group]
        n, m = len(prompts), len(flat)
        with self.lock:
            if task is None:
                phi = theta = self._shared_logits(self.route, [BASE] * n, prompts, owner, flat)
            elif task.kind == "lora":
                both = self._shared_logits(self.route, [task.adapter_name] * n + [BASE] * n, prompts * 2,
                                           owner + [n + b for b in owner], flat * 2)
                phi, theta = both[:m], both[m:]
            else:
                theta = self._shared_logits(self.route, [BASE] * n, prompts, owner, flat)
                if task.kind == "ia3":
                    phi = self._shared_logits(lambda _names: task.phi_model, [BASE] * n, prompts, owner, flat)
                else:
                    phi = self._shared_logits(self.route, [BASE] * n, prompts, owner, flat, task.prefix)
        return phi, theta, [torch.tensor(o) for o in flat]

    def _shared_logits(self, forward_for, names: list[str], prompts, owner: list[int], options, prefix=None):
        """Per option row r: logits [len(option), V] predicting its tokens, the prompt
        `owner[r]` run once (with adapter names[owner[r]]) and the option fed on its cache."""
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad(prompts, pad)
        kwargs = {"input_ids": ids}
        if prefix is not None:
            embed = self.model.get_input_embeddings()
            kwargs = {"inputs_embeds": torch.cat([prefix.expand(len(prompts), -1, -1).to(embed.weight.dtype),
                                                  embed(ids)], dim=1)}
            mask = torch.cat([torch.ones(len(prompts), prefix.shape[0], dtype=mask.dtype), mask], dim=1)
        positions = _positions(mask)
        out = forward_for(names)(attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                                 **kwargs)
        first = out.logits[:, -1].float()                  # predicts each option's first token
        cache = getattr(out, CACHE_KEY)
        index = torch.tensor(owner, dtype=torch.long)
        for layer in _cache_layers(cache):
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        # options right-padded: a row's padding comes after its tokens, so causality hides it
        width = max(len(o) for o in options)
        option_ids = torch.full((len(options), width), pad, dtype=torch.long)
        option_mask = torch.zeros((len(options), width), dtype=torch.long)
        for r, o in enumerate(options):
            option_ids[r, :len(o)] = torch.tensor(o, dtype=torch.long)
            option_mask[r, :len(o)] = 1
        rest = forward_for([names[b] for b in owner])(
            input_ids=option_ids, attention_mask=torch.cat([mask[index], option_mask], dim=1),
            position_ids=positions[index, -1:] + 1 + torch.arange(width), use_cache=True, **{CACHE_KEY: cache})
        logits = rest.logits.float()
        return [torch.cat([first[b][None], logits[r, :len(o) - 1]]) for r, (b, o) in enumerate(zip(owner, options))]

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
