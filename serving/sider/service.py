"""The SIDeR service without Ray or HTTP: decode and check images, protect, restore, verify.

`SiderService` holds the face models and the backend (loaded once, one per Serve replica) and
raises `ApiError` (status + short code + message) for every bad input; the HTTP layer only maps
it to JSON. The password is only ever passed to the KDF: it is never logged, stored or returned.

Status rule (so the OpenAPI schema tells the truth, and `schemathesis run` with its default checks
passes without allowances): a request that breaks a rule the schema states (a field missing, out of
range, too short or too long, not base64, another media type) is a 4xx; a schema-valid request whose
CONTENT cannot be used -- an image that does not decode, is not PNG/JPEG/WebP, is under 64 px or
shows no face; on /protect also a face that cannot be protected, too many faces, a passphrase the
entropy policy rejects, a token that does not fit -- gets 200 with a body that says so: /protect
`published: false`, no samples, `refused: {error, message, boxes}` (nothing is published: fail
closed); /verify `comparable: false` with `problems` per image. 413 stays for the size limits
(declared as maxLength where a schema can say it). /restore answers every failure with one 403.
"""

from __future__ import annotations

import base64
import binascii
import io
import unicodedata
import warnings

import numpy as np
from PIL import Image

from edgeray.errors import UserError
from serving.sider import crypto, restoration
from serving.sider.anonymize import Anonymizer, ClassicalBackend, blur_face, psnr, ssim
from serving.sider.config import SiderConfig
from serving.sider.faces import FaceStack, NoFaceError, box_iou

API_VERSION = "sider/1"


