"""The measurements behind the default model's VAE and UNet sizes (#19), on DRR films and this machine.

VAE: how much of a DRR film each candidate keeps. Each candidate is trained from scratch the way ``synthmed finetune --base scratch`` trains its VAE (random
crops, L1 + image-gradient L1 + a small KL term, AdamW with warm-up and cosine decay, the same steps for
all), then reconstructs held-out films at full size. Printed per candidate:

- parameters, fp16 size, decode time per 256x256 image on this machine (what sampling pays once per image);
- PSNR of the reconstructions (images in [0, 1]);
- detail kept: 1 - the relative error of the structures 1-4 pixels across (vessels, rib cortices, small
  nodules, line edges; not the pixel noise): 1 keeps all of that fine texture, a smoothing VAE scores near 0;
- the DRR auditor's reading of the reconstructions (finding set, location, severity agreement), beside its
  reading of the original films (the ceiling) and of the originals blurred by a Gaussian of 1 and 1.5 pixels.

    python scripts/measure_vae_capacity.py --manifest out/default-train/manifest.csv \
        [--train 4000] [--held-out 300] [--steps 2000] [--candidates v16,v24,v32] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

CANDIDATES = {  # block_out_channels, layers_per_block, latent channels (1 channel in/out; 2^(blocks-1) x down)
    "v16": ((16, 32, 64, 64), 1, 4),  # the default model's VAE before the drr films
    "v16c8": ((16, 32, 64, 64), 1, 8),  # the default model's VAE now
    "v16c16": ((16, 32, 64, 64), 1, 16),
    "v16d4": ((16, 32, 64), 1, 4),  # 4x down: a 64x64x4 latent for a 256x256 film
    "v16d4c8": ((16, 32, 64), 1, 8),
    "v24": ((24, 48, 96, 128), 1, 4),
    "v32": ((32, 64, 128, 128), 1, 4),
    "v32x2": ((32, 64, 128, 128), 2, 4),
}
UNETS = {  # block_out_channels, layers_per_block, norm groups, latent side and channels, [levels with cross-attention,
    # the lowest ones: 2 unless given] (128-d text); a latent of 32 goes with an 8x-down VAE, 64 with a 4x-down one
    "u32": ((32, 64, 128), 1, 32, 32, 8),  # the default model's UNet
    "u48": ((48, 96, 192), 1, 16, 32, 8),
    "u32x2": ((32, 64, 128), 2, 32, 32, 8),
    "u64": ((64, 128, 256), 1, 32, 32, 8),
    "u16l64": ((16, 32, 64, 128), 1, 8, 64, 4),  # one more level on top of u32's, at the 4x-down latent
    "u24l64": ((24, 48, 96, 192), 1, 8, 64, 4),
    "u16l64a1": ((16, 32, 64, 128), 1, 8, 64, 4, 1),  # u16l64 with cross-attention at 8x8 only (not at 16x16)
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, help="a drr build's manifest.csv (train and val rows), for the VAEs")
    p.add_argument("--unets", help="UNet candidates to time instead, e.g. u32,u48,u32x2 (no manifest needed)")
    p.add_argument("--vae-folder", type=Path, action="append", default=[],
                   help="also measure a trained VAE folder (diffusers AutoencoderKL, e.g. a finetune work folder's "
                        "vae/), on the same held-out films; repeatable")
    p.add_argument("--train", type=int, default=4000, help="training films (the first N train rows)")
    p.add_argument("--held-out", type=int, default=300, help="held-out films (the first N val rows)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--candidates", default="v16,v24,v32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def read_rows(manifest: Path, split: str, limit: int) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.DictReader(fh) if row["split"] == split]
    if len(rows) < limit:
        sys.exit(f"error: {manifest} has {len(rows)} {split} rows; asked for {limit}")
    return rows[:limit]


def load(folder: Path, rows: list[dict]) -> np.ndarray:
    """Films as float32 [N, H, W] in [0, 1] (8- or 16-bit PNG)."""
    from PIL import Image

    films = []
    for row in rows:
        with Image.open(folder / row["file_name"]) as image:
            pixels = np.asarray(image)
        films.append(pixels.astype(np.float32) / (65535.0 if pixels.dtype == np.uint16 else 255.0))
    return np.stack(films)


def make_vae(name: str):
    from diffusers import AutoencoderKL

    channels, layers, latent = CANDIDATES[name]
    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=latent, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         layers_per_block=layers, norm_num_groups=8, mid_block_add_attention=False, sample_size=256)


def train(vae, films: np.ndarray, args) -> float:
    """The VAE stage of ``synthmed finetune --base scratch``, on these films; returns the final smoothed loss."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.from_numpy(films * 2 - 1)[:, None]
    n, _, h, w = images.shape
    optimiser = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    vae.train()
    smooth = None
    for step in range(args.steps):
        idx = torch.randint(n, (args.batch_size,), generator=generator)
        ys = torch.randint(h - args.crop + 1, (args.batch_size,), generator=generator)
        xs = torch.randint(w - args.crop + 1, (args.batch_size,), generator=generator)
        x = torch.stack([images[i, :, y:y + args.crop, x0:x0 + args.crop] for i, y, x0 in zip(idx, ys, xs)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x)
        loss = loss + 0.5 * (F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2)))
        loss = loss + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if (step + 1) % 250 == 0:
            print(f"  step {step + 1}/{args.steps} loss {smooth:.4f}", flush=True)
    return smooth


