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


def _config(weights, *extra):
    return load_config(SiderConfig, overrides=[
        "backend=diffusion", f"diffusion.weights_dir={weights}", "diffusion.device=cpu",
        "diffusion.dtype=float32", "diffusion.resolution=32", "diffusion.inversion_steps=4",
        "diffusion.latent_directions=4", "search.steps=2", "crypto.argon2_memory_kib=8192",
        "crypto.argon2_iterations=1", *extra])


def test_ddim_inversion_mirrors_regeneration(tiny_weights):
    from serving.sider.diffusion import DiffusionBackend

    backend = DiffusionBackend(_config(tiny_weights).diffusion)
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

    with pytest.raises(UserError, match="vae/, unet/ and scheduler/"):
        DiffusionBackend(_config(tmp_path).diffusion)
