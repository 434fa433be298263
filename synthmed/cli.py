"""The ``synthmed`` command: one thin command per library entry point.

Exit codes: 0 ok, 1 failure, 2 usage or spec error. Expected errors print a message, never a traceback.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
from pathlib import Path

import click

from . import __version__
from .spec import SpecError, load_spec


def _late_guidance(ctx, param, value: str | None):
    """--late-guidance checked, and kept as written (``SCALE@TIMESTEP`` or ``none``: what a resume command repeats);
    :func:`_generator_overrides` parses it."""
    if value is None or value == "none":
        return value
    from .spec import parse_late_guidance

    try:
        parse_late_guidance(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


# generate's options that only the diffusion backend reads
DIFFUSION_ONLY = ("steps", "guidance_scale", "scheduler", "timestep_spacing", "late_guidance", "dtype", "device",
                  "compile", "quantize", "decoder")


def _generator_overrides(options: dict) -> dict:
    """The generate options that override spec.generator, as GeneratorSpec holds them."""
    overrides = {k: v for k, v in options.items() if v is not None}
    if overrides.get("late_guidance") not in (None, "none"):
        from .spec import parse_late_guidance

        overrides["late_guidance"] = parse_late_guidance(overrides["late_guidance"])
    return overrides


def _fail_spec(e: SpecError) -> None:
    click.echo(str(e), err=True)
    raise SystemExit(2)


def _print_warnings(spec) -> None:
    for w in spec.warnings:
        click.echo(w.format(spec.source), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="synthmed")
def main() -> None:
    """Build labelled synthetic chest X-ray training sets from a YAML spec.

    \b
    synthmed validate dataset_specs/pneumonia.yaml
    synthmed plan dataset_specs/pneumonia.yaml -o out/cases.jsonl
    """
    # transformers' advisory notes (e.g. that torchvision is absent) are noise on this command line
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    _keep_freed_memory()


def _keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    torch and numpy allocate and free large buffers on every batch; by default glibc serves each from a fresh mmap and
    unmaps it on free, so the next batch page-faults the same memory in again (about 3.5 M faults and 5 s of kernel
    time per 100 diffusion images on 2 cores). This is the tuning PyTorch's CPU launcher gets from jemalloc or
    tcmalloc; the outputs do not change, the peak memory grows by about a tenth. Left alone where the user has
    chosen malloc settings (any MALLOC_* or GLIBC_TUNABLES) or the C library is not glibc. Returns whether it applied.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt takes no such parameters
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
def validate(specs: tuple[Path, ...], quiet: bool) -> None:
    """Check one or more specs: strict YAML, the JSON Schema, then meaning.

    Every problem is listed with its file, line, column and JSON path. Exits 2 if any spec is wrong.
    """
    failed = 0
    for path in specs:
        try:
            spec = load_spec(path)
        except SpecError as e:
            click.echo(str(e), err=True)
            failed += 1
            continue
        _print_warnings(spec)
        if not quiet:
            click.echo(f"ok: {path}: '{spec.name}', {spec.count:,} cases, {len(spec.findings)} finding entries, "
                       f"spec sha256 {spec.spec_hash[:12]}")
    if failed:
        click.echo(f"{failed} of {len(specs)} spec{'s' if len(specs) != 1 else ''} failed validation", err=True)
        raise SystemExit(2)


def _check_plan_output(output: Path, overwrite: bool) -> None:
    """A plan file goes where nothing of the user's, or of another synthmed command, is replaced."""
    from .atomic import leftover_temps
    from .build.run_folder import STATE_DIR
    from .ledger import Ledger

    parent = output.absolute().parent
    for folder in [parent, *parent.parents]:  # a dataset's, model's or work folder's own files
        other = Ledger(folder, folder / STATE_DIR).other_kind() if (folder / STATE_DIR).is_dir() else None
        if other:
            raise click.UsageError(f"--output {output} lies in {folder}, which holds {other}; write the plan "
                                   "elsewhere")
    for leftover in leftover_temps(output):
        click.echo(f"warning: {leftover} ({leftover.lstat().st_size:,} bytes) is the temp file of an interrupted "
                   "plan; synthmed did not record it, so it is left there: remove it yourself", err=True)
    if os.path.lexists(output) and (not overwrite or not output.is_file() or output.is_symlink()):
        what = "is not a plain file" if not output.is_file() or output.is_symlink() else "exists"
        raise click.UsageError(f"--output {output} {what}; "
                               + ("pass --overwrite to replace it" if what == "exists" else "choose another path"))


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the cases to this file: .jsonl (one Case per line) or .csv (flat, with CheXpert columns and prompts).")
@click.option("--csv", "as_csv", is_flag=True, help="Print the summary table as CSV instead of text.")
@click.option("--show", default=5, show_default=True, type=click.IntRange(0, 1000), help="How many prompts to print.")
@click.option("--limit", type=click.IntRange(1), help="Plan only the first N cases (the same ones a full run starts with).")
@click.option("--overwrite", is_flag=True, help="Replace the --output file if it exists.")
def plan(spec_path: Path, output: Path | None, as_csv: bool, show: int, limit: int | None, overwrite: bool) -> None:
    """Show what a spec will produce: counts per finding x location x severity x split, and the first prompts."""
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        _fail_spec(e)
    _print_warnings(spec)
    if output is not None and output.suffix.lower() not in (".jsonl", ".csv"):
        raise click.UsageError(f"--output must end in .jsonl or .csv, got '{output.name}'")
    if output is not None:
        _check_plan_output(output, overwrite)
    from .prompts import build_prompt
    from .sampler import sample_cases

    cases = sample_cases(spec, limit=limit)
    rows = cases.counts()
    splits = list(spec.splits.keys)
    if as_csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["finding", "location", "severity", *splits, "total", "target"],
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "target": f"{row['target']:.4f}"})
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(_summary_text(spec, cases, rows, splits, show, build_prompt))
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            if output.suffix.lower() == ".jsonl":
                cases.write_jsonl(output)
            else:
                _write_cases_csv(cases, spec, output)
        except OSError as e:
            click.echo(f"error: could not write {output}: {e.strerror or e}", err=True)
            raise SystemExit(1)
        click.echo(f"wrote {len(cases):,} cases to {output}", err=as_csv)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: new, empty, or one an earlier run wrote (with --resume or --overwrite).")
