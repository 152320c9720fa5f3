"""The SVD Ray Serve app: an OpenAI-compatible API with steering-vector decoding
(arXiv 2509.15888).

Routes (under the app's route prefix, e.g. /svd); request bodies are pydantic models, so
/openapi.json declares them, and an unknown field is a 400 naming it:
  POST /v1/completions, /v1/chat/completions   OpenAI shapes: stop, n, logprobs / top_logprobs,
        seed, max_tokens, response_format {"type": "json_object"}, stream (SSE, with
        stream_options.include_usage), plus an `svd` extension object {"task", "enabled",
        "mu": "auto" | float, "alpha"}; the response carries "svd": {"task", "mu", "alpha",
        "mean_masked_vocab"}
  GET  /v1/models                              the base model and every ready task
  POST /svd/tasks                              register + warm-start a task -> 202 (a Ray task when
        the cluster has a free CPU, else a thread of this replica: `serve.task_placement`); a
        failed or cancelled task may be registered again
  GET  /svd/tasks, /svd/tasks/{id}             status, mu_bar (+ every estimator), and for a queued
        task why it waits (position, CPUs needed / free)
  DELETE /svd/tasks/{id}                       cancel a warm start and delete the task
  POST /svd/score                              log-probability of multiple-choice options

  GET  /svd/batch                              the running batch: rows running / queued, decode steps,
        how many steps cancelled rows took to leave

Continuous batching (`decoding.ContinuousBatcher`): concurrent requests (and the n choices of
one) share decode steps; a request arriving mid-generation joins the running batch at the next
decode-step boundary (its KV cache is merged into the batch's), steered or not, with its own mu /
alpha; a row leaves when it finishes, reaches a stop string, or its client goes away (at the next
boundary). At most `serve.max_batch_size` rows run at once; the rest queue in arrival order.

Run: `serve run serving.svd.app:app_builder config=configs/svd.yaml [model.source=tiny-random ...]`
(`app_builder` takes a dict: "config" is a YAML path, every other key a dotted override).
Errors are OpenAI error objects {"error": {"message", "type", "param", "code"}} with a 4xx for
anything wrong in a request; a 5xx means a server fault.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation.
import asyncio
import dataclasses
import json
import math
import re
import shutil
import statistics
import threading
import time
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeray.config import load_config, to_dict
from edgeray.errors import UserError
from serving.svd.config import SVDServeConfig
from serving.svd.decoding import ContinuousBatcher, DecodeRequest, SVDEngine, option_logprobs
from serving.svd.model import load_model, resolve_source
from serving.svd.steering import SamplingParams
from serving.svd.warmstart import (TaskSpec, list_tasks, new_task_record, parse_task_request, read_task,
                                   run_warm_start, task_path, write_task)


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


def _param(loc) -> str | None:
    """A pydantic error location as an OpenAI `param`: messages[0].role, svd.mu, stop, ...
    (union-member tags such as 'str' or 'list[str]' are dropped)."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in ("str", "int", "float", "bool", "list", "dict"):
            out += ("." if out else "") + str(part)
        else:
            break
    return out or None


@api.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = _param(first.get("loc", ()))
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "this field is not supported by this server"
    elif first.get("type") == "missing":
        message = "this field is required"
    return error_response(400, f"{where or 'body'}: {message}", where)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    response = error_response(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        # Starlette's Allow names the methods of one route; a path here has a route per method:
        # name every method /openapi.json declares for the path (GET implies HEAD)
        path, root = request.scope["path"], request.scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path
        methods = set()
        for template, operations in api.openapi()["paths"].items():
            if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
                methods |= {m.upper() for m in operations} | ({"HEAD"} if "get" in operations else set())
        if methods:
            response.headers["Allow"] = ", ".join(sorted(methods))
    return response


@api.exception_handler(Exception)
async def _server_error(_, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}")


# ----------------------------------------------------------------------------- request bodies
# Declared as pydantic models (as vLLM's OpenAI server does), so /openapi.json states every field;
# an unknown field is a 400 naming it (extra="forbid"). Limits that depend on the config
# (max_tokens, prompt length) are checked in the handler.

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """JSON Schema's "integer" includes 130.0: an integer field takes it as 130 (strict
        mode alone would refuse it)."""
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items() if int in (f.annotation, *typing.get_args(f.annotation))}
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


