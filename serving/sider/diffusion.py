"""Diffusion backend: semantic recomposition of the head in a VAE latent (GPU; any device works).

OUR RECONSTRUCTION of SIDeR's generator (the paper names momentum-based latent optimization and
semantic guidance but not the backbone): the head crop is encoded by the autoencoder, DDIM-inverted
to `strength` of the schedule with an unconditional latent UNet2DModel, shifted along a
low-dimensional set of latent directions (theta = the coordinates, tanh-bounded), regenerated with
deterministic DDIM and decoded. The same momentum search as the CPU backend (anonymize.py) drives
theta, so the identity ensemble and gamma work identically; the recomposition through the
denoiser is what keeps the result on the model's image manifold (the "semantic" part).

Edit directions (`diffusion.directions`): `identity` (default) draws `direction_candidates` x k seeded
latent directions, renders each at full amplitude, and keeps the k along which the evaluator's dlib
identity distance grows least per unit of visual change (1 - SSIM of the head crop): directions the
identity objective is blind to, so the search spends its budget on appearance, not on fighting the
recognizer (OUR RULE). `random` = the k seeded directions as drawn (the part-1 rule).

Weights come only from a local folder (`sider.diffusion.weights_dir`) in diffusers layout:
    vae/ (AutoencoderKL) or vqvae/ (VQModel)   unet/ (UNet2DModel over the latents)   scheduler/ (DDIM)
`vqvae/ + unet/ + scheduler/` is the layout of the public face LDM CompVis/ldm-celebahq-256 (VQ
autoencoder, latents used unscaled as in diffusers' LDMPipeline); `vae/` the KL layout (latents times
the VAE's scaling_factor). No hub access. Tests build tiny random models of both layouts.
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

    def __init__(self, cfg: DiffusionConfig, faces=None):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

        root = Path(cfg.weights_dir)
        auto = "vqvae" if (root / "vqvae").is_dir() and not (root / "vae").is_dir() else "vae"
        missing = [sub for sub in (auto, "unet", "scheduler") if not (root / sub).is_dir()]
        if missing:
            raise UserError(f"sider.diffusion.weights_dir={cfg.weights_dir!r} lacks {', '.join(missing)}/; "
                            f"it must be a local diffusers folder with vae/ (or vqvae/), unet/ and scheduler/")
        if cfg.directions == "identity" and faces is None:
            raise UserError("sider.diffusion.directions=identity needs the face stack (the identity evaluator)")
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"sider.diffusion.device={cfg.device!r} but no CUDA GPU is visible; "
                            f"set sider.diffusion.device=cpu (slow) or use backend=classical")
        self.cfg, self.faces, self.kind = cfg, faces, auto
        self.device, self.dtype = torch.device(cfg.device), _DTYPES[cfg.dtype]
        model = VQModel if auto == "vqvae" else AutoencoderKL
        self.vae = model.from_pretrained(root / auto, torch_dtype=self.dtype).to(self.device).eval()
        self.unet = UNet2DModel.from_pretrained(root / "unet", torch_dtype=self.dtype).to(self.device).eval()
        scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
        self.alphas = scheduler.alphas_cumprod.to(torch.float32)
        train_steps = scheduler.config.num_train_timesteps
        n_edit = max(1, round(cfg.inversion_steps * cfg.strength))
        stride = train_steps // cfg.inversion_steps
        self.timesteps = [i * stride for i in range(n_edit)]  # ascending: the inversion order
        self.scale = 1.0 if auto == "vqvae" else float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vqvae":
            return self.vae.encode(x.to(self.device, self.dtype)).latents.float()
        return self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean.float()

    def generator(self, image: np.ndarray, region: Region, seed: int, face=None) -> "DiffusionGenerator":
        return DiffusionGenerator(self, image, region, np.random.default_rng(seed), face)

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
    def __init__(self, backend: DiffusionBackend, image: np.ndarray, region: Region, rng: np.random.Generator,
                 face=None):
        self.b, self.image, self.region = backend, image, region
        crop = torch.from_numpy(image[region.slices].astype(np.float32)).permute(2, 0, 1)[None]
        self.crop = crop
        self.h, self.w = crop.shape[-2:]
        self.mask = torch.from_numpy(region.mask()).permute(2, 0, 1)[None]
        side = backend.cfg.resolution
        x = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False) / 127.5 - 1
        self.noised = backend.invert(backend.encode(x) * backend.scale)
        k = backend.cfg.latent_directions
        n = k * (backend.cfg.direction_candidates if backend.cfg.directions == "identity" else 1)
        directions = torch.from_numpy(rng.standard_normal((n, *self.noised.shape[1:])).astype(np.float32))
        self.directions = (directions * self.noised.std().cpu()).to(backend.device)
        self.dim = k
        self.direction_scores: list[float] = []
        if backend.cfg.directions == "identity":
            self._keep_identity_blind_directions(face, k)

    def _keep_identity_blind_directions(self, face, k: int) -> None:
        """Score every candidate direction by the evaluator's identity distance per unit of visual
        change when rendered at full amplitude (a lost face scores inf), keep the k lowest."""
        from serving.sider.anonymize import ssim

        faces = self.b.faces
        reference = (faces.embeddings(self.image, face, [faces.cfg.evaluator_view])[0] if face is not None
                     else faces.identity(self.image)[1])
        all_dirs, scores = self.directions, []
        crop = self.image[self.region.slices]
        for i in range(len(all_dirs)):
            self.directions = all_dirs[i:i + 1]
            rendered = self._render_coords(torch.ones(1, device=self.b.device) * self.b.cfg.latent_amplitude)
            change = 1.0 - ssim(rendered[self.region.slices], crop)
            found = faces.detect(rendered)
            if not found or change <= 1e-6:
                scores.append(float("inf"))
                continue
            emb = faces.embeddings(rendered, found[0], [faces.cfg.evaluator_view])[0]
            scores.append(float(np.linalg.norm(emb - reference)) / change)
        order = np.argsort(scores, kind="stable")[:k]
        self.directions = all_dirs[torch.from_numpy(np.sort(order)).to(all_dirs.device)]
        self.direction_scores = [scores[i] for i in np.sort(order)]
        self.candidate_scores = scores

    def initial(self, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, 0.05, self.dim)

    def render(self, theta: np.ndarray) -> np.ndarray:
        b = self.b
        return self._render_coords(torch.from_numpy(np.tanh(theta).astype(np.float32)).to(b.device)
                                   * b.cfg.latent_amplitude)

    def _render_coords(self, coords: torch.Tensor) -> np.ndarray:
        b = self.b
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
