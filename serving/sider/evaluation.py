"""Evaluators for SIDeR (arXiv 2602.04994) that take no part in the search, and the pair metrics.

The paper reports black-box identity success on CelebA-HQ/FFHQ with recognizers never optimized
against. Offline we have one face network (dlib's ResNet, which the search optimizes: white-box)
and build the rest from scratch:

- `LbphMatcher`: local binary pattern histograms (Ahonen et al., 2006; the algorithm of OpenCV's
  LBPHFaceRecognizer), 59-bin non-rotation-invariant uniform LBP on an 8x8 grid of a 112x112 grey
  chip, chi-square distance. A matcher of another family that no search step ever sees.
- `OnnxMatcher`: a user-supplied ONNX recognizer (ArcFace/FaceNet style: aligned RGB chip in, one
  embedding out, cosine distance) as a black-box evaluator; needs `onnxruntime` (not a dependency).
- Human-recognizability proxies that use no dlib embedding: `landmark_distance` (Procrustes shape
  distance of re-detected 68-point landmarks; a lineup says "another person" when it exceeds the
  spread between photos of one person) and `gradient_ssim` (SSIM of gradient magnitudes:
  structure, not colour).
- `LineupRule`: the lineup proxy's decision, "another person" when the landmark distance exceeds
  `threshold + slope * |pose gap|` (pose gap = difference of `morph.pose_asymmetry`, a head-turn
  proxy: a turned head moves the landmarks without being another person). OUR RULE: the points
  (all 68 or the inner 51), the slope and the threshold are calibrated by `LineupRule.calibrate` on
  same-person and different-person pairs of photos that are never reported (the equal-error point:
  the fewest of the worse of the two error rates). `LineupRule.fixed` is the part-1 rule (beyond the
  largest within-person spread, no pose allowance).
- Naturalness: `noise_energy` (high-frequency energy, grey minus its Gaussian blur at sigma 1) and
  `colour_stats` of a face region.
- Pair metrics: `threshold_at_far`, `tar_at`, `far_at`, `rank1`.
All pure numpy/skimage; the chips come from the caller (the face stack aligns them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, sobel
from skimage.feature import local_binary_pattern
from skimage.metrics import structural_similarity
from skimage.transform import resize

from edgeray.errors import UserError
from serving.sider.morph import procrustes_distance

GREY = np.array([0.299, 0.587, 0.114])


def grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ GREY if image.ndim == 3 else image.astype(np.float64)


# ----------------------------------------------------------------------------- held-out matchers


class LbphMatcher:
    """LBPH face matcher (never optimized against): lower distance = more alike."""
    name = "lbph"

    def __init__(self, side: int = 112, grid: int = 8, radius: int = 1, points: int = 8):
        self.side, self.grid, self.radius, self.points = side, grid, radius, points

    def features(self, chip: np.ndarray) -> np.ndarray:
        g = resize(grey(chip), (self.side, self.side), anti_aliasing=True, preserve_range=True)
        g = np.clip(np.round(g), 0, 255).astype(np.uint8)
        codes = local_binary_pattern(g, self.points, self.radius, method="nri_uniform")
        bins = self.points * (self.points - 1) + 3
        cell = self.side // self.grid
        hists = []
        for i in range(self.grid):
            for j in range(self.grid):
                block = codes[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
                h = np.bincount(block.astype(int).ravel(), minlength=bins).astype(np.float64)
                hists.append(h / max(h.sum(), 1.0))
        return np.concatenate(hists)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        """Chi-square distance of two LBPH feature vectors."""
        s = a + b
        nz = s > 0
        return float((((a - b) ** 2)[nz] / s[nz]).sum())


class OnnxMatcher:
    """A user-supplied ONNX face recognizer: input NCHW float (RGB chip scaled to [-1, 1], the
    ArcFace convention), output one embedding per image; distance = 1 - cosine."""
    name = "onnx"

    def __init__(self, path: str | Path, side: int = 112):
        try:
            import onnxruntime
        except ImportError:
            raise UserError("the ONNX evaluator needs onnxruntime: pip install onnxruntime") from None
        if not Path(path).is_file():
            raise UserError(f"ONNX recognizer {str(path)!r} is not a file")
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.side = side

    def features(self, chip: np.ndarray) -> np.ndarray:
        x = resize(chip.astype(np.float32), (self.side, self.side), preserve_range=True)
        x = (x / 127.5 - 1.0).transpose(2, 0, 1)[None].astype(np.float32)
        out = np.asarray(self.session.run(None, {self.input: x})[0]).reshape(-1).astype(np.float64)
        return out / max(np.linalg.norm(out), 1e-12)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(1.0 - np.dot(a, b))


# ----------------------------------------------------------------------------- human-side proxies


def landmark_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Procrustes shape distance of two 68-point landmark sets (position, scale, rotation removed)."""
    return procrustes_distance(np.asarray(a, float), np.asarray(b, float))


LINEUP_POINTS = {"all68": tuple(range(68)), "inner": tuple(range(17, 68))}


