"""SIDeR benchmark: identity kept, visual change, restoration, rejection, HTTP latency.

    python bench/sider.py            # full: 8 variants of the astronaut x 2 samples, 1,000 wrong passwords
    python bench/sider.py --quick    # < 2 min, same keys: 3 variants x 1 sample, 12 search steps, 30 tries

Inputs: scikit-image's astronaut and transformed variants (crops, flips, scales, colour shifts).
The method (protect through HTTP on a local Ray Serve app) runs beside two classic baselines on the
same head regions in the same process: Gaussian blur (sigma 6) and pixelation (10 px blocks).
Identity = the built-in evaluator (re-detect, dlib ResNet, distance < 0.6); a held-out view
(68-point alignment, padding 0.10, not in the search ensemble) is reported too. SSIM/PSNR are
measured on the edited head box (mean_ssim) and on the whole image (mean_ssim_full); they are a
proxy for "looks different", not a measure of human anonymity.
Writes bench/results/sider_rows.jsonl, sider_grid.png; prints one JSON line per variant and the
summary JSON line last (with os.getloadavg() before and after).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants(quick: bool) -> dict[str, np.ndarray]:
    from skimage import data
    from skimage.transform import rescale

    a = data.astronaut()

    def scale(img, s):
        return (rescale(img, s, channel_axis=-1, anti_aliasing=True) * 255).round().astype(np.uint8)

    def shift(img, gains, offset=0):
        return np.clip(img.astype(np.float64) * np.array(gains) + offset, 0, 255).astype(np.uint8)

    all_variants = {
        "original": a,
        "hflip": np.ascontiguousarray(a[:, ::-1]),
        "crop_head": np.ascontiguousarray(a[0:320, 60:400]),
        "crop_wide": np.ascontiguousarray(a[10:420, 90:470]),
        "scale_0.6": scale(a, 0.6),
        "scale_1.5": scale(a, 1.5),
        "colour_warm": shift(a, (1.15, 1.0, 0.8)),
        "colour_dark_flip": np.ascontiguousarray(shift(a, (0.7, 0.75, 0.85), -10)[:, ::-1]),
    }
    keep = ("original", "hflip", "colour_warm") if quick else tuple(all_variants)
    return {k: all_variants[k] for k in keep}


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def baseline(pixels: np.ndarray, box: list[int], kind: str) -> np.ndarray:
    top, left, bottom, right = box
    crop = Image.fromarray(pixels[top:bottom, left:right])
    if kind == "blur":
        crop = crop.filter(ImageFilter.GaussianBlur(6))
    else:
        w, h = crop.size
        crop = crop.resize((max(1, w // 10), max(1, h // 10)), Image.BILINEAR).resize((w, h), Image.NEAREST)
    out = pixels.copy()
    out[top:bottom, left:right] = np.asarray(crop)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tries", type=int, default=None, help="wrong-password tries (1000; quick 30)")
    parser.add_argument("--samples", type=int, default=None, help="samples per variant (2; quick 1)")
    parser.add_argument("--set", action="append", default=[], help="SiderConfig override key=value")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    quick = args.quick
    tries = args.tries if args.tries is not None else (30 if quick else 1000)
    n_samples = args.samples or (1 if quick else 2)
    overrides = (["search.steps=12"] if quick else []) + args.set
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    import httpx
    import ray
    from ray import serve

    from edgeray.config import load_config
    from serving.sider import crypto, restoration
    from serving.sider.app import app_builder
    from serving.sider.config import SiderConfig
    from serving.sider.faces import FaceStack

    cfg = load_config(SiderConfig, ROOT / "configs" / "sider.yaml", overrides)
    faces = FaceStack(cfg.faces)
    kdf = crypto.KdfParams.from_config(cfg.crypto, crypto.argon2_available())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"config": str(ROOT / "configs" / "sider.yaml"), "set": overrides, "num_cpus": 0}),
              name="siderbench", route_prefix="/siderbench")
    base = f"http://127.0.0.1:{port}/siderbench"
    client = httpx.Client(base_url=base, timeout=600)
    password = "bench-password-" + os.urandom(4).hex()

    from serving.sider.anonymize import psnr, ssim

    rows, grid_rows, protect_s, restore_s, tokens = [], [], [], [], []
    for name, pixels in variants(quick).items():
        t = time.perf_counter()
        r = client.post("/protect", files={"image": ("v.png", png_bytes(pixels), "image/png")},
                        data={"password": password, "n_samples": str(n_samples), "seed": "11"})
        protect_s.append(time.perf_counter() - t)
        if r.status_code != 200:
            row = {"variant": name, "status": r.status_code, "error": r.json().get("error")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        body = r.json()
        tiles, baseline_tiles = [pixels], []
        for k, sample in enumerate(body["samples"]):
            png = base64.b64decode(sample["image_b64"])
            protected = from_png(png)
            t = time.perf_counter()
            rr = client.post("/restore", files={"image": ("p.png", png, "image/png")}, data={"password": password})
            restore_s.append(time.perf_counter() - t)
            restored = from_png(base64.b64decode(rr.json()["image_b64"])) if rr.status_code == 200 else None
            exact = restored is not None and np.array_equal(restored, pixels)
            top, left, bottom, right = sample["region"]
            face = faces.detect(pixels)[0]
            held_out = None
            found = [f for f in faces.detect(protected) if f.box and _iou(f.box, face.box) > 0.3]
            if found:
                view = ["chip68_pad10"]
                held_out = float(np.linalg.norm(faces.embeddings(pixels, face, view)[0]
                                                - faces.embeddings(protected, found[0], view)[0]))
            row = {"variant": name, "method": "sider", "sample": k,
                   "identity_distance": sample["identity_distance"],
                   "identity_kept": sample["identity_kept"], "held_out_distance": held_out,
                   "ssim_face": sample["ssim_face"], "psnr_face": sample["psnr_face"],
                   "ssim_full": sample["ssim_vs_orig"], "psnr_full": sample["psnr_vs_orig"],
                   "restore_exact": exact, "protect_s": round(protect_s[-1], 3),
                   "restore_s": round(restore_s[-1], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            tiles += [protected] + ([restored] if restored is not None else [])
            tokens.append((protected, base64.b64decode(sample["restore_token"])))
            if k == 0:
                for kind in ("blur", "pixelate"):
                    b = baseline(pixels, [top, left, bottom, right], kind)
                    d = faces.detect(b)
                    match = [f for f in d if _iou(f.box, face.box) > 0.3]
                    view = [cfg.faces.evaluator_view]
                    dist = None if not match else float(np.linalg.norm(
                        faces.embeddings(pixels, face, view)[0] - faces.embeddings(b, match[0], view)[0]))
                    crop = (slice(top, bottom), slice(left, right))
                    brow = {"variant": name, "method": kind, "identity_distance": dist,
                            "identity_kept": dist is not None and dist < cfg.faces.threshold,
                            "ssim_face": round(ssim(b[crop], pixels[crop]), 4),
                            "psnr_face": round(psnr(b[crop], pixels[crop]), 3),
                            "ssim_full": round(ssim(b, pixels), 4), "psnr_full": round(psnr(b, pixels), 3)}
                    rows.append(brow)
                    print(json.dumps(brow), flush=True)
                    baseline_tiles.append(b)
        grid_rows.append(tiles + baseline_tiles)

    # wrong passwords: the real KDF every time (the service's own parameters), distinct passwords
    protected, token = tokens[0]
    t = time.perf_counter()
    rejected = 0
    for i in range(tries):
        try:
            restoration.restore(protected, token, f"wrong-{i}-{os.urandom(3).hex()}".encode(), kdf)
        except crypto.RestoreFailed:
            rejected += 1
    kdf_s = (time.perf_counter() - t) / max(tries, 1)
    # tampering and token moved to another protected image
    rng = np.random.default_rng(0)
    tamper_tries, tamper_rejected = 10, 0
    for _ in range(tamper_tries):
        bad = protected.copy()
        y, x, c = rng.integers(1, bad.shape[0]), rng.integers(0, bad.shape[1]), rng.integers(0, 3)
        bad[y, x, c] ^= 1 << int(rng.integers(0, 8))
        try:
            restoration.restore(bad, token, password.encode(), kdf)
        except crypto.RestoreFailed:
            tamper_rejected += 1
    moved = [(tokens[i][0], tokens[j][1]) for i in range(len(tokens)) for j in range(len(tokens)) if i != j][:10]
    moved_rejected = 0
    for img, tok in moved:
        try:
            restoration.restore(img, tok, password.encode(), kdf)
        except crypto.RestoreFailed:
            moved_rejected += 1

    serve.delete("siderbench")
    serve.shutdown()
    ray.shutdown()

    sider = [r for r in rows if r.get("method") == "sider"]
    failed = [r for r in rows if "status" in r]

    def mean(key, items, method="sider"):
        vals = [r[key] for r in items if r.get("method") == method and r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    def rate(items, method):
        sel = [r for r in items if r.get("method") == method]
        # a protect request that failed (e.g. no face found) counts as a miss for the method
        total = len(sel) + (len(failed) if method == "sider" else 0)
        return round(sum(bool(r["identity_kept"]) for r in sel) / max(total, 1), 4)

    held = [r["held_out_distance"] for r in sider]
    summary = {
        "bench": "sider", "quick": quick, "variants": len(grid_rows) + len(failed), "samples": len(sider),
        "identity_match_rate": rate(rows, "sider"),
        "identity_match_rate_held_out_view": round(sum(d is not None and d < cfg.faces.threshold for d in held)
                                                   / max(len(held), 1), 4),
        "mean_identity_distance": mean("identity_distance", rows),
        "mean_ssim": mean("ssim_face", rows), "mean_psnr": mean("psnr_face", rows),
        "mean_ssim_full": mean("ssim_full", rows), "mean_psnr_full": mean("psnr_full", rows),
        "ssim_le_0.7_and_matched_rate": round(sum(r["identity_kept"] and r["ssim_face"] <= 0.7 for r in sider)
                                              / max(len(sider), 1), 4),
        "restore_exact_rate": round(sum(r["restore_exact"] for r in sider) / max(len(sider), 1), 4),
        "wrong_password_tries": tries, "wrong_password_rejected_rate": round(rejected / max(tries, 1), 4),
        "kdf": kdf.describe(), "kdf_s_per_try": round(kdf_s, 4),
        "tamper_rejected_rate": round(tamper_rejected / tamper_tries, 4),
        "moved_token_rejected_rate": round(moved_rejected / max(len(moved), 1), 4) if moved else None,
        "protect_p50_s": round(float(np.median(protect_s)), 3) if protect_s else None,
        "protect_p50_s_per_sample": round(float(np.median(protect_s)) / n_samples, 3) if protect_s else None,
        "restore_p50_s": round(float(np.median(restore_s)), 3) if restore_s else None,
        "baseline_blur": {"identity_match_rate": rate(rows, "blur"), "mean_ssim": mean("ssim_face", rows, "blur")},
        "baseline_pixelate": {"identity_match_rate": rate(rows, "pixelate"),
                              "mean_ssim": mean("ssim_face", rows, "pixelate")},
        "search_steps": cfg.search.steps, "gamma": cfg.default_gamma,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    with open(out_dir / ("sider_rows_quick.jsonl" if quick else "sider_rows.jsonl"), "w") as f:
        for row in rows + [summary]:
            f.write(json.dumps(row) + "\n")
    save_grid(grid_rows, out_dir / ("sider_grid_quick.png" if quick else "sider_grid.png"))
    print(json.dumps(summary), flush=True)
    return 0


def _iou(a, b) -> float:
    from serving.sider.faces import box_iou
    return box_iou(a, b)


def save_grid(grid_rows: list[list[np.ndarray]], path: Path, tile: int = 192) -> None:
    """One row per variant: original, then per sample the protected and restored images, then the
    blur and pixelate baselines."""
    if not grid_rows:
        return
    cols = max(len(r) for r in grid_rows)
    canvas = Image.new("RGB", (cols * tile, len(grid_rows) * tile), "white")
    for i, tiles in enumerate(grid_rows):
        for j, img in enumerate(tiles):
            im = Image.fromarray(img)
            im.thumbnail((tile, tile))
            canvas.paste(im, (j * tile, i * tile))
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
