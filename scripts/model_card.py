"""Measure a trained model and write its model card (README.md + evaluation.json in the model folder).

Generates the held-out cases of ``dataset_specs/default_model_evaluation.yaml`` twice, with the
model and with the backend it learned from (``--films drr``: the CT-derived films; the same cases, so
the same labels), then reports:

- label fidelity: that backend's auditor's agreement with the labels, on the model's images
  and, as the ceiling, on the backend's images of the same cases;
- domain FID (auditor embedding) of the model's images against those held-out films, beside the
  FID of a sample of the training films against the same held-out set (the floor);
- memorisation: each generated image's nearest training image in encoder and pixel space;
- speed: images/s of `synthmed generate` with the model on this machine.

    python scripts/model_card.py --model synthmed/models/default --training out/default-train/manifest.csv

With ``--teacher``, the model is a student made by ``synthmed distill`` and its card puts every figure
beside its teacher's on the same held-out cases (the teacher's evaluation.json, written by this script
first); the targets are those of the fast default: within 0.03 of the teacher in finding-set and location
agreement.

    python scripts/model_card.py --model synthmed/models/default-fast --teacher synthmed/models/default \
        --docs docs/default_fast_model.md
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
    """First image of each finding: the model's row above, the backend's (same cases) below."""
    seen, picks = set(), []
    for i, row in enumerate(rows_a):
        key = row["findings"].split(":")[0]
        if key not in seen:
            seen.add(key)
            picks.append(i)
    picks = picks[:3 * per_row]
    tiles = []
    for start in range(0, len(picks), per_row):
        chunk = picks[start:start + per_row] + [None] * (per_row - len(picks[start:start + per_row]))
        for source in (images_a, images_b):
            tiles.append(np.concatenate([source[i] if i is not None else np.zeros_like(source[0]) for i in chunk], 1))
    Image.fromarray((np.concatenate(tiles, 0) * 255).round().astype(np.uint8)).save(path, optimize=True)


FILMS_TEXT = {"drr": "digitally reconstructed radiographs of a real labelled chest CT (the drr backend)",
              "phantom": "phantom images (the procedural backend)"}
# The targets for the card (#19 item 3).
TARGETS = {"finding_set": 0.92, "location": 0.90, "severity": 0.85, "sensitivity": 0.7, "fid_ratio": 2.0,
           "memorised": 0.0, "images_per_s": 1.5}


def lowest_sensitivity(fidelity: dict) -> tuple[str | None, float | None]:
    """The finding read least often where labelled, and its sensitivity, from a label_fidelity report."""
    per_finding = {name: v["sensitivity"] for name, v in fidelity["findings"]["per_finding"].items()
                   if v["support"] and v["sensitivity"] is not None}
    return min(per_finding.items(), key=lambda kv: kv[1]) if per_finding else (None, None)


def by_view(gen_read, ref_read, gen_rows, ref_rows) -> dict:
    """The card's three agreements on each view's cases, the model's beside the films' (its ceiling).

    A user who makes only frontal films wants the frontal figure, not an average over laterals.

        >>> by_view(gen_read, ref_read, gen_rows, ref_rows)["PA"]["model"]["finding_set"]  # doctest: +SKIP
        0.863
    """
    import dataclasses

    from synthmed.qc.auditor import label_fidelity

    def agreements(read, rows, idx):
        taken = dataclasses.replace(read, finding_probs=read.finding_probs[idx],
                                    location_probs=read.location_probs[idx],
                                    severity_probs=read.severity_probs[idx])
        fl = label_fidelity(taken, [rows[i] for i in idx])
        return {"finding_set": fl["findings"]["exact_set_agreement"], "location": fl["location"]["accuracy"],
                "severity": fl["severity"]["accuracy"]}

    views = {}
    for view in sorted({r["view"] for r in gen_rows}):
        idx = [i for i, r in enumerate(gen_rows) if r["view"] == view]
        views[view] = {"cases": len(idx), "model": agreements(gen_read, gen_rows, idx),
                       "ceiling": agreements(ref_read, ref_rows, idx)}
    return views


def sampling_text(evaluation: dict) -> str:
    """How the card's images were sampled, e.g. "dpm_solver, 20 steps, trailing timestep spacing, guidance 4 then 2
    below timestep 500" (no parentheses: the cards print it inside their own)."""
    s = evaluation.get("sampling") or {}
    spacing = f", {s['timestep_spacing']} timestep spacing" if s.get("timestep_spacing") else ""
    late = s.get("late_guidance")
    late = f" then {late['scale']:g} below timestep {late['below_timestep']}" if late else ""
    return (f"{s.get('scheduler', 'dpm_solver')}, {s.get('steps', 20)} steps{spacing}, "
            f"guidance {s.get('guidance_scale', 4.0):g}{late}")


