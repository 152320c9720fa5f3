"""SIDeR anonymization: keep the machine identity, change what a person sees.

Paper: Bao et al., "SIDeR: Semantic Identity Decoupling for Unrestricted Face Privacy",
arXiv 2602.04994 (2026). Only the abstract is public; no code, losses or constants.

What is the PAPER's: identity is decoupled from appearance; appearance is optimized with
momentum in a generator's latent space under ensemble identity losses; a semantic-visual
balancing factor gamma trades the two; several diverse samples per face.

What is OUR RECONSTRUCTION (each a named choice in `SearchConfig` / `ClassicalConfig`):
- the loss  L(theta) = (1 - gamma) * I(theta) - gamma * V(theta)  with
  I = mean_k d_k / margin (`identity_loss=linear`) or the hinge above the margin (`hinge`),
  d_k = Euclidean distance of dlib ResNet embeddings under ensemble view k, and
  V = 1 - SSIM(grey head region) as the visual-change term (no LPIPS/CLIP offline);
- dlib is not differentiable, so the gradient is an SPSA estimate (two probes per step) and the
  update is MI-FGSM: g <- mu*g + grad/||grad||_1, theta <- theta - eta*sign(g) (`step_rule`);
- after the search, the best feasible change is also tried at 1.25x/1.5x/2x (`extrapolate`);
- the returned sample is the most changed evaluated point whose every ensemble distance stays
  under `identity_margin`, re-checked with full detection (`select=feasible_best`);
- the CPU appearance space (`ClassicalBackend`): a smooth colour field, seeded band-pass textures,
  a smooth warp and a blend toward a seeded flat colour palette, all on a feathered head region.
  It is NOT the paper's diffusion generator: it recolours and re-textures a face but keeps its
  shape, so a person still recognizes it. `serving/sider/diffusion.py` is the generative backend.
Diversity: each sample uses its own seed (textures, palette, SPSA probes, start point).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from serving.sider.config import ClassicalConfig, SearchConfig
from serving.sider.faces import Face, FaceStack, box_iou

# ----------------------------------------------------------------------------- the interface


class AppearanceGenerator(Protocol):
    """Renders the image with one face's appearance set by a parameter vector theta."""
    dim: int

    def render(self, theta: np.ndarray) -> np.ndarray: ...


class Backend(Protocol):
    """An anonymization backend: builds a generator for one face of one image and seed."""
    name: str

    def generator(self, image: np.ndarray, region: "Region", seed: int, face: Face | None = None
                  ) -> AppearanceGenerator: ...


# ----------------------------------------------------------------------------- the edited region


@dataclass(frozen=True)
class Region:
    """The head box the generator may change, and a feathered elliptical mask inside it."""
    top: int
    left: int
    bottom: int
    right: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.top, self.left, self.bottom, self.right

    def mask(self) -> np.ndarray:
        h, w = self.bottom - self.top, self.right - self.left
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.sqrt(((yy + 0.5) / h * 2 - 1) ** 2 + ((xx + 0.5) / w * 2 - 1) ** 2)
        return np.clip((1.0 - r) / 0.25, 0.0, 1.0).astype(np.float32)[..., None]


def head_region(face: Face, shape: tuple[int, ...], scale: float) -> Region:
    """Face box scaled around its centre, shifted up to cover the forehead. Row 0 stays untouched:
    the in-pixel carrier keeps its locator there."""
    left, top, right, bottom = face.box
    cx, cy = (left + right) / 2, (top + bottom) / 2 - 0.1 * (bottom - top)
    half_w, half_h = (right - left) * scale / 2, (bottom - top) * scale / 2
    return Region(top=int(max(1, cy - half_h)), left=int(max(0, cx - half_w)),
                  bottom=int(min(shape[0], cy + half_h)), right=int(min(shape[1], cx + half_w)))


# ----------------------------------------------------------------------------- the search


@dataclass
class Evaluation:
    theta: np.ndarray
    loss: float
    visual: float           # V = 1 - SSIM of the head region
    distances: np.ndarray   # one per ensemble view
    feasible: bool


@dataclass
class SearchTrace:
    evaluations: list[Evaluation] = field(default_factory=list)


