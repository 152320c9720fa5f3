"""Landmark morph backend: move the face's geometry toward other people, keep the machine identity.

Paper: Bao et al., "SIDeR: Semantic Identity Decoupling for Unrestricted Face Privacy", arXiv
2602.04994 (2026). The paper edits faces in a diffusion latent; we have no face diffusion weights
offline, so this CPU backend is OUR RECONSTRUCTION of "visually anonymous but identity-consistent":

- **Donors** (k-Same style, Newton et al. 2005): `k` faces of *other* people from a local photo pool
  (`morph.donors_dir`, filled by scripts/assets/sider.sh). Donors that dlib matches to the subject
  are excluded, and so are donors whose head turn (`pose_asymmetry`) differs from the subject's by
  more than `morph.max_pose_gap` (a head turn is not another person); each donor also serves
  mirrored (`morph.mirror_donors`). Among the rest, the k with the farthest Procrustes shape
  (`morph.donor_pick=farthest`, the default) or k drawn by the seed among the farther half
  (`spread`, the part-1 rule).
- **Geometry**: the donors' 68 landmarks are aligned to the subject's by a similarity (Procrustes)
  fit and averaged; the target shape moves each facial component (jaw, brows, eyes, nose, mouth)
  a fraction `f_c` of the way toward that average. The head crop is warped onto the target shape
  by a thin-plate-spline warp (`morph.warp=tps`, default) or a piecewise-affine Delaunay warp
  (`delaunay`; it folds on near-degenerate jaw triangles of small faces) whose crop border is
  fixed, so nothing outside moves.
- **Appearance**: optionally the donors' inner faces, warped onto the same target shape, are
  blended in with fraction `f_t` in the gradient domain (Poisson blending, Perez et al. 2003, with
  the subject's pixels as the boundary), so skin tone and lighting stay the subject's and no colour
  noise is added.
- **Search variables**: theta = (logits of f_jaw, f_brows, f_eyes, f_nose, f_mouth, f_t); the
  momentum search in anonymize.py keeps every ensemble distance under the margin while maximizing
  `change(theta)` = the Procrustes distance between the target and the original shape (geometry,
  not SSIM), plus `texture_weight * f_t`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import ConvexHull, Delaunay, QhullError
from skimage.draw import polygon

from edgeray.errors import UserError

# 68-point (iBUG) landmark groups
COMPONENTS = {
    "jaw": tuple(range(0, 17)),
    "brows": tuple(range(17, 27)),
    "nose": tuple(range(27, 36)),
    "eyes": tuple(range(36, 48)),
    "mouth": tuple(range(48, 68)),
}
COMPONENT_NAMES = tuple(COMPONENTS)
# the 68-point index each point becomes when the face is mirrored left-right
MIRROR68 = np.array(list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] +
                    [35, 34, 33, 32, 31] + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40] +
                    [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65])
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ----------------------------------------------------------------------------- geometry


def shape_points(shape) -> np.ndarray:
    """dlib full_object_detection -> (n, 2) float array of (x, y)."""
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def similarity_fit(src: np.ndarray, dst: np.ndarray, points: np.ndarray | None = None) -> np.ndarray:
    """The least-squares similarity transform (Umeyama, no reflection) that maps `src` onto `dst`,
    applied to `points` (default: `src` itself)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag([1.0, d]) @ vt
    scale = (sig * [1.0, d]).sum() / max((a ** 2).sum(), 1e-12)
    pts = src if points is None else points
    return (scale * (rot @ (pts - mu_s).T)).T + mu_d