def view_table(views: dict, model: str, films: str, teacher_views: dict | None = None) -> str:
    """The per-view rows of a card: cases, then each agreement as model / (teacher /) films."""
    names = f"{model} / teacher / {films} films" if teacher_views else f"{model} / {films} films"
    head = f"| view | cases | finding set ({names}) | location | severity |\n|---|---|---|---|---|\n"

    def cell(view, v, k):
        teacher = f"{fmt(teacher_views[view]['model'][k])} / " if teacher_views and view in teacher_views else ""
        return f"{fmt(v['model'][k])} / {teacher}{fmt(v['ceiling'][k])}"

    return head + "\n".join(f"| {view} | {v['cases']} | "
                             + " | ".join(cell(view, v, k) for k in ("finding_set", "location", "severity")) + " |"
                             for view, v in views.items())


def card_targets(evaluation: dict) -> list[dict]:
    """Each target of the card: what, the target, the value, met or not."""
    fidelity = evaluation["label_fidelity"]
    name, value = lowest_sensitivity(fidelity)
    worst = (name or "none", value)
    ratio = evaluation["fid"] / evaluation["fid_floor"] if evaluation["fid_floor"] else None
    flagged = max(evaluation["memorisation"][space]["flagged_fraction"]
                  for space in ("encoder", "pixel") if evaluation["memorisation"].get(space))
    rows = [("finding set agreement", TARGETS["finding_set"], fidelity["findings"]["exact_set_agreement"], ">="),
            ("location agreement", TARGETS["location"], fidelity["location"]["accuracy"], ">="),
            ("severity agreement", TARGETS["severity"], fidelity["severity"]["accuracy"], ">="),
            (f"lowest sensitivity ({worst[0]})", TARGETS["sensitivity"], worst[1], ">="),
            ("FID / floor", TARGETS["fid_ratio"], ratio, "<="),
            ("memorised (flagged)", TARGETS["memorised"], flagged, "<="),
            ("images/s", TARGETS["images_per_s"], evaluation["speed_images_per_s"], ">=")]
    return [{"what": what, "target": f"{sign} {target:g}", "value": fmt(value),
             "met": value is not None and (value >= target if sign == ">=" else value <= target)}
            for what, target, value, sign in rows]


def _capacity_tables(vae: dict, unet: dict | None) -> tuple[str, str]:
    """The VAE and UNet tables of one run of scripts/measure_model_capacity.py (markdown rows, headers included)."""
    reading = lambda a: (f"{a['finding_set_agreement']:.3f} / {a['location_agreement']:.3f} / "  # noqa: E731
                         f"{a['severity_agreement']:.3f}")
    threads = lambda f: f"{f['threads']} thread{'s' if f['threads'] > 1 else ''}"  # noqa: E731
    rows = ["| VAE | parameters | decode ms/image | PSNR dB | detail kept | auditor |", "|---|---|---|---|---|---|",
            f"| original films (ceiling) | | | | 1 | {reading(vae['ceiling'])} |"]
    rows += [f"| original films, Gaussian blur {sigma} px | | | {f['psnr_db']} | {f['detail_kept']} | {reading(f['auditor'])} |"
             for sigma, f in vae.get("blurred", {}).items()]
    for name, f in vae["candidates"].items():
        rows.append(f"| {name} | {f['parameters'] / 1e6:.2f} M | {f['decode_ms_per_image']} ({threads(f)}) | "
                    f"{f['psnr_db']} | {f['detail_kept']} | {reading(f['auditor'])} |")
    for name, f in vae.get("trained", {}).items():
        rows.append(f"| {name} | {f['parameters'] / 1e6:.2f} M | {f['decode_ms_per_image']} | {f['psnr_db']} | "
                    f"{f['detail_kept']} | {reading(f['auditor'])} |")
    unet_rows = ["| UNet | parameters | fp16 MiB | sampling ms/image | training step s |", "|---|---|---|---|---|"]
    unet_rows += [f"| {name} | {f['parameters'] / 1e6:.2f} M | {f['fp16_mib']} | {f['sampling_ms_per_image']} | "
                  f"{f['train_step_s']} |" for name, f in (unet or {}).get("candidates", {}).items()]
    return "\n".join(rows), "\n".join(unet_rows) if unet else ""