def momentum_search(evaluate, dim: int, cfg: SearchConfig, rng: np.random.Generator,
                    theta0: np.ndarray | None = None) -> SearchTrace:
    """MI-FGSM with SPSA gradient estimates. `evaluate(list_of_theta) -> list[Evaluation]`.

    Pure: knows nothing of faces; tests run it on toy objectives."""
    start = np.zeros(dim) if theta0 is None else theta0.astype(np.float64)
    theta = start.copy()
    momentum = np.zeros(dim)
    trace = SearchTrace()
    for _ in range(cfg.steps):
        delta = rng.choice((-1.0, 1.0), size=dim)
        plus, minus = evaluate([theta + cfg.probe * delta, theta - cfg.probe * delta])
        trace.evaluations += [plus, minus]
        grad = (plus.loss - minus.loss) / (2 * cfg.probe) * delta
        if cfg.step_rule == "momentum_sign":
            momentum = cfg.momentum * momentum + grad / (np.abs(grad).sum() + 1e-12)
            theta = theta - cfg.step_size * np.sign(momentum)
        else:
            theta = theta - cfg.step_size * np.sign(grad)
        if cfg.backoff < 1.0 and not (plus.feasible or minus.feasible):
            # both probes lost the identity: pull back toward the start (a cheap projection
            # onto the feasible set, which sign steps alone keep overshooting)
            theta = start + cfg.backoff * (theta - start)
        theta = np.clip(theta, -3.0, 3.0)  # past |3| tanh/sigmoid saturate: no gradient signal
    trace.evaluations += evaluate([theta])
    feasible = [e for e in trace.evaluations if e.feasible]
    if cfg.extrapolate and feasible:
        # more of the best feasible change: cheap, and the search's sign steps are often too timid
        best = max(feasible, key=lambda e: e.visual)
        trace.evaluations += evaluate([start + scale * (best.theta - start) for scale in cfg.extrapolate])
    return trace


def identity_term(distances: np.ndarray, margin: float, rule: str) -> float:
    if rule == "linear":
        return float(np.mean(distances) / margin)
    return float(10.0 * np.mean(np.maximum(distances - margin, 0.0)) / margin)


def visual_change(a: np.ndarray, b: np.ndarray) -> float:
    """1 - SSIM on luminance: the offline proxy for 'a person sees a different face'."""
    return 1.0 - ssim(a, b)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    weights = np.array([0.299, 0.587, 0.114])
    ga, gb = a.astype(np.float64) @ weights, b.astype(np.float64) @ weights
    if min(ga.shape) < 7:
        return float(ga.shape == gb.shape and np.array_equal(ga, gb))
    return float(structural_similarity(ga, gb, data_range=255.0))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# ----------------------------------------------------------------------------- the anonymizer


@dataclass
class Sample:
    image: np.ndarray
    regions: list[Region]
    changes: list[float]                # per face: the backend's change term at the returned point
    identity_distance: float | None   # evaluator view, after full re-detection; None = face lost
    identity_kept: bool
    ensemble_distances: list[list[float]]
    ssim_face: float
    psnr_face: float
    ssim_vs_orig: float
    psnr_vs_orig: float
    details: list[dict] = field(default_factory=list)   # per face: donors, fractions (morph backend)


