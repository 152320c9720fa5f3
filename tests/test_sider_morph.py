"""SIDeR morph backend and evaluators, pure parts (no dlib, no Ray): Procrustes geometry, the
piecewise-affine warp, Poisson blending, LBPH, the pair metrics and the naturalness measures."""

import numpy as np
import pytest
from skimage import data

from serving.sider import evaluation as E
from serving.sider import morph as M


def _shape(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(30, 120, (68, 2))


def _rotate(points, angle, scale, shift):
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, -s], [s, c]]).T + shift


def test_procrustes_ignores_position_scale_rotation():
    a = _shape()
    assert M.procrustes_distance(a, _rotate(a, 0.4, 1.7, [12, -5])) == pytest.approx(0.0, abs=1e-9)
    b = _shape(1)
    assert M.procrustes_distance(a, b) > 0.3
    fitted = M.similarity_fit(_rotate(a, -0.3, 0.5, [3, 3]), a)
    assert np.allclose(fitted, a, atol=1e-8)


def test_target_shape_moves_each_component_by_its_fraction():
    a, b = _shape(), _shape(1)
    t = M.target_shape(a, b, {"mouth": 0.5, "jaw": 1.0})
    mouth, jaw, eyes = list(M.COMPONENTS["mouth"]), list(M.COMPONENTS["jaw"]), list(M.COMPONENTS["eyes"])
    assert np.allclose(t[mouth], (a[mouth] + b[mouth]) / 2)
    assert np.allclose(t[jaw], b[jaw]) and np.allclose(t[eyes], a[eyes])
    assert sorted(i for idx in M.COMPONENTS.values() for i in idx) == list(range(68))


