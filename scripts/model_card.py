"""Measure a trained model and write its model card (README.md + evaluation.json in the model folder).

Generates the held-out cases of ``dataset_specs/default_model_evaluation.yaml`` twice, with the
model and with the phantom backend (the same cases, so the same labels), then reports:

- label fidelity: the phantom-trained auditor's agreement with the labels, on the model's images
  and, as the ceiling, on the phantom images;
- domain FID (auditor embedding) of the model's images against the held-out phantoms, beside the
  FID of a sample of the training phantoms against the same held-out set (the floor);
- memorisation: each generated image's nearest training image in encoder and pixel space;
- speed: images/s of `synthmed generate` with the model on this machine.

    python scripts/model_card.py --model synthmed/models/default --training out/default-train/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def read_set(manifest: Path, limit: int | None = None, stride: int = 1):
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[::stride][:limit]
    images = []
    for row in rows:
        with Image.open(manifest.parent / row["png_path"]) as im:
            arr = np.asarray(im)
        images.append(arr.astype(np.float32) / (65535.0 if arr.dtype == np.uint16 else 255.0))
    return rows, np.stack(images)


def grid(rows_a, images_a, images_b, path: Path, per_row: int = 8) -> None:
    """First image of each finding: the model's row above, the phantom's (same cases) below."""
    seen, picks = set(), []
    for i, row in enumerate(rows_a):
        key = row["findings"].split(":")[0]
        if key not in seen:
            seen.add(key)
            picks.append(i)
    picks = picks[:2 * per_row]
    tiles = []
    for start in range(0, len(picks), per_row):
        chunk = picks[start:start + per_row] + [None] * (per_row - len(picks[start:start + per_row]))
        for source in (images_a, images_b):
            tiles.append(np.concatenate([source[i] if i is not None else np.zeros_like(source[0]) for i in chunk], 1))
    Image.fromarray((np.concatenate(tiles, 0) * 255).round().astype(np.uint8)).save(path, optimize=True)


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def lineage(training: dict) -> list[dict]:
    """The training records of a model, first stage (from scratch) first."""
    return (lineage(training["base_training"]) if "base_training" in training else []) + [training]


def total_unet_steps(training: dict) -> int:
    return sum(stage["steps"] for stage in lineage(training))


# The manifest the first stage of the shipped model ran on, built before the sampler fix (see the card).
PRE_FIX_SET = "faf4fcc7397a"


def _rate(s: dict) -> str:
    lr = s["learning_rate"] or (5e-4 if s["base"] == "scratch" else 1e-4 if s["mode"] == "lora" else 1e-5)
    return f"learning rate {lr:g} " + ("cosine to a tenth" if s.get("lr_schedule") == "cosine" else "constant")


def training_steps_lines(training: dict) -> str:
    """The card's 'Steps' and 'Rebuild' bullets, one clause per training stage."""
    stages = lineage(training)
    first, s1 = stages[0], stages[0]["settings"]
    what = lambda s: "UNet + text encoder" if s["train_text_encoder"] else "UNet"  # noqa: E731
    hours = sum(t.get("logged_seconds", t["seconds"]) for t in stages) / 3600
    line = (f"- Steps: VAE {first['vae_steps']:,} (batch {s1['vae_batch_size']}), then {what(s1)} {first['steps']:,} "
            f"(batch {s1['batch_size']}, {_rate(s1)}, min-SNR {s1['min_snr_gamma']:g}, prompt dropout "
            f"{s1['cond_dropout']}, EMA {s1['ema_decay']})")
    for before, stage in zip(stages, stages[1:]):
        s = stage["settings"]
        same = s["manifest_sha256"] == before["settings"]["manifest_sha256"]
        line += (f", then {stage['steps']:,} more from those weights ({s['mode']} {what(s)}, {_rate(s)}, "
                 f"seed {s['seed']}) on {'the same' if same else 'another build of the'} training set")
    line += (f"; last losses: VAE {fmt(first['losses'].get('vae'), 4)}, "
             f"UNet {fmt(stages[-1]['losses'].get('unet'), 4)}; training time {hours:.2f} h (from the logs) "
             "on a 2-core CPU shared with other work.")
    rebuild = ("- Rebuild: `make default-model` (generates the training set, runs "
               f"{'both stages' if len(stages) == 2 else 'every stage'}, resumes after an interruption).")
    if len({t["settings"]["manifest_sha256"] for t in stages}) > 1:
        if s1["manifest_sha256"].startswith(PRE_FIX_SET):
            rebuild += (" The first stage ran on the set the spec gave before the sampler kept every mixture entry "
                        "within one case of its share (pneumonia 603 cases and atelectasis 297, targets 600 and 300); "
                        "the later stages and a rebuild use the set it gives now")
        else:
            rebuild += " The stages ran on different builds of the training set"
        rebuild += " (`training.json` has each stage's manifest sha256)."
    return "\n".join(textwrap.fill(x, 112, subsequent_indent="  ") for x in (line, rebuild))

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "synthmed/models/default")
    parser.add_argument("--training", type=Path, default=ROOT / "out/default-train/manifest.csv")
    parser.add_argument("--spec", type=Path, default=ROOT / "dataset_specs/default_model_evaluation.yaml")
    parser.add_argument("--work", type=Path, default=ROOT / "out/model-card")
    parser.add_argument("--train-sample", type=int, default=1200, help="training images compared against")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/default_model.md")
    args = parser.parse_args()

    from synthmed.build import generate
    from synthmed.qc.auditor import Auditor, label_fidelity, memorisation_audit
    from synthmed.qc.metrics import fid_from_features

    # 1. The held-out cases, by the model and by the phantom
    started = time.time()
    made = generate(args.spec, args.work / "generated", model=str(args.model), overwrite=True, progress=True, qc=False)
    speed = made.written / made.seconds
    generate(args.spec, args.work / "phantom", backend="phantom", overwrite=True, progress=True, qc=False)
    gen_rows, gen = read_set(args.work / "generated" / "manifest.csv")
    ref_rows, ref = read_set(args.work / "phantom" / "manifest.csv")
    assert [r["case_id"] for r in gen_rows] == [r["case_id"] for r in ref_rows]
    with open(args.training, newline="", encoding="utf-8") as fh:
        n_train = sum(1 for _ in fh) - 1
    train_rows, train = read_set(args.training, limit=args.train_sample, stride=max(1, n_train // args.train_sample))

    # 2. Label fidelity, FID, memorisation
    auditor = Auditor.load()
    gen_read, ref_read = auditor.predict(gen), auditor.predict(ref)
    fidelity = label_fidelity(gen_read, gen_rows)
    ceiling = label_fidelity(ref_read, ref_rows)
    # Does the model's image read like the phantom of the same case? Independent of the auditor's own misses.
    leaves = set(fidelity["findings"]["leaf_findings"])
    same_reading = float(np.mean([set(a) & leaves == set(b) & leaves
                                  for a, b in zip(gen_read.findings(), ref_read.findings())]))
    f_gen, f_ref, f_train = auditor.embed(gen), auditor.embed(ref), auditor.embed(train)
    fid = fid_from_features(f_gen, f_ref, method="eigh")
    fid_floor = fid_from_features(f_train, f_ref, method="eigh")
    memo = memorisation_audit(f_gen, [r["case_id"] for r in gen_rows], f_train, [r["case_id"] for r in train_rows],
                              gen_pixels=gen, train_pixels=train)
    grid(gen_rows, gen, ref, args.work / "samples.png")
    docs_grid = args.docs.parent / "default_model_samples.png"
    grid(gen_rows, gen, ref, docs_grid)

    # 3. The card
    training = json.loads((args.model / "training.json").read_text(encoding="utf-8"))
    settings = lineage(training)[0]["settings"]  # the scratch stage: design, VAE
    params = {}
    from safetensors import safe_open

    for part in ("text_encoder", "vae", "unet"):
        for f in (args.model / part).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                params[part] = sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    size_mb = sum(p.stat().st_size for p in args.model.rglob("*") if p.is_file()) / 2**20
    spec_hash = train_rows[0].get("spec_hash", "")
    evaluation = {
        "label_fidelity": fidelity, "label_fidelity_phantom_ceiling": ceiling, "same_reading_as_phantom": same_reading,
        "auditor": auditor.name, "fid": fid, "fid_floor": fid_floor,
        "memorisation": {k: v for k, v in memo.items() if k in ("n_generated", "n_training")} |
                        {space: {k: memo[space][k] for k in ("threshold", "distances", "training_distances",
                                                             "flagged_fraction")} if memo.get(space) else None
                         for space in ("encoder", "pixel")},
        "speed_images_per_s": speed, "eval_cases": len(gen_rows), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seconds": time.time() - started,
    }
    (args.model / "evaluation.json").write_text(json.dumps(evaluation, indent=1, default=float), encoding="utf-8")

    fl, cl = fidelity["findings"], ceiling["findings"]
    per_finding = "\n".join(
        f"| {name} | {v['support']} | {fmt(v['accuracy'])} | {fmt(v['sensitivity'])} | {fmt(v['specificity'])} | "
        f"{fmt(cl['per_finding'][name]['sensitivity'])} |"
        for name, v in fl["per_finding"].items() if v["support"])
    met = fl['exact_set_agreement'] >= 0.9 and fidelity['location']['accuracy'] >= 0.8
    targets = "met" if met else f"**not met yet** after {total_unet_steps(training):,} UNet steps (`make default-model` resumes training)"
    card = f"""# synthmed default model

A small latent-diffusion model of **synthetic** chest radiographs, trained by `synthmed finetune` from scratch
on phantom images (the procedural backend), so that `synthmed generate` makes real latent-diffusion images on
a CPU with no download. Used when a spec says `generator.model: default`.

## Intended use
Building and testing pipelines, demos, teaching, and pre-training experiments. The images are synthetic
renderings of a procedural phantom as learned by a small model: **not for diagnosis, not a substitute for
real radiographs**, and not evidence about any patient. Every image synthmed writes from it is marked synthetic.

## Training
- Training set: `dataset_specs/default_model_training.yaml` (spec sha256 `{spec_hash[:12]}`), {settings['images']:,}
  phantom images at {settings['width']}x{settings['height']}, prompts by the `{settings['template']}` template.
- Design: word-level tokenizer built from the vocabulary; CLIP text encoder 128-d, 2 layers
  ({params.get('text_encoder', 0) / 1e6:.2f} M parameters); AutoencoderKL, 1 channel, blocks (16, 32, 64, 64),
  8x down, 4 latent channels, trained on {settings['vae_crop']}x{settings['vae_crop']} crops
  ({params.get('vae', 0) / 1e6:.2f} M); UNet (32, 64, 128), one resnet per level, cross-attention at the two lower
  resolutions ({params.get('unet', 0) / 1e6:.2f} M). fp16 safetensors, {size_mb:.1f} MB in all.
{training_steps_lines(training)}

## Label fidelity
The auditor (`synthmed/models/auditor`, {auditor.name}, trained on the phantom images of
`dataset_specs/auditor_training.yaml`, another seed than the model's training set) reads {len(gen_rows)} images
the model made for the held-out cases of `dataset_specs/default_model_evaluation.yaml`; the last column is the
auditor on the phantom images of the same cases (its ceiling: what it misses there, it cannot credit the model with).

| figure | model | phantom (ceiling) |
|---|---|---|
| finding set agreement (exact) | {fmt(fl['exact_set_agreement'])} | {fmt(cl['exact_set_agreement'])} |
| mean per-finding accuracy | {fmt(fl['mean_accuracy'])} | {fmt(cl['mean_accuracy'])} |
| location (exact) | {fmt(fidelity['location']['accuracy'])} | {fmt(ceiling['location']['accuracy'])} |
| location (side) | {fmt(fidelity['location']['side_accuracy'])} | {fmt(ceiling['location']['side_accuracy'])} |
| severity | {fmt(fidelity['severity']['accuracy'])} | {fmt(ceiling['severity']['accuracy'])} |
| finding set read the same as on the phantom of the case | {fmt(same_reading)} | 1 |

| finding | cases | accuracy | sensitivity | specificity | phantom sensitivity |
|---|---|---|---|---|---|
{per_finding}

First targets: finding agreement >= 0.90, location >= 0.80: {targets}.

## FID
Fréchet distance in the auditor's embedding space (`method="eigh"`): the model's images vs held-out phantoms
**{fid:.2f}**; a sample of {len(train_rows)} training phantoms vs the same held-out phantoms **{fid_floor:.2f}** (the
floor: two samples of the same distribution).

## Memorisation
Nearest training image (of {len(train_rows)} sampled) for each generated image. Encoder space (cosine distance):
median {fmt(memo['encoder']['distances']['median'], 4)}, minimum {fmt(memo['encoder']['distances']['min'], 4)};
flagged (closer than the 1st percentile of training-to-training distances,
{fmt(memo['encoder']['threshold'], 4)}): {memo['encoder']['flagged_fraction']:.1%}.
Pixel space (64x64, L2): median {fmt(memo['pixel']['distances']['median'])}, minimum
{fmt(memo['pixel']['distances']['min'])}; flagged {memo['pixel']['flagged_fraction']:.1%}.

## Speed
`synthmed generate` with this model, 256x256, 20 DPM-Solver steps, guidance 4: **{speed:.2f} images/s** on
{platform.machine()} with {os.cpu_count()} CPU cores (shared with other work while measured).

![samples](../../../docs/default_model_samples.png)
"""
    (args.model / "README.md").write_text(card, encoding="utf-8")
    args.docs.write_text(card.replace("](../../../docs/default_model_samples.png)", "](default_model_samples.png)"),
                         encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