class Anonymizer:
    """Runs the momentum search for every face of an image, once per sample seed."""

    def __init__(self, faces: FaceStack, backend: Backend, search: SearchConfig, head_scale: float):
        self.faces, self.backend, self.search, self.head_scale = faces, backend, search, head_scale

    def anonymize(self, image: np.ndarray, faces: list[Face], n_samples: int, gamma: float,
                  seed: int) -> list[Sample]:
        return [self._one_sample(image, faces, gamma, seed + 7919 * i) for i in range(n_samples)]

    def _one_sample(self, image: np.ndarray, faces: list[Face], gamma: float, seed: int) -> Sample:
        current = image
        regions, ensemble, changes, details = [], [], [], []
        for k, face in enumerate(faces):
            region = head_region(face, image.shape, self.head_scale)
            current, chosen, info = self._protect_face(current, image, face, region, gamma, seed + 104729 * k)
            regions.append(region)
            ensemble.append([round(float(d), 4) for d in chosen.distances])
            changes.append(float(chosen.visual))
            details.append(info)
        sample = self.measure(image, current, regions, faces[0], ensemble, changes)
        sample.details = details
        return sample

    def measure(self, original: np.ndarray, protected: np.ndarray, regions: list[Region], face: Face,
                ensemble: list[list[float]], changes: list[float]) -> Sample:
        """Evaluator identity distance (after re-detection) and visual change of a protected image."""
        distance = self.evaluator_distance(original, protected, face)
        crop = _union_crop(regions)
        return Sample(image=protected, regions=regions, changes=changes, identity_distance=distance,
                      identity_kept=distance is not None and distance < self.faces.cfg.threshold,
                      ensemble_distances=ensemble,
                      ssim_face=ssim(protected[crop], original[crop]),
                      psnr_face=psnr(protected[crop], original[crop]),
                      ssim_vs_orig=ssim(protected, original), psnr_vs_orig=psnr(protected, original))

    def _protect_face(self, current: np.ndarray, original: np.ndarray, face: Face, region: Region,
                      gamma: float, seed: int) -> tuple[np.ndarray, Evaluation, dict]:
        rng = np.random.default_rng(seed)
        views = list(self.search.ensemble)
        reference = self.faces.embeddings(original, face, views)
        generator = self.backend.generator(current, region, seed, face=face)
        target = original[region.slices]
        # the change the search maximizes: the generator's own term when it has one (morph: shape
        # distance), else 1 - SSIM of the head region
        change = getattr(generator, "change", None)
        rendered: dict[bytes, np.ndarray] = {}

        def evaluate(thetas: list[np.ndarray]) -> list[Evaluation]:
            images = [generator.render(t) for t in thetas]
            chips = [c for img in images for c in self.faces.chips(img, face, views)]
            embeddings = self.faces.embed(chips).reshape(len(images), len(views), -1)
            out = []
            for theta, img, emb in zip(thetas, images, embeddings):
                distances = np.linalg.norm(emb - reference, axis=1)
                visual = change(theta) if change else visual_change(img[region.slices], target)
                score = self.faces.detection_score(img, face.box)
                # the protected face must stay detectable: a lost face cannot be matched at all
                detect_gap = max(0.0, self.faces.cfg.detect_threshold + self.search.detect_slack - score)
                identity = identity_term(distances, self.search.identity_margin, self.search.identity_loss)
                loss = (1 - gamma) * (identity + self.search.detect_weight * detect_gap) - gamma * visual
                rendered[theta.tobytes()] = img
                feasible = distances.max() < self.search.identity_margin and detect_gap == 0.0
                out.append(Evaluation(theta, loss, visual, distances, bool(feasible)))
            return out

        theta0 = generator.initial(rng) if hasattr(generator, "initial") else None
        trace = momentum_search(evaluate, generator.dim, self.search, rng, theta0)
        chosen = self._select(trace, rendered, original, face)
        info = {}
        if hasattr(generator, "fractions"):
            geo, tex = generator.fractions(chosen.theta)
            info = {"donors": list(generator.donors), "fractions": {k: round(v, 3) for k, v in geo.items()},
                    "texture": round(tex, 3)}
        return rendered[chosen.theta.tobytes()], chosen, info

    def _select(self, trace: SearchTrace, rendered: dict, original: np.ndarray, face: Face) -> Evaluation:
        if self.search.select == "last":
            return trace.evaluations[-1]
        feasible = sorted((e for e in trace.evaluations if e.feasible), key=lambda e: -e.visual)
        for candidate in feasible[: self.search.verify_candidates]:
            distance = self.evaluator_distance(original, rendered[candidate.theta.tobytes()], face)
            if distance is not None and distance < self.faces.cfg.threshold:
                return candidate
        # nothing verified: keep the evaluated point closest to the identity and report it honestly
        return min(trace.evaluations, key=lambda e: float(e.distances.max()))

    def evaluator_distance(self, original: np.ndarray, protected: np.ndarray, face: Face) -> float | None:
        """Re-detect on the protected image (the evaluator sees only pixels) and compare the face
        overlapping the original box with the original's evaluator embedding."""
        found = [f for f in self.faces.detect(protected) if box_iou(f.box, face.box) > 0.3]
        if not found:
            return None
        view = [self.faces.cfg.evaluator_view]
        a = self.faces.embeddings(original, face, view)[0]
        b = self.faces.embeddings(protected, found[0], view)[0]
        return float(np.linalg.norm(a - b))