NonEmpty = Annotated[str, Field(min_length=1)]


class SVDOptions(_Strict):
    """The `svd` extension object."""

    task: str | None = Field(None, description="task id to steer with (or use the task id as `model`)")
    enabled: bool | None = Field(None, description="steer (default: true when a task is given)")
    mu: Union[Literal["auto"], Annotated[float, Field(ge=-1e6, le=1e6)]] = Field(
        "auto", description='"auto" = the task\'s calibrated mu_bar, or a number')
    alpha: float | None = Field(None, gt=0, le=1, description="confidence-mask alpha (default: the task's)")


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"] = Field(description="json_object constrains the output to one JSON object")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Generation(_Strict):
    model: str = Field(min_length=1, description="the base model or a task id (GET /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="at most serve.max_tokens_limit (the schema states it)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy (the default, as in the paper)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=8, description="number of choices")
    stop: Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=4)], None] = Field(
        None, description="up to 4 stop strings")
    seed: int | None = Field(None, description="sampling seed, any integer (choice i uses seed + i, modulo 2**64)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS until max_tokens "
                                                 "(benchmarks)")
    svd: SVDOptions | None = None


class CompletionRequest(_Generation):
    prompt: Union[NonEmpty, Annotated[list[NonEmpty], Field(min_length=1, max_length=1)]] = Field(
        description="a string (or a list holding one string), at most serve.max_prompt_tokens tokens")
    logprobs: int | None = Field(None, ge=0, le=5, description="log-probs of each token and this many alternatives")
    echo: Literal[False] = Field(False, description="not served: must be false")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="at most serve.max_tokens_limit")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (implies logprobs)")


class ScoreRequest(_Strict):
    prompt: NonEmpty
    options: list[NonEmpty] = Field(min_length=2, description="at most serve.max_score_options (the schema states it)")
    task: str | None = None
    model: str | None = None
    steer: bool = Field(True, description="steer with the task (no task: the base model's scores, steer false "
                                           "in the answer)")
    mu: Union[Literal["auto"], Annotated[float, Field(ge=-1e6, le=1e6)], None] = None
    alpha: float | None = Field(None, gt=0, le=1)
    mask: Literal["zero", "neg_inf"] | None = None


