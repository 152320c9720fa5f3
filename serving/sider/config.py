"""SIDeR configuration (one dataclass per section; see docs/sider.md for the reference).

Every rule marked OUR RECONSTRUCTION in the method files is a named choice here, so it can be
switched off or replaced from YAML or `--set sider.search.step_rule=plain_sign`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeray.config import param, section
from edgeray.errors import UserError

VIEWS = ("chip5_pad25", "chip5_flip", "chip68_pad40", "chip68_pad10")


@dataclass
class FacesConfig:
    """The offline face stack: dlib detector, landmarks and the ResNet 128-d recognizer."""
    models_dir: str = param("", "directory holding the face_recognition_models *.dat files; empty = "
                                "data/face_recognition_models/models under the repo, then the installed "
                                "face_recognition_models package (found with importlib.util.find_spec)")
    upsample: int = param(1, "HOG detector upsampling passes (1 finds faces down to ~40 px)", ge=0, le=2)
    detect_threshold: float = param(0.5, "minimum HOG detection score for a face", ge=-1.0, le=3.0)
    max_faces: int = param(4, "more detected faces than this is a refusal (200, published=false, too_many_faces)",
                           ge=1, le=16)
    min_face_px: int = param(40, "smaller detections are ignored", ge=16)
    threshold: float = param(0.6, "same-identity threshold on the dlib Euclidean distance", gt=0, le=2)
    recall_upsample: int = param(2, "second, higher-recall detection pass (fail closed): HOG upsampling",
                                 ge=0, le=3)
    recall_threshold: float = param(-0.1, "second pass: HOG score threshold (lower = more recall, more "
                                    "false alarms; the astronaut photo has a false alarm at -0.14)",
                                    ge=-1.0, le=3.0)
    cnn_max_side: int = param(0, "also run dlib's MMOD CNN detector on the image shrunk to this side in the "
                              "second pass (0 = off; ~2-9 s on 2 CPU cores at 384 px)", ge=0, le=2048)
    unprotected: str = param("refuse", "a face found by either pass that cannot be protected (too small, "
                             "not matched by the first pass, or the search could not change it): refuse = "
                             "nothing published, 200 with published=false and refused.error="
                             "unprotected_face naming its box; blur = pixelate it "
                             "(restorable with the rest)", choices=("refuse", "blur"))
    evaluator_view: str = param("chip5_pad25", "view used by /verify and reported identity_distance "
                                "(the standard face_recognition pipeline)", choices=VIEWS)


@dataclass
class SearchConfig:
    """Momentum black-box search over the appearance space (OUR RECONSTRUCTION of the paper's
    momentum-based latent optimization with ensemble identity losses)."""
    steps: int = param(10, "search iterations per sample (2 evaluations each)", ge=1, le=500)
    step_size: float = param(0.15, "sign-step size eta in parameter space", gt=0)
    probe: float = param(0.15, "SPSA probe radius c", gt=0)
    momentum: float = param(0.9, "MI-FGSM momentum mu", ge=0, lt=1)
    step_rule: str = param("momentum_sign", "update rule: MI-FGSM momentum on L1-normalized gradient "
                           "estimates + sign step, or a plain sign step (no momentum)",
                           choices=("momentum_sign", "plain_sign"))
    identity_loss: str = param("linear", "identity term: linear = mean distance / margin (always pulls "
                               "toward the identity), hinge = only the part above the margin",
                               choices=("linear", "hinge"))
    identity_margin: float = param(0.5, "a sample is accepted only if every ensemble member's "
                                   "distance stays below this (the 0.6 threshold leaves slack for "
                                   "re-detection)", gt=0, le=1.5)
    ensemble: list[str] = param(["chip5_pad25", "chip5_flip", "chip68_pad40"],
                                "recognizer views in the identity loss (one dlib ResNet seen through "
                                f"different alignments/flips); allowed: {', '.join(VIEWS)}")
    backoff: float = param(0.7, "when both probes of a step are infeasible, theta <- start + backoff * "
                           "(theta - start); 1.0 switches the back-off off (plain MI-FGSM)", gt=0, le=1)
    extrapolate: list[float] = param([1.25, 1.5, 2.0], "after the search, the best feasible change "
                                     "(theta - start) is also evaluated scaled by these; [] = off")
    select: str = param("feasible_best", "which iterate is returned: the most changed one that keeps "
                        "identity under every ensemble member, or simply the last one",
                        choices=("feasible_best", "last"))
    detect_slack: float = param(0.1, "the face's HOG score must stay this far above the detection "
                                "threshold for a sample to be accepted (and is penalized below it)", ge=0)
    detect_weight: float = param(3.0, "weight of the detection-score penalty in the loss", ge=0)
    min_change: float = param(0.3, "a face whose returned change term is below this counts as not "
                              "protected (faces.unprotected decides); morph: shape distance / 0.1 + "
                              "texture term, classical/diffusion: 1 - SSIM", ge=0)
    verify_candidates: int = param(8, "most-changed feasible candidates re-checked with full-image "
                                   "detection (the in-loop check runs on a crop, whose HOG scores differ)",
                                   ge=1, le=32)

    def validate(self) -> None:
        bad = [v for v in self.ensemble if v not in VIEWS]
        if bad or not self.ensemble:
            raise UserError(f"sider.search.ensemble={self.ensemble!r} is not allowed; use a non-empty "
                            f"list of: {', '.join(VIEWS)}")


@dataclass
class ClassicalConfig:
    """The CPU appearance space: colour field, texture, warp and palette blending on the head."""
    colour_grid: int = param(3, "colour field control points per side", ge=1, le=16)
    colour_amplitude: float = param(70.0, "max colour shift (0-255 levels)", ge=0, le=255)
    texture_bases: int = param(4, "random band-pass texture patterns per sample (seeded)", ge=0, le=16)
    texture_amplitude: float = param(25.0, "max texture amplitude (0-255 levels)", ge=0, le=255)
    warp_grid: int = param(3, "warp field control points per side", ge=1, le=16)
    warp_pixels: float = param(5.0, "max warp displacement in pixels", ge=0, le=32)
    palette_colours: int = param(4, "colours of the seeded flat palette the head is blended toward", ge=2, le=16)
    blend_grid: int = param(2, "blend-weight control points per side", ge=1, le=8)


@dataclass
class MorphConfig:
    """The CPU landmark-morph backend (serving/sider/morph.py): the face's shape moves toward the
    mean shape of k donors of other identities, per facial component; optional Poisson-blended
    donor texture. OUR RECONSTRUCTION (k-Same + Delaunay morph), not the paper's generator."""
    donors_dir: str = param("data/sider_faces", "folder of photos of other people (one face per identity is "
                            "kept); relative paths are tried from the current directory, then the repo root")
    donors_k: int = param(2, "donors averaged per sample (k-Same)", ge=1, le=8)
    donor_pick: str = param("farthest", "which donors: farthest = the k whose 68-point shape is farthest "
                            "(Procrustes) from the subject's; spread = the seed draws k among the farther "
                            "half (more diverse samples, smaller moves)", choices=("farthest", "spread"))
    max_pose_gap: float = param(0.3, "donors whose head-turn proxy (morph.pose_asymmetry, 0 frontal, "
                                "~0.9 profile) differs from the subject's by more are skipped; >= 2 = off",
                                ge=0, le=2)
    mirror_donors: bool = param(True, "each donor face also serves left-right mirrored (same person, "
                                "turned the other way)")
    max_fraction: float = param(1.0, "largest move of a component toward the donors' shape "
                                "(1 = all the way)", gt=0, le=1.5)
    max_texture: float = param(0.6, "largest donor-texture blend fraction (0 = geometry only)", ge=0, le=1)
    texture_weight: float = param(0.5, "weight of the texture fraction in the change term", ge=0)
    warp: str = param("tps", "landmark warp: tps (thin-plate spline, smooth) or delaunay (piecewise affine "
                      "on Delaunay triangles)", choices=("tps", "delaunay"))
    feather_px: float = param(6.0, "feathering of the inner-face mask for the texture blend", ge=0)


