"""SVD tasks: PEFT warm-start on a task's training split, mu_bar calibration on its held-out
split, and persistence (adapter + mu_bar + metadata) so any replica, restarted or new, serves it.

Paper's rules (arXiv 2509.15888, Table 6): warm-start with any PEFT method for 1 epoch on
D_train; D_task is split into D_train and D_calib; LoRA r = 8, alpha = 16; alpha_mask = 0.1;
mu_bar from the per-token Gauss-Newton terms over the labelled tokens of D_calib, by default in
the sequence (ratio) form of Eq. 46: sum of numerators / sum of denominators.
OUR RECONSTRUCTION: the LoRA targets (q_proj, v_proj), IA3 targets, prompt-tuning size,
learning rate and batch size; an EOS token appended to each target so generation stops;
masked delta entries set to 0 during calibration (`calib_mask="zero"`); the `mu_estimator`
choice (ratio by default; mean and median are the paper's alternatives and are always reported
with their signs); `calib_tokens="content"` (default) leaves format tokens out of calibration:
EOS and tokens that decode to whitespace only, where p_phi is near-certain, ||delta||^2 -> 0 and
mu* is noise (issue 18 measured mean +0.46 vs median -0.25 with them in); the minimum number of
examples.

`run_warm_start` is the body of the Ray task the Serve deployment launches for POST /svd/tasks;
it writes <tasks_dir>/<task_id>/task.json (status queued -> running -> ready | failed) and
<tasks_dir>/<task_id>/adapter/ (PEFT `save_pretrained`).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeray.config import load_config, param, section, to_dict
from edgeray.errors import UserError
from serving.svd.steering import MU_ESTIMATORS, aggregate_mu, token_mu_terms

PEFT_TYPES = ("lora", "ia3", "prompt_tuning")
DEFAULT_TARGETS = {"lora": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"], "prompt_tuning": []}
CALIB_TOKENS = ("content", "all")
TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")      # \Z: no trailing newline


@dataclass
class PeftSpec:
    """Which PEFT method warm-starts the task."""

    type: str = param("lora", "PEFT method", choices=PEFT_TYPES)
    r: int = param(8, "LoRA rank", ge=1, le=256)
    alpha: float = param(16.0, "LoRA scaling alpha", gt=0)
    targets: list[str] = param([], "module names to adapt; empty = the method's default "
                                    "(LoRA: q_proj, v_proj; IA3: k_proj, v_proj, down_proj)")
    num_virtual_tokens: int = param(8, "prompt tuning: number of virtual tokens", ge=1, le=256)


@dataclass
class TaskSpec:
    """How a task is warm-started and calibrated (the body of POST /svd/tasks, minus `train`)."""

    name: str = param("", "task id to use (letters, digits, . _ -); empty = generated")
    base_model: str = param("", "served model name the task adapts; empty = the served model")
    peft: PeftSpec = section(PeftSpec)
    calib_frac: float = param(0.2, "share of the examples held out to calibrate mu_bar", gt=0, lt=1)
    epochs: float = param(1.0, "warm-start epochs over the training split (the paper: 1)", gt=0, le=20)
    lr: float = param(2e-3, "AdamW learning rate", gt=0, le=1)
    batch_size: int = param(16, "warm-start batch size", ge=1, le=256)
    max_steps: int = param(0, "stop after this many optimizer steps; 0 = no limit", ge=0)
    alpha: float = param(0.1, "confidence-mask alpha stored with the task (paper: 0.1)", gt=0, le=1)
    mu_estimator: str = param("ratio", "mu_bar from per-token terms: ratio (Eq. 46, sum of numerators / sum of "
                                       "denominators), mean or median of mu*", choices=MU_ESTIMATORS)
    calib_tokens: str = param("content", "calibration tokens: content (EOS and whitespace-only tokens left out) "
                                         "or all", choices=CALIB_TOKENS)
    calib_mask: str = param("zero", "masked delta entries during calibration: zero (ours) or none",
                            choices=("zero", "none"))
    append_eos: bool = param(True, "append EOS to each target so generation stops after the answer")
    seed: int = param(0, "shuffle / init seed", ge=0, le=2 ** 32 - 1)

    def validate(self) -> None:
        if self.name and not TASK_ID.match(self.name):
            raise UserError(f"task name {self.name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-'")


def parse_task_request(body: dict, min_examples: int, max_examples: int) -> tuple[TaskSpec, list[dict]]:
    """Validate a POST /svd/tasks body: (spec, examples). Raises UserError on bad input."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    body = dict(body)
    examples = body.pop("train", None)
    if not isinstance(examples, list) or not examples:
        raise UserError("'train' must be a non-empty list of {\"prompt\": str, \"target\": str} objects")
    for i, ex in enumerate(examples):
        if not (isinstance(ex, dict) and isinstance(ex.get("prompt"), str) and isinstance(ex.get("target"), str)
                and ex["target"] and set(ex) <= {"prompt", "target"}):
            raise UserError(f"train[{i}] must be {{\"prompt\": str, \"target\": non-empty str}}")
    spec = load_config(TaskSpec, data=body)
    if not min_examples <= len(examples) <= max_examples:
        raise UserError(f"a task needs between {min_examples} and {max_examples} train examples, got {len(examples)}")
    if split_sizes(len(examples), spec.calib_frac)[1] < 1:
        raise UserError(f"calib_frac={spec.calib_frac} leaves no calibration example out of {len(examples)}")
    return spec, examples