def capacity_section(path: Path) -> str:
    """The card's "Why these sizes": the measurements of scripts/measure_model_capacity.py kept in ``path``, the
    first run's tables and reading, then each later run's (``later``: its own films, auditor and machine)."""
    if not path.is_file():
        return ""
    m = json.loads(path.read_text(encoding="utf-8"))
    vae, unet = m["vae"], m["unet"]
    vae_table, unet_table = _capacity_tables(vae, unet)
    s = vae["settings"]
    text = f"""
## Why these sizes
Measured with `scripts/measure_model_capacity.py` ({m['what']}; figures in `docs/default_model_capacity.json`).
VAE candidates (v16: blocks (16, 32, 64, 64), 4 latent channels; v16c8: the same with 8; v24: (24, 48, 96, 128))
were each trained {s['steps']:,} steps (batch {s['batch_size']}, {s['crop']}x{s['crop']} crops) on {s['train']:,}
DRR films and reconstructed {s['held_out']} held-out films. Detail kept: 1 - the relative error of the
structures 1-4 pixels across (vessels, rib cortices, small nodules, line edges). Auditor: the DRR auditor's
finding set / location / severity agreement on the reconstructions.

{vae_table}

In the same steps the wider VAE reconstructed worse (the stage is limited by steps, not width), and 8 latent
channels kept more fine structure than 4 at the same decode cost; the auditor reads blur as missing findings
(the blurred rows), so detail is what counts. The shipped VAE is v16c8, trained for longer (the Training section).

UNet candidates, timed on {unet['threads']} thread (sampling: 20 steps, guidance batched; training: one step of
batch 16):

{unet_table}

A wider or deeper UNet costs 1.5-3x per training step, so fewer steps fit the CPU-hours a rebuild may take, and
1.2-2.2x per image when sampling (u64 alone would pass the 30 MiB budget): the (32, 64, 128) UNet is kept.
"""
    for later in m.get("later", []):
        vae_table, unet_table = _capacity_tables(later["vae"], later.get("unet"))
        text += f"""
### {later['title']}
{textwrap.fill(later['what'], 112)}

{vae_table}
{chr(10) + unet_table + chr(10) if unet_table else ''}
{textwrap.fill(later['reading'], 112)}
"""
    return text


# The fast default's targets (#22 item 2): this close to its teacher, on the same held-out cases.
STUDENT_MARGIN = {"finding_set": 0.03, "location": 0.03}


def student_targets(evaluation: dict, teacher: dict) -> list[dict]:
    """The student's targets beside its teacher's figures: within STUDENT_MARGIN of them."""
    rows = []
    for key, what, get in (("finding_set", "finding set agreement",
                            lambda e: e["label_fidelity"]["findings"]["exact_set_agreement"]),
                           ("location", "location agreement", lambda e: e["label_fidelity"]["location"]["accuracy"])):
        value, reference = get(evaluation), get(teacher)
        rows.append({"what": f"{what} (teacher {fmt(reference)})", "target": f">= {fmt(reference - STUDENT_MARGIN[key])}",
                     "value": fmt(value), "met": value >= reference - STUDENT_MARGIN[key] - 1e-12})
    speedup = evaluation["speed_images_per_s"] / teacher["speed_images_per_s"]
    rows.append({"what": f"images/s (teacher {fmt(teacher['speed_images_per_s'], 2)})", "target": "> teacher",
                 "value": f"{evaluation['speed_images_per_s']:.2f} ({speedup:.1f}x)", "met": speedup > 1})
    return rows


def decoder_section(evaluation: dict, teacher: dict) -> str:
    """The student's two decoders (the teacher's VAE, its tiny one) on the same latents, as the auditor reads them."""
    other = evaluation.get("other_decoder")
    if not other:
        return ""
    mine = evaluation["sampling"]["decoder"]
    columns = {mine: (evaluation["label_fidelity"], evaluation["fid"], evaluation["speed_images_per_s"]),
               other["decoder"]: (other["label_fidelity"], other["fid"], other["speed_images_per_s"])}
    full, tiny = columns["full"], columns["tiny"]
    rows = [("finding set agreement (exact)", lambda r: r["findings"]["exact_set_agreement"]),
            ("location (exact)", lambda r: r["location"]["accuracy"]),
            ("severity", lambda r: r["severity"]["accuracy"])]
    table = "\n".join(f"| {what} | {fmt(get(full[0]))} | {fmt(get(tiny[0]))} | {fmt(get(teacher['label_fidelity']))} |"
                      for what, get in rows)
    default = "the teacher's VAE" if mine == "full" else "its tiny decoder"
    return f"""## Decoder
The student decodes with {default} by default. It also carries a TAESD-style decoder (`tiny_vae/`, diffusers
`AutoencoderTiny`, `generator.decoder: tiny`); the same student's latents through each, read by the same auditor:

| figure | teacher's VAE decoder{' (default)' if mine == 'full' else ''} | tiny decoder{' (default)' if mine == 'tiny' else ''} | teacher |
|---|---|---|---|
{table}
| FID in the auditor's space | {full[1]:.1f} | {tiny[1]:.1f} | {teacher['fid']:.1f} |
| images/s (card run, QC off) | {full[2]:.2f} | {tiny[2]:.2f} | {teacher['speed_images_per_s']:.2f} |

"""