@click.option("--resume", is_flag=True, help="Finish an interrupted run: verify what is there by sha256, redo the rest.")
@click.option("--overwrite", is_flag=True, help="Delete what an earlier run wrote in the folder and start again.")
@click.option("--limit", type=click.IntRange(1), help="Build only the first N cases (the same ones a full run starts with).")
@click.option("--backend", type=click.Choice(["diffusion", "drr", "phantom", "pattern"]),
              help="Override generator.backend (pattern: a fast test pattern with exact masks, for dry runs).")
@click.option("--model", help="Override generator.model: 'default', 'default-fast' (its few-step student) or a local "
              "diffusers pipeline folder.")
@click.option("--batch-size", type=click.IntRange(1, 1024), help="Override generator.batch_size; never changes an image.")
@click.option("--steps", type=click.IntRange(1, 1000), help="Override generator.steps.")
@click.option("--guidance-scale", type=click.FloatRange(0, 50), help="Override generator.guidance_scale.")
@click.option("--scheduler", type=click.Choice(["dpm_solver", "ddim", "euler", "euler_ancestral", "pndm", "unipc",
                                               "lcm"]),
              help="Override generator.scheduler (lcm: a student made by synthmed distill).")
@click.option("--timestep-spacing", type=click.Choice(["leading", "linspace", "trailing"]),
              help="Override generator.timestep_spacing (default: trailing with dpm_solver, euler and unipc).")