def config_model(cls: type, name: str, patterns: dict | None = None) -> type[BaseModel]:
    """A strict pydantic model of a config dataclass (edgeray.config `param` fields: choices,
    bounds, docs, defaults; nested sections become nested models), so a body that the config
    loader validates is also declared in /openapi.json."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        kind, meta = hints[f.name], f.metadata
        if dataclasses.is_dataclass(kind):
            sub = config_model(kind, name + kind.__name__)
            fields[f.name] = (sub, Field(default_factory=sub, description=meta.get("doc")))
            continue
        if meta.get("choices"):
            kind = Literal[tuple(meta["choices"])]
        bounds = {k: meta[k] for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
        if (patterns or {}).get(f.name):
            bounds["pattern"] = patterns[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = (kind, Field(default, description=meta.get("doc"), **bounds))
    return create_model(name, __base__=_Strict, **fields)


class TrainExample(_Strict):
    prompt: str
    target: NonEmpty


class TaskRequest(config_model(TaskSpec, "TaskSpec", {"name": r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"})):
    """The body of POST /svd/tasks: how to warm-start and calibrate, and the examples."""

    train: list[TrainExample] = Field(description="between serve.min_task_examples and serve.max_task_examples "
                                                  "(the schema states them)")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {400: {"model": ErrorResponse, "description": "bad request (the message and param name the problem)"},
          404: {"model": ErrorResponse, "description": "unknown model or task"},
          409: {"model": ErrorResponse, "description": "task not ready, or already exists"}}
GENERATION = {**ERRORS, 200: {"description": "the completion (JSON), or with stream=true server-sent events "
                                             "(`data: {chunk}` lines, then `data: [DONE]`)",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


# ----------------------------------------------------------------------------- request parsing

def state_limits(schema: dict, limits) -> dict:
    """Write the config-dependent limits (serve.* of SVDServeConfig) into an OpenAPI schema, so
    the schema states what the handlers enforce: max_tokens, the train list, the score options."""
    def put(prop: dict, kind: str, **values) -> None:
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == kind:
                branch.update(values)

    models = schema["components"]["schemas"]
    for model, field in (("CompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_tokens"),
                         ("ChatCompletionRequest", "max_completion_tokens")):
        put(models[model]["properties"][field], "integer", maximum=limits.max_tokens_limit)
    put(models["TaskRequest"]["properties"]["train"], "array", minItems=limits.min_task_examples,
        maxItems=limits.max_task_examples)
    put(models["ScoreRequest"]["properties"]["options"], "array", maxItems=limits.max_score_options)
    for operations in schema["paths"].values():        # invalid bodies are 400s here, never FastAPI's 422
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    models.pop("HTTPValidationError", None)
    models.pop("ValidationError", None)
    return schema


@dataclass
class Job:
    """One choice of one generation request, as it enters the batch."""

    decode: DecodeRequest
    svd: dict | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


LOGPROB_FLOOR = -9999.0


def finite(value: Any) -> Any:
    """The value with non-finite floats (NaN, inf: not JSON) replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class ChoiceText:
    """Incremental detokenization of one choice with stop strings: `add(token)` returns the new
    text that is safe to send (a suffix that could start a stop string is held back) and
    whether a stop string was reached (the text is cut before it)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):          # half of a multi-byte character
            return "", False
        self.text = text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.flush(), True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta




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
        self.local: dict[str, threading.Event] = {}   # task id -> cancel flag of an in-replica warm start
        self.created = int(time.time())
        self.batcher = ContinuousBatcher(self.engine, self.cfg.serve.max_batch_size,
                                         self.cfg.serve.batch_wait_timeout_s)
        api.openapi_schema = None
        state_limits(api.openapi(), self.cfg.serve)          # cached by FastAPI: /openapi.json serves it

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
        if record["status"] == "queued" and task_id in self.jobs:
            record = {**record, "waiting": self._waiting(task_id)}
        return record

    def _queued_ray_tasks(self) -> list[str]:
        """Ids of this replica's warm starts submitted as Ray tasks that have not started yet
        (oldest first): Ray counts their CPUs as free until it schedules them."""
        return [r["id"] for r in sorted(list_tasks(self.tasks_dir), key=lambda r: r.get("created", 0))
                if r["status"] == "queued" and r["id"] in self.jobs]

    def _free_cpus(self) -> float:
        """CPUs a new warm-start Ray task could get now: the cluster's free CPUs less those our
        own queued (submitted, not yet scheduled) warm starts will take."""
        import ray

        free = ray.available_resources().get("CPU", 0.0)
        return free - len(self._queued_ray_tasks()) * self.cfg.serve.task_num_cpus

    def _waiting(self, task_id: str) -> dict:
        """Why a queued task has not started: its place among this replica's queued warm starts,
        the CPUs it needs versus those free in the cluster, and an estimate of the wait: its
        position times the median warm-start time of this server's finished tasks (null before
        one has finished; OUR ESTIMATE: it does not know how long CPUs held by others stay held)."""
        import ray

        queued = self._queued_ray_tasks()
        position = queued.index(task_id) + 1 if task_id in queued else 1
        free = ray.available_resources().get("CPU", 0.0)
        took = [r["finished"] - r["started"] for r in list_tasks(self.tasks_dir)
                if r["status"] == "ready" and "started" in r and "finished" in r]
        per_task = statistics.median(took) if took else None
        return {"position": position, "needs_cpus": self.cfg.serve.task_num_cpus, "free_cpus": free,
                "estimate_s": None if per_task is None else round(position * per_task, 1),
                "estimate_basis": (f"position x median warm-start time of {len(took)} finished task(s)" if took
                                   else "no warm start has finished on this server yet"),
                "reason": "waiting for a free CPU in the cluster"
                if free - (position - 1) * self.cfg.serve.task_num_cpus < self.cfg.serve.task_num_cpus
                else "scheduled; starting"}

    def _ready_task(self, task_id: str):
        record = self._task_record(task_id)
        if record["status"] != "ready":
            raise APIError(409, f"task {task_id!r} is {record['status']}, not ready", "task", "task_not_ready")
        return self.engine.load_task(record)

    def _resolve(self, model: Any, svd: SVDOptions | None):
        """(task or None, steering fields) from `model` and the `svd` extension object."""
        svd = svd or SVDOptions()
        task_id = svd.task
        if model != self.cfg.model.name:
            if read_task(self.tasks_dir, model) is None:
                raise APIError(404, f"unknown model {model!r}; GET /v1/models lists them", "model",
                               "model_not_found")
            if task_id not in (None, model):
                raise APIError(400, f"model {model!r} is a task; svd.task must be absent or the same", "svd.task")
            task_id = model
        task = self._ready_task(task_id) if task_id else None
        enabled = svd.enabled if svd.enabled is not None else task is not None
        if enabled and task is None:
            raise APIError(400, "svd.enabled needs a task: set svd.task or use a task id as model", "svd.task")
        mu = svd.mu
        if mu == "auto":
            mu = task.mu_bar if task else 0.0
        elif abs(mu) > 1e6:
            raise APIError(400, f"svd.mu must be \"auto\" or a number of size at most 1e6, got {mu!r}", "svd.mu")
        alpha = svd.alpha if svd.alpha is not None else (task.alpha if task else self.cfg.svd.alpha)
        return task, {"enabled": enabled, "mu": float(mu), "alpha": float(alpha)}

    def _encode_prompt(self, text: str) -> list[int]:
        ids = self.engine.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) > self.cfg.serve.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {self.cfg.serve.max_prompt_tokens}",
                           "prompt")
        return ids

    def _jobs(self, body: _Generation, prompt_ids: list[int], max_tokens: int | None,
              top_logprobs: int | None) -> list[Job]:
        limits = self.cfg.serve
        max_tokens = max_tokens if max_tokens is not None else limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {limits.max_tokens_limit}, got {max_tokens}", "max_tokens")
        task, svd = self._resolve(body.model, body.svd)
        jobs = []
        for i in range(body.n):
            sampling = SamplingParams(
                temperature=limits.default_temperature if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                seed=None if body.seed is None else (body.seed + i) % 2 ** 64)
            decode = DecodeRequest(prompt_ids, max_tokens, task, svd["enabled"],
                                   svd["mu"] if svd["enabled"] else 0.0, svd["alpha"], sampling,
                                   top_logprobs=top_logprobs, ignore_eos=body.ignore_eos,
                                   json_mode=body.response_format is not None
                                   and body.response_format.type == "json_object")
            info = None
            if task:
                info = {"task": task.id, "enabled": svd["enabled"], "mu": svd["mu"], "alpha": svd["alpha"]}
            jobs.append(Job(decode, info))
        return jobs

    # ------------------------------------------------------------------ continuous batching
    async def _choices(self, jobs: list[Job]):
        """Lists of (choice index, event) from every job of a request, as the batcher produces
        them (each job joins the running batch at the next decode-step boundary); a list holds
        every event waiting when the consumer asks. When the consumer goes away (client
        disconnect, cancelled request), every unfinished job is cancelled and leaves the batch
        at the next boundary."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        finished: set[int] = set()

        def deliver(i: int, event: dict) -> None:          # called from the batcher thread
            loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        for i, job in enumerate(jobs):
            self.batcher.submit(job.decode, lambda event, i=i: deliver(i, event))
        try:
            while len(finished) < len(jobs):
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                for i, event in ready:
                    if "error" in event:
                        finished.add(i)
                        raise event["error"]
                    if event.get("done"):
                        finished.add(i)
                yield ready
        finally:
            for i, job in enumerate(jobs):
                if i not in finished:
                    self.batcher.cancel(job.decode)

    def _svd_field(self, job: Job, done: dict | None) -> dict | None:
        if job.svd is None:
            return None
        return {**job.svd, "mean_masked_vocab": done["mean_masked_vocab"] if done else None}

    def _logprob_entry(self, kind: str, token: int, logprob) -> dict:
        tok = self.engine.tokenizer
        text = tok.decode([token])
        value, alternatives = logprob
        # a token the confidence mask removed has log-prob -inf, not JSON: -9999.0 as OpenAI reports
        value, alternatives = max(value, LOGPROB_FLOOR), [(a, max(lp, LOGPROB_FLOOR)) for a, lp in alternatives]
        if kind == "chat":
            return {"token": text, "logprob": value, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": tok.decode([a]), "logprob": lp, "bytes": list(tok.decode([a]).encode())}
                                     for a, lp in alternatives]}
        return {"token": text, "logprob": value, "top": {tok.decode([a]): lp for a, lp in alternatives}}

    @staticmethod
    def _logprobs_body(kind: str, entries: list[dict], offset0: int = 0) -> dict:
        if kind == "chat":
            return {"content": entries}
        offsets, at = [], offset0
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": offsets}

    async def _respond(self, jobs: list[Job], kind: str, stops: list[str], stream: bool, want_logprobs: bool,
                       include_usage: bool):
        n_prompt = len(jobs[0].decode.prompt_ids)
        created = int(time.time())
        model = jobs[0].svd["task"] if jobs[0].svd else self.cfg.model.name
        obj = "chat.completion" if kind == "chat" else "text_completion"
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + jobs[0].id
        texts = [ChoiceText(self.engine.tokenizer, stops) for _ in jobs]
        logprobs: list[list[dict]] = [[] for _ in jobs]
        done: list[dict | None] = [None] * len(jobs)

        def on_event(i: int, event: dict) -> str:
            """Text to send for this event; stops the job at a stop string."""
            if event.get("done"):
                done[i] = event
                if texts[i].stopped:
                    event["finish_reason"] = "stop"
                return texts[i].flush()
            if texts[i].stopped:
                return ""
            if want_logprobs and event["logprob"] is not None:
                logprobs[i].append(self._logprob_entry(kind, event["token"], event["logprob"]))
            delta, stopped = texts[i].add(event["token"])
            if stopped or (jobs[i].decode.json_state is not None and jobs[i].decode.json_state.complete):
                jobs[i].decode.finish = "stop"
            return delta

        def usage() -> dict:
            completion = sum(d["completion_tokens"] for d in done if d)
            return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}

        def choice(i: int, text: str, finish: str | None, delta: bool, lp: list[dict] | None) -> dict:
            body_lp = self._logprobs_body(kind, lp) if (want_logprobs and lp is not None) else None
            if kind == "chat":
                body = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
                return {"index": i, ("delta" if delta else "message"): body, "finish_reason": finish,
                        "logprobs": body_lp}
            return {"index": i, "text": text, "finish_reason": finish, "logprobs": body_lp}

        if not stream:
            parts = [""] * len(jobs)
            async for ready in self._choices(jobs):
                for i, event in ready:
                    parts[i] += on_event(i, event)
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": [choice(i, parts[i], done[i]["finish_reason"], False, logprobs[i])
                               for i in range(len(jobs))], "usage": usage()}
            if jobs[0].svd:
                out["svd"] = self._svd_field(jobs[0], done[0])
            return JSONResponse(out)

        async def events():
            chunk_obj = obj + ".chunk" if kind == "chat" else obj
            base = {"id": rid, "object": chunk_obj, "created": created, "model": model}
            if kind == "chat":
                for i in range(len(jobs)):
                    yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "finish_reason": None, "logprobs": None}]})
            async for ready in self._choices(jobs):
                # every event already waiting is sent at once: one chunk per choice with all its
                # new text, and one write to the client (fewer, larger chunks when it lags)
                out, text, new_lp = [], {}, {}

                def flush(i):
                    if text.get(i) or (want_logprobs and new_lp.get(i)):
                        out.append(_sse({**base, "choices": [choice(i, text[i], None, True, new_lp[i])]}))
                    text.pop(i, None)
                    new_lp.pop(i, None)

                for i, event in ready:
                    sent_lp = len(logprobs[i])
                    text[i] = text.get(i, "") + on_event(i, event)
                    new_lp[i] = new_lp.get(i, []) + logprobs[i][sent_lp:]
                    if event.get("done"):
                        flush(i)
                        final = {**base, "choices": [choice(i, "", event["finish_reason"], True, None)]}
                        if jobs[i].svd:
                            final["svd"] = self._svd_field(jobs[i], event)
                        out.append(_sse(final))
                for i in list(text):
                    flush(i)
                if out:
                    yield "".join(out)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage()})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    def _stops(stop) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    # ------------------------------------------------------------------ OpenAI routes
    @api.post("/v1/completions", responses=GENERATION)
    async def completions(self, body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt must be a string or a list holding exactly one string", "prompt")
            prompt = prompt[0]
        jobs = self._jobs(body, self._encode_prompt(prompt), body.max_tokens, body.logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._respond(jobs, "completion", self._stops(body.stop), body.stream, body.logprobs is not None,
                                   include_usage)

    @api.post("/v1/chat/completions", responses=GENERATION)
    async def chat_completions(self, body: ChatCompletionRequest):
        clean = []
        for message in body.messages:
            content = message.content if isinstance(message.content, str) else "".join(p.text for p in message.content)
            clean.append({"role": message.role, "content": content})
        want_logprobs = body.logprobs or body.top_logprobs is not None
        text = self.engine.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        jobs = self._jobs(body, self._encode_prompt(text), max_tokens,
                          (body.top_logprobs or 0) if want_logprobs else None)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._respond(jobs, "chat", self._stops(body.stop), body.stream, want_logprobs, include_usage)

    @api.get("/v1/models")
    async def models(self):
        data = [{"id": self.cfg.model.name, "object": "model", "created": self.created, "owned_by": "edgeray"}]
        for record in list_tasks(self.tasks_dir):
            if record.get("status") == "ready" and record.get("base_model") == self.cfg.model.name:
                data.append({"id": record["id"], "object": "model", "created": int(record["created"]),
                             "owned_by": "edgeray", "parent": self.cfg.model.name,
                             "svd": {"mu_bar": finite(record["mu_bar"]), "alpha": record["alpha"],
                                     "peft_type": record["peft_type"]}})
        return {"object": "list", "data": data}

    @api.get("/svd/batch")
    async def batch(self):
        """The continuous batch of this replica."""
        return self.batcher.stats()

    # ------------------------------------------------------------------ SVD routes
    @api.post("/svd/tasks", status_code=202, responses=ERRORS)
    async def create_task(self, request: Request, body: TaskRequest):
        import ray

        spec, examples = parse_task_request(body.model_dump(exclude_unset=True), self.cfg.serve.min_task_examples,
                                            self.cfg.serve.max_task_examples)
        if spec.base_model not in ("", self.cfg.model.name):
            raise APIError(404, f"unknown base_model {spec.base_model!r}; this server serves {self.cfg.model.name!r}",
                           "base_model", "model_not_found")
        task_id = spec.name or f"task-{uuid.uuid4().hex[:12]}"
        existing = read_task(self.tasks_dir, task_id)
        if task_id == self.cfg.model.name or (existing is not None and existing["status"] not in ("failed",
                                                                                                   "cancelled")):
            raise APIError(409, f"task {task_id!r} already exists ({existing['status'] if existing else 'the model'}); "
                                "DELETE /svd/tasks/{id} removes it", "name", "task_exists")
        if existing is not None:                       # re-registering a failed or cancelled task
            self._forget(task_id)
        record = new_task_record(task_id, spec, self.cfg.model.name, len(examples))
        free = self._free_cpus()
        args = (self.tasks_dir, task_id, self.source, self.cfg.model.dtype, to_dict(spec), examples,
                self.cfg.serve.num_threads)
        if self.cfg.serve.task_placement == "replica" or (self.cfg.serve.task_placement == "auto"
                                                          and free < self.cfg.serve.task_num_cpus):
            # no free CPU for a Ray task: train in this replica (it holds a CPU) instead of waiting
            record["runs_in"] = "replica"
            write_task(self.tasks_dir, task_id, record)
            cancel = threading.Event()
            self.local[task_id] = cancel
            threading.Thread(target=run_warm_start, args=args, kwargs={"cancel": cancel}, daemon=True).start()
        else:
            record["runs_in"] = "ray_task"
            write_task(self.tasks_dir, task_id, record)
            remote = ray.remote(num_cpus=self.cfg.serve.task_num_cpus, max_retries=0)(run_warm_start)
            self.jobs[task_id] = remote.remote(*args)
        status_url = str(request.url).rstrip("/") + f"/{task_id}"
        answer = {"task": task_id, "status": "queued", "runs_in": record["runs_in"], "status_url": status_url}
        if record["runs_in"] == "ray_task":            # it may have to wait: say why, where and how long
            answer["waiting"] = self._waiting(task_id)
        return JSONResponse(answer, 202, headers={"Location": status_url})

    def _forget(self, task_id: str) -> None:
        """Unload a task from the engine and remove its files."""
        self.engine.unload_task(task_id)
        self.jobs.pop(task_id, None)
        shutil.rmtree(task_path(self.tasks_dir, task_id), ignore_errors=True)

    @api.delete("/svd/tasks/{task_id}", responses=ERRORS)
    async def delete_task(self, task_id: str):
        """Cancel a queued or running warm start and delete the task (any status)."""
        import ray

        record = self._task_record(task_id)
        was = record["status"]
        if task_id in self.jobs and was in ("queued", "running"):
            ray.cancel(self.jobs[task_id], force=True)
        if task_id in self.local:
            self.local.pop(task_id).set()        # the in-replica warm start stops at its next step
        self._forget(task_id)
        return {"task": task_id, "deleted": True, "was": was}

    @api.get("/svd/tasks")
    async def tasks(self):
        return {"object": "list", "data": [self._public(r) for r in list_tasks(self.tasks_dir)]}

    @api.get("/svd/tasks/{task_id}", responses=ERRORS)
    async def task(self, task_id: str):
        return self._public(self._task_record(task_id))

    @staticmethod
    def _public(record: dict) -> dict:
        record = finite(record)
        keys = ("status", "base_model", "peft_type", "mu_bar", "mu_mean", "mu_median", "mu_ratio", "n_calib_tokens",
                "n_calib_tokens_excluded", "n_train", "n_calib", "steps", "loss_first", "loss_last", "train_seconds",
                "alpha", "adapter_path", "error", "created", "finished", "runs_in", "waiting")
        return {"task": record["id"], **{k: record[k] for k in keys if k in record}}

    @api.post("/svd/score", responses=ERRORS)
    async def score(self, body: ScoreRequest):
        if len(body.options) > self.cfg.serve.max_score_options or not all(body.options):
            raise APIError(400, f"options must be a list of 2 to {self.cfg.serve.max_score_options} non-empty strings",
                           "options")
        mask = body.mask or self.cfg.svd.score_mask
        svd = SVDOptions(task=body.task, enabled=None if body.steer else False,     # None: steer when a task is given
                         mu="auto" if body.mu is None else body.mu, alpha=body.alpha)
        task, resolved = self._resolve(body.model or self.cfg.model.name, svd)
        steer = resolved["enabled"]
        prompt_ids = self._encode_prompt(body.prompt)
        option_ids = [self.engine.tokenizer(o, add_special_tokens=False).input_ids for o in body.options]
        phi, theta, targets = await asyncio.to_thread(self.engine.option_logits, task, [prompt_ids] * len(option_ids),
                                                      option_ids)
        mu, alpha = (resolved["mu"], resolved["alpha"]) if steer else (0.0, 0.0)
        scores = [option_logprobs(p, t, y, mu, alpha, mask) for p, t, y in zip(phi, theta, targets)]
        best = max(range(len(scores)), key=lambda i: scores[i])
        return finite({"task": task.id if task else None, "steer": steer, "mu": mu, "alpha": alpha, "mask": mask,
                       "scores": scores, "best": best, "best_option": body.options[best]})     # -inf -> null


def app_builder(args: dict):
    """Build the Serve application. `args`: {"config": YAML path (optional), any dotted key such
    as "model.source": value} (strings from `serve run ... key=value` are parsed as YAML)."""
    args = dict(args or {})
    path = args.pop("config", None)
    cfg = load_config(SVDServeConfig, path, [f"{k}={v}" if isinstance(v, str) else f"{k}={json.dumps(v)}"
                                             for k, v in args.items()])
    return SVDServer.options(ray_actor_options={"num_cpus": cfg.serve.num_cpus},
                             max_ongoing_requests=cfg.serve.max_ongoing_requests).bind(to_dict(cfg))