def write_student_card(args, evaluation: dict, teacher: dict, gen_rows, train_rows, memo) -> None:
    """README.md of a distilled student (its making from distillation.json, its figures beside its teacher's)."""
    distillation = json.loads((args.model / "distillation.json").read_text(encoding="utf-8"))
    settings, films = distillation.get("settings", {}), evaluation["films"]
    fl, tl = evaluation["label_fidelity"], teacher["label_fidelity"]
    cl = evaluation["label_fidelity_ceiling"]
    sampling = evaluation["sampling"]
    size_mb = sum(p.stat().st_size for p in args.model.rglob("*") if p.is_file()) / 2**20
    target_lines = "\n".join(f"| {t['what']} | {t['target']} | {t['value']} | {'met' if t['met'] else '**not met**'} |"
                             for t in evaluation["targets"])
    per_finding = "\n".join(
        f"| {name} | {v['support']} | {fmt(v['sensitivity'])} | {fmt(tl['findings']['per_finding'][name]['sensitivity'])}"
        f" | {fmt(cl['findings']['per_finding'][name]['sensitivity'])} |"
        for name, v in fl["findings"]["per_finding"].items() if v["support"])
    rows = [("finding set agreement (exact)", lambda r: r["findings"]["exact_set_agreement"]),
            ("mean per-finding accuracy", lambda r: r["findings"]["mean_accuracy"]),
            ("location (exact)", lambda r: r["location"]["accuracy"]),
            ("location (side)", lambda r: r["location"]["side_accuracy"]),
            ("severity", lambda r: r["severity"]["accuracy"])]
    table = "\n".join(f"| {what} | {fmt(get(fl))} | {fmt(get(tl))} | {fmt(get(cl))} |" for what, get in rows)
    teacher_name = evaluation["teacher"]["folder"]
    # "seconds" is the last run's alone; a resumed distillation's logs hold every leg
    seconds = distillation.get("logged_seconds", distillation.get("seconds"))
    recommended_dtype = distillation.get("recommended", {}).get("dtype", "float32")
    dtype_text = {"auto": "auto: bfloat16 where the CPU or GPU computes it natively, else float32"}.get(
        recommended_dtype, recommended_dtype)
    card = f"""# synthmed default-fast model

The shipped default model (`{teacher_name}`) distilled by `synthmed distill` into a student that samples in
**{sampling.get('steps')} steps with one UNet evaluation per step** (the classifier-free guidance is distilled
into it: no unconditional pass), so `synthmed generate` makes images several times faster on a CPU. Used when a
spec says `generator.model: default-fast`; a spec that leaves `generator.steps`, `scheduler`,
`guidance_scale` and `dtype` out gets the student's own ({sampling.get('scheduler')}, {sampling.get('steps')} steps,
guidance {sampling.get('guidance_scale')}, dtype {dtype_text}; the figures below were measured in
{sampling.get('dtype', 'float32')}).

## Intended use
As the default model's: building and testing pipelines, demos, teaching, pre-training experiments, where speed
matters more than the last points of label fidelity. The images are **synthetic** ({FILMS_TEXT[films]} as learned
by a small model, then distilled): **not for diagnosis**, not evidence about any patient; every image synthmed
writes from it is marked synthetic.

## Distillation
- Teacher: `{teacher_name}` (model hash `{str(distillation.get('teacher', {}).get('model_hash', settings.get('teacher_hash', '')))[:16]}`).
- Method: {distillation.get('method', 'latent consistency distillation')} ({settings.get('mode')} mode: the
  student is the teacher's UNet with the guidance scale as an input, learnt over guidance
  {settings.get('guidance_min')}-{settings.get('guidance_max')}; target network an EMA of the student, decay
  {settings.get('ema_decay')}); DDIM solver over {settings.get('num_ddim_timesteps')} of the teacher's timesteps,
  Huber loss c = {settings.get('huber_c')}.
- Data: the teacher's own training set (`dataset_specs/default_model_training.yaml`, {settings.get('images', 0):,}
  films); {settings.get('steps', 0):,} steps of batch {settings.get('batch_size')}, learning rate
  {settings.get('learning_rate') or 1e-4:g}{f', {seconds / 3600:.2f} h' if seconds else ''} on a 2-core CPU.
- Rebuild: `make default-fast` (after `make default-model`; resumes after an interruption).
{rebuilt_set_note(settings.get("manifest_sha256"), args.training)}- {size_mb:.1f} MB in all (fp16 safetensors; tokenizer, text encoder and VAE are the teacher's{'; the tiny decoder is its own' if evaluation.get('other_decoder') else ''}).

## Targets
| figure | target | value | |
|---|---|---|---|
{target_lines}

## Label fidelity beside the teacher
The {films} auditor (`{evaluation['auditor']}`) reads {len(gen_rows)} images of the held-out cases of
`dataset_specs/default_model_evaluation.yaml` made by the student ({sampling.get('scheduler')},
{sampling.get('steps')} steps, guidance {sampling.get('guidance_scale')}, {sampling.get('decoder', 'full')} decoder,
{sampling.get('dtype', 'float32')}) and by the teacher
({sampling_text(teacher)}); the last column is the auditor on the {films} films of the same cases
(its ceiling).

| figure | student | teacher | {films} films (ceiling) |
|---|---|---|---|
{table}

| finding | cases | student sensitivity | teacher sensitivity | {films} sensitivity |
|---|---|---|---|---|
{per_finding}

By view (PA, AP, LL: lateral):

{view_table(evaluation["by_view"], "student", films, teacher.get("by_view"))}

{decoder_section(evaluation, teacher)}## FID and memorisation
Fréchet distance in the auditor's embedding space against the held-out {films} films: student
**{evaluation['fid']:.2f}**, teacher {teacher['fid']:.2f}, floor (training films against the same set)
{evaluation['fid_floor']:.2f}. Memorisation against {len(train_rows)} training films: flagged
{memo['encoder']['flagged_fraction']:.1%} in encoder space, {memo['pixel']['flagged_fraction']:.1%} in pixel space.

## Speed
`synthmed generate`, 256x256, every output (DICOM, SR, SEG, PNG), QC off: student
**{evaluation['speed_images_per_s']:.2f} images/s**, teacher {teacher['speed_images_per_s']:.2f} images/s, on
{machine_text()}, in the card's own run (benchmarks/bench_diffusion.py
measures it against the bare diffusers pipeline).

## Samples
The first case of each finding: the student's image above, the {films} film of the same case below.

![samples](../../../docs/default_fast_model_samples.png)
"""
    grid_path = args.docs.parent / "default_fast_model_samples.png"
    import shutil

    shutil.copyfile(args.work / "samples.png", grid_path)
    (args.model / "README.md").write_text(card, encoding="utf-8")
    args.docs.write_text(card.replace("](../../../docs/default_fast_model_samples.png)",
                                      "](default_fast_model_samples.png)"), encoding="utf-8")
    print(card)