def procrustes_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Shape distance after removing position, scale and rotation: both shapes are centred and
    scaled to unit Frobenius norm, `a` is fitted onto `b`, and the residual norm is returned
    (0 = same shape; ~0.05 = typical pose/expression spread of one person)."""
    a0, b0 = a - a.mean(0), b - b.mean(0)
    a0, b0 = a0 / np.linalg.norm(a0), b0 / np.linalg.norm(b0)
    return float(np.linalg.norm(similarity_fit(a0, b0) - b0))


def mirror_landmarks(points: np.ndarray, width: int) -> np.ndarray:
    """The 68 landmarks of the left-right mirrored image (x -> width-1-x, points renumbered so that
    e.g. the left eye stays the left eye)."""
    flipped = points.copy()
    flipped[:, 0] = width - 1 - flipped[:, 0]
    return flipped[MIRROR68]


def pose_asymmetry(points: np.ndarray) -> float:
    """A head-turn (yaw) proxy from the 68 landmarks: (|jaw2 - nose tip| - |jaw14 - nose tip|) / sum;
    0 = frontal, about +-0.5 = a clear three-quarter view, +-0.9 = near profile."""
    a, b = np.linalg.norm(points[2] - points[30]), np.linalg.norm(points[14] - points[30])
    return float((a - b) / max(a + b, 1e-9))


def target_shape(original: np.ndarray, donor: np.ndarray, fractions: dict[str, float]) -> np.ndarray:
    """Each component moved `fractions[name]` of the way from the original toward the donor shape
    (already aligned to the original)."""
    out = original.copy()
    for name, idx in COMPONENTS.items():
        f = float(fractions.get(name, 0.0))
        out[list(idx)] = original[list(idx)] + f * (donor[list(idx)] - original[list(idx)])
    return out


def _anchors(h: int, w: int, n: int = 4) -> np.ndarray:
    """Fixed points along the crop border (they keep everything outside the crop in place)."""
    xs, ys = np.linspace(0, w - 1, n + 1), np.linspace(0, h - 1, n + 1)
    border = [(x, 0) for x in xs] + [(x, h - 1) for x in xs] + [(0, y) for y in ys[1:-1]] + \
             [(w - 1, y) for y in ys[1:-1]]
    return np.array(border, dtype=np.float64)


def piecewise_affine_map(src_pts: np.ndarray, dst_pts: np.ndarray, h: int, w: int,
                         src_anchors: np.ndarray | None = None, step: int = 3) -> np.ndarray | None:
    """For every pixel (x, y) of an h x w output, the source coordinates that land there when
    `src_pts` move to `dst_pts` (Delaunay triangles of `dst_pts`, affine inside each). The crop
    border is pinned: its points map to themselves, or to `src_anchors` when given (another image).
    Returns a (2, h, w) array of (row, col) source coordinates, or None when a triangle would fold.
    The map is evaluated every `step` px and interpolated bilinearly in between (it is linear inside
    each triangle, so only pixels near a triangle edge differ, by well under a pixel)."""
    anchors = _anchors(h, w)
    src = np.vstack([src_pts, anchors if src_anchors is None else src_anchors])
    dst = np.vstack([dst_pts, anchors])
    try:
        tri = Delaunay(dst)
    except QhullError:                  # degenerate target points: no map
        return None

    def orient(p):
        t = p[tri.simplices]
        return np.sign((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1]) -
                       (t[:, 1, 1] - t[:, 0, 1]) * (t[:, 2, 0] - t[:, 0, 0]))
    if np.any(orient(src) != orient(dst)):
        return None
    ys = np.unique(np.append(np.arange(0, h, step), h - 1)).astype(np.float64)
    xs = np.unique(np.append(np.arange(0, w, step), w - 1)).astype(np.float64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], 1)
    simplex = np.maximum(tri.find_simplex(pts), 0)
    trans = tri.transform[simplex]                       # (n, 3, 2)
    bary2 = np.einsum("nij,nj->ni", trans[:, :2], pts - trans[:, 2])
    bary = np.concatenate([bary2, 1 - bary2.sum(1, keepdims=True)], 1)
    mapped = np.einsum("ni,nij->nj", bary, src[tri.simplices[simplex]]).reshape(len(ys), len(xs), 2)
    # bilinear upsampling of the coarse map onto every pixel
    fy = np.interp(np.arange(h), ys, np.arange(len(ys)))
    fx = np.interp(np.arange(w), xs, np.arange(len(xs)))
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    return np.stack([map_coordinates(mapped[..., 1], [gy, gx], order=1),
                     map_coordinates(mapped[..., 0], [gy, gx], order=1)])


def thin_plate_map(src_pts: np.ndarray, dst_pts: np.ndarray, h: int, w: int,
                   src_anchors: np.ndarray | None = None, step: int = 3) -> np.ndarray | None:
    """Same contract as `piecewise_affine_map`, with a thin-plate spline fitted from the output
    points to the source points (the backward map) instead of Delaunay triangles: smooth across
    the whole face, so near-degenerate triangles along the jaw cannot fold. None when the map's
    Jacobian determinant is not positive everywhere (a fold)."""
    from scipy.interpolate import RBFInterpolator

    anchors = _anchors(h, w)
    src = np.vstack([src_pts, anchors if src_anchors is None else src_anchors])
    dst = np.vstack([dst_pts, anchors])
    ys = np.unique(np.append(np.arange(0, h, step), h - 1)).astype(np.float64)
    xs = np.unique(np.append(np.arange(0, w, step), w - 1)).astype(np.float64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    grid = np.stack([xx.ravel(), yy.ravel()], 1)
    try:
        mapped = RBFInterpolator(dst, src, kernel="thin_plate_spline", smoothing=0.0)(grid)
    except np.linalg.LinAlgError:       # two target points coincide (e.g. clipped to the crop): no map
        return None
    mapped = mapped.reshape(len(ys), len(xs), 2)
    dx = np.gradient(mapped, xs, axis=1)
    dy = np.gradient(mapped, ys, axis=0)
    if np.any(dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0] <= 0.05):
        return None
    fy = np.interp(np.arange(h), ys, np.arange(len(ys)))
    fx = np.interp(np.arange(w), xs, np.arange(len(xs)))
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    return np.stack([map_coordinates(mapped[..., 1], [gy, gx], order=1),
                     map_coordinates(mapped[..., 0], [gy, gx], order=1)])


WARPS = {"tps": thin_plate_map, "delaunay": piecewise_affine_map}


def sample(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear sampling of an HxWx3 image at (2, h, w) (row, col) coordinates."""
    return np.stack([map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="nearest")
                     for c in range(image.shape[2])], -1)


