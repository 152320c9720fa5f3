"""The SIDeR service without Ray or HTTP: decode and check images, protect, restore, verify.

`SiderService` holds the face models and the backend (loaded once, one per Serve replica) and
raises `ApiError` (status + short code + message) for every bad input; the HTTP layer only maps
it to JSON. The password is only ever passed to the KDF: it is never logged, stored or returned.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import warnings

import numpy as np
from PIL import Image

from edgeray.errors import UserError
from serving.sider import crypto, restoration
from serving.sider.anonymize import Anonymizer, ClassicalBackend
from serving.sider.config import SiderConfig
from serving.sider.faces import FaceStack, NoFaceError

API_VERSION = "sider/1"


class ApiError(UserError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def restore_failed() -> ApiError:
    return ApiError(403, "restore_failed", "restore failed: wrong password, or the image or token "
                                            "is not the one that was protected")


def build_backend(cfg: SiderConfig):
    if cfg.backend == "diffusion":
        from serving.sider.diffusion import DiffusionBackend
        return DiffusionBackend(cfg.diffusion)
    return ClassicalBackend(cfg.classical)


class SiderService:
    def __init__(self, cfg: SiderConfig):
        self.cfg = cfg
        self.faces = FaceStack(cfg.faces)
        self.backend = build_backend(cfg)
        self.anonymizer = Anonymizer(self.faces, self.backend, cfg.search, cfg.head_scale)
        self.kdf = crypto.KdfParams.from_config(cfg.crypto, crypto.argon2_available())
        self._lock = threading.Lock()  # dlib's network keeps per-call buffers: one computation at a time

    # ------------------------------------------------------------------ inputs

    def decode_image(self, data: bytes, name: str = "image") -> tuple[np.ndarray, dict]:
        """RGB uint8 pixels and the PNG text chunks; 413 / 415 / 422 on bad input."""
        limits = self.cfg.limits
        if not data:
            raise ApiError(422, "invalid_image", f"{name} is empty")
        if len(data) > limits.max_image_bytes:
            raise ApiError(413, "too_large", f"{name} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                fmt = img.format
                width, height = img.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(413, "too_large", f"{name} has too many pixels") from None
        except Exception:
            raise ApiError(422, "invalid_image", f"{name} is not a readable image "
                                                 f"({', '.join(limits.formats)})") from None
        if fmt not in limits.formats:
            raise ApiError(415, "unsupported_format", f"{name} is {fmt}; allowed: {', '.join(limits.formats)}")
        if max(width, height) > limits.max_side or width * height > limits.max_pixels:
            raise ApiError(413, "too_large", f"{name} is {width}x{height}; the limit is {limits.max_side} px "
                                             f"per side and {limits.max_pixels} pixels")
        if min(width, height) < 64:
            raise ApiError(422, "invalid_image", f"{name} is {width}x{height}; at least 64x64 is needed")
        try:
            img.load()
            pixels = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except Exception:
            raise ApiError(422, "invalid_image", f"{name} is truncated or corrupt") from None
        return pixels, dict(getattr(img, "text", {}) or {})

    def check_password(self, password: str | bytes | None) -> bytes:
        raw = password.encode("utf-8") if isinstance(password, str) else (password or b"")
        c = self.cfg.crypto
        if not (c.min_password_bytes <= len(raw) <= c.max_password_bytes):
            raise ApiError(422, "invalid_password", f"password must be {c.min_password_bytes} to "
                                                    f"{c.max_password_bytes} bytes (UTF-8)")
        return raw

    # ------------------------------------------------------------------ endpoints

    def protect(self, image: bytes, password: str | bytes, n_samples: int = 1, gamma: float | None = None,
                seed: int = 0, embed: str = "chunk") -> dict:
        pixels, _ = self.decode_image(image)
        secret = self.check_password(password)
        if not 1 <= n_samples <= self.cfg.limits.max_samples:
            raise ApiError(422, "invalid_request", f"n_samples must be 1..{self.cfg.limits.max_samples}")
        gamma = self.cfg.default_gamma if gamma is None else gamma
        if not 0.0 <= gamma <= 1.0:
            raise ApiError(422, "invalid_request", "gamma must be in [0, 1]")
        if embed not in restoration.EMBED_MODES:
            raise ApiError(422, "invalid_request", f"embed must be one of {', '.join(restoration.EMBED_MODES)}")
        with self._lock:
            faces = self.faces.detect(pixels)
            if not faces:
                raise ApiError(422, "no_face_detected", "no face detected in the image")
            if len(faces) > self.cfg.faces.max_faces:
                raise ApiError(422, "too_many_faces", f"{len(faces)} faces detected; the limit is "
                                                      f"{self.cfg.faces.max_faces}")
            samples = self.anonymizer.anonymize(pixels, faces, n_samples, gamma, seed)
        out = []
        for sample in samples:
            region = _union_bbox(sample.regions)
            try:
                published, token = restoration.protect_payload(pixels, sample.image, region, secret,
                                                               self.kdf, embed)
            except restoration.CarrierError as exc:
                raise ApiError(422, "carrier_too_small", str(exc)) from None
            if embed == "lsb":  # the carrier bits change pixels: report what is published
                with self._lock:
                    sample = self.anonymizer.measure(pixels, published, sample.regions, faces[0],
                                                     sample.ensemble_distances)
            png = restoration.encode_png(published, token if embed == "chunk" else None)
            out.append({"image_b64": base64.b64encode(png).decode("ascii"),
                        "restore_token": base64.b64encode(token).decode("ascii"),
                        "identity_distance": _rounded(sample.identity_distance),
                        "identity_kept": sample.identity_kept,
                        "ensemble_distances": sample.ensemble_distances,
                        "ssim_face": round(sample.ssim_face, 4), "psnr_face": _rounded(sample.psnr_face),
                        "ssim_vs_orig": round(sample.ssim_vs_orig, 4),
                        "psnr_vs_orig": _rounded(sample.psnr_vs_orig),
                        "region": list(region)})
        return {"samples": out, "faces": [f.as_dict() for f in faces], "backend": self.backend.name,
                "gamma": gamma, "embed": embed, "kdf": self.kdf.describe()["kdf"], "version": API_VERSION}

    def restore(self, image: bytes, password: str | bytes, restore_token: str | None = None) -> dict:
        pixels, chunks = self.decode_image(image)
        secret = self.check_password(password)
        token = None
        if restore_token:
            try:
                token = base64.b64decode(restore_token, validate=True)
            except (binascii.Error, ValueError):
                token = b""  # garbage: still goes through the KDF below, then the same 403
        else:
            token = restoration.chunk_token(chunks) or restoration.lsb_token(pixels) or b""
        try:
            original = restoration.restore(pixels, token, secret, self.kdf)
        except crypto.RestoreFailed:
            raise restore_failed() from None
        png = restoration.encode_png(original)
        return {"image_b64": base64.b64encode(png).decode("ascii"), "bit_exact": True,
                "version": API_VERSION}

    def verify(self, image_a: bytes, image_b: bytes) -> dict:
        a, _ = self.decode_image(image_a, "image_a")
        b, _ = self.decode_image(image_b, "image_b")
        with self._lock:
            try:
                distance = self.faces.distance(a, b)
            except NoFaceError:
                raise ApiError(422, "no_face_detected", "no face detected in one of the images") from None
        threshold = self.cfg.faces.threshold
        return {"distance": round(distance, 4), "same_identity": distance < threshold,
                "threshold": threshold, "model": "dlib_resnet_v1", "view": self.cfg.faces.evaluator_view}

    def health(self) -> dict:
        return {"status": "ok", "backend": self.backend.name, "models_dir": str(self.faces.models_dir),
                "kdf": self.kdf.describe(), "limits": {"max_image_bytes": self.cfg.limits.max_image_bytes,
                                                      "max_side": self.cfg.limits.max_side,
                                                      "formats": self.cfg.limits.formats},
                "version": API_VERSION}


def _union_bbox(regions) -> tuple[int, int, int, int]:
    return (min(r.top for r in regions), min(r.left for r in regions),
            max(r.bottom for r in regions), max(r.right for r in regions))


def _rounded(value: float | None) -> float | None:
    if value is None:
        return None
    return None if value == float("inf") else round(float(value), 4)
