"""SIDeR over HTTP: a Ray Serve deployment with a FastAPI ingress.

Routes (relative to the app's route_prefix, "/sider" by default):
    POST /protect   multipart (image file + fields) or JSON (image_b64 + fields)
    POST /restore   multipart or JSON: image, password, restore_token (optional if the image carries it)
    POST /verify    multipart or JSON: image_a, image_b -> identity distance (the built-in evaluator)
    GET  /health
    GET  /openapi.json, /docs

Start it with any of:
    serve run serving.sider.app:app_builder config=configs/sider.yaml
    serve deploy serving/sider/serve_config.yaml
    edgeray serve sider ...          (serving/cli.py calls app_builder)
"""

# No `from __future__ import annotations` here: Serve rebuilds the ingress routes, and FastAPI must
# see `request: Request` as a real type, not a string (the OpenAPI route fails otherwise).
import base64
import binascii
import json
import logging
import re
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from edgeray.config import load_config, to_dict
from edgeray.errors import UserError
from serving.sider.config import SiderConfig
from serving.sider.service import ApiError, SiderService, restore_failed

REPO_ROOT = Path(__file__).resolve().parents[2]
# exactly what base64.b64decode(validate=True) accepts (standard alphabet, padded to 4), stated in the
# schema as the pattern of every *_b64 field so that a schema-valid string always decodes
B64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
log = logging.getLogger("ray.serve")


class ProtectJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_b64: str = Field(min_length=1, description="PNG/JPEG/WebP file, base64; at least 64x64 px, at most limits.max_side "
                           "per side. An image that cannot be used (does not decode, no face, a face that "
                           "cannot be protected) gets 200 with published=false and `refused` naming why")
    password: str = Field(min_length=1, description="passphrase: crypto.min_password_bytes (12) to "
                          "crypto.max_password_bytes/4 (256) characters, NFC-normalized; only sent in the body, "
                          "never logged. One whose estimated entropy is under crypto.min_password_bits (40) "
                          "gets 200 with published=false, refused.error=weak_password")
    n_samples: int = Field(1, ge=1, le=16, description="diverse protected samples (seeds seed, seed+7919, ...); "
                           "at most limits.max_samples")
    gamma: float | None = Field(None, ge=0, le=1, description="semantic-visual balancing factor")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    embed: Literal["none", "chunk", "lsb"] = Field("none", description="where the token also travels. "
                                                   "none (default) = only in the response. chunk / lsb put the "
                                                   "encrypted original INTO the published image: anyone holding "
                                                   "the image can then guess passwords offline, without limit")


class RestoreJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_b64: str = Field(min_length=1, description="the published PNG, base64")
    password: str = Field(min_length=1)
    restore_token: str | None = Field(None, description="base64 token; omit if the PNG carries it")


class VerifyJson(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_a_b64: str = Field(min_length=1, description="PNG/JPEG/WebP, base64; an image that cannot be used "
                             "(does not decode, under 64x64 px, no face) gives comparable=false")
    image_b_b64: str = Field(min_length=1, description="as image_a_b64")


def _multipart_schema(fields: dict, files: tuple, required: tuple = ()) -> dict:
    props = {name: {"type": "string", "format": "binary", "minLength": 1} for name in files}
    props.update(fields)
    return {"type": "object", "properties": props, "required": list(files) + list(required),
            "additionalProperties": False}


def _request_body(model: type[BaseModel], form_fields: dict, files: tuple, required: tuple = ()) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": _multipart_schema(form_fields, files, required),
                                # the file parts' formats (limits.formats), as the part content types
                                "encoding": {name: {"contentType": "image/png, image/jpeg, image/webp"}
                                             for name in files}}}}}


_PROTECT_FORM = {"password": {"type": "string", "minLength": 1},
                 "n_samples": {"type": "integer", "minimum": 1, "maximum": 16},
                 "gamma": {"type": "number", "minimum": 0, "maximum": 1},
                 "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                 "embed": {"type": "string", "enum": ["none", "chunk", "lsb"]}}
_ERRORS = {status: {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}}}}
    for status, text in ((403, "restore failed (every failure: one answer)"), (413, "too large"),
                         (415, "not JSON or multipart"), (422, "the request breaks a rule this schema "
                                                                "states (a field missing, out of range, "
                                                                "too short or long, not base64)"),
                         (429, "too many password operations in progress"))}

api = FastAPI(title="SIDeR", version="sider/1",
              description="Identity-keeping face anonymization with password restoration (edgeray).")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "message": str(exc)}, status_code=exc.status)


