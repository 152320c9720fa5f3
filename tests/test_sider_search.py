"""SIDeR anonymization: the momentum search on toy objectives, its named switches, the face stack
on scikit-image's astronaut and the service's input checks (no Ray)."""

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from edgeray.config import load_config
from edgeray.errors import UserError
from serving.sider import anonymize as A
from serving.sider.config import SearchConfig, SiderConfig
from serving.sider.faces import box_iou, find_models_dir

FAST = ["search.steps=4", "crypto.argon2_memory_kib=8192", "crypto.argon2_iterations=1"]
STRONG = "otter lamp quartz 91"


def _toy(loss_fn, feasible_fn):
    def evaluate(thetas):
        return [A.Evaluation(t, float(loss_fn(t)), 0.0, np.array([np.linalg.norm(t)]), bool(feasible_fn(t)))
                for t in thetas]
    return evaluate


@pytest.mark.parametrize("rule", ["momentum_sign", "plain_sign"])
def test_momentum_search_descends_a_toy_loss(rule):
    target = np.linspace(-1, 1, 8)
    cfg = SearchConfig(steps=60, step_size=0.05, probe=0.1, step_rule=rule, backoff=1.0, extrapolate=[])
    trace = A.momentum_search(_toy(lambda t: np.sum((t - target) ** 2), lambda t: True), 8, cfg,
                              np.random.default_rng(0))
    assert len(trace.evaluations) == 2 * 60 + 1
    assert trace.evaluations[-1].loss < 0.25 * np.sum(target ** 2)


def test_momentum_rides_over_one_contrary_estimate():
    """MI-FGSM: after several consistent gradient estimates one contrary estimate does not flip the
    step (with momentum), while the plain sign rule follows it."""
    def run(rule):
        calls = {"n": 0}

        def evaluate(thetas):
            calls["n"] += 1
            slope = -1.0 if calls["n"] == 6 else 1.0          # step 6 sees the opposite slope
            return [A.Evaluation(t, float(slope * t.sum()), 0.0, np.zeros(1), True) for t in thetas]

        cfg = SearchConfig(steps=6, step_size=0.1, probe=0.1, step_rule=rule, momentum=0.9, backoff=1.0,
                           extrapolate=[])
        return A.momentum_search(evaluate, 1, cfg, np.random.default_rng(0)).evaluations[-1].theta[0]
    assert run("momentum_sign") == pytest.approx(-0.6)
    assert run("plain_sign") == pytest.approx(-0.4)


def test_backoff_keeps_the_search_near_the_feasible_set():
    def run(backoff):
        cfg = SearchConfig(steps=60, step_size=0.1, probe=0.05, backoff=backoff, extrapolate=[])
        trace = A.momentum_search(_toy(lambda t: -np.sum(t), lambda t: np.linalg.norm(t) < 1.0), 6, cfg,
                                  np.random.default_rng(1))
        return np.mean([e.feasible for e in trace.evaluations])
    assert run(0.5) > run(1.0) + 0.3


def test_extrapolation_finds_a_larger_feasible_change():
    def evaluate(thetas):
        return [A.Evaluation(t, float(-t.sum()), float(np.linalg.norm(t)), np.zeros(1),
                             bool(np.linalg.norm(t) < 2.0)) for t in thetas]

    def best(extrapolate):
        cfg = SearchConfig(steps=5, step_size=0.05, probe=0.01, extrapolate=extrapolate)
        trace = A.momentum_search(evaluate, 4, cfg, np.random.default_rng(0))
        return max(e.visual for e in trace.evaluations if e.feasible)
    assert best([]) < 1.0 < best([1.5, 2.0, 4.0]) < 2.0


def test_identity_term_rules():
    d = np.array([0.2, 0.5])
    assert A.identity_term(d, 0.4, "linear") == pytest.approx(0.35 / 0.4)
    assert A.identity_term(d, 0.4, "hinge") == pytest.approx(10 * 0.05 / 0.4)
    assert A.identity_term(np.array([0.1, 0.3]), 0.4, "hinge") == 0.0


def test_config_rejects_bad_choices(tmp_path):
    with pytest.raises(UserError, match="ensemble"):
        load_config(SiderConfig, overrides=["search.ensemble=[chip9]"])
    with pytest.raises(UserError, match="identity_margin"):
        load_config(SiderConfig, overrides=["search.identity_margin=0.7"])
    with pytest.raises(UserError, match="weights_dir"):
        load_config(SiderConfig, overrides=["backend=diffusion"])
    with pytest.raises(UserError, match="did you mean"):
        load_config(SiderConfig, overrides=["search.stpes=3"])
    with pytest.raises(UserError, match="scripts/assets/sider.sh"):
        find_models_dir(str(tmp_path))


def test_config_files_load():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("sider*.yaml")):
        load_config(SiderConfig, path)