@dataclass
class DiffusionConfig:
    """Diffusion backend (GPU): DDIM inversion of the head crop in a VAE latent, then recomposition
    along a low-dimensional latent offset found by the same momentum search."""
    weights_dir: str = param("", "local diffusers folder with vae/ (AutoencoderKL) or vqvae/ (VQModel, e.g. "
                                 "CompVis/ldm-celebahq-256), unet/ (UNet2DModel over latents) and scheduler/ "
                                 "(DDIM); required when backend=diffusion")
    resolution: int = param(256, "head crop side fed to the VAE", ge=16, le=1024)
    inversion_steps: int = param(20, "DDIM steps of the inversion / regeneration", ge=1, le=200)
    strength: float = param(0.5, "fraction of the schedule inverted (0 = no change, 1 = pure noise)", gt=0, le=1)
    latent_directions: int = param(16, "latent directions the search moves along", ge=1, le=256)
    directions: str = param("identity", "how the directions are chosen: identity = the latent_directions of "
                            "direction_candidates x as many seeded candidates along which the evaluator's "
                            "identity distance grows least per unit of visual change (OUR RULE); random = "
                            "seeded random directions", choices=("identity", "random"))
    direction_candidates: int = param(4, "identity directions: candidates drawn per kept direction", ge=1, le=16)
    latent_amplitude: float = param(1.0, "max offset along each direction (latent std units)", gt=0)
    device: str = param("cuda", "torch device, e.g. cuda, cuda:1, cpu")
    dtype: str = param("float16", "torch dtype of the models", choices=("float16", "bfloat16", "float32"))