@api.exception_handler(Exception)
async def _internal(_: Request, exc: Exception) -> JSONResponse:
    log.error("sider internal error: %s", type(exc).__name__)  # no request data: it may hold a password
    return JSONResponse({"error": "internal", "message": "internal error"}, status_code=500)


async def _read_fields(request: Request, max_body: int, files: tuple) -> dict:
    """Body fields from JSON (`<file>_b64` base64 strings) or multipart (file parts), with the
    body-size limit enforced while reading."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, "too_large", f"request body is {declared} bytes; the limit is {max_body}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ApiError(413, "too_large", f"request body exceeds {max_body} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "invalid_request", "body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_request", "JSON body must be an object")
        return {"json": data}
    if ctype == "multipart/form-data":
        async def receive():
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        try:
            form = await Request(request.scope, receive).form(max_files=len(files), max_fields=16)
        except Exception:
            raise ApiError(422, "invalid_request", "malformed multipart body") from None
        out = {}
        for key, value in form.multi_items():
            out[key] = await value.read() if isinstance(value, UploadFile) else value
        return {"form": out}
    raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")


def _parse(model: type[BaseModel], fields: dict, files: tuple) -> dict:
    """Validate with the JSON model; multipart files are turned into their base64 JSON twins."""
    if "json" in fields:
        raw = fields["json"]
    else:
        raw = {}
        for key, value in fields["form"].items():
            if key in files:
                if not isinstance(value, bytes):
                    raise ApiError(422, "invalid_request", f"{key} must be a file part")
                raw[f"{key}_b64"] = base64.b64encode(value).decode("ascii")
            else:
                raw[key] = value
    try:
        parsed = model.model_validate(raw).model_dump()
    except ValidationError as exc:
        where = ", ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors()[:3])
        raise ApiError(422, "invalid_request", f"invalid request ({where})") from None
    for key in files:
        value = parsed.pop(f"{key}_b64")
        try:
            if not re.fullmatch(B64_PATTERN, value):
                raise ValueError
            parsed[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_image", f"{key}_b64 is not valid base64 (padded, standard "
                                                 f"alphabet)") from None
    return parsed


def declare_limits(schema: dict, cfg: SiderConfig) -> dict:
    """The OpenAPI schema with this deployment's own limits, so that every request the schema calls
    valid is accepted (2xx; /restore: 403 for a failed restore) and every one it calls invalid is a
    4xx: n_samples <= limits.max_samples; passwords of 1 (restore) or crypto.min_password_bytes
    (protect) to crypto.max_password_bytes // 4 characters (the service counts characters, so the
    rule is the schema's); image parts of at most limits.max_image_bytes (base64 in JSON, declared
    with contentEncoding). What a JSON Schema cannot state -- an image's pixel size, format and
    content, a passphrase's estimated entropy -- is not a 4xx: /protect answers 200 with
    published=false and `refused`, /verify 200 with comparable=false (service module docstring); it
    is also described in each operation's description and its x-sider-image extension."""
    image = {"min_side_px": 64, "max_side_px": cfg.limits.max_side, "max_bytes": cfg.limits.max_image_bytes,
             "formats": list(cfg.limits.formats), "needs_face": True,
             "else": {"/protect": "200 published=false, refused", "/verify": "200 comparable=false, problems",
                      "/restore": "403 restore_failed"}}
    b64_max = 4 * -(-cfg.limits.max_image_bytes // 3)
    pw_max = max(2, cfg.crypto.max_password_bytes // 4)
    paths = schema.get("paths", {})
    for route in ("/protect", "/restore", "/verify"):
        op = paths.get(route, {}).get("post")
        if op is None:
            continue
        for media, body in op.get("requestBody", {}).get("content", {}).items():   # the JSON and the form
            props = body.get("schema", {}).get("properties", {})
            if "n_samples" in props:
                props["n_samples"]["maximum"] = cfg.limits.max_samples
            if "password" in props:
                props["password"]["minLength"] = max(1, cfg.crypto.min_password_bytes) if route == "/protect" else 1
                props["password"]["maxLength"] = pw_max
            for name, prop in props.items():
                if media == "application/json" and name.endswith("_b64"):
                    prop.update(contentEncoding="base64", pattern=B64_PATTERN, maxLength=b64_max)
                elif prop.get("format") == "binary":
                    prop["maxLength"] = cfg.limits.max_image_bytes
        op["x-sider-image"] = image
        op["description"] = (op.get("description", "") + f" Images: PNG/JPEG/WebP, 64 to {cfg.limits.max_side} px "
                             f"per side, at most {cfg.limits.max_image_bytes} bytes. " + {
                                 "/protect": "A schema-valid request whose content cannot be protected (the image "
                                             "does not decode or has no face, a face cannot be protected, too "
                                             "many faces, a weak passphrase) gets 200 with published=false, no "
                                             "samples and `refused` naming the reason and the boxes: nothing is "
                                             "published.",
                                 "/verify": "An image that cannot be used (does not decode, under 64 px, no "
                                            "face) gives 200 with comparable=false and `problems` per image.",
                                 "/restore": "Every failure, an unusable image included, is the same 403."}[route]
                             ).strip()
    return schema


@serve.deployment(name="SiderDeployment", max_ongoing_requests=8)
@serve.ingress(api)
class SiderDeployment:
    """One replica = one set of face models in memory; heavy work runs off the event loop."""

    def __init__(self, config: dict, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.cfg = load_config(SiderConfig, data=config)
        self.service = SiderService(self.cfg)
        api.openapi_schema = None
        api.openapi_schema = declare_limits(api.openapi(), self.cfg)

    @api.post("/protect", responses=_ERRORS,
              openapi_extra=_request_body(ProtectJson, _PROTECT_FORM, ("image",), ("password",)))
    async def protect(self, request: Request) -> dict:
        fields = await _read_fields(request, self.cfg.limits.max_body_bytes, ("image",))
        args = _parse(ProtectJson, fields, ("image",))
        log.info("sider protect: %d bytes, n_samples=%d, embed=%s", len(args["image"]), args["n_samples"],
                 args["embed"])
        return await run_in_threadpool(self.service.protect, args["image"], args["password"], args["n_samples"],
                                       args["gamma"], args["seed"], args["embed"])

    @api.post("/restore", responses=_ERRORS, openapi_extra=_request_body(
        RestoreJson, {"password": {"type": "string", "minLength": 1}, "restore_token": {"type": "string"}},
        ("image",), ("password",)))
    async def restore(self, request: Request) -> dict:
        fields = await _read_fields(request, self.cfg.limits.max_body_bytes, ("image",))
        try:
            args = _parse(RestoreJson, fields, ("image",))
        except ApiError as exc:
            if exc.code == "invalid_image":      # not base64: cannot be the published image (same 403)
                raise restore_failed() from None
            raise
        return await run_in_threadpool(self.service.restore, args["image"], args["password"],
                                       args["restore_token"])

    @api.post("/verify", responses=_ERRORS, openapi_extra=_request_body(VerifyJson, {}, ("image_a", "image_b")))
    async def verify(self, request: Request) -> dict:
        fields = await _read_fields(request, self.cfg.limits.max_body_bytes, ("image_a", "image_b"))
        args = _parse(VerifyJson, fields, ("image_a", "image_b"))
        return await run_in_threadpool(self.service.verify, args["image_a"], args["image_b"])

    @api.get("/health")
    async def health(self) -> dict:
        return self.service.health()


def resolve_path(path: str) -> Path:
    """Relative paths work from the current directory or, failing that, from the repo root
    (Serve builds apps in its controller, whose working directory is not the user's)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def app_builder(args: dict):
    """Build the SIDeR Serve application.

    args (all optional; strings are accepted, as `serve run ... key=value` passes them):
        config        path to a SiderConfig YAML (e.g. configs/sider.yaml)
        set           list of "key=value" overrides, or one string of them separated by ';'
        num_replicas  int, default 1
        num_cpus      float per replica, default 1
        torch_threads int, default 1
    """
    args = dict(args or {})
    unknown = set(args) - {"config", "set", "num_replicas", "num_cpus", "torch_threads"}
    if unknown:
        raise UserError(f"unknown sider app args {sorted(unknown)}; allowed: config, set, num_replicas, "
                        f"num_cpus, torch_threads")
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [s for s in overrides.split(";") if s.strip()]
    config = args.get("config")
    cfg = load_config(SiderConfig, resolve_path(config) if config else None, overrides)
    try:
        replicas, cpus, threads = int(args.get("num_replicas", 1)), float(args.get("num_cpus", 1)), \
            int(args.get("torch_threads", 1))
    except (TypeError, ValueError):
        raise UserError("num_replicas and torch_threads must be integers, num_cpus a number") from None
    return SiderDeployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind(
        to_dict(cfg), threads)