@click.option("--late-guidance", metavar="SCALE@TIMESTEP|none", callback=_late_guidance,
              help="Override generator.late_guidance: e.g. 2@500 guides the steps below timestep 500 at 2 instead of "
                   "--guidance-scale; none: the same guidance to the last step (default: the model folder's "
                   "recommendation; the shipped default's is 2@500).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]),
              help="Override generator.dtype (auto: bfloat16 where the CPU or GPU computes it natively, else float32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="Override generator.device.")
@click.option("--compile/--no-compile", default=None, help="Wrap the UNet in torch.compile.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), help="Dynamic int8 quantisation of the UNet (CPU).")
@click.option("--decoder", type=click.Choice(["full", "tiny"]),
              help="Override generator.decoder: the model's VAE, or its lighter tiny decoder (tiny_vae/, as synthmed "
                   "distill trains one); default: the model folder's recommendation.")
@click.option("--threads", type=click.IntRange(1, 1024), help="torch CPU threads.")
@click.option("--allow-pickle", is_flag=True, default=None,
              help="Allow pickled (.bin/.ckpt) model weights, which can run code. Only for models you trust.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the chunks are made: this process, or Ray workers (pip install 'synthmed[ray]'); "
                   "both write the same bytes.")
@click.option("--address", "ray_address", metavar="ADDR",
              help="Ray cluster to join (--executor ray), e.g. ray://head:10001; default: $RAY_ADDRESS, else a local Ray.")
@click.option("--workers", type=click.IntRange(1), help="Ray workers, one backend each (default: the cluster's CPUs, "
                                                        "or its GPUs / --gpus-per-worker).")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0, show_default=True,
              help="GPUs each Ray worker reserves (0.5: two workers share a GPU).")
@click.option("--qc/--no-qc", "run_qc", default=None,
              help="Run the cheap quality checks at the end (default: the spec's qc.enabled, true).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate(spec_path: Path, out: Path, resume: bool, overwrite: bool, limit: int | None, backend: str | None,
             model: str | None, batch_size: int | None, executor: str, ray_address: str | None, workers: int | None,
             gpus_per_worker: float, run_qc: bool | None, quiet: bool, **generator_options) -> None:
    """Build the dataset: images (DICOM, PNG), masks, manifest.csv and the dataset card.

    Ctrl-C finishes the current batch and stops; rerun with --resume to finish.
    With --executor ray, OUT must be a folder every Ray worker can write (a shared file system).
    The quality checks run at the end (qc_report.json, report.html); exits 1 when a gating check fails.
    """
    from .build import CHUNK_SIZE, BuildError
    from .build import generate as run_generate

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        _fail_spec(e)
    _print_warnings(spec)
    overrides = _generator_overrides(generator_options)
    used = (backend or spec.generator.backend)
    idle = [k for k in ("model", *DIFFUSION_ONLY) if (model if k == "model" else overrides.get(k)) is not None]
    if used != "diffusion" and idle:  # else recorded in the run, where they would only block a --resume
        names = ", ".join("--" + k.replace("_", "-") for k in idle)
        raise click.UsageError(f"{names} {'applies' if len(idle) == 1 else 'apply'} to the diffusion backend only; "
                               f"this run uses the {used} backend")
    if overrides:
        import dataclasses

        spec = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, **overrides))
    try:
        result = run_generate(spec, out, resume=resume, overwrite=overwrite, limit=limit, backend=backend,
                              model=model, batch_size=batch_size, progress=not quiet, executor=executor,
                              ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                              qc=run_qc)
    except BuildError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"interrupted; rerun with --resume to finish: {_resume_command()}", err=True)
        raise SystemExit(130)
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    if result.interrupted:
        click.echo(f"interrupted after {result.written} new images; whole chunks of {CHUNK_SIZE} are kept and the "
                   f"unfinished one is made again. Rerun with --resume to finish: {_resume_command()}", err=True)
        raise SystemExit(130)
    rate = result.written / result.seconds if result.seconds > 0 else 0.0
    click.echo(f"wrote {result.written:,} images ({result.reused:,} kept from before) of {result.total:,} "
               f"in {result.seconds:.1f} s ({rate:.1f} images/s)")
    folders = [str(out / top) for top in ("images", "dicom") if (out / top).is_dir()]
    click.echo(f"  images:   {'  '.join(folders) or '(none written)'}")
    click.echo(f"  manifest: {out / 'manifest.csv'}")  # as the other lines: the folder as it was given
    click.echo(f"  card:     {out / 'dataset_card.json'}")
    if result.qc is not None:
        from .qc.report import headline, summary_lines

        click.echo(f"  qc:       {headline(result.qc.report, result.qc.seconds)}")
        for line in summary_lines(result.qc.report) if not result.qc.passed else ():
            click.echo(f"            {line}")
        click.echo("            " + "  ".join(str(p) for p in (result.qc.report_path, result.qc.html_path) if p))
        for message in result.qc.not_written:
            click.echo(f"warning: {message}", err=True)
        if not result.qc.passed:
            raise SystemExit(1)


@main.command()
@click.option("--manifest", required=True, type=click.Path(path_type=Path),
              help="A synthmed manifest.csv (or its folder, or a split's images/<split>/metadata.csv): phantom or "
                   "drr images, or your own described in the same columns; or a real dataset's folder or CSV: "
                   "CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14, or any CSV with --column-map (records of split "
                   "train, or of none; docs/datasets.md).")