def test_piecewise_affine_map_identity_translation_and_fold():
    h, w = 90, 110
    pts = np.array([[30, 30], [80, 30], [55, 60], [40, 70], [70, 72]], float)
    ident = M.piecewise_affine_map(pts, pts, h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    assert np.allclose(ident[0], yy, atol=1e-6) and np.allclose(ident[1], xx, atol=1e-6)
    moved = M.piecewise_affine_map(pts, pts + [3, 0], h, w)       # points move 3 px right
    # a pixel at a moved landmark samples the source 3 px to its left; the border stays pinned
    assert moved[1][60, 58] == pytest.approx(55, abs=0.6)
    assert np.allclose(moved[:, 0, :], ident[:, 0, :]) and np.allclose(moved[:, :, -1], ident[:, :, -1])
    folded = pts.copy()
    folded[[0, 1]] = folded[[1, 0]]                                 # two landmarks swap places: a fold
    assert M.piecewise_affine_map(pts, folded, h, w) is None


def test_poisson_blend_takes_features_not_colour():
    base = data.astronaut()[100:200, 150:250].astype(np.float64)
    weight = np.zeros(base.shape[:2])
    weight[20:80, 20:80] = 1.0
    assert np.allclose(M.poisson_blend(base, base + 40.0, weight), base, atol=1e-6)   # a tint is dropped
    assert np.allclose(M.poisson_blend(base, base * 0 + 7, np.zeros_like(weight)), base)
    other = data.astronaut()[300:400, 300:400].astype(np.float64)
    blended = M.poisson_blend(base, other, weight)
    inner = (slice(30, 70), slice(30, 70))
    # inside, the blend carries the source's structure (its gradients)...
    grad = lambda x: np.diff(x[inner].mean(-1), axis=1)               # noqa: E731
    assert np.corrcoef(grad(blended).ravel(), grad(other).ravel())[0, 1] > 0.9
    # ...and the border keeps the base's values
    assert np.allclose(blended[0], base[0]) and np.allclose(blended[:, -1], base[:, -1])


def test_hull_mask_is_inside_the_points():
    pts = np.array([[20, 20], [60, 20], [60, 50], [20, 50]], float)
    hard = M.hull_mask(pts, 70, 80, 0)
    assert hard[35, 40] == 1 and hard[5, 5] == 0 and hard.sum() == pytest.approx(41 * 31, rel=0.1)
    soft = M.hull_mask(pts, 70, 80, 4)
    assert 0 < soft[22, 40] < 1 and soft[35, 40] == pytest.approx(1, abs=0.05) and soft[5, 5] == 0


def test_lbph_matcher_tells_faces_apart():
    lbph = E.LbphMatcher()
    astro = data.astronaut()[60:210, 160:310]
    rng = np.random.default_rng(0)
    noisy = np.clip(astro + rng.normal(0, 4, astro.shape), 0, 255).astype(np.uint8)
    other = data.coffee()[100:250, 200:350]
    fa, fn, fo = lbph.features(astro), lbph.features(noisy), lbph.features(other)
    assert lbph.distance(fa, fa) == 0.0
    assert lbph.distance(fa, fn) < lbph.distance(fa, fo)
    assert fa.shape == (8 * 8 * 59,) and np.allclose(fa.reshape(64, 59).sum(1), 1.0)


def test_pair_metrics():
    impostor = np.linspace(0.6, 1.6, 100)
    t = E.threshold_at_far(impostor, 0.01)
    assert E.far_at(impostor, t) <= 0.01 and E.far_at(impostor, t + 0.02) > 0.01
    assert E.tar_at([0.3, 0.5, 0.7, 0.9], 0.6) == 0.5
    assert np.isnan(E.tar_at([], 0.6))
    assert E.rank1(np.array([0.5, 0.2, 0.9]), ["a", "b", "c"], "b")
    assert not E.rank1(np.array([0.5, 0.2, 0.9]), ["a", "b", "c"], "a")


def test_naturalness_measures():
    face = data.astronaut()[60:210, 160:310]
    assert E.gradient_ssim(face, np.clip(face.astype(int) + 30, 0, 255).astype(np.uint8)) > 0.95  # colour-blind
    rng = np.random.default_rng(1)
    speckled = np.clip(face + rng.normal(0, 20, face.shape), 0, 255).astype(np.uint8)
    assert E.noise_energy(speckled) > 2 * E.noise_energy(face)
    assert E.gradient_ssim(face, speckled) < 0.7
    stats = E.colour_stats(face)
    assert len(stats["mean"]) == 3 and all(s > 0 for s in stats["std"])
    assert E.landmark_distance(_shape(), _shape()) == pytest.approx(0.0, abs=1e-9)


def test_onnx_evaluator_says_what_it_needs(tmp_path):
    from edgeray.errors import UserError
    with pytest.raises(UserError, match="onnxruntime|not a file"):
        E.OnnxMatcher(tmp_path / "missing.onnx")


def _face68(turn=0.0):
    """A symmetric synthetic 68-point face (jaw arc, brows, nose, eyes, mouth); `turn` shifts the
    nose and mouth sideways like a head turn."""
    jaw = [(50 + 40 * np.sin(t), 60 + 45 * np.cos(t) * 0.9) for t in np.linspace(-np.pi / 2, np.pi / 2, 17)]
    jaw = [(x, 60 + (y - 60)) for x, y in jaw][::-1]
    jaw = [(100 - x, y) for x, y in jaw]               # left to right in the image
    brows = [(20 + 6 * i, 35 - 3 * np.sin(i / 4 * np.pi)) for i in range(5)]
    brows += [(100 - x, y) for x, y in brows[::-1]]
    nose = [(50, 40 + 5 * i) for i in range(4)] + [(42 + 4 * i, 62) for i in range(5)]
    eye = [(25, 45), (30, 42), (36, 42), (41, 45), (36, 47), (30, 47)]
    eyes = eye + [(100 - x, y) for x, y in [eye[3], eye[2], eye[1], eye[0], eye[5], eye[4]]]
    mouth = [(35, 78), (40, 75), (45, 74), (50, 75), (55, 74), (60, 75), (65, 78),
             (60, 82), (55, 84), (50, 84), (45, 84), (40, 82)]
    inner = [(38, 78), (45, 77), (50, 77), (55, 77), (62, 78), (55, 80), (50, 80), (45, 80)]
    pts = np.array(jaw + brows + nose + eyes + mouth + inner, float)
    pts[27:68, 0] += turn
    return pts


def test_mirror_landmarks_is_an_involution_that_keeps_sides():
    pts = _face68(turn=6.0)
    flipped = M.mirror_landmarks(pts, 101)
    assert np.allclose(M.mirror_landmarks(flipped, 101), pts)
    # the left eye (36-41) of the mirror is the mirrored right eye (42-47): still on the left
    assert flipped[36:42, 0].mean() < flipped[42:48, 0].mean()
    assert np.allclose(flipped[45], [100 - pts[36, 0], pts[36, 1]])
    assert M.procrustes_distance(M.mirror_landmarks(_face68(), 100), _face68()) == pytest.approx(0, abs=1e-6)


def test_pose_asymmetry_tells_the_turn():
    assert M.pose_asymmetry(_face68()) == pytest.approx(0, abs=1e-6)
    right, left = M.pose_asymmetry(_face68(turn=8.0)), M.pose_asymmetry(_face68(turn=-8.0))
    assert right > 0.1 and left == pytest.approx(-right)
    assert M.pose_asymmetry(M.mirror_landmarks(_face68(turn=8.0), 100)) == pytest.approx(left, abs=1e-6)


class _Cfg:
    donors_k, donor_pick, max_pose_gap = 2, "farthest", 0.3


def _backend(donors, **cfg):
    backend = M.MorphBackend.__new__(M.MorphBackend)
    c = _Cfg()
    for k, v in cfg.items():
        setattr(c, k, v)
    backend.cfg, backend.threshold, backend.donors = c, 0.6, donors
    return backend


def test_pick_donors_farthest_of_the_same_pose_and_distinct_people():
    subject = _face68()
    rng = np.random.default_rng(0)
    wide = _face68()
    wide[0:17, 0] = 50 + (wide[0:17, 0] - 50) * 1.3                       # another jaw: far in shape
    near = _face68()
    near[48:68, 0] = 50 + (near[48:68, 0] - 50) * 1.1                     # a wider mouth: a little
    turned = _face68(turn=20.0)                                           # far, but by a head turn
    emb = lambda v: np.full(128, v)                                       # noqa: E731
    donors = [M.Donor("wide", None, wide, emb(1.0)), M.Donor("wide~mirror", None, wide, emb(1.0)),
              M.Donor("near", None, near, emb(2.0)), M.Donor("turned", None, turned, emb(3.0)),
              M.Donor("self", None, wide * 1.01, emb(0.01))]
    picked = _backend(donors).pick_donors(subject, emb(0.0), rng)
    # the subject itself (dlib match) and the turned face are skipped; a face and its mirror count once
    assert [d.name for d in picked] == ["wide", "near"]
    assert M.procrustes_distance(turned, subject) > M.procrustes_distance(wide, subject)
    # without the pose gap the head turn wins
    assert _backend(donors, max_pose_gap=2.0, donors_k=1).pick_donors(subject, emb(0.0), rng)[0].name == "turned"
    # not enough donors of the subject's pose: the closest poses are used
    only_turned = [donors[3], M.Donor("turned2", None, _face68(turn=-24.0), emb(4.0))]
    assert {d.name for d in _backend(only_turned).pick_donors(subject, emb(0.0), rng)} == {"turned", "turned2"}
    assert [d.name for d in _backend(only_turned, donors_k=1).pick_donors(subject, emb(0.0), rng)] == ["turned"]


def test_warps_give_no_map_for_coinciding_target_points():
    pts = np.array([[30, 30], [80, 30], [55, 60], [40, 70], [70, 72]], float)
    same = pts.copy()
    same[1] = same[0]                                  # two targets on one spot (clipped landmarks)
    assert M.thin_plate_map(pts, same, 90, 110) is None


def test_lineup_rule_calibrates_to_the_equal_error_point_and_allows_for_a_head_turn():
    rng = np.random.default_rng(3)
    base = _face68()

    def person(k):       # another person: a fixed change of the inner face's shape
        p = base.copy()
        p[17:68] += np.random.default_rng(100 + k).normal(0, 3.0, (51, 2))
        return p

    def photo(p, turn=0.0):   # another photo: landmark noise and a head turn
        q = p.copy() + rng.normal(0, 0.4, p.shape)
        q[27:68, 0] += turn
        return q

    people = [person(k) for k in range(4)]
    same = [(photo(p), photo(p, turn=t)) for p in people for t in (0.0, 4.0, -4.0)]
    different = [(photo(a), photo(b)) for i, a in enumerate(people) for b in people[i + 1:]]
    rule, rates = E.LineupRule.calibrate(same, different)
    assert rule.name == "calibrated" and rule.points in E.LINEUP_POINTS and rule.slope in (0.0, 0.1, 0.2, 0.3)
    assert rates["auc"] > 0.9 and rates["same_pairs"] == 12 and rates["different_pairs"] == 6
    assert rates["same_person_other_rate"] <= 0.2 and rates["different_person_other_rate"] >= 0.8
    assert rule.other_person(*different[0]) and not rule.other_person(*same[0])
    # the pose allowance: the same landmark change counts less when the heads are turned differently
    turned = E.LineupRule("t", "all68", 0.3, 0.05)
    a, b = people[0], people[1].copy()
    b_turned = b.copy()
    b_turned[27:68, 0] += 8.0
    assert turned.score(a, b_turned) < E.landmark_distance(a, b_turned)
    fixed = E.LineupRule.fixed(0.3)
    assert (fixed.points, fixed.slope, fixed.threshold) == ("all68", 0.0, 0.3)
    assert not fixed.other_person(base, base)
    with pytest.raises(Exception, match="same-person and different-person"):
        E.LineupRule.calibrate([], different)
    assert E.pair_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and E.pair_auc([0.3], [0.3]) == 0.5