def blur_face(image: np.ndarray, box: tuple[int, int, int, int], scale: float = 1.4) -> tuple[np.ndarray, Region]:
    """The fallback for a face that cannot be protected (policy `faces.unprotected=blur`): the box
    scaled by `scale` is pixelated to ~6 blocks across and then smoothed, which no recognizer or
    person can match. Returns the new image and the changed region."""
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    half = max(right - left, bottom - top) * scale / 2
    region = Region(top=int(max(1, cy - half)), left=int(max(0, cx - half)),
                    bottom=int(min(image.shape[0], cy + half)), right=int(min(image.shape[1], cx + half)))
    crop = torch.from_numpy(image[region.slices].astype(np.float32)).permute(2, 0, 1)[None]
    h, w = crop.shape[-2:]
    small = F.adaptive_avg_pool2d(crop, (min(6, h), min(6, w)))
    blocky = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    out = image.copy()
    out[region.slices] = blocky[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, region


def _union_crop(regions: list[Region]) -> tuple[slice, slice]:
    return (slice(min(r.top for r in regions), max(r.bottom for r in regions)),
            slice(min(r.left for r in regions), max(r.right for r in regions)))


# ----------------------------------------------------------------------------- CPU backend


class ClassicalBackend:
    """Colour field + band-pass textures + smooth warp + palette blend on the head region."""
    name = "classical"

    def __init__(self, cfg: ClassicalConfig):
        self.cfg = cfg

    def generator(self, image: np.ndarray, region: Region, seed: int, face: Face | None = None
                  ) -> "ClassicalGenerator":
        return ClassicalGenerator(image, region, self.cfg, np.random.default_rng(seed))


class ClassicalGenerator:
    def __init__(self, image: np.ndarray, region: Region, cfg: ClassicalConfig, rng: np.random.Generator):
        self.image, self.region, self.cfg = image, region, cfg
        crop = torch.from_numpy(image[region.slices].astype(np.float32)).permute(2, 0, 1)[None]
        self.crop = crop                                    # 1x3xHxW, 0..255
        self.h, self.w = crop.shape[-2:]
        self.mask = torch.from_numpy(region.mask()).permute(2, 0, 1)[None]
        self.textures = _band_pass_textures(cfg.texture_bases, self.h, self.w, rng)
        self.palette = _palette_image(crop, cfg.palette_colours, rng)
        self.sizes = [("colour", 3 * cfg.colour_grid ** 2), ("texture", cfg.texture_bases),
                      ("warp", 2 * cfg.warp_grid ** 2), ("blend", cfg.blend_grid ** 2)]
        self.dim = sum(n for _, n in self.sizes)

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        parts = self._split(rng.normal(0.0, 0.05, self.dim))
        parts["blend"] = parts["blend"] - 3.0  # start almost unblended: sigmoid(-3) ~ 0.05
        return np.concatenate([parts[name] for name, _ in self.sizes])

    def _split(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for name, n in self.sizes:
            out[name] = np.asarray(theta[at:at + n], dtype=np.float32)
            at += n
        return out

    def _field(self, values: np.ndarray, channels: int, grid: int) -> torch.Tensor:
        coarse = torch.from_numpy(values).reshape(1, channels, grid, grid)
        return F.interpolate(coarse, size=(self.h, self.w), mode="bicubic", align_corners=True)

    def render(self, theta: np.ndarray) -> np.ndarray:
        p, c = self._split(theta), self.cfg
        with torch.no_grad():
            warp = self._field(np.tanh(p["warp"]), 2, c.warp_grid) * c.warp_pixels
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, self.h), torch.linspace(-1, 1, self.w), indexing="ij")
            grid = torch.stack((xs + warp[0, 0] * 2 / self.w, ys + warp[0, 1] * 2 / self.h), -1)[None]
            warped = F.grid_sample(self.crop, grid, mode="bilinear", padding_mode="border", align_corners=True)
            blend = torch.sigmoid(self._field(p["blend"], 1, c.blend_grid))
            out = warped * (1 - blend) + self.palette * blend
            out = out + self._field(np.tanh(p["colour"]), 3, c.colour_grid) * c.colour_amplitude
            if c.texture_bases:
                weights = torch.from_numpy(np.tanh(p["texture"]) * c.texture_amplitude)
                out = out + (weights[:, None, None, None] * self.textures).sum(0, keepdim=True)
            out = self.mask * out.clamp(0, 255) + (1 - self.mask) * self.crop
        image = self.image.copy()
        image[self.region.slices] = out[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
        return image


def _band_pass_textures(n: int, h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    """n colour noise patterns with detail between ~3 and ~12 px, unit std."""
    if n == 0:
        return torch.zeros(0, 3, h, w)
    noise = torch.from_numpy(rng.standard_normal((n, 3, h, w)).astype(np.float32))
    fine = F.avg_pool2d(noise, 3, 1, 1)
    coarse = F.avg_pool2d(noise, 11, 1, 5)
    band = fine - coarse
    return band / band.flatten(1).std(1)[:, None, None, None]


def _palette_image(crop: torch.Tensor, colours: int, rng: np.random.Generator) -> torch.Tensor:
    """The crop posterized to `colours` luminance levels, each painted a seeded random colour
    whose brightness follows the level (so shading survives, skin tone and texture do not)."""
    luma = (crop[0] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
    edges = torch.quantile(luma.flatten(), torch.linspace(0, 1, colours + 1)[1:-1])
    level = torch.bucketize(luma, edges)
    brightness = np.linspace(40, 220, colours)
    hues = rng.uniform(0.6, 1.4, size=(colours, 3))
    palette = torch.from_numpy(np.clip(brightness[:, None] * hues, 0, 255).astype(np.float32))
    return palette[level].permute(2, 0, 1)[None]