@click.option("--dataset-kind", type=click.Choice(["chexpert", "mimic", "nih", "csv"]),
              help="Force the real dataset's layout (default: told from its files and columns).")
@click.option("--column-map", type=click.Path(dir_okay=False, path_type=Path), metavar="YAML",
              help="For a CSV in no known layout: a YAML file naming its columns (docs/datasets.md).")
@click.option("--prompts", type=click.Choice(["labels", "reports"]), default="labels", show_default=True,
              help="A real dataset's prompts: its labels through --template (the model answers synthmed's specs), "
                   "or its reports' impressions (RoentGen's recipe).")
@click.option("--no-report", type=click.Choice(["skip", "labels"]),
              help="With --prompts reports, a record without an impression: skip it (default) or prompt its labels.")
@click.option("--uncertain", type=click.Choice(["ignore", "positive", "negative"]),
              help="A real dataset's uncertain labels (-1): left out of the prompt (ignore, the default), "
                   "present (positive) or absent (negative).")
@click.option("--views", type=click.Choice(["all", "frontal"]), default="all", show_default=True,
              help="Train on every view, or on PA and AP only (laterals and unknown views left out, counted).")
@click.option("--size", type=click.IntRange(8), metavar="N",
              help="Training size: each image's shorter side resized to N, then a square crop (aspect kept). "
                   "Default: a manifest of same-size PNGs as it is; anything else at the model's native size "
                   "(512 for an SD-1.x/RoentGen folder, 256 from scratch).")
@click.option("--crop", type=click.Choice(["center", "random"]), default="center", show_default=True,
              help="The square taken across the longer side; random: one offset per image drawn from --seed (the "
                   "latent cache holds one crop per image, the same after --resume).")
@click.option("--base", required=True, help="'scratch' (the small default design) or a local diffusers model folder.")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The model folder to write (a diffusers pipeline, safetensors).")
@click.option("--mode", type=click.Choice(["full", "lora"]), default="full", show_default=True,
              help="Train every UNet weight, or LoRA adapters (merged into the saved UNet).")
@click.option("--train-text-encoder/--freeze-text-encoder", default=None,
              help="Also train the text encoder (always on from scratch; off by default for a base model).")
@click.option("--steps", type=click.IntRange(0), default=2000, show_default=True, help="UNet optimiser steps.")
@click.option("--vae-steps", type=click.IntRange(0), default=1000, show_default=True, help="VAE steps (scratch only).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="UNet images per step (per micro-step with --gradient-accumulation).")
@click.option("--vae-batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--vae-crop", type=click.IntRange(8), default=64, show_default=True,
              help="Side of the random crops the VAE trains on (it is fully convolutional).")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True),
              help="UNet learning rate (default: 5e-4 scratch, 1e-4 LoRA, 1e-5 full fine-tune).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="After 200 warm-up steps: constant, or cosine down to a tenth at the last step.")
@click.option("--finding-loss-weight", type=click.FloatRange(0, 1000), default=0.0, show_default=True, metavar="W",
              help="Weigh the UNet's loss 1 + W on the latent cells the findings' masks cover (a drr or phantom "
                   "manifest's mask_paths) and 1 elsewhere, so that small findings count; 0: every cell alike.")
@click.option("--save-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
              show_default=True, help="Precision every component of the saved model is stored in (frozen ones too).")
@click.option("--template", default="synthmed-v1", show_default=True,
              help="Prompt template (a built-in name or a template string), the same as generation uses.")