def reconstruct(vae, films: np.ndarray, batch: int = 8) -> tuple[np.ndarray, float]:
    """Reconstructions of full films (posterior mean) and the decode time per image in seconds."""
    import torch

    vae.eval()
    out, decode = [], 0.0
    with torch.inference_mode():
        for start in range(0, len(films), batch):
            x = torch.from_numpy(films[start:start + batch] * 2 - 1)[:, None]
            z = vae.encode(x).latent_dist.mean
            t0 = time.perf_counter()
            y = vae.decode(z).sample
            decode += time.perf_counter() - t0
            out.append(((y[:, 0].clamp(-1, 1) + 1) / 2).numpy())
    return np.concatenate(out), decode / len(films)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def detail_kept(recon: np.ndarray, films: np.ndarray) -> float:
    """How much of the originals' fine structure the reconstructions keep: 1 - the relative error of a band of
    structures 1-4 pixels across (difference of Gaussians: vessels, rib cortices, small nodules, line edges; not
    the pixel noise). 1 keeps all of it; a VAE that smooths it away scores near 0."""
    from scipy.ndimage import gaussian_filter

    def band(x):
        return gaussian_filter(x, 1.0) - gaussian_filter(x, 4.0)

    return float(np.mean([1 - np.linalg.norm(band(r) - band(f)) / max(np.linalg.norm(band(f)), 1e-8)
                          for r, f in zip(recon, films)]))


def auditor_reading(films: np.ndarray, rows: list[dict]) -> dict:
    from synthmed.qc.auditor import Auditor, label_fidelity, shipped_auditor_dir

    auditor = Auditor.load(shipped_auditor_dir("drr"))
    report = label_fidelity(auditor.predict(films, batch_size=64), rows)
    return {"finding_set_agreement": report["findings"]["exact_set_agreement"],
            "location_agreement": report["location"]["accuracy"], "severity_agreement": report["severity"]["accuracy"]}


def make_unet(name: str):
    """A UNet candidate of :data:`UNETS` (random weights), for a latent of its side and channels."""
    from diffusers import UNet2DConditionModel

    channels, layers, groups, side, latent, *attended = UNETS[name]
    attended = attended[0] if attended else 2
    plain = len(channels) - attended  # levels without cross-attention
    return UNet2DConditionModel(sample_size=side, in_channels=latent, out_channels=latent,
                                block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups,
                                cross_attention_dim=128, attention_head_dim=4 if channels[0] == 32 else 8,
                                down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attended,
                                up_block_types=("CrossAttnUpBlock2D",) * attended + ("UpBlock2D",) * plain)