@dataclass(frozen=True)
class LineupRule:
    """Lineup proxy decision (see the module docstring): a pair of faces is "another person" when
    `landmark_distance` on `points` exceeds `threshold + slope * |pose gap|`."""
    name: str
    points: str
    slope: float
    threshold: float

    def score(self, a: np.ndarray, b: np.ndarray) -> float:
        from serving.sider.morph import pose_asymmetry
        idx = list(LINEUP_POINTS[self.points])
        gap = abs(pose_asymmetry(np.asarray(a, float)) - pose_asymmetry(np.asarray(b, float)))
        return landmark_distance(np.asarray(a, float)[idx], np.asarray(b, float)[idx]) - self.slope * gap

    def other_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.score(a, b) > self.threshold

    @classmethod
    def fixed(cls, threshold: float) -> "LineupRule":
        """The part-1 rule: beyond a given within-person spread, all 68 points, no pose allowance."""
        return cls("max_within_spread", "all68", 0.0, float(threshold))

    @classmethod
    def calibrate(cls, same: list[tuple[np.ndarray, np.ndarray]], different: list[tuple[np.ndarray, np.ndarray]],
                  slopes=(0.0, 0.1, 0.2, 0.3), points=("all68", "inner")) -> tuple["LineupRule", dict]:
        """Pick points and slope by the best separation (AUC) of same- vs different-person pairs
        (ties: the smaller slope, then all68), then the threshold at the equal-error point. Returns the
        rule and its rates on the calibration pairs. Needs at least one pair of each kind."""
        if not same or not different:
            raise UserError("the lineup calibration needs same-person and different-person pairs")
        best = None
        for pts in points:
            for slope in slopes:
                probe = cls("calibrated", pts, slope, 0.0)
                g = np.array([probe.score(a, b) for a, b in same])
                d = np.array([probe.score(a, b) for a, b in different])
                auc = pair_auc(g, d)
                if best is None or auc > best[0] + 1e-12:
                    best = (auc, pts, slope, g, d)
        auc, pts, slope, g, d = best
        cands = np.sort(np.concatenate([g, d]))
        thr = float(min(cands, key=lambda t: (max(np.mean(g > t), np.mean(d <= t)), t)))
        rule = cls("calibrated", pts, slope, thr)
        return rule, {"auc": round(float(auc), 4), "same_person_other_rate": round(float(np.mean(g > thr)), 4),
                      "different_person_other_rate": round(float(np.mean(d > thr)), 4),
                      "same_pairs": len(g), "different_pairs": len(d)}


def pair_auc(same_scores, different_scores) -> float:
    """P(a different-person pair scores higher than a same-person pair), ties half."""
    g, d = np.asarray(same_scores, float), np.asarray(different_scores, float)
    if not len(g) or not len(d):
        return float("nan")
    return float(np.mean((d[:, None] > g[None, :]) + 0.5 * (d[:, None] == g[None, :])))


def gradient_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of the gradient-magnitude images: how much of the structure (edges of eyes, brows,
    nose, mouth, jaw) is shared, blind to colour and smooth shading."""
    def mag(x):
        g = grey(x)
        return np.hypot(sobel(g, 0), sobel(g, 1))
    ga, gb = mag(a), mag(b)
    rng = max(float(ga.max()), float(gb.max()), 1e-6)
    return float(structural_similarity(ga, gb, data_range=rng))


def noise_energy(region: np.ndarray) -> float:
    """Mean squared high-frequency residual of the grey region (grey - Gaussian(grey, 1))."""
    g = grey(region)
    return float(np.mean((g - gaussian_filter(g, 1.0)) ** 2))


def colour_stats(region: np.ndarray) -> dict:
    """Per-channel mean and standard deviation (0-255) of an RGB region."""
    x = region.reshape(-1, 3).astype(np.float64)
    return {"mean": x.mean(0).round(2).tolist(), "std": x.std(0).round(2).tolist()}


# ----------------------------------------------------------------------------- pair metrics


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The largest distance threshold (accept when distance < t) whose false-accept rate on the
    impostor distances is at most `far` (with n impostors, FAR is resolved to 1/n)."""
    d = np.sort(np.asarray(impostor, float))
    k = int(np.floor(far * len(d)))        # impostors we may accept
    if len(d) == 0:
        return float("nan")
    return float(d[k]) if k < len(d) else float(d[-1] + 1e-9)


def tar_at(genuine: np.ndarray, threshold: float) -> float:
    g = np.asarray(genuine, float)
    return float(np.mean(g < threshold)) if len(g) else float("nan")


def far_at(impostor: np.ndarray, threshold: float) -> float:
    d = np.asarray(impostor, float)
    return float(np.mean(d < threshold)) if len(d) else float("nan")


def rank1(distances: np.ndarray, gallery_ids: list, probe_id) -> bool:
    """Is the nearest gallery entry of the probe's identity?"""
    return gallery_ids[int(np.argmin(distances))] == probe_id