def split_sizes(n: int, calib_frac: float) -> tuple[int, int]:
    n_calib = min(n - 1, max(1, round(n * calib_frac)))
    return n - n_calib, n_calib


# ----------------------------------------------------------------------------- tokens

def encode_examples(tokenizer, examples: list[dict], append_eos: bool) -> list[tuple[list[int], int]]:
    """(token ids of prompt + target [+ eos], number of prompt tokens) per example. Prompt and
    target are encoded apart so that the labelled tokens are exactly the target's."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"], add_special_tokens=False).input_ids
        target = tokenizer(ex["target"], add_special_tokens=False).input_ids
        if append_eos:
            target = target + [tokenizer.eos_token_id]
        out.append((prompt + target, len(prompt)))
    return out


def collate(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


def token_logits(model, input_ids, attention_mask):
    """Logits of the real tokens (prompt tuning prepends virtual tokens; they are cut off)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, -input_ids.shape[1]:]


# ----------------------------------------------------------------------------- warm start

def make_peft_model(model, spec: PeftSpec):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    targets = spec.targets or DEFAULT_TARGETS[spec.type]
    if spec.type == "lora":
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=0.0,
                            task_type=TaskType.CAUSAL_LM)
    elif spec.type == "ia3":
        config = IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if "down" in t or "mlp" in t],
                           task_type=TaskType.CAUSAL_LM)
    else:
        config = PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=TaskType.CAUSAL_LM,
                                    prompt_tuning_init=PromptTuningInit.RANDOM)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"peft.targets {targets} do not fit the model: {' '.join(str(exc).split())[:200]}") from None