def machine_text() -> str:
    """The machine speed was measured on, CPU model included (the same card's images/s differ about 2x between the
    2-core machines this project runs on), e.g. ``x86_64 (AMD EPYC) with 2 CPU cores``."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor()
    return f"{platform.machine()}{f' ({model})' if model else ''} with {os.cpu_count()} CPU cores"


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def lineage(training: dict) -> list[dict]:
    """The training records of a model, first stage (from scratch) first."""
    return (lineage(training["base_training"]) if "base_training" in training else []) + [training]


def total_unet_steps(training: dict) -> int:
    return sum(stage["steps"] for stage in lineage(training))


NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}  # a stage count in the card's words
# The manifest the first stage of the shipped model ran on, built before the sampler fix (see the card).
PRE_FIX_SET = "faf4fcc7397a"


def _rate(s: dict) -> str:
    lr = s["learning_rate"] or (5e-4 if s["base"] == "scratch" else 1e-4 if s["mode"] == "lora" else 1e-5)
    return f"learning rate {lr:g} " + ("cosine to a tenth" if s.get("lr_schedule") == "cosine" else "constant")


def rebuilt_set_note(trained_on: str | None, compared: Path) -> str:
    """A card line where the training films the card compares against (memorisation, the FID floor) are not the
    build the model last trained on: a rebuild of its spec after the backend changed how it draws. Empty if same."""
    import hashlib

    now = hashlib.sha256(compared.read_bytes()).hexdigest()
    if not trained_on or trained_on == now:
        return ""
    return textwrap.fill(
        f"- The training films compared against below (the FID floor, memorisation) are a build of the spec made "
        f"after this model was trained (manifest sha256 `{now[:12]}`; it trained on `{trained_on[:12]}`): the "
        "backend has drawn some findings differently since (docs/drr.md says what changed), so they are the films "
        "the spec gives now, which `make default-model` would train on.", 112, subsequent_indent="  ") + "\n"


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
        weighted = f", findings' loss weight {s['finding_loss_weight']:g}" if s.get("finding_loss_weight") else ""
        line += (f", then {stage['steps']:,} more from those weights ({s['mode']} {what(s)}, {_rate(s)}, "
                 f"seed {s['seed']}{weighted}) on {'the same' if same else 'another build of the'} training set")
    line += (f"; last losses: VAE {fmt(first['losses'].get('vae'), 4)}, "
             f"UNet {fmt(stages[-1]['losses'].get('unet'), 4)}; training time {hours:.2f} h (from the logs) "
             "on a 2-core CPU shared with other work.")
    # a stage of `make default-model-refresh` starts from its copy of the shipped model, out/default-model-base
    made = sum(Path(str(t["settings"]["base"])).name != "default-model-base" for t in stages)
    runs = ("both stages" if made == len(stages) == 2 else "every stage" if made == len(stages)
            else f"the first {NUMBERS.get(made, made)} stages" if made > 1 else "the first stage")
    rebuild = f"- Rebuild: `make default-model` (generates the training set, runs {runs}, resumes after an interruption)."
    if made < len(stages):
        rebuild += (" Each later stage is `make default-model-refresh`: the anneal stage again, from the shipped "
                    "weights, on the build of the spec after the drr backend changed how it draws a finding.")
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
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: out/model-card-<model>)")
    parser.add_argument("--train-sample", type=int, default=1200, help="training images compared against")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/default_model.md")
    parser.add_argument("--films", choices=("drr", "phantom"), default="drr",
                        help="the backend the model learned from: the reference images and the auditor")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the model is a distilled student of this teacher (whose evaluation.json, on the same "
                             "spec, is put beside the student's figures)")
    args = parser.parse_args()
    films = args.films
    args.work = args.work or ROOT / "out" / f"model-card-{args.model.name}"
    import hashlib

    spec_sha256 = hashlib.sha256(args.spec.read_bytes()).hexdigest()
    teacher_eval = None
    if args.teacher is not None:
        teacher_file = args.teacher / "evaluation.json"
        teacher_eval = json.loads(teacher_file.read_text(encoding="utf-8")) if teacher_file.is_file() else {}
        if teacher_eval.get("eval_spec_sha256") != spec_sha256:
            raise SystemExit(f"error: {teacher_file} is not an evaluation on {args.spec} as it is now; run "
                             f"`python scripts/model_card.py --model {args.teacher}` (make model-card) first")

    import dataclasses

    from synthmed.build import generate
    from synthmed.spec import load_spec
    from synthmed.qc.auditor import Auditor, label_fidelity, memorisation_audit, shipped_auditor_dir
    from synthmed.qc.metrics import fid_from_features

    # 1. The held-out cases, by the model and by the backend it learned from
    started = time.time()
    spec = load_spec(args.spec)
    if args.teacher is not None:  # the spec's sampling settings are the teacher's: the student samples as it recommends
        spec = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, steps=None, scheduler=None,
                                                                       guidance_scale=None, decoder=None,
                                                                       late_guidance=None))
    made = generate(spec, args.work / "generated", model=str(args.model), overwrite=True, progress=True, qc=False)
    speed = made.written / made.seconds
    generate(args.spec, args.work / films, backend=films, overwrite=True, progress=True, qc=False)
    gen_rows, gen = read_set(args.work / "generated" / "manifest.csv")
    ref_rows, ref = read_set(args.work / films / "manifest.csv")
    assert [r["case_id"] for r in gen_rows] == [r["case_id"] for r in ref_rows]
    with open(args.training, newline="", encoding="utf-8") as fh:
        n_train = sum(1 for _ in fh) - 1
    train_rows, train = read_set(args.training, limit=args.train_sample, stride=max(1, n_train // args.train_sample))

    # 2. Label fidelity, FID, memorisation
    auditor = Auditor.load(shipped_auditor_dir(films))
    gen_read, ref_read = auditor.predict(gen), auditor.predict(ref)
    fidelity = label_fidelity(gen_read, gen_rows)
    ceiling = label_fidelity(ref_read, ref_rows)
    # Does the model's image read like the backend's film of the same case? Independent of the auditor's misses.
    leaves = set(fidelity["findings"]["leaf_findings"])
    same_reading = float(np.mean([set(a) & leaves == set(b) & leaves
                                  for a, b in zip(gen_read.findings(), ref_read.findings())]))
    f_gen, f_ref, f_train = auditor.embed(gen), auditor.embed(ref), auditor.embed(train)
    fid = fid_from_features(f_gen, f_ref, method="eigh")
    fid_floor = fid_from_features(f_train, f_ref, method="eigh")
    memo = memorisation_audit(f_gen, [r["case_id"] for r in gen_rows], f_train, [r["case_id"] for r in train_rows],
                              gen_pixels=gen, train_pixels=train)
    grid(gen_rows, gen, ref, args.work / "samples.png")
    other_decoder = None
    run_generator = json.loads((args.work / "generated" / ".synthmed" / "run.json").read_text(encoding="utf-8"))[
        "generator"]
    decoder = run_generator.get("decoder") or "full"
    if (args.model / "tiny_vae").is_dir():  # the same latents through the other decoder: what the choice costs
        other = "full" if decoder == "tiny" else "tiny"
        spec_other = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, decoder=other))
        made_other = generate(spec_other, args.work / f"generated-{other}-decoder", model=str(args.model),
                              overwrite=True, progress=True, qc=False)
        other_rows, other_images = read_set(args.work / f"generated-{other}-decoder" / "manifest.csv")
        other_decoder = {"decoder": other, "label_fidelity": label_fidelity(auditor.predict(other_images), other_rows),
                         "fid": fid_from_features(auditor.embed(other_images), f_ref, method="eigh"),
                         "speed_images_per_s": made_other.written / made_other.seconds}

    # 3. The card
    params = {}
    from safetensors import safe_open

    for part in ("text_encoder", "vae", "unet"):
        for f in (args.model / part).glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                params[part] = sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    size_mb = sum(p.stat().st_size for p in args.model.rglob("*") if p.is_file()) / 2**20
    spec_hash = train_rows[0].get("spec_hash", "")
    evaluation = {
        "films": films, "label_fidelity": fidelity, "label_fidelity_ceiling": ceiling,
        "same_reading_as_reference": same_reading,
        "by_view": by_view(gen_read, ref_read, gen_rows, ref_rows),
        "auditor": auditor.name, "fid": fid, "fid_floor": fid_floor,
        "memorisation": {k: v for k, v in memo.items() if k in ("n_generated", "n_training")} |
                        {space: {k: memo[space][k] for k in ("threshold", "distances", "training_distances",
                                                             "flagged_fraction")} if memo.get(space) else None
                         for space in ("encoder", "pixel")},
        "speed_images_per_s": speed, "eval_cases": len(gen_rows),
        "machine": machine_text(), "seconds": time.time() - started,
        "eval_spec_sha256": spec_sha256,
        "sampling": {**{k: v for k, v in run_generator.items()
                        if k in ("scheduler", "steps", "guidance_scale", "timestep_spacing", "late_guidance")},
                     "decoder": decoder, "dtype": json.loads(gen_rows[0]["generation"]).get("dtype", "float32")},
    }
    if other_decoder is not None:
        evaluation["other_decoder"] = other_decoder
    if teacher_eval is not None:
        evaluation["teacher"] = {"folder": str(args.teacher.relative_to(ROOT)) if args.teacher.is_absolute()
                                 and args.teacher.is_relative_to(ROOT) else str(args.teacher),
                                 "evaluation": teacher_eval}
        evaluation["targets"] = targets = student_targets(evaluation, teacher_eval)
        (args.model / "evaluation.json").write_text(json.dumps(evaluation, indent=1, default=float), encoding="utf-8")
        write_student_card(args, evaluation, teacher_eval, gen_rows, train_rows, memo)
        return
    evaluation["targets"] = targets = card_targets(evaluation)
    (args.model / "evaluation.json").write_text(json.dumps(evaluation, indent=1, default=float), encoding="utf-8")
    grid(gen_rows, gen, ref, args.docs.parent / "default_model_samples.png")
    training = json.loads((args.model / "training.json").read_text(encoding="utf-8"))
    settings = lineage(training)[0]["settings"]  # the scratch stage: design, VAE

    film_text = FILMS_TEXT[films]
    fl, cl = fidelity["findings"], ceiling["findings"]
    per_finding = "\n".join(
        f"| {name} | {v['support']} | {fmt(v['accuracy'])} | {fmt(v['sensitivity'])} | {fmt(v['specificity'])} | "
        f"{fmt(cl['per_finding'][name]['sensitivity'])} |"
        for name, v in fl["per_finding"].items() if v["support"])
    target_lines = "\n".join(f"| {t['what']} | {t['target']} | {t['value']} | {'met' if t['met'] else '**not met**'} |"
                              for t in targets)
    configs = {part: json.loads((args.model / part / "config.json").read_text(encoding="utf-8"))
               for part in ("vae", "unet", "text_encoder")}
    vae_c, unet_c, text_c = configs["vae"], configs["unet"], configs["text_encoder"]
    factor = 2 ** (len(vae_c["block_out_channels"]) - 1)
    card = f"""# synthmed default model