@dataclass
class CryptoConfig:
    """Restoration envelope: password KDF -> AES-256-GCM, AAD bound to the protected pixels."""
    kdf: str = param("argon2id", "password KDF (scrypt is the fallback when OpenSSL lacks Argon2)",
                     choices=("argon2id", "scrypt"))
    argon2_memory_kib: int = param(65536, "Argon2id memory cost in KiB", ge=8192, le=1048576)
    argon2_iterations: int = param(3, "Argon2id passes", ge=1, le=10)
    scrypt_log2_n: int = param(15, "scrypt cost n = 2**this", ge=10, le=20)
    min_password_bytes: int = param(12, "protect: passphrases of fewer characters (Unicode code points as sent, so "
                                    "at least this many UTF-8 bytes; the schema's minLength) are a 422 "
                                    "invalid_password", ge=1)
    min_password_bits: float = param(40.0, "protect: passphrases whose estimated entropy (crypto."
                                     "estimate_entropy_bits, a crude character-class estimate; OUR "
                                     "policy) is below this are refused: 200, published=false, "
                                     "refused.error=weak_password (JSON Schema cannot state it)", ge=0)
    pepper_file: str = param("", "optional server-side pepper: a file of >= 16 secret bytes the deployment "
                             "holds; the key becomes HMAC(pepper, KDF(password)), so a leaked image cannot "
                             "be attacked offline, but restoring needs this server (or the file)")
    max_concurrent_kdf: int = param(2, "KDF runs at once per replica (each holds its memory cost)", ge=1, le=64)
    kdf_wait_s: float = param(30.0, "a request waiting longer than this for a KDF slot gets 429", gt=0)
    max_password_bytes: int = param(1024, "passwords of more than this // 4 characters (so at most this "
                                    "many UTF-8 bytes; the schema's maxLength) are a 422", ge=8, le=65536)


@dataclass
class LimitsConfig:
    """Request limits: bigger bodies are a 413, bigger images a 413, other formats a 415."""
    max_body_bytes: int = param(12 * 1024 * 1024, "whole request body (base64 JSON included)", ge=1024)
    max_image_bytes: int = param(8 * 1024 * 1024, "one decoded image file", ge=1024)
    max_side: int = param(2048, "max image width or height in pixels", ge=64, le=16384)
    max_pixels: int = param(2048 * 2048, "max width*height", ge=4096)
    formats: list[str] = param(["PNG", "JPEG", "WEBP"], "accepted image formats (Pillow names)")
    max_samples: int = param(4, "max n_samples per protect request", ge=1, le=16)


@dataclass
class SiderConfig:
    """SIDeR service."""
    backend: str = param("morph", "anonymization backend: morph (CPU, landmark morph toward donors; the "
                         "default), classical (CPU colour/texture, kept for comparison), diffusion (local "
                         "diffusers weights)", choices=("morph", "classical", "diffusion"))
    default_gamma: float = param(0.5, "semantic-visual balancing factor when the request gives none",
                                 ge=0, le=1)
    head_scale: float = param(1.7, "edited region = face box scaled by this (covers forehead, cheeks); "
                              "both backends change only this region", ge=1.0, le=3.0)
    faces: FacesConfig = section(FacesConfig)
    search: SearchConfig = section(SearchConfig)
    classical: ClassicalConfig = section(ClassicalConfig)
    morph: MorphConfig = section(MorphConfig)
    diffusion: DiffusionConfig = section(DiffusionConfig)
    crypto: CryptoConfig = section(CryptoConfig)
    limits: LimitsConfig = section(LimitsConfig)

    def validate(self) -> None:
        if self.backend == "diffusion" and not self.diffusion.weights_dir:
            raise UserError("sider.backend=diffusion needs sider.diffusion.weights_dir: a local diffusers "
                            "folder with vae/ (or vqvae/), unet/ and scheduler/")
        if self.search.identity_margin >= self.faces.threshold:
            raise UserError(f"sider.search.identity_margin={self.search.identity_margin} must be below "
                            f"sider.faces.threshold={self.faces.threshold}")