class ApiError(UserError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class Refused(ApiError):
    """A schema-valid request whose content cannot be used (see the module docstring): /protect and
    /verify answer it with 200 and this reason in the body, never with a published image."""

    def __init__(self, code: str, message: str, boxes=()):
        super().__init__(422, code, message)
        self.boxes = [[int(v) for v in b] for b in boxes]

    def as_dict(self) -> dict:
        return {"error": self.code, "message": str(self), "boxes": self.boxes}


def _content_problem(exc: ApiError) -> ApiError:
    """An image problem other than a size limit (413) is a content refusal."""
    return exc if exc.status == 413 else Refused(exc.code, str(exc))


def restore_failed() -> ApiError:
    return ApiError(403, "restore_failed", "restore failed: wrong password, or the image or token "
                                            "is not the one that was protected")


def busy() -> ApiError:
    return ApiError(429, "busy", "too many password operations in progress on this replica; retry shortly")


def build_backend(cfg: SiderConfig, faces: FaceStack):
    if cfg.backend == "diffusion":
        from serving.sider.diffusion import DiffusionBackend
        return DiffusionBackend(cfg.diffusion, faces)
    if cfg.backend == "morph":
        from serving.sider.morph import MorphBackend
        return MorphBackend(cfg.morph, faces, threshold=cfg.faces.threshold)
    return ClassicalBackend(cfg.classical)


class SiderService:
    def __init__(self, cfg: SiderConfig):
        self.cfg = cfg
        self.faces = FaceStack(cfg.faces)
        self.backend = build_backend(cfg, self.faces)
        self.anonymizer = Anonymizer(self.faces, self.backend, cfg.search, cfg.head_scale)
        self.kdf = crypto.KdfParams.from_config(cfg.crypto, crypto.argon2_available(),
                                                crypto.read_pepper(cfg.crypto.pepper_file))
        # at most this many KDF runs at once (each holds the KDF's memory); others wait, then 429
        self._kdf_gate = crypto.KdfGate(cfg.crypto.max_concurrent_kdf, cfg.crypto.kdf_wait_s)

    # ------------------------------------------------------------------ inputs

    def decode_image(self, data: bytes, name: str = "image", min_side: int = 64) -> tuple[np.ndarray, dict]:
        """RGB uint8 pixels and the PNG text chunks; 413 / 415 / 422 on bad input (422 too when a
        side is under `min_side` px)."""
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
        if min(width, height) < min_side:
            raise ApiError(422, "invalid_image", f"{name} is {width}x{height}; at least {min_side}x{min_side} "
                                                 f"is needed")
        try:
            img.load()
            pixels = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except Exception:
            raise ApiError(422, "invalid_image", f"{name} is truncated or corrupt") from None
        return pixels, dict(getattr(img, "text", {}) or {})

    def password_limits(self, protect: bool) -> tuple[int, int]:
        """(min, max) length in characters (Unicode code points, as sent), the schema's
        minLength/maxLength: protect needs crypto.min_password_bytes characters (so at least as many
        UTF-8 bytes), every password at most crypto.max_password_bytes // 4 characters (so at most
        max_password_bytes bytes)."""
        c = self.cfg.crypto
        return (max(1, c.min_password_bytes) if protect else 1), max(2, c.max_password_bytes // 4)

    def check_password(self, password: str | bytes | None, policy: bool = False, protect: bool | None = None) -> bytes:
        """NFC-normalized UTF-8 bytes (so NFC and NFD spellings of one password are one key). The
        length in characters is checked as the schema states it (422 invalid_password; `protect`, which
        defaults to `policy`, applies protect's minimum); with `policy` the passphrase's estimated
        entropy too (a content refusal: `Refused` weak_password)."""
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(422, "invalid_password", "password must be UTF-8 text") from None
        password = password or ""
        low, high = self.password_limits(policy if protect is None else protect)
        if not low <= len(password) <= high:
            raise ApiError(422, "invalid_password", f"password must be {low} to {high} characters"
                                                    + (" (the passphrase policy's minimum length)" if policy else ""))
        text = unicodedata.normalize("NFC", password)
        raw = text.encode("utf-8")
        if policy:
            c = self.cfg.crypto
            bits = crypto.estimate_entropy_bits(text)
            if bits < c.min_password_bits:
                raise Refused("weak_password", f"passphrase too weak: about {bits:.0f} bits estimated; at least "
                                               f"{c.min_password_bits} bits are required (use several unrelated "
                                               f"words or mixed character classes)")
        return raw

    # ------------------------------------------------------------------ endpoints

    def protect(self, image: bytes, password: str | bytes, n_samples: int = 1, gamma: float | None = None,
                seed: int = 0, embed: str = "none") -> dict:
        """Protected samples, or (200, nothing published) `published: false` with `refused` naming why
        the content cannot be protected. Schema-level problems raise ApiError (4xx) first."""
        self.check_password(password, protect=True)        # the schema's length rule, before content
        if not 1 <= n_samples <= self.cfg.limits.max_samples:
            raise ApiError(422, "invalid_request", f"n_samples must be 1..{self.cfg.limits.max_samples}")
        gamma = self.cfg.default_gamma if gamma is None else gamma
        if not 0.0 <= gamma <= 1.0:
            raise ApiError(422, "invalid_request", "gamma must be in [0, 1]")
        if embed not in restoration.EMBED_MODES:
            raise ApiError(422, "invalid_request", f"embed must be one of {', '.join(restoration.EMBED_MODES)}")
        try:
            return self._protect(image, password, n_samples, gamma, seed, embed)
        except Refused as exc:
            return {"published": False, "refused": exc.as_dict(), "samples": [], "faces": [], "blurred": [],
                    "backend": self.backend.name, "gamma": gamma, "embed": embed,
                    "kdf": self.kdf.describe()["kdf"], "version": API_VERSION}

    def _protect(self, image: bytes, password, n_samples: int, gamma: float, seed: int, embed: str) -> dict:
        try:
            pixels, _ = self.decode_image(image)
        except ApiError as exc:
            raise _content_problem(exc) from None
        secret = self.check_password(password, policy=True)
        faces, unhandled = self.find_faces(pixels)
        if len(faces) > self.cfg.faces.max_faces:
            raise Refused("too_many_faces", f"{len(faces)} faces detected; the limit is {self.cfg.faces.max_faces}",
                          [f.box for f in faces])
        working, blurred = self._handle_unprotected(pixels, unhandled, "could not be protected (too small or "
                                                    "found only by the second detection pass)")
        if faces:
            samples = self.anonymizer.anonymize(working, faces, n_samples, gamma, seed)
        else:   # every face was blurred under faces.unprotected=blur
            samples = [None] * n_samples
        out = []
        for sample in samples:
            regions, changed = list(blurred), working
            if sample is not None:
                failed = [f.box for f, c in zip(faces, sample.changes) if c < self.cfg.search.min_change]
                changed, more = self._handle_unprotected(sample.image, failed, "could not be changed by the "
                                                         "search while keeping its identity")
                regions += sample.regions + more
            region = _union_bbox(regions)
            try:
                published, token = restoration.protect_payload(pixels, changed, region, secret, self.kdf,
                                                               embed, self._kdf_gate)
            except restoration.CarrierError as exc:
                raise Refused("carrier_too_small", str(exc)) from None
            except crypto.KdfBusy:
                raise busy() from None
            out.append(self._sample_json(pixels, published, token, embed, faces, sample, regions, region))
        return {"published": True, "refused": None, "samples": out, "faces": [f.as_dict() for f in faces],
                "blurred": [list(b) for b in unhandled], "backend": self.backend.name, "gamma": gamma,
                "embed": embed, "kdf": self.kdf.describe()["kdf"], "version": API_VERSION}

    def find_faces(self, pixels: np.ndarray) -> tuple[list, list[tuple[int, int, int, int]]]:
        """(faces to protect, boxes of faces that cannot be): the first pass's faces at least
        faces.min_face_px wide; smaller ones and second-pass boxes that overlap no protected face are
        the unprotected ones. Refused no_face_detected only when neither pass finds anything."""
        found = self.faces.detect(pixels, min_px=0)
        faces = [f for f in found if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= self.cfg.faces.min_face_px]
        unhandled = [f.box for f in found if f not in faces]
        for box, _ in self.faces.candidates(pixels):
            if not any(_covers(f.box, box) for f in faces) and not any(_covers(b, box) for b in unhandled):
                unhandled.append(box)
        if not faces and not unhandled:
            raise Refused("no_face_detected", "no face detected in the image: nothing was changed and nothing "
                                              "is published")
        return faces, unhandled

    def _handle_unprotected(self, image: np.ndarray, boxes: list, why: str) -> tuple[np.ndarray, list]:
        """Fail closed: refuse (`Refused` unprotected_face: nothing published) or blur each box."""
        if not boxes:
            return image, []
        if self.cfg.faces.unprotected == "refuse":
            where = "; ".join(f"box (left, top, right, bottom) = {tuple(int(v) for v in b)}" for b in boxes)
            raise Refused("unprotected_face", f"{len(boxes)} face(s) {why}: {where}. Nothing was "
                                              f"published. Crop them out, or set "
                                              f"sider.faces.unprotected=blur to pixelate them", boxes)
        regions = []
        for box in boxes:
            image, region = blur_face(image, box)
            regions.append(region)
        return image, regions

    def _sample_json(self, pixels, published, token, embed, faces, sample, regions, region) -> dict:
        if sample is not None and faces:
            # measure what is published (the in-pixel carrier and any blur change pixels)
            sample = self.anonymizer.measure(pixels, published, sample.regions, faces[0],
                                             sample.ensemble_distances, sample.changes) if (
                embed == "lsb" or len(regions) > len(sample.regions)) else sample
        png = restoration.encode_png(published, token if embed == "chunk" else None)
        crop = (slice(region[0], region[2]), slice(region[1], region[3]))
        return {"image_b64": base64.b64encode(png).decode("ascii"),
                "restore_token": base64.b64encode(token).decode("ascii"),
                "identity_distance": _rounded(sample.identity_distance) if sample else None,
                "identity_kept": bool(sample.identity_kept) if sample else False,
                "ensemble_distances": sample.ensemble_distances if sample else [],
                "changes": [round(c, 4) for c in sample.changes] if sample else [],
                "morph": sample.details if sample else [],
                "ssim_face": round(ssim(published[crop], pixels[crop]), 4),
                "psnr_face": _rounded(psnr(published[crop], pixels[crop])),
                "ssim_vs_orig": round(ssim(published, pixels), 4),
                "psnr_vs_orig": _rounded(psnr(published, pixels)),
                "region": list(region)}

    def restore(self, image: bytes, password: str | bytes, restore_token: str | None = None) -> dict:
        # an image that does not decode (or is tiny, or of another format) cannot be one that protect
        # published: a restore failure like any other (the same 403), not a malformed request; only
        # the size limits keep their 413
        try:
            pixels, chunks = self.decode_image(image, min_side=1)
        except ApiError as exc:
            if exc.status == 413:
                raise
            raise restore_failed() from None
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
            original = restoration.restore(pixels, token, secret, self.kdf, self._kdf_gate)
        except crypto.RestoreFailed:
            raise restore_failed() from None
        except crypto.KdfBusy:
            raise busy() from None
        png = restoration.encode_png(original)
        return {"image_b64": base64.b64encode(png).decode("ascii"), "bit_exact": True,
                "version": API_VERSION}

    def verify(self, image_a: bytes, image_b: bytes) -> dict:
        """Distance between the largest faces of two images (the built-in evaluator). An image that
        cannot be used (does not decode, another format, under 64 px, no face) makes the pair not
        comparable: 200 with `comparable: false` and the problem per image (413 for size limits)."""
        problems, ids = {}, {}
        for name, data in (("image_a", image_a), ("image_b", image_b)):
            try:
                pixels, _ = self.decode_image(data, name)
                ids[name] = self.faces.identity(pixels)[1]
            except NoFaceError:
                problems[name] = {"error": "no_face_detected", "message": f"no face detected in {name}"}
            except ApiError as exc:
                if exc.status == 413:
                    raise
                problems[name] = {"error": exc.code, "message": str(exc)}
        threshold = self.cfg.faces.threshold
        distance = None if problems else float(np.linalg.norm(ids["image_a"] - ids["image_b"]))
        return {"comparable": not problems, "distance": _rounded(distance),
                "same_identity": distance is not None and distance < threshold,
                "face_found": {name: name in ids for name in ("image_a", "image_b")}, "problems": problems,
                "threshold": threshold, "model": "dlib_resnet_v1", "view": self.cfg.faces.evaluator_view}

    def health(self) -> dict:
        return {"status": "ok", "backend": self.backend.name, "models_dir": str(self.faces.models_dir),
                "kdf": self.kdf.describe(), "limits": {"max_image_bytes": self.cfg.limits.max_image_bytes,
                                                      "max_side": self.cfg.limits.max_side,
                                                      "formats": self.cfg.limits.formats},
                "version": API_VERSION}


def _covers(face_box, box) -> bool:
    """A detection `box` is the face `face_box` when they overlap or its centre lies inside."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return box_iou(face_box, box) > 0.3 or (face_box[0] <= cx <= face_box[2] and face_box[1] <= cy <= face_box[3])


def _union_bbox(regions) -> tuple[int, int, int, int]:
    return (min(r.top for r in regions), min(r.left for r in regions),
            max(r.bottom for r in regions), max(r.right for r in regions))


def _rounded(value: float | None) -> float | None:
    if value is None:
        return None
    return None if value == float("inf") else round(float(value), 4)