A small latent-diffusion model of **synthetic** chest radiographs, trained by `synthmed finetune` from scratch
on {film_text}, so that `synthmed generate` makes real latent-diffusion images on
a CPU with no download. Used when a spec says `generator.model: default`.

## Intended use
Building and testing pipelines, demos, teaching, and pre-training experiments. The images are synthetic:
{film_text} as learned by a small model: **not for diagnosis, not a substitute for
real radiographs**, and not evidence about any patient. Every image synthmed writes from it is marked synthetic.

## Training
- Training set: `dataset_specs/default_model_training.yaml` (spec sha256 `{spec_hash[:12]}`), {settings['images']:,}
  films at {settings['width']}x{settings['height']}, prompts by the `{settings['template']}` template.
- Design: word-level tokenizer built from the vocabulary; CLIP text encoder {text_c['hidden_size']}-d,
  {text_c['num_hidden_layers']} layers ({params.get('text_encoder', 0) / 1e6:.2f} M parameters); AutoencoderKL,
  {vae_c['in_channels']} channel, blocks {tuple(vae_c['block_out_channels'])}, {factor}x down,
  {vae_c['latent_channels']} latent channels, trained on {settings['vae_crop']}x{settings['vae_crop']} crops
  ({params.get('vae', 0) / 1e6:.2f} M); UNet {tuple(unet_c['block_out_channels'])}, {unet_c['layers_per_block']}
  resnet(s) per level, cross-attention at the lower resolutions ({params.get('unet', 0) / 1e6:.2f} M). fp16
  safetensors, {size_mb:.1f} MB in all. Sizes chosen from measurements: `scripts/measure_model_capacity.py`
  (docs/default_model.md, "Why these sizes").
{training_steps_lines(training)}
{rebuilt_set_note(lineage(training)[-1]["settings"].get("manifest_sha256"), args.training)}
## Targets
| figure | target | value | |
|---|---|---|---|
{target_lines}