def unet_costs(names: list[str], repeats: int = 3) -> dict:
    """Sampling ms per image (20 steps, guidance batch of 2 x 8) and seconds per training step (batch 16)."""
    import torch

    costs = {}
    for name in names:
        _, _, _, side, latent, *_ = UNETS[name]
        torch.manual_seed(0)
        unet = make_unet(name)
        params = sum(p.numel() for p in unet.parameters())
        x, text = torch.randn(16, latent, side, side), torch.randn(16, 24, 128)
        unet.eval()
        with torch.inference_mode():
            unet(x, 500, encoder_hidden_states=text)
            forward = min(_timed(lambda: unet(x, 500, encoder_hidden_states=text)) for _ in range(repeats))
        unet.train()
        optimiser = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def step():
            loss = unet(x, 500, encoder_hidden_states=text).sample.pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        step()
        train_step = min(_timed(step) for _ in range(repeats))
        costs[name] = {"parameters": params, "fp16_mib": round(params * 2 / 2**20, 2),
                       "sampling_ms_per_image": round(1000 * 20 * forward / 8, 1),
                       "train_step_s": round(train_step, 3)}
        print(f"{name} {UNETS[name]}: {json.dumps(costs[name])}", flush=True)
    return costs


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.unets:
        costs = unet_costs(args.unets.split(","))
        print("\n| UNet | params | fp16 MiB | sampling ms/image (20 steps) | training step s (batch 16) |")
        print("|---|---|---|---|---|")
        for name, c in costs.items():
            print(f"| {name} {UNETS[name]} | {c['parameters'] / 1e6:.2f} M | {c['fp16_mib']} | "
                  f"{c['sampling_ms_per_image']} | {c['train_step_s']} |")
        if args.json:
            args.json.write_text(json.dumps({"unets": costs}, indent=1) + "\n", encoding="utf-8")
        return 0
    if args.manifest is None:
        sys.exit("error: give --manifest (VAEs) or --unets")
    folder = args.manifest.parent
    train_rows, held_rows = read_rows(args.manifest, "train", args.train), read_rows(args.manifest, "val", args.held_out)
    films, held = load(folder, train_rows), load(folder, held_rows)
    print(f"{len(films)} training films, {len(held)} held out, {films.shape[1]}x{films.shape[2]}; "
          f"{args.steps} steps of batch {args.batch_size}, crop {args.crop}; {args.threads} threads", flush=True)
    results = {"settings": {k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v
                            for k, v in vars(args).items()},
               "ceiling": auditor_reading(held, held_rows), "candidates": {}}
    print(f"auditor on the original films: {results['ceiling']}", flush=True)
    from scipy.ndimage import gaussian_filter

    for sigma in (1.0, 1.5):  # what losing fine detail alone does to the auditor's reading
        blurred = np.stack([gaussian_filter(f, sigma) for f in held])
        results.setdefault("blurred", {})[str(sigma)] = {
            "psnr_db": round(psnr(blurred, held), 2), "detail_kept": round(detail_kept(blurred, held), 3),
            "auditor": auditor_reading(blurred, held_rows)}
    print(f"auditor on the original films blurred (Gaussian sigma in pixels): {results['blurred']}", flush=True)
    for folder in args.vae_folder:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True).float()
        recon, decode = reconstruct(vae, held)
        figures = {"parameters": sum(p.numel() for p in vae.parameters()), "decode_ms_per_image": round(1000 * decode, 1),
                   "psnr_db": round(psnr(recon, held), 2), "detail_kept": round(detail_kept(recon, held), 3),
                   "auditor": auditor_reading(recon, held_rows)}
        results.setdefault("trained", {})[str(folder)] = figures
        print(f"{folder}: {json.dumps(figures)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    for name in filter(None, args.candidates.split(",")):
        torch.manual_seed(args.seed)
        vae = make_vae(name)
        params = sum(p.numel() for p in vae.parameters())
        t0 = time.perf_counter()
        print(f"{name}: {params / 1e6:.2f} M parameters", flush=True)
        loss = train(vae, films, args)
        seconds = time.perf_counter() - t0
        recon, decode = reconstruct(vae, held)
        figures = {"parameters": params, "fp16_mib": round(params * 2 / 2**20, 2), "train_seconds": round(seconds, 1),
                   "loss": round(loss, 5), "decode_ms_per_image": round(1000 * decode, 1),
                   "psnr_db": round(psnr(recon, held), 2), "detail_kept": round(detail_kept(recon, held), 3),
                   "auditor": auditor_reading(recon, held_rows)}
        results["candidates"][name] = figures
        print(f"{name}: {json.dumps(figures)}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print("\n| VAE | params | fp16 MiB | decode ms/img | PSNR dB | detail kept | auditor finding set / location / severity |")
    print("|---|---|---|---|---|---|---|")
    c = results["ceiling"]
    print(f"| originals (ceiling) | | | | | 1.000 | {c['finding_set_agreement']:.3f} / {c['location_agreement']:.3f} / "
          f"{c['severity_agreement']:.3f} |")
    for name, f in results["candidates"].items():
        a = f["auditor"]
        print(f"| {name} {CANDIDATES[name]} | {f['parameters'] / 1e6:.2f} M | {f['fp16_mib']} | {f['decode_ms_per_image']} | "
              f"{f['psnr_db']} | {f['detail_kept']} | {a['finding_set_agreement']:.3f} / {a['location_agreement']:.3f} / "
              f"{a['severity_agreement']:.3f} |")
    for folder, f in results.get("trained", {}).items():
        a = f["auditor"]
        print(f"| {folder} (trained) | {f['parameters'] / 1e6:.2f} M | | {f['decode_ms_per_image']} | {f['psnr_db']} | "
              f"{f['detail_kept']} | {a['finding_set_agreement']:.3f} / {a['location_agreement']:.3f} / "
              f"{a['severity_agreement']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