@click.option("--lora-rank", type=click.IntRange(1), default=8, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=250, show_default=True)
@click.option("--validate-every", type=click.IntRange(0), default=0, show_default=True,
              help="Write a validation image grid every N steps (0: at the end only).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, latent cache, logs, validation grids (default: OUTPUT.training).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the work folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model folder / earlier checkpoints.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default: the CPUs this process may use).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto uses a CUDA GPU through accelerate when there is one.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="Forward pass in half precision, weights in float32: fp16 needs a CUDA GPU; bf16 also runs on CPUs.")
@click.option("--gradient-accumulation", type=click.IntRange(1), default=1, show_default=True,
              help="Micro-batches of --batch-size per UNet optimiser step (the effective batch is their product).")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in the backward pass: far less GPU memory, about a third slower per step.")
@click.option("--allow-pickle", is_flag=True, help="Allow a base model with pickled weights (only if you trust it).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def finetune(manifest: Path, base: str, out: Path, quiet: bool, **options) -> None:
    """Train a latent-diffusion model on a manifest or a real dataset, with the prompts generation uses.

    \b
    synthmed finetune --manifest out/phantom/manifest.csv --base scratch -o models/mine --steps 8000
    synthmed finetune --manifest my_cxr/manifest.csv --base ./roentgen --mode lora -o models/roentgen-lora
    synthmed finetune --manifest /data/CheXpert-v1.0-small --base ./roentgen --mode lora --views frontal -o models/cxp
    synthmed finetune ... --device cuda --mixed-precision bf16 --gradient-checkpointing --gradient-accumulation 4

    Interrupt at any time; rerun with --resume to continue from the last checkpoint.
    """
    from .finetune import ManifestError
    from .finetune import finetune as run_finetune

    try:
        with _training_warnings():
            result = run_finetune(manifest, base, out, progress=not quiet, **options)
    except (ManifestError, ValueError) as e:
        click.echo(f"error: {_as_flags(str(e))}", err=True)
        raise SystemExit(2)
    except ImportError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        click.echo(f"interrupted; rerun the same command with --resume to continue from the last checkpoint", err=True)
        raise SystemExit(130)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
    click.echo(f"trained {result.steps:,} UNet steps ({result.vae_steps:,} VAE) in {result.seconds / 60:.1f} min; "
               f"last losses: {losses or 'n/a'}")
    for line in result.record.get("data", {}).get("summary", ()):
        click.echo(f"  data:        {line}")
    click.echo(f"  model:       {result.model_dir}  (use it: generator.model: {Path(result.model_dir).absolute()})")
    click.echo(f"  checkpoints: {result.work_dir / 'checkpoints'}")
    click.echo(f"  validation:  {result.work_dir / 'validation'}")


@main.command()
@click.option("--teacher", required=True,
              help="The teacher: 'default' (the shipped model) or a local Stable-Diffusion-shaped diffusers folder "
                   "(RoentGen-style), loaded offline, safetensors unless --allow-pickle.")
@click.option("--manifest", required=True, type=click.Path(path_type=Path),
              help="What to distil on, as finetune reads it: a synthmed manifest.csv (or its folder), or a real "
                   "dataset's folder or CSV (CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14, or --column-map).")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The student folder to write (a diffusers pipeline with an LCMScheduler, safetensors).")
@click.option("--mode", type=click.Choice(["auto", "full", "lora"]), default="auto", show_default=True,
              help="full: every UNet weight, the guidance scale an input of the student; lora: LoRA adapters "
                   "(merged), one guidance scale distilled in; auto: full below 200 M UNet parameters, else lora.")
@click.option("--steps", type=click.IntRange(0), default=2000, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Latents per step.")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True),
              help="AdamW's rate after 100 warm-up steps (default 1e-4).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True)
@click.option("--guidance-min", type=click.FloatRange(1, 50),
              help="Full mode: the lowest guidance scale the student learns (default 2).")
@click.option("--guidance-max", type=click.FloatRange(1, 50),
              help="Full mode: the highest guidance scale the student learns (default 8).")
@click.option("--guidance-scale", type=click.FloatRange(1, 50), default=4.0, show_default=True,
              help="Full mode: the guidance the student's card recommends; lora mode: the one distilled into it.")
@click.option("--num-ddim-timesteps", type=click.IntRange(2, 1000), default=50, show_default=True,
              help="N of the DDIM solver the teacher takes its steps with (every 1000/N-th of its timesteps).")
@click.option("--student-steps", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="The sampling steps the student's card and distillation.json recommend; a --resume may change "
                   "it without training again (measure it: scripts/sweep_guidance.py --steps).")
@click.option("--time-cond-proj-dim", type=click.IntRange(4, 4096),
              help="Full mode: the width of the student's guidance embedding (default 256).")
@click.option("--ema-decay", type=click.FloatRange(0, 1),
              help="Full mode: the target network's moving-average decay (default 0.95).")
@click.option("--lora-rank", type=click.IntRange(1, 4096), help="Lora mode: the adapters' rank (default 64).")
@click.option("--tiny-decoder-steps", type=click.IntRange(0), default=0, show_default=True, metavar="N",
              help="Also train a TAESD-style decoder (tiny_vae/, about 3x faster than the VAE decode) for N steps, "
                   "for generator.decoder: tiny.")
@click.option("--recommend-dtype", type=click.Choice(["float32", "bfloat16", "auto"]), default="float32",
              show_default=True, help="The dtype the student recommends for generation (auto: bfloat16 where the "
                                      "machine computes it natively); check its images first.")
@click.option("--save-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
              show_default=True,
              help="Precision of the saved student UNet (the teacher's parts are copied as they are).")
@click.option("--template", default="synthmed-v1", show_default=True,
              help="Prompt template (a built-in name or a template string), the same as generation uses.")
@click.option("--late-guidance", metavar="SCALE@TIMESTEP|none", callback=_late_guidance,
              help="The teacher's guidance at its steps below TIMESTEP, which the student learns (e.g. 2@500); none: "
                   "the same guidance throughout (default: the teacher folder's recommendation).")
@click.option("--dataset-kind", type=click.Choice(["chexpert", "mimic", "nih", "csv"]),
              help="Force the real dataset's layout (default: told from its files and columns).")
@click.option("--column-map", type=click.Path(dir_okay=False, path_type=Path), metavar="YAML",
              help="For a CSV in no known layout: a YAML file naming its columns (docs/datasets.md).")
@click.option("--prompts", type=click.Choice(["labels", "reports"]), default="labels", show_default=True,
              help="A real dataset's prompts: its labels through --template, or its reports' impressions.")
@click.option("--no-report", type=click.Choice(["skip", "labels"]),
              help="With --prompts reports, a record without an impression: skip it (default) or prompt its labels.")
@click.option("--uncertain", type=click.Choice(["ignore", "positive", "negative"]),
              help="A real dataset's uncertain labels (-1): left out (default), present or absent.")
@click.option("--views", type=click.Choice(["all", "frontal"]), default="all", show_default=True)
@click.option("--size", type=click.IntRange(8), metavar="N",
              help="Training size (shorter side to N, then a square crop); default: same-size PNGs as they are, "
                   "else the teacher's native size.")
@click.option("--crop", type=click.Choice(["center", "random"]), default="center", show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=250, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, latent cache, log (default: OUTPUT.training).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the work folder.")
@click.option("--overwrite", is_flag=True, help="Replace a student / checkpoints an earlier run wrote.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads (default: the CPUs this process may use).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass.")
@click.option("--allow-pickle", is_flag=True, help="Allow a teacher with pickled weights (only if you trust it).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def distill(teacher: str, manifest: Path, out: Path, quiet: bool, **options) -> None:
    """Distil a few-step student of a teacher model: 4 steps, one UNet evaluation per step (no guidance pass).

    Latent consistency distillation; the student is a plain diffusers folder that generate samples with
    its recommended settings (lcm, 4 steps) when the spec sets no steps or scheduler.

    \b
    synthmed distill --teacher default --manifest out/drr/manifest.csv -o models/student
    synthmed distill --teacher ./roentgen --manifest my_cxr/manifest.csv -o models/roentgen-lcm --mode lora \\
        --template roentgen-v1 --device cuda --mixed-precision bf16 --gradient-checkpointing

    Interrupt at any time; rerun with --resume to continue from the last checkpoint.
    """
    from .distill import distill as run_distill
    from .finetune import ManifestError

    try:
        with _training_warnings():
            result = run_distill(manifest, teacher, out, progress=not quiet, **options)
    except (ManifestError, ValueError) as e:  # ModelFolderError (a bad teacher) is a ValueError
        click.echo(f"error: {_as_flags(str(e))}", err=True)
        raise SystemExit(2)
    except ImportError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command with --resume to continue from the last checkpoint", err=True)
        raise SystemExit(130)
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    loss = result.losses.get("consistency")
    recommended = result.record["recommended"]
    click.echo(f"distilled {result.steps:,} steps ({result.mode}) in {result.seconds / 60:.1f} min; last loss: "
               f"{'n/a' if loss is None else f'{loss:.5f}'}")
    click.echo(f"  student:     {result.model_dir}  (use it: generator.model: {Path(result.model_dir).absolute()}; "
               f"it samples with {recommended['scheduler']}, {recommended['steps']} steps, guidance "
               f"{recommended['guidance_scale']:g}"
               f"{'; generator.decoder: tiny for its tiny decoder' if 'tiny_decoder' in result.record else ''})")
    click.echo(f"  checkpoints: {result.work_dir / 'checkpoints'}")


@contextlib.contextmanager
def _training_warnings():
    """finetune's and distill's own warnings as one plain line each, when they happen."""
    import warnings

    from .finetune import FinetuneWarning

    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, FinetuneWarning):
            click.echo(f"warning: {_as_flags(str(message))}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", FinetuneWarning)
        warnings.showwarning = show
        yield


def _as_flags(message: str) -> str:
    """finetune's messages name Python arguments (overwrite=True); on the command line, name the flags."""
    import re

    for argument, flag in (("overwrite=True", "--overwrite"), ("resume=True", "--resume"),
                           ("allow_pickle=True", "--allow-pickle")):
        message = message.replace(argument, flag)
    message = re.sub(r"\b(device|mixed_precision|dataset_kind|prompts|no_report|uncertain|views|crop)='(\w+)'",
                     lambda m: f"--{m[1].replace('_', '-')} {m[2]}", message)
    message = re.sub(r"\bsize=(\d*)", lambda m: f"--size {m[1]}".rstrip(), message)
    return re.sub(r"(?<![\w/.-])(work_dir|dataset_kind|column_map|no_report)=?(?![\w/.-])",
                  lambda m: f"--{m[1].replace('_', '-')}", message)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), metavar="MANIFEST",
              help="Reference images: a manifest (CSV with png_path, file_name or path), or a real dataset's "
                   "folder or CSV (CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14; docs/datasets.md). Intensity bands "
                   "are fitted on them, and FID, KID, precision/recall/density/coverage computed against them: "
                   "over the whole set, and per finding where the reference has labels.")
@click.option("--reference-uncertain", type=click.Choice(["ignore", "positive", "negative"]), default="ignore",
              show_default=True,
              help="How a real reference dataset's uncertain labels (-1) count in the per-finding figures: in "
                   "neither group (U-Ignore), present (U-Ones) or absent (U-Zeros).")
@click.option("--training-manifest", type=click.Path(path_type=Path), metavar="MANIFEST",
              help="Manifest, or a real dataset's folder or CSV, of the images the generator was trained on, for "
                   "the memorisation audit.")
@click.option("--features", metavar="FOLDER|MODULE:ATTR",
              help="Feature extractor for FID, duplicates and memorisation: a model folder (config.json naming a "
                   "torchvision or timm architecture + model.safetensors; docs/datasets.md), or MODULE:ATTR (an "
                   "object with name and __call__, or a class making one); default: the shipped auditor's "
                   "embedding.")
@click.option("--no-auditor", is_flag=True, help="Skip the auditor (label fidelity, IS-style figure, default features).")
@click.option("--fast", is_flag=True, help="Only the cheap checks, as at the end of generate: per-image, intensity, "
                                           "spec fidelity, duplicates (FID only with --reference).")
@click.option("--dciodvfy-sample", type=click.IntRange(0), metavar="N",
              help="How many DICOM files dciodvfy checks (default: the spec's qc.dciodvfy_sample, 5).")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write qc_report.json and report.html into DIR (made if needed) and leave OUT untouched: for a "
                   "read-only build or another user's folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def qc(out: Path, reference: Path | None, reference_uncertain: str, training_manifest: Path | None,
       features: str | None, no_auditor: bool, fast: bool, dciodvfy_sample: int | None, report_dir: Path | None,
       quiet: bool) -> None:
    """Check an output folder: per-image checks, spec fidelity, duplicates, diversity, FID, label fidelity.

    Writes OUT/qc_report.json and OUT/report.html and fills the manifest's qc_status and qc_flags, each only where
    synthmed's record says the file is its own (a copied dataset's manifest is left as it is). In a folder it
    cannot write, it prints its verdict and writes nothing (use --report-dir).
    Exits 1 when a gating check (the spec's qc.gate) fails, 2 when OUT is not a synthmed output folder.
    """
    from .qc.report import headline, summary_lines
    from .qc.run import QCError
    from .qc.run import qc as run_qc

    try:
        result = run_qc(out, reference=reference, training_manifest=training_manifest, feature_extractor=features,
                        auditor=not no_auditor, full=not fast, dciodvfy_sample=dciodvfy_sample, progress=not quiet,
                        report_dir=report_dir, reference_uncertain=reference_uncertain)
    except QCError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:  # its files are written whole or not at all: a rerun checks again from the start
        click.echo("interrupted; nothing half-written was kept. Rerun synthmed qc to check the folder", err=True)
        raise SystemExit(130)
    report = result.report
    click.echo(headline(report, result.seconds))
    for line in summary_lines(report, skip_reasons=("auditor",) if no_auditor else ()):
        click.echo(f"  {line}")
    for note in report.get("notes") or ():
        click.echo(f"  note: {note}")
    for message in result.not_written:
        click.echo(f"warning: {message}", err=True)
    if result.report_path is not None:
        click.echo(f"  report: {result.report_path}")
    if result.html_path is not None:
        click.echo(f"  html:   {result.html_path}")
    if not result.passed:
        raise SystemExit(1)


def _resume_command() -> str:
    """The command that finishes this run: this one's arguments and overrides, with --resume, without --overwrite."""
    import shlex

    ctx = click.get_current_context()
    words = ["synthmed", ctx.info_name or "generate"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("resume", "overwrite") or value is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name == "DEFAULT":
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
            continue
        opt = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts and not value:
                words.append(max(param.secondary_opts, key=len))
            elif value:
                words.append(opt)
        else:
            words += [opt, str(value)]
    return shlex.join(words + ["--resume"])


def _summary_text(spec, cases, rows, splits, show, build_prompt) -> str:
    import numpy as np

    lines = [f"{spec.name}  ({spec.source})",
             f"{len(cases):,} cases · allocation {spec.allocation} · seed {spec.seed} · spec sha256 {spec.spec_hash[:12]}"]
    widths = [max(7, *(len(r["finding"]) for r in rows)), max(8, *(len(r["location"]) for r in rows)),
              max(8, *(len(r["severity"]) for r in rows))]
    num_w = [max(len(s), 6) for s in splits]
    head = (f"{'finding':<{widths[0]}}  {'location':<{widths[1]}}  {'severity':<{widths[2]}}  "
            + "  ".join(f"{s:>{w}}" for s, w in zip(splits, num_w)) + f"  {'total':>7}  {'target':>9}")
    lines += ["", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['finding']:<{widths[0]}}  {r['location']:<{widths[1]}}  {r['severity']:<{widths[2]}}  "
                     + "  ".join(f"{r[s]:>{w}}" for s, w in zip(splits, num_w))
                     + f"  {r['total']:>7}  {r['target']:>9.2f}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<{widths[0] + widths[1] + widths[2] + 4}}  "
                 + "  ".join(f"{sum(r[s] for r in rows):>{w}}" for s, w in zip(splits, num_w))
                 + f"  {len(cases):>7}")
    cols = cases.columns()

    def shares(names, column):
        counts = np.bincount(column, minlength=len(names))
        return ", ".join(f"{n} {c:,} ({100 * c / max(len(cases), 1):.1f}%)" for n, c in zip(names, counts))

    ages = cols["age"].astype(float)
    lines += ["", f"sex:  {shares(spec.sex.keys, cols['sex'])}",
              f"view: {shares(spec.view.keys, cols['view'])}",
              f"age:  mean {ages.mean():.1f}, sd {ages.std():.1f}, range {int(ages.min())}-{int(ages.max())}"]
    if show:
        lines += ["", f"first prompts (template {spec.prompt.template_id}):"]
        for case in cases[:show]:
            lines.append(f"  {case.case_id}  {build_prompt(case, spec.prompt).text}")
        if spec.prompt.negative:
            lines.append(f"  negative: {spec.prompt.negative}")
    return "\n".join(lines)


def _write_cases_csv(cases, spec, output: Path) -> None:
    from .atomic import atomic_write_text_lines
    from .prompts import build_prompt
    from .vocabulary import CHEXPERT_COLUMNS, get_vocabulary

    vocab = get_vocabulary()
    fields = ["case_id", "index", "split", "seed", "findings", *CHEXPERT_COLUMNS, "sex", "age", "view",
              "prompt", "negative_prompt", "prompt_template"]

    def lines():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")  # quotes fields with line breaks; stripped below
        writer.writerow(fields)
        yield buf.getvalue()[:-2]
        for case in cases:
            buf.seek(0)
            buf.truncate()
            prompt = build_prompt(case, spec.prompt, vocab)
            long_form = "|".join(":".join(x or "" for x in (f.finding, f.location, f.severity)) for f in case.findings)
            labels = case.chexpert_labels(vocab)
            writer.writerow([case.case_id, case.index, case.split, case.seed, long_form,
                             *(labels[c] for c in CHEXPERT_COLUMNS), case.sex, case.age, case.view,
                             prompt.text, prompt.negative, prompt.template_id])
            yield buf.getvalue()[:-2]

    atomic_write_text_lines(output, lines())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