def hull_mask(points: np.ndarray, h: int, w: int, feather: float) -> np.ndarray:
    """Soft mask of the convex hull of `points` (the inner face), fading to 0 at its edge over
    about `feather` px."""
    hull = points[ConvexHull(points).vertices]
    hard = np.zeros((h, w), dtype=np.float32)
    rr, cc = polygon(hull[:, 1], hull[:, 0], shape=(h, w))
    hard[rr, cc] = 1.0
    if feather <= 0:
        return hard
    return np.clip(2 * gaussian_filter(hard, feather) - 1, 0, 1)


def poisson_blend(base: np.ndarray, source: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Gradient-domain blend (Perez et al. 2003): the result's gradients are base's plus `weight` x
    the gradients of (source - base), with base's values on the crop border (Dirichlet); solved
    exactly with a sine transform. The donor's features and texture come in; its overall colour
    and lighting (a constant or smooth offset) do not."""
    h, w = base.shape[:2]
    base = base.astype(np.float64)
    if h < 3 or w < 3:
        return base
    diff = source.astype(np.float64) - base
    # weighted guidance field on the pixel edges, then its divergence
    gx = (diff[:, 1:] - diff[:, :-1]) * ((weight[:, 1:] + weight[:, :-1]) / 2)[..., None]
    gy = (diff[1:] - diff[:-1]) * ((weight[1:] + weight[:-1]) / 2)[..., None]
    div = np.zeros_like(diff)
    div[:, :-1] += gx          # div at pixel i = g(i + 1/2) - g(i - 1/2)
    div[:, 1:] -= gx
    div[:-1] += gy
    div[1:] -= gy
    inner = div[1:-1, 1:-1]
    ky = 2 * np.cos(np.pi * np.arange(1, h - 1) / (h - 1)) - 2
    kx = 2 * np.cos(np.pi * np.arange(1, w - 1) / (w - 1)) - 2
    denom = ky[:, None] + kx[None, :]
    u = np.zeros_like(diff)
    for c in range(diff.shape[2]):
        u[1:-1, 1:-1, c] = sfft.idstn(sfft.dstn(inner[..., c], type=1) / denom, type=1)
    return base + u


# ----------------------------------------------------------------------------- donors


@dataclass
class Donor:
    """One face of another person: its photo, 68 landmarks in that photo, dlib embedding."""
    name: str
    image: np.ndarray
    landmarks: np.ndarray
    embedding: np.ndarray

    @property
    def person(self) -> str:
        """The face's name without the mirror mark (a mirrored face is the same person)."""
        return self.name.removesuffix("~mirror")


def load_donors(faces, folder: str | Path, exclude: tuple[str, ...] = (), threshold: float = 0.6,
                max_side: int = 800, mirror: bool = False) -> list[Donor]:
    """Every detected face in the photos of `folder`, one per identity (faces that dlib matches to
    an earlier one are dropped). `exclude` = file-name stems to skip (used by the bench for
    leave-one-identity-out). `mirror` adds each face's left-right mirror image (name + "~mirror"):
    the same person turned the other way, so a donor of the subject's pose exists more often."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"sider.morph.donors_dir={str(folder)!r} is not a folder; run "
                        f"`bash scripts/assets/sider.sh` (it fills data/sider_faces) or set the path")
    donors: list[Donor] = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.stem in exclude:
            continue
        image = read_rgb(path, max_side)
        for k, face in enumerate(faces.detect(image, min_px=0)):
            emb = faces.embeddings(image, face, [faces.cfg.evaluator_view])[0]
            if any(np.linalg.norm(emb - d.embedding) < threshold for d in donors):
                continue
            donors.append(Donor(f"{path.stem}#{k}", image, shape_points(face.shapes["landmarks68"]), emb))
    if mirror:
        donors += [Donor(d.name + "~mirror", np.ascontiguousarray(d.image[:, ::-1]),
                         mirror_landmarks(d.landmarks, d.image.shape[1]), d.embedding) for d in list(donors)]
    if not donors:
        raise UserError(f"no faces found in sider.morph.donors_dir={str(folder)!r}")
    return donors


def read_rgb(path: str | Path, max_side: int = 800) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.LANCZOS)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


# ----------------------------------------------------------------------------- the backend


class MorphBackend:
    name = "morph"

    def __init__(self, cfg, faces, donors: list[Donor] | None = None, threshold: float = 0.6):
        self.cfg, self.faces, self.threshold = cfg, faces, threshold
        self.donors = donors if donors is not None else load_donors(faces, _resolve(cfg.donors_dir),
                                                                    threshold=threshold, mirror=cfg.mirror_donors)

    def pick_donors(self, subject_landmarks: np.ndarray, subject_embedding: np.ndarray | None,
                    rng: np.random.Generator) -> list[Donor]:
        """k donors of other identities (dlib distance >= threshold) whose head pose is within
        `max_pose_gap` of the subject's: the k farthest shapes (`donor_pick=farthest`), or k drawn by
        the seed among the farther half (`spread`)."""
        pool = [d for d in self.donors if subject_embedding is None
                or np.linalg.norm(d.embedding - subject_embedding) >= self.threshold]
        if not pool:
            raise UserError("the donor pool holds no face of another person than the subject")
        if self.cfg.max_pose_gap < 2.0:
            # a donor turned another way than the subject moves the landmarks by a head turn, which
            # a person sees as the same face turned, not another face: keep donors of a similar pose
            # (the closest poses when none is within the gap)
            pose = pose_asymmetry(subject_landmarks)
            gap = {id(d): abs(pose_asymmetry(d.landmarks) - pose) for d in pool}
            near = [d for d in pool if gap[id(d)] <= self.cfg.max_pose_gap]
            if len({d.person for d in near}) < self.cfg.donors_k:
                near, people = [], set()
                for d in sorted(pool, key=lambda d: gap[id(d)]):
                    if len(people) < self.cfg.donors_k or d.person in people:
                        near.append(d)
                        people.add(d.person)
            pool = near
        far, seen = [], set()
        for d in sorted(pool, key=lambda d: -procrustes_distance(d.landmarks, subject_landmarks)):
            if d.person not in seen:                     # a face and its mirror are one person: k people
                far.append(d)
                seen.add(d.person)
        if self.cfg.donor_pick == "farthest":
            return far[: self.cfg.donors_k]
        top = far[: max(self.cfg.donors_k, (len(far) + 1) // 2)]
        idx = rng.choice(len(top), size=min(self.cfg.donors_k, len(top)), replace=False)
        return [top[i] for i in sorted(idx)]

    def generator(self, image: np.ndarray, region, seed: int, face=None) -> "MorphGenerator":
        if face is None:
            raise UserError("the morph backend needs the face's landmarks")
        rng = np.random.default_rng(seed)
        subject = shape_points(face.shapes["landmarks68"])
        emb = self.faces.embeddings(image, face, [self.faces.cfg.evaluator_view])[0]
        return MorphGenerator(image, region, subject, self.pick_donors(subject, emb, rng), self.cfg)


class MorphGenerator:
    """Renders the image with the face morphed by theta (6 logits, see the module docstring)."""

    def __init__(self, image: np.ndarray, region, subject: np.ndarray, donors: list[Donor], cfg):
        self.image, self.region, self.cfg = image, region, cfg
        self.donors = [d.name for d in donors]
        self.offset = np.array([region.left, region.top], dtype=np.float64)
        self.crop = image[region.slices].astype(np.float32)
        self.h, self.w = self.crop.shape[:2]
        # crop coordinates, kept 2 px inside the crop (a landmark on or past the pinned border, e.g. a
        # jaw cut by the image edge, would fold every warp)
        inside = lambda p: np.clip(p, 2.0, [self.w - 3.0, self.h - 3.0])   # noqa: E731
        self.subject = inside(subject - self.offset)
        aligned = [similarity_fit(d.landmarks, subject) - self.offset for d in donors]
        self.donor_shape = inside(np.mean(aligned, 0))          # k-Same: the donors' mean shape
        self._applied: dict[bytes, float] = {}                  # theta -> move scale actually rendered
        self._donor_images = donors
        self.dim = len(COMPONENT_NAMES) + 1
        self.max_fraction = cfg.max_fraction

    def fractions(self, theta: np.ndarray) -> tuple[dict[str, float], float]:
        f = self.max_fraction / (1 + np.exp(-np.asarray(theta, dtype=np.float64)))
        geo = {name: float(f[i]) for i, name in enumerate(COMPONENT_NAMES)}
        tex = float(self.cfg.max_texture / (1 + np.exp(-theta[-1])))
        return geo, tex

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        theta = rng.normal(0.0, 0.05, self.dim)
        theta[-1] -= 1.0
        return theta

    def target(self, theta: np.ndarray) -> np.ndarray:
        geo, _ = self.fractions(theta)
        return target_shape(self.subject, self.donor_shape, geo)

    def change(self, theta: np.ndarray) -> float:
        """The visual-change term the search maximizes: shape distance from the original (plus the
        texture fraction) of what was actually rendered; NOT an image similarity, so the reported
        SSIM is not the objective."""
        geo, tex = self.fractions(theta)
        scale = self._applied.get(np.asarray(theta, dtype=np.float64).tobytes(), 1.0)
        if scale == 0.0:
            return 0.0
        target = target_shape(self.subject, self.donor_shape, {k: v * scale for k, v in geo.items()})
        return procrustes_distance(target, self.subject) / 0.1 + self.cfg.texture_weight * tex

    def render(self, theta: np.ndarray) -> np.ndarray:
        geo, tex = self.fractions(theta)
        target = target_shape(self.subject, self.donor_shape, geo)
        warp = WARPS[self.cfg.warp]
        coords = warp(self.subject, target, self.h, self.w)
        scale = 1.0
        while coords is None and scale > 0.05:          # a folded warp: shrink the move until it unfolds
            scale *= 0.7
            target = target_shape(self.subject, self.donor_shape, {k: v * scale for k, v in geo.items()})
            coords = warp(self.subject, target, self.h, self.w)
        self._applied[np.asarray(theta, dtype=np.float64).tobytes()] = 0.0 if coords is None else scale
        out = self.crop if coords is None else sample(self.crop, coords)
        if tex > 0 and coords is not None:
            texture = np.mean([self._donor_texture(d, target) for d in self._donor_images], 0)
            mask = hull_mask(target[17:68], self.h, self.w, self.cfg.feather_px)
            out = poisson_blend(out, texture, tex * mask)
        image = self.image.copy()
        image[self.region.slices] = np.clip(np.round(out), 0, 255).astype(np.uint8)
        return image

    def _donor_texture(self, donor: Donor, target: np.ndarray) -> np.ndarray:
        """The donor's photo warped so that its landmarks land on `target` (crop coordinates); the
        crop border follows the similarity fit of the subject's face onto the donor's."""
        border = similarity_fit(self.subject, donor.landmarks, _anchors(self.h, self.w))
        coords = WARPS[self.cfg.warp](donor.landmarks, target, self.h, self.w, src_anchors=border)
        if coords is None:
            return self.crop
        return sample(donor.image, coords)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else Path(__file__).resolve().parents[2] / p