def warm_start(peft_model, tokenizer, spec: TaskSpec, train: list[dict], on_step=None) -> dict:
    """Fine-tune the adapter for `spec.epochs` epochs on `train`; returns loss statistics.
    `on_step(step, peft_model)`, if given, runs after every optimizer step (1-based); the model
    is put back in train mode afterwards (the bench evaluates checkpoints this way)."""
    encoded = encode_examples(tokenizer, train, spec.append_eos)
    rng = random.Random(spec.seed)
    steps = math.ceil(spec.epochs * len(encoded) / spec.batch_size)
    if spec.max_steps:
        steps = min(steps, spec.max_steps)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    peft_model.train()
    order, losses = [], []
    for _ in range(steps):
        if len(order) < spec.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:spec.batch_size], order[spec.batch_size:]
        input_ids, mask, labels = collate([encoded[i] for i in batch], tokenizer.pad_token_id)
        logits = token_logits(peft_model, input_ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), peft_model)
            peft_model.train()
    peft_model.eval()
    return {"steps": steps, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def format_token_ids(tokenizer, ids) -> set[int]:
    """Which of `ids` are format tokens: special tokens (EOS, padding) and tokens that decode to
    whitespace only (e.g. the lone space SmolLM2 splits off before digits)."""
    special = set(tokenizer.all_special_ids)
    return {i for i in set(int(x) for x in ids) if i in special or not tokenizer.decode([i]).strip()}


@torch.no_grad()
def calibrate(peft_model, tokenizer, spec: TaskSpec, calib: list[dict], batch_size: int = 16) -> dict:
    """mu_bar over the labelled tokens of the calibration split (sign kept), with every
    estimator reported; `spec.calib_tokens="content"` leaves format tokens out."""
    encoded = encode_examples(tokenizer, calib, spec.append_eos)
    numerators, denominators = [], []
    n_excluded = 0
    for start in range(0, len(encoded), batch_size):
        input_ids, mask, labels = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
        logits_phi = token_logits(peft_model, input_ids, mask)
        with peft_model.disable_adapter():
            logits_theta = token_logits(peft_model, input_ids, mask)
        targets = labels[:, 1:]
        keep = targets != -100
        if spec.calib_tokens == "content":
            fmt = format_token_ids(tokenizer, targets[keep].tolist())
            if fmt:
                is_format = torch.isin(targets, torch.tensor(sorted(fmt))) & keep
                n_excluded += int(is_format.sum())
                keep = keep & ~is_format
        num, den = token_mu_terms(logits_phi[:, :-1][keep], logits_theta[:, :-1][keep], targets[keep],
                                  spec.alpha, spec.calib_mask)
        numerators.append(num)
        denominators.append(den)
    num, den = torch.cat(numerators), torch.cat(denominators)
    return {"mu_bar": aggregate_mu(num, den, spec.mu_estimator), "mu_mean": aggregate_mu(num, den, "mean"),
            "mu_median": aggregate_mu(num, den, "median"), "mu_ratio": aggregate_mu(num, den, "ratio"),
            "n_calib_tokens": int(num.numel()), "n_calib_tokens_excluded": n_excluded,
            "mu_positive_share": float((num > 0).float().mean()) if num.numel() else None}


class TaskCancelled(Exception):
    """Raised inside a warm start whose task was deleted (DELETE /svd/tasks/{id})."""


def train_task(model, tokenizer, spec: TaskSpec, examples: list[dict], on_step=None):
    """Warm-start + calibration in memory: (peft_model, metadata)."""
    torch.manual_seed(spec.seed)
    shuffled = list(examples)
    random.Random(spec.seed).shuffle(shuffled)
    n_train, n_calib = split_sizes(len(shuffled), spec.calib_frac)
    peft_model = make_peft_model(model, spec.peft)
    started = time.time()
    stats = warm_start(peft_model, tokenizer, spec, shuffled[:n_train], on_step=on_step)
    calibration = calibrate(peft_model, tokenizer, spec, shuffled[n_train:])
    meta = {"n_train": n_train, "n_calib": n_calib, "train_seconds": round(time.time() - started, 2),
            **stats, **calibration}
    return peft_model, meta


# ----------------------------------------------------------------------------- persistence

def task_path(tasks_dir: str | Path, task_id: str) -> Path:
    return Path(tasks_dir) / task_id


def read_task(tasks_dir: str | Path, task_id: str) -> dict | None:
    if not TASK_ID.match(task_id):
        return None
    path = task_path(tasks_dir, task_id) / "task.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_task(tasks_dir: str | Path, task_id: str, record: dict) -> None:
    """Atomic write of task.json (a reader never sees half a file)."""
    folder = task_path(tasks_dir, task_id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "task.json.part"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / "task.json")


def list_tasks(tasks_dir: str | Path) -> list[dict]:
    root = Path(tasks_dir)
    if not root.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/task.json"))]


def new_task_record(task_id: str, spec: TaskSpec, model_name: str, n_examples: int) -> dict:
    return {"id": task_id, "status": "queued", "base_model": model_name, "peft_type": spec.peft.type,
            "spec": to_dict(spec), "n_examples": n_examples, "created": time.time(), "alpha": spec.alpha}


def run_warm_start(tasks_dir: str, task_id: str, model_source: str, dtype: str, spec_dict: dict,
                   examples: list[dict], num_threads: int = 2, cancel=None) -> dict:
    """The Ray task (or, without a free CPU, a thread of the replica): load the base model,
    warm-start, calibrate, persist. Failures are recorded in task.json (status "failed") rather
    than lost with the worker. `cancel` (a threading.Event) stops it at the next optimizer step
    and nothing more is written (the task's folder has been deleted)."""
    from serving.svd.model import load_model

    torch.set_num_threads(num_threads)
    record = read_task(tasks_dir, task_id)
    if record is None or (cancel is not None and cancel.is_set()):     # deleted before it started
        return {"id": task_id, "status": "cancelled"}
    record.update(status="running", started=time.time())
    write_task(tasks_dir, task_id, record)
    try:
        spec = load_config(TaskSpec, data=spec_dict)
        model, tokenizer = load_model(model_source, dtype)
        def check(_step, _model):
            if cancel is not None and cancel.is_set():
                raise TaskCancelled(task_id)

        peft_model, meta = train_task(model, tokenizer, spec, examples, on_step=check)
        check(0, None)
        if not math.isfinite(meta.get("mu_bar", 0.0)):
            raise ValueError(f"the warm start diverged (mu_bar = {meta['mu_bar']}, last loss {meta.get('loss_last')}); "
                             "try a smaller lr")
        adapter_dir = task_path(tasks_dir, task_id) / "adapter"
        peft_model.save_pretrained(adapter_dir)
        record.update(status="ready", finished=time.time(), adapter_path=str(adapter_dir), **meta)
    except TaskCancelled:
        return {**record, "status": "cancelled"}
    except Exception as exc:  # recorded for GET /svd/tasks/{id}; the task itself stays inspectable
        record.update(status="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}"[:500])
    if (cancel is not None and cancel.is_set()) or not task_path(tasks_dir, task_id).is_dir():
        return {**record, "status": "cancelled"}         # deleted meanwhile: never write it back
    write_task(tasks_dir, task_id, record)
    return record
