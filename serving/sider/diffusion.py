"""Diffusion backend: semantic recomposition of the head in a VAE latent (GPU; any device works).

OUR RECONSTRUCTION of SIDeR's generator (the paper names momentum-based latent optimization and
semantic guidance but not the backbone): the head crop is encoded by an AutoencoderKL, DDIM-inverted
to `strength` of the schedule with an unconditional latent UNet2DModel, shifted along a seeded
low-dimensional set of latent directions (theta = the coordinates, tanh-bounded), regenerated with
deterministic DDIM and decoded. The same momentum search as the CPU backend (anonymize.py) drives
theta, so the identity ensemble and gamma work identically; the recomposition through the
denoiser is what keeps the result on the model's image manifold (the "semantic" part).

Weights come only from a local folder (`sider.diffusion.weights_dir`) in diffusers layout:
    vae/ (AutoencoderKL)   unet/ (UNet2DModel over the VAE latents)   scheduler/ (DDIMScheduler)
No hub access. Tests build a tiny random model of that layout from a config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeray.errors import UserError
from serving.sider.anonymize import Region
from serving.sider.config import DiffusionConfig

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class DiffusionBackend:
    name = "diffusion"

    def __init__(self, cfg: DiffusionConfig):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

        root = Path(cfg.weights_dir)
        missing = [sub for sub in ("vae", "unet", "scheduler") if not (root / sub).is_dir()]
        if missing:
            raise UserError(f"sider.diffusion.weights_dir={cfg.weights_dir!r} lacks {', '.join(missing)}/; "
                            f"it must be a local diffusers folder with vae/, unet/ and scheduler/")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"sider.diffusion.device={cfg.device!r} but no CUDA GPU is visible; "
                            f"set sider.diffusion.device=cpu (slow) or use backend=classical")
        self.cfg = cfg
        self.device, self.dtype = torch.device(cfg.device), _DTYPES[cfg.dtype]
        self.vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=self.dtype).to(self.device).eval()
        self.unet = UNet2DModel.from_pretrained(root / "unet", torch_dtype=self.dtype).to(self.device).eval()
        scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
        self.alphas = scheduler.alphas_cumprod.to(torch.float32)
        train_steps = scheduler.config.num_train_timesteps
        n_edit = max(1, round(cfg.inversion_steps * cfg.strength))
        stride = train_steps // cfg.inversion_steps
        self.timesteps = [i * stride for i in range(n_edit)]  # ascending: the inversion order
        self.scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def generator(self, image: np.ndarray, region: Region, seed: int, face=None) -> "DiffusionGenerator":
        return DiffusionGenerator(self, image, region, np.random.default_rng(seed))

    @torch.no_grad()
    def _eps(self, latent: torch.Tensor, t: int) -> torch.Tensor:
        return self.unet(latent.to(self.dtype), torch.tensor([t], device=self.device)).sample.float()

    def _alpha(self, t: int | None) -> float:
        return 1.0 if t is None else float(self.alphas[t])

    @torch.no_grad()
    def invert(self, latent: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM inversion: clean latent -> latent at the last edit timestep."""
        steps = [None] + self.timesteps
        for prev, t in zip(steps[:-1], steps[1:]):
            eps = self._eps(latent, t if prev is None else prev)
            latent = _ddim_move(latent, eps, self._alpha(prev), self._alpha(t))
        return latent

    @torch.no_grad()
    def regenerate(self, latent: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM denoising back to a clean latent (the inversion's mirror)."""
        steps = list(reversed(self.timesteps)) + [None]
        for t, nxt in zip(steps[:-1], steps[1:]):
            latent = _ddim_move(latent, self._eps(latent, t), self._alpha(t), self._alpha(nxt))
        return latent


def _ddim_move(latent: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    x0 = (latent - (1 - alpha_from) ** 0.5 * eps) / alpha_from ** 0.5
    return alpha_to ** 0.5 * x0 + (1 - alpha_to) ** 0.5 * eps


class DiffusionGenerator:
    def __init__(self, backend: DiffusionBackend, image: np.ndarray, region: Region, rng: np.random.Generator):
        self.b, self.image, self.region = backend, image, region
        crop = torch.from_numpy(image[region.slices].astype(np.float32)).permute(2, 0, 1)[None]
        self.crop = crop
        self.h, self.w = crop.shape[-2:]
        self.mask = torch.from_numpy(region.mask()).permute(2, 0, 1)[None]
        side = backend.cfg.resolution
        x = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False) / 127.5 - 1
        with torch.no_grad():
            latent = backend.vae.encode(x.to(backend.device, backend.dtype)).latent_dist.mean.float()
        self.noised = backend.invert(latent * backend.scale)
        k = backend.cfg.latent_directions
        directions = torch.from_numpy(rng.standard_normal((k, *self.noised.shape[1:])).astype(np.float32))
        self.directions = (directions * self.noised.std().cpu()).to(backend.device)
        self.dim = k

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, 0.05, self.dim)

    def render(self, theta: np.ndarray) -> np.ndarray:
        b = self.b
        coords = torch.from_numpy(np.tanh(theta).astype(np.float32)).to(b.device) * b.cfg.latent_amplitude
        latent = self.noised + (coords[:, None, None, None] * self.directions).sum(0, keepdim=True)
        with torch.no_grad():
            clean = b.regenerate(latent) / b.scale
            decoded = b.vae.decode(clean.to(b.dtype)).sample.float().cpu()
        out = F.interpolate((decoded.clamp(-1, 1) + 1) * 127.5, size=(self.h, self.w), mode="bilinear",
                            align_corners=False)
        out = self.mask * out + (1 - self.mask) * self.crop
        image = self.image.copy()
        image[self.region.slices] = out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return image
