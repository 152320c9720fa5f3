"""SIDeR diffusion backend: the real loading + DDIM inversion/regeneration + search code path on a
tiny random diffusers model built from a config (CPU, float32)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from edgeray.config import load_config
from edgeray.errors import UserError
from serving.sider.config import SiderConfig


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("tiny_diffusion")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, layers_per_block=1, sample_size=32).save_pretrained(root / "vae")
    UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                norm_num_groups=8).save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def tiny_vq_weights(tmp_path_factory, tiny_weights):
    """The CompVis/ldm-celebahq-256 layout (vqvae/ + unet/ + scheduler/), tiny and random."""
    import shutil

    from diffusers import VQModel

    root = tmp_path_factory.mktemp("tiny_ldm")
    torch.manual_seed(0)
    VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=8, num_vq_embeddings=32, sample_size=32).save_pretrained(root / "vqvae")
    shutil.copytree(tiny_weights / "unet", root / "unet")
    shutil.copytree(tiny_weights / "scheduler", root / "scheduler")
    return root


def _config(weights, *extra):
    return load_config(SiderConfig, overrides=[
        "backend=diffusion", f"diffusion.weights_dir={weights}", "diffusion.device=cpu",
        "diffusion.dtype=float32", "diffusion.resolution=32", "diffusion.inversion_steps=4",
        "diffusion.latent_directions=4", "diffusion.direction_candidates=2", "search.steps=2", "crypto.argon2_memory_kib=8192",
        "crypto.argon2_iterations=1", *extra])


def test_ddim_inversion_mirrors_regeneration(tiny_weights):
    from serving.sider.diffusion import DiffusionBackend

    backend = DiffusionBackend(_config(tiny_weights, "diffusion.directions=random").diffusion)
    assert backend.timesteps == [0, 25]       # strength 0.5 of 4 steps over 100 train steps
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    noised = backend.invert(latent)
    assert not torch.allclose(noised, latent)
    # deterministic DDIM: regenerating the inverted latent comes back close to where it started
    assert torch.allclose(backend.regenerate(noised), latent, atol=0.35)


def test_diffusion_backend_protects_and_restores(tiny_weights):
    from serving.sider.service import SiderService

    service = SiderService(_config(tiny_weights))
    assert service.health()["backend"] == "diffusion"
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    out = service.protect(buf.getvalue(), "otter lamp quartz 91", n_samples=1, gamma=0.5, seed=0, embed="chunk")
    sample = out["samples"][0]
    assert out["backend"] == "diffusion" and sample["ssim_face"] < 1.0
    import base64
    protected = base64.b64decode(sample["image_b64"])
    pixels = np.asarray(Image.open(io.BytesIO(protected)).convert("RGB"))
    top, left, bottom, right = sample["region"]
    outside = np.ones(pixels.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(pixels[outside], data.astronaut()[outside])
    restored = service.restore(protected, "otter lamp quartz 91")
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(restored["image_b64"]))).convert("RGB"))
    assert np.array_equal(original, data.astronaut())


def test_diffusion_backend_needs_its_folders(tmp_path):
    from serving.sider.diffusion import DiffusionBackend

    with pytest.raises(UserError, match=r"vae/ \(or vqvae/\), unet/ and scheduler/"):
        DiffusionBackend(_config(tmp_path).diffusion)


@pytest.mark.parametrize("layout", ["kl", "vq"])
def test_identity_directions_keep_the_candidates_the_evaluator_is_least_sensitive_to(tiny_weights, tiny_vq_weights,
                                                                                   layout):
    from serving.sider.anonymize import head_region
    from serving.sider.service import SiderService

    weights = tiny_weights if layout == "kl" else tiny_vq_weights
    service = SiderService(_config(weights))              # directions=identity is the default
    backend = service.backend
    assert backend.kind == ("vae" if layout == "kl" else "vqvae")
    image = data.astronaut()
    face = service.faces.detect(image)[0]
    gen = backend.generator(image, head_region(face, image.shape, service.cfg.head_scale), 0, face=face)
    assert gen.dim == 4 and gen.directions.shape[0] == 4 and len(gen.candidate_scores) == 8
    finite = sorted(x for x in gen.candidate_scores if np.isfinite(x))
    kept = sorted(gen.direction_scores)
    assert kept == sorted(gen.candidate_scores)[:4]        # the 4 lowest of the 8 candidates
    assert not finite or kept[0] == finite[0]
    random = SiderService(_config(weights, "diffusion.directions=random")).backend
    assert random.generator(image, head_region(face, image.shape, 1.6), 0, face=face).direction_scores == []


def test_the_vq_layout_protects_and_restores(tiny_vq_weights):
    from serving.sider.service import SiderService

    service = SiderService(_config(tiny_vq_weights))
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    out = service.protect(buf.getvalue(), "otter lamp quartz 91", n_samples=1, gamma=0.5, seed=0)
    assert out["backend"] == "diffusion" and out["published"] is True
    import base64
    protected = base64.b64decode(out["samples"][0]["image_b64"])
    restored = service.restore(protected, "otter lamp quartz 91", out["samples"][0]["restore_token"])
    original = np.asarray(Image.open(io.BytesIO(base64.b64decode(restored["image_b64"]))).convert("RGB"))
    assert np.array_equal(original, data.astronaut())