## Label fidelity
The auditor (`{shipped_auditor_dir(films).relative_to(ROOT)}`, {auditor.name}, trained on {films} films of
its own spec) reads {len(gen_rows)} images the model made for the held-out cases of
`dataset_specs/default_model_evaluation.yaml` ({sampling_text(evaluation)}); the last column is the auditor on the {films} films of the same
cases (its ceiling: what it misses there, it cannot credit the model with).

| figure | model | {films} films (ceiling) |
|---|---|---|
| finding set agreement (exact) | {fmt(fl['exact_set_agreement'])} | {fmt(cl['exact_set_agreement'])} |
| mean per-finding accuracy | {fmt(fl['mean_accuracy'])} | {fmt(cl['mean_accuracy'])} |
| location (exact) | {fmt(fidelity['location']['accuracy'])} | {fmt(ceiling['location']['accuracy'])} |
| location (side) | {fmt(fidelity['location']['side_accuracy'])} | {fmt(ceiling['location']['side_accuracy'])} |
| severity | {fmt(fidelity['severity']['accuracy'])} | {fmt(ceiling['severity']['accuracy'])} |
| finding set read the same as on the {films} film of the case | {fmt(same_reading)} | 1 |

| finding | cases | accuracy | sensitivity | specificity | {films} sensitivity |
|---|---|---|---|---|---|
{per_finding}

