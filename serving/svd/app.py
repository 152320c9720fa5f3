"""The SVD Ray Serve app: an OpenAI-compatible API with steering-vector decoding.

Routes (under the app's route prefix, e.g. /svd):
  POST /v1/completions, /v1/chat/completions   OpenAI shapes, SSE when stream=true, plus an
        `svd` extension object {"task", "enabled", "mu": "auto" | float, "alpha"}; the
        response carries "svd": {"task", "mu", "alpha", "mean_masked_vocab"}
  GET  /v1/models                              the base model and every ready task
  POST /svd/tasks                              register + warm-start a task (Ray task) -> 202
  GET  /svd/tasks, /svd/tasks/{id}             status, mu_bar, calibration statistics
  POST /svd/score                              log-probability of multiple-choice options

Run: `serve run serving.svd.app:app_builder config=configs/svd.yaml [model.source=tiny-random ...]`
(`app_builder` takes a dict: "config" is a YAML path, every other key a dotted override).
Errors are OpenAI error objects {"error": {"message", "type", "param", "code"}} with a 4xx for
anything wrong in a request; a 5xx means a server fault.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation.
import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeray.config import load_config, to_dict
from edgeray.errors import UserError
from serving.svd.config import SVDServeConfig
from serving.svd.decoding import DecodeRequest, SVDEngine, option_logprobs
from serving.svd.model import load_model, resolve_source
from serving.svd.steering import SamplingParams
from serving.svd.warmstart import (list_tasks, new_task_record, parse_task_request, read_task, run_warm_start,
                                   write_task)


class APIError(Exception):
    """A request error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


api = FastAPI(title="edgeray SVD", description="Steering-vector decoding behind an OpenAI-compatible API")


@api.exception_handler(APIError)
async def _api_error(_, exc: APIError):
    return error_response(exc.status, exc.message, exc.param, exc.code)


@api.exception_handler(UserError)
async def _user_error(_, exc: UserError):
    return error_response(400, str(exc))


@api.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _server_error(_, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}")


# ----------------------------------------------------------------------------- request parsing

def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{key} must be {kind} between {low} and {high}, got {value!r}", key)
    return int(value) if integer else float(value)


@dataclass
class Job:
    """One parsed generation request, as it enters the batch."""

    decode: DecodeRequest
    svd: dict | None
    stream: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment
@serve.ingress(api)
class SVDServer:
    """One replica: the base model, the tasks loaded into it, batched decoding."""

    def __init__(self, config: dict):
        self.cfg = load_config(SVDServeConfig, data=config)
        torch.set_num_threads(self.cfg.serve.num_threads)
        self.source = resolve_source(self.cfg.model.source)
        self.tasks_dir = resolve_source(self.cfg.serve.tasks_dir)
        Path(self.tasks_dir).mkdir(parents=True, exist_ok=True)
        model_cfg = self.cfg.model

        def loader():
            return load_model(self.source, model_cfg.dtype, model_cfg.device, model_cfg.seed)

        model, tokenizer = loader()
        self.engine = SVDEngine(model, tokenizer, model_cfg.name, model_loader=loader)
        self.jobs: dict[str, Any] = {}          # task id -> ObjectRef of its warm-start Ray task
        self.created = int(time.time())
        self._generate_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)

    # ------------------------------------------------------------------ tasks
    def _task_record(self, task_id: str) -> dict:
        record = read_task(self.tasks_dir, task_id)
        if record is None:
            raise APIError(404, f"unknown task {task_id!r}; GET /v1/models lists the ready ones", "task",
                           "task_not_found")
        ref = self.jobs.get(task_id)
        if record["status"] in ("queued", "running") and ref is not None:
            import ray

            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # the worker died before it could record the failure
                    record.update(status="failed", error=f"warm-start task died: {type(exc).__name__}")
                    write_task(self.tasks_dir, task_id, record)
                record = read_task(self.tasks_dir, task_id)
        return record

    def _ready_task(self, task_id: str):
        record = self._task_record(task_id)
        if record["status"] != "ready":
            raise APIError(409, f"task {task_id!r} is {record['status']}, not ready", "task", "task_not_ready")
        return self.engine.load_task(record)

    def _resolve(self, model: Any, svd: Any):
        """(task or None, steering fields) from `model` and the `svd` extension object."""
        if not isinstance(model, str) or not model:
            raise APIError(400, "model must be a non-empty string; GET /v1/models lists them", "model")
        if svd is not None and not isinstance(svd, dict):
            raise APIError(400, "svd must be an object {task, enabled, mu, alpha}", "svd")
        svd = dict(svd or {})
        unknown = set(svd) - {"task", "enabled", "mu", "alpha"}
        if unknown:
            raise APIError(400, f"unknown svd field(s) {sorted(unknown)}; allowed: task, enabled, mu, alpha", "svd")
        task_id = svd.get("task")
        if model != self.cfg.model.name:
            if read_task(self.tasks_dir, model) is None:
                raise APIError(404, f"unknown model {model!r}; GET /v1/models lists them", "model",
                               "model_not_found")
            if task_id not in (None, model):
                raise APIError(400, f"model {model!r} is a task; svd.task must be absent or the same", "svd.task")
            task_id = model
        if task_id is not None and not isinstance(task_id, str):
            raise APIError(400, "svd.task must be a string", "svd.task")
        task = self._ready_task(task_id) if task_id else None
        enabled = svd.get("enabled", task is not None)
        if not isinstance(enabled, bool):
            raise APIError(400, "svd.enabled must be true or false", "svd.enabled")
        if enabled and task is None:
            raise APIError(400, "svd.enabled needs a task: set svd.task or use a task id as model", "svd.task")
        mu = svd.get("mu", "auto")
        if mu == "auto":
            mu = task.mu_bar if task else 0.0
        elif not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and abs(mu) <= 1e6):
            raise APIError(400, f"svd.mu must be \"auto\" or a number, got {mu!r}", "svd.mu")
        alpha = svd.get("alpha", task.alpha if task else self.cfg.svd.alpha)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1):
            raise APIError(400, f"svd.alpha must be a number in (0, 1], got {alpha!r}", "svd.alpha")
        return task, {"enabled": enabled, "mu": float(mu), "alpha": float(alpha)}

    def _encode_prompt(self, text: str) -> list[int]:
        ids = self.engine.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) > self.cfg.serve.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {self.cfg.serve.max_prompt_tokens}",
                           "prompt")
        return ids

    def _job(self, body: dict, prompt_ids: list[int]) -> Job:
        limits = self.cfg.serve
        for key, allowed in (("n", 1), ("best_of", 1)):
            if body.get(key, allowed) not in (allowed, None):
                raise APIError(400, f"{key} must be 1 (only one choice per request is served)", key)
        for key in ("logprobs", "echo", "stop", "logit_bias", "tools", "functions"):
            if body.get(key) not in (None, False, [], {}):
                raise APIError(400, f"{key} is not supported by this server", key)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limits.default_max_tokens, 1,
                             limits.max_tokens_limit, integer=True)
        sampling = SamplingParams(
            temperature=_number(body, "temperature", limits.default_temperature, 0, 2),
            top_p=_number(body, "top_p", 1.0, 1e-6, 1),
            top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),
            seed=None if body.get("seed") is None else _number(body, "seed", 0, -2**63, 2**63 - 1, integer=True))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream must be true or false", "stream")
        task, svd = self._resolve(body.get("model"), body.get("svd"))
        decode = DecodeRequest(prompt_ids, max_tokens, task, svd["enabled"], svd["mu"] if svd["enabled"] else 0.0,
                               svd["alpha"], sampling)
        info = {"task": task.id, "enabled": svd["enabled"], "mu": svd["mu"], "alpha": svd["alpha"]} if task else None
        return Job(decode, info, stream)

    # ------------------------------------------------------------------ batched decoding
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=1)
    async def _generate_batch(self, jobs: list[Job]):
        """Decode a batch in lockstep; yields, per step, one event per job: {"text": delta} while
        it runs, {"done": ...} when it finishes, then StopIteration."""
        steps = self.engine.generate([job.decode for job in jobs])
        ids: list[list[int]] = [[] for _ in jobs]
        sent = [""] * len(jobs)
        finished = [False] * len(jobs)
        while not all(finished):
            tokens = await asyncio.to_thread(next, steps, None)
            stats = self.engine.last_stats
            events = []
            for i, _ in enumerate(jobs):
                if finished[i]:
                    events.append(StopIteration)
                    continue
                token = tokens[i] if tokens is not None else None
                if token is not None:
                    ids[i].append(token)
                    text = self.engine.tokenizer.decode(ids[i], skip_special_tokens=True)
                    if not text.endswith("\ufffd"):
                        events.append({"text": text[len(sent[i]):]})
                        sent[i] = text
                        continue
                    events.append({"text": ""})
                    continue
                finished[i] = True
                text = self.engine.tokenizer.decode(ids[i], skip_special_tokens=True)
                events.append({"done": True, "text": text[len(sent[i]):], "completion_tokens": len(ids[i]),
                               "finish_reason": stats["finish_reason"][i] or "length",
                               "mean_masked_vocab": stats["mean_masked_vocab"][i]})
            yield events

    async def _run(self, job: Job):
        """Async generator of events for one job (through the shared batch)."""
        async for event in self._generate_batch(job):
            yield event

    def _svd_field(self, job: Job, done: dict | None) -> dict | None:
        if job.svd is None:
            return None
        return {**job.svd, "mean_masked_vocab": done["mean_masked_vocab"] if done else None}

    async def _respond(self, job: Job, kind: str):
        n_prompt = len(job.decode.prompt_ids)
        created = int(time.time())
        model = job.svd["task"] if job.svd else self.cfg.model.name
        obj = "chat.completion" if kind == "chat" else "text_completion"
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.id

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if kind == "chat":
                body = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
                return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": finish,
                        "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not job.stream:
            text, done = "", None
            async for event in self._run(job):
                text += event["text"]
                if event.get("done"):
                    done = event
            usage = {"prompt_tokens": n_prompt, "completion_tokens": done["completion_tokens"],
                     "total_tokens": n_prompt + done["completion_tokens"]}
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": [choice(text, done["finish_reason"], False)], "usage": usage}
            if job.svd:
                out["svd"] = self._svd_field(job, done)
            return JSONResponse(out)

        async def events():
            chunk_obj = obj + ".chunk" if kind == "chat" else obj
            base = {"id": rid, "object": chunk_obj, "created": created, "model": model}
            if kind == "chat":
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})
            async for event in self._run(job):
                if event["text"]:
                    yield _sse({**base, "choices": [choice(event["text"], None, True)]})
                if event.get("done"):
                    final = {**base, "choices": [choice("", event["finish_reason"], True)],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": event["completion_tokens"],
                                       "total_tokens": n_prompt + event["completion_tokens"]}}
                    if job.svd:
                        final["svd"] = self._svd_field(job, event)
                    yield _sse(final)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ OpenAI routes
    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (or a list holding one string)", "prompt")
        return await self._respond(self._job(body, self._encode_prompt(prompt)), "completion")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}] must be an object with role system, user or assistant",
                               f"messages[{i}]")
            content = message.get("content")
            if isinstance(content, list):   # OpenAI content parts: only text is served
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content parts must all be {{type: text, text: str}}",
                                   f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            clean.append({"role": message["role"], "content": content})
        if not any(m["content"].strip() for m in clean):
            raise APIError(400, "the prompt is empty: every message has empty content", "messages")
        text = self.engine.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        return await self._respond(self._job(body, self._encode_prompt(text)), "chat")

    @api.get("/v1/models")
    async def models(self):
        data = [{"id": self.cfg.model.name, "object": "model", "created": self.created, "owned_by": "edgeray"}]
        for record in list_tasks(self.tasks_dir):
            if record.get("status") == "ready" and record.get("base_model") == self.cfg.model.name:
                data.append({"id": record["id"], "object": "model", "created": int(record["created"]),
                             "owned_by": "edgeray", "parent": self.cfg.model.name,
                             "svd": {"mu_bar": record["mu_bar"], "alpha": record["alpha"],
                                     "peft_type": record["peft_type"]}})
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ SVD routes
    @api.post("/svd/tasks", status_code=202)
    async def create_task(self, request: Request):
        import ray

        body = await _json_body(request)
        spec, examples = parse_task_request(body, self.cfg.serve.min_task_examples, self.cfg.serve.max_task_examples)
        if spec.base_model not in ("", self.cfg.model.name):
            raise APIError(404, f"unknown base_model {spec.base_model!r}; this server serves {self.cfg.model.name!r}",
                           "base_model", "model_not_found")
        task_id = spec.name or f"task-{uuid.uuid4().hex[:12]}"
        if task_id == self.cfg.model.name or read_task(self.tasks_dir, task_id) is not None:
            raise APIError(409, f"task {task_id!r} already exists", "name", "task_exists")
        record = new_task_record(task_id, spec, self.cfg.model.name, len(examples))
        write_task(self.tasks_dir, task_id, record)
        remote = ray.remote(num_cpus=self.cfg.serve.task_num_cpus, max_retries=0)(run_warm_start)
        self.jobs[task_id] = remote.remote(self.tasks_dir, task_id, self.source, self.cfg.model.dtype,
                                           to_dict(spec), examples, self.cfg.serve.num_threads)
        status_url = str(request.url).rstrip("/") + f"/{task_id}"
        return JSONResponse({"task": task_id, "status": "queued", "status_url": status_url}, 202,
                            headers={"Location": status_url})

    @api.get("/svd/tasks")
    async def tasks(self):
        return {"object": "list", "data": [self._public(r) for r in list_tasks(self.tasks_dir)]}

    @api.get("/svd/tasks/{task_id}")
    async def task(self, task_id: str):
        return self._public(self._task_record(task_id))

    @staticmethod
    def _public(record: dict) -> dict:
        keys = ("status", "base_model", "peft_type", "mu_bar", "mu_mean", "mu_median", "mu_ratio", "n_calib_tokens",
                "n_train", "n_calib", "steps", "loss_first", "loss_last", "train_seconds", "alpha", "adapter_path",
                "error", "created", "finished")
        return {"task": record["id"], **{k: record[k] for k in keys if k in record}}

    @api.post("/svd/score")
    async def score(self, request: Request):
        body = await _json_body(request)
        unknown = set(body) - {"task", "model", "prompt", "options", "steer", "mu", "alpha", "mask"}
        if unknown:
            raise APIError(400, f"unknown field(s) {sorted(unknown)}; allowed: task, model, prompt, options, steer, "
                                "mu, alpha, mask")
        prompt, options = body.get("prompt"), body.get("options")
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string", "prompt")
        if (not isinstance(options, list) or not 2 <= len(options) <= self.cfg.serve.max_score_options
                or not all(isinstance(o, str) and o for o in options)):
            raise APIError(400, f"options must be a list of 2 to {self.cfg.serve.max_score_options} non-empty strings",
                           "options")
        steer = body.get("steer", True)
        if not isinstance(steer, bool):
            raise APIError(400, "steer must be true or false", "steer")
        mask = body.get("mask", self.cfg.svd.score_mask)
        if mask not in ("zero", "neg_inf"):
            raise APIError(400, f"mask must be zero or neg_inf, got {mask!r}", "mask")
        svd = {"enabled": steer, **{k: body[k] for k in ("task", "mu", "alpha") if k in body}}
        task, resolved = self._resolve(body.get("model", self.cfg.model.name), svd)
        prompt_ids = self._encode_prompt(prompt)
        option_ids = [self.engine.tokenizer(o, add_special_tokens=False).input_ids for o in options]
        phi, theta, targets = await asyncio.to_thread(self.engine.option_logits, task, [prompt_ids] * len(options),
                                                      option_ids)
        mu, alpha = (resolved["mu"], resolved["alpha"]) if steer else (0.0, 0.0)
        scores = [option_logprobs(p, t, y, mu, alpha, mask) for p, t, y in zip(phi, theta, targets)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        return {"task": task.id if task else None, "steer": steer, "mu": mu, "alpha": alpha, "mask": mask,
                "scores": [s if s != float("-inf") else None for s in scores], "best": best,
                "best_option": options[best]}


def app_builder(args: dict):
    """Build the Serve application. `args`: {"config": YAML path (optional), any dotted key such
    as "model.source": value} (strings from `serve run ... key=value` are parsed as YAML)."""
    args = dict(args or {})
    path = args.pop("config", None)
    cfg = load_config(SVDServeConfig, path, [f"{k}={v}" if isinstance(v, str) else f"{k}={json.dumps(v)}"
                                             for k, v in args.items()])
    return SVDServer.options(ray_actor_options={"num_cpus": cfg.serve.num_cpus},
                             max_ongoing_requests=cfg.serve.max_ongoing_requests).bind(to_dict(cfg))