@pytest.fixture(scope="module")
def service():
    from serving.sider.service import SiderService
    return SiderService(load_config(SiderConfig, overrides=FAST))


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_face_stack_finds_the_astronaut_and_rejects_others(service):
    astronaut = data.astronaut()
    faces = service.faces.detect(astronaut)
    assert len(faces) == 1 and box_iou(faces[0].box, (175, 76, 265, 166)) > 0.7
    flipped = np.ascontiguousarray(astronaut[:, ::-1])
    assert service.faces.distance(astronaut, flipped) < 0.6          # same person
    assert service.faces.distance(astronaut, astronaut) == 0.0
    region = A.head_region(faces[0], astronaut.shape, 1.7)
    assert region.top >= 1 and region.bottom <= 512                    # row 0 is the locator's


@pytest.mark.parametrize("select", ["feasible_best", "last"])
def test_anonymizer_returns_changed_faces(service, select):
    astronaut = data.astronaut()
    faces = service.faces.detect(astronaut)
    search = SearchConfig(steps=4, select=select)
    anonymizer = A.Anonymizer(service.faces, service.backend, search, 1.7)
    samples = anonymizer.anonymize(astronaut, faces, 2, 0.5, seed=3)
    assert len(samples) == 2 and not np.array_equal(samples[0].image, samples[1].image)  # diverse seeds
    for sample in samples:
        region = sample.regions[0]
        outside = np.ones(astronaut.shape[:2], bool)
        outside[region.slices] = False
        assert np.array_equal(sample.image[outside], astronaut[outside])   # only the head changes
        assert sample.ssim_face < 1.0
        if select == "feasible_best" and sample.identity_distance is not None:
            assert max(sample.ensemble_distances[0]) < search.identity_margin
            assert sample.identity_kept


def test_service_input_checks(service):
    from serving.sider.service import ApiError

    def status(fn, *args):
        with pytest.raises(ApiError) as info:
            fn(*args)
        return info.value.status, info.value.code

    png = _png(data.astronaut())
    assert status(service.decode_image, b"not an image") == (422, "invalid_image")
    assert status(service.decode_image, png[: len(png) // 2]) == (422, "invalid_image")
    gif = io.BytesIO()
    Image.fromarray(data.astronaut()).save(gif, format="GIF")
    assert status(service.decode_image, gif.getvalue()) == (415, "unsupported_format")
    huge = _png(np.zeros((3000, 100, 3), np.uint8))
    assert status(service.decode_image, huge) == (413, "too_large")
    assert status(service.protect, png, "") == (422, "invalid_password")
    assert status(service.protect, png, "x" * 2000) == (422, "invalid_password")
    assert status(service.protect, png, "password123") == (422, "invalid_password")        # 11 characters
    assert status(service.protect, png, STRONG, 9) == (422, "invalid_request")
    # content the schema cannot describe: 200, nothing published, the reason named
    weak = service.protect(png, "aaaaaaaaaaaaaaaaaaaa")                                      # low entropy
    assert (weak["published"], weak["samples"], weak["refused"]["error"]) == (False, [], "weak_password")
    blank = service.protect(_png(np.full((128, 128, 3), 90, np.uint8)), STRONG)
    assert (blank["published"], blank["refused"]["error"]) == (False, "no_face_detected")


def test_many_faces_are_refused(service):
    face = data.astronaut()[30:230, 120:320]
    tiled = np.concatenate([np.concatenate([face] * 3, axis=1)] * 2, axis=0)   # 6 faces
    assert len(service.faces.detect(tiled)) > service.cfg.faces.max_faces
    out = service.protect(_png(tiled), STRONG)
    assert out["published"] is False and out["samples"] == [] and out["refused"]["error"] == "too_many_faces"
    assert len(out["refused"]["boxes"]) > service.cfg.faces.max_faces


def test_app_builder_args_and_serve_deploy_config():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.sider.app import app_builder

    with pytest.raises(UserError, match="unknown sider app args"):
        app_builder({"replicas": 2})
    with pytest.raises(UserError, match="integers"):
        app_builder({"num_replicas": "two"})
    with pytest.raises(UserError, match="config file not found"):
        app_builder({"config": "configs/nope.yaml"})
    # strings, as `serve run ... key=value` passes them; ';'-separated overrides
    app_builder({"config": "configs/sider.yaml", "set": "search.steps=2;faces.max_faces=1", "num_cpus": "0"})
    root = Path(__file__).resolve().parents[1]
    deploy_yaml = yaml.safe_load((root / "serving/sider/serve_config.yaml").read_text())
    deploy = ServeDeploySchema.model_validate(deploy_yaml)
    (application,) = deploy.applications
    assert application.import_path == "serving.sider.app:app_builder" and application.route_prefix == "/sider"
    app_builder(application.args)