By view (PA, AP, LL: lateral):

{view_table(evaluation["by_view"], "model", films)}

## FID
Fréchet distance in the auditor's embedding space (`method="eigh"`): the model's images vs the held-out
{films} films **{fid:.2f}**; a sample of {len(train_rows)} training films vs the same held-out films
**{fid_floor:.2f}** (the floor: two samples of the same distribution).

## Memorisation
Nearest training image (of {len(train_rows)} sampled) for each generated image. Encoder space (cosine distance):
median {fmt(memo['encoder']['distances']['median'], 4)}, minimum {fmt(memo['encoder']['distances']['min'], 4)};
flagged (closer than the 1st percentile of training-to-training distances,
{fmt(memo['encoder']['threshold'], 4)}): {memo['encoder']['flagged_fraction']:.1%}.
Pixel space (64x64, L2): median {fmt(memo['pixel']['distances']['median'])}, minimum
{fmt(memo['pixel']['distances']['min'])}; flagged {memo['pixel']['flagged_fraction']:.1%}.

## Speed
`synthmed generate` with this model, 256x256, {sampling_text(evaluation)}, every output (DICOM, SR, SEG,
PNG): **{speed:.2f} images/s** on {machine_text()}, in the card's
own run (benchmarks/bench_diffusion.py measures it against the bare diffusers pipeline).

{capacity_section(args.docs.parent / "default_model_capacity.json")}
## Samples
The first case of each finding: the model's image above, the {films} film of the same case below.

![samples](../../../docs/default_model_samples.png)
"""
    (args.model / "README.md").write_text(card, encoding="utf-8")
    args.docs.write_text(card.replace("](../../../docs/default_model_samples.png)", "](default_model_samples.png)"),
                         encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
