"""Distil a fast student from a local latent-diffusion teacher: 4 steps or fewer, one UNet evaluation per step.

The method is latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models",
arXiv:2310.04378): the student learns the consistency function of the teacher's classifier-free-guided
probability-flow ODE, so it maps any noisy latent on a trajectory straight to that trajectory's end and samples
in 1 to 4 steps with diffusers' ``LCMScheduler``. Each training step takes a latent of the training set (the same
latent cache and prompts as ``synthmed finetune``), noises it to a timestep ``t_{n+k}`` of a DDIM solver of
``num_ddim_timesteps`` (N = 50: k = 20 of the teacher's 1000), runs the teacher with and without the prompt,
combines the two as ``cond + w (cond - uncond)`` on both the predicted x0 and the predicted noise, takes one
DDIM step back to ``t_n``, and asks the student at ``t_{n+k}`` to agree with a target network at ``t_n``
(boundary scalings ``c_skip``, ``c_out`` of sigma_data 0.5 at timestep scaling 10; a Huber loss with c = 0.001).

Why LCD and not progressive (Salimans & Ho 2022) or guided (Meng et al. 2023) distillation: it is one stage that
distils the guidance and the few-step sampler at once (progressive distillation needs log2(N/4) rounds of
training after a separate guidance stage), it needs only the teacher and the training latents, and diffusers
runs its student as it is: ``LCMScheduler``, and pipelines that pass the guidance embedding to a UNet with
``time_cond_proj_dim`` and then skip the classifier-free guidance pass. Two modes:

- ``mode="full"`` (small teachers such as the shipped model): the student is the teacher's UNet with one more
  input, the guidance scale (``time_cond_proj_dim``; ``w`` drawn per example in [guidance_min, guidance_max] - 1
  and embedded as diffusers' pipelines embed it), every weight trained; the target network is an exponential
  moving average of the student (decay 0.95), and the saved UNet is that average. The new ``cond_proj`` layer
  starts at zero, so the student starts as exactly the teacher (diffusers' script leaves it randomly initialised).
- ``mode="lora"`` (Stable Diffusion 1.x-sized teachers such as RoentGen; LCM-LoRA, Luo et al. 2023,
  arXiv:2311.05556): LoRA adapters on the UNet, the guidance fixed at ``guidance_scale`` (no guidance input);
  the teacher is the same UNet with the adapters switched off and the target the student itself (as diffusers'
  LoRA script), so one UNet is in memory; the adapters are merged into the saved UNet.

``mode="auto"`` picks full for a teacher UNet under 200 M parameters (estimated from its config), else LoRA.

The student folder is a plain diffusers folder: the teacher's tokenizer, text encoder and VAE copied as they
are, the student UNet, an ``LCMScheduler`` built from the teacher's scheduler config, a model card (README.md)
naming the teacher and its model hash, and ``distillation.json`` (what generation reads: the recommended
scheduler, steps and guidance; the settings, data and losses). ``synthmed generate`` with
``generator.model: <student>`` and no steps or scheduler samples it with lcm in 4 steps.

Adapted from diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` and
``train_lcm_distill_lora_sd_wds.py`` (the DDIM solver, the boundary scalings, the guided teacher step); the run
rules are finetune's: checks before anything is written, records of what it wrote (it deletes or overwrites only
those), accelerate checkpoints with every random state, so a resumed run reaches the same weights.

Example:
    >>> from synthmed.distill import distill
    >>> distill("out/drr/manifest.csv", "default", "models/student", steps=2000)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .finetune import (IMAGE_DIGESTS, IMAGES_CHANGED, MODEL_PATHS, PLANNED_TOPS, LazyImages, ManifestError, ModelFolder,
                       TrainingLog, TrainingProgress, WorkFolder, check_arguments, check_device, earlier_record,
                       enable_gradient_checkpointing, images_sha256, latent_cache, load_base, load_checkpoint,
                       logged_seconds, lr_scheduler, model_geometry, only_trained, random_crops, read_json_object,
                       read_training_set, run_folders, save_checkpoint, save_pipeline, shown, token_ids)
from .process_state import keeps_caller_state, usable_cpus

__all__ = ["DistillResult", "distill", "MODES", "FULL_MODE_LIMIT"]

MODES = ("auto", "full", "lora")
FULL_MODE_LIMIT = 200_000_000  # teacher UNet parameters (estimated from its config) up to which auto picks full
STAGE = "student"  # the checkpoints: checkpoints/student-<step>
TINY_STAGE = "tiny_vae"  # the tiny decoder's: checkpoints/tiny_vae-<step>
TINY_VAE = "tiny_vae"  # the student folder's TAESD-style autoencoder (not in model_index.json)
TINY_WIDTH = 32  # DecoderTiny keeps one width through its stages; 32 measured 2.7x faster than the VAE decode
TINY_ENCODER_WIDTH = 16
TINY_CROP = 16  # latents per side of a training crop (128 px at 8x): four times the examples per step
TINY_LEARNING_RATE = 1e-3
SIGMA_DATA = 0.5  # the consistency boundary scalings (LCMScheduler's)
TIMESTEP_SCALING = 10.0  # and its timestep scaling; the student's scheduler config says the same
WARMUP_STEPS = 100  # linear learning-rate warm-up (a fixed count: a resume with more steps keeps the same curve)
FORMAT = 1  # of distillation.json
MODEL_FILES = MODEL_PATHS + ("distillation.json", "README.md", TINY_VAE)  # the student folder's top-level entries
# LCM-LoRA's adapters (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, convolutions, time
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass
class DistillResult:
    """What a distill run made: the student folder and its record (also written as its distillation.json)."""

    model_dir: Path
    work_dir: Path
    mode: str
    steps: int
    losses: dict[str, float]
    seconds: float
    record: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the warnings it gave (FinetuneWarning)


# ----------------------------------------------------------------------------- checks


def _name_of(value) -> str:
    numpy = type(value).__module__ == "numpy"  # np.float32(4) is not a float: say how to pass it
    return f"{type(value).__name__} {value!r}"[:120] + (" (a numpy scalar: pass int(x) or float(x))" if numpy else "")


def _number(name: str, value, *, whole: bool, low: float, high: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not whole and not math.isfinite(value)):
        raise TypeError(f"{name} must be {'a whole number' if whole else 'a number'}{' or None' if optional else ''}, "
                        f"got {_name_of(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value!r}")


def _check_distill_arguments(teacher, mode, guidance_min, guidance_max, guidance_scale, num_ddim_timesteps,
                             student_steps, time_cond_proj_dim, ema_decay, huber_c, lora_rank,
                             tiny_decoder_steps=0, recommend_dtype="float32") -> None:
    """The arguments distill has and finetune has not (finetune's check_arguments takes the shared ones)."""
    if not isinstance(teacher, (str, os.PathLike)) or not os.fspath(teacher):
        raise TypeError(f"teacher must be the path of a local diffusers model folder (or 'default', the shipped "
                        f"model), got {_name_of(teacher)}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {_name_of(mode)}")
    # guidance scales as synthmed writes them (uncond + g (cond - uncond)); the LCM papers' w is g - 1 >= 0
    _number("guidance_min", guidance_min, whole=False, low=1.0, high=50.0, optional=True)
    _number("guidance_max", guidance_max, whole=False, low=1.0, high=50.0, optional=True)
    _number("guidance_scale", guidance_scale, whole=False, low=1.0, high=50.0)
    _number("num_ddim_timesteps", num_ddim_timesteps, whole=True, low=2, high=1000)
    _number("student_steps", student_steps, whole=True, low=1, high=num_ddim_timesteps)
    _number("time_cond_proj_dim", time_cond_proj_dim, whole=True, low=4, high=4096, optional=True)
    _number("ema_decay", ema_decay, whole=False, low=0.0, high=1.0, optional=True)
    _number("huber_c", huber_c, whole=False, low=1e-8, high=1.0)
    _number("lora_rank", lora_rank, whole=True, low=1, high=4096, optional=True)
    _number("tiny_decoder_steps", tiny_decoder_steps, whole=True, low=0, high=10_000_000)
    if recommend_dtype not in ("float32", "bfloat16", "auto"):  # float16 needs a GPU: not a recommendation to ship
        raise ValueError(f"recommend_dtype must be float32, bfloat16 or auto, got {_name_of(recommend_dtype)}")


def _teacher_folder(teacher: str | os.PathLike) -> Path:
    from .backends import SHIPPED_MODELS, default_model_dir

    if os.fspath(teacher) in SHIPPED_MODELS:
        return default_model_dir(os.fspath(teacher))
    return Path(teacher)


def _check_teacher(teacher: Path, allow_pickle: bool, num_ddim_timesteps: int) -> tuple[dict, dict]:
    """The teacher folder checked as the backend checks a model (no weights read); its UNet and scheduler configs."""
    from .model_folder import check_model_folder

    if not teacher.is_dir():
        raise ValueError(f"teacher {teacher} is not a folder: give a local diffusers model folder (or 'default', "
                         "the shipped model)")
    check_model_folder(teacher, allow_pickle=allow_pickle)  # ModelFolderError names the file at fault
    unet = read_json_object(teacher / "unet" / "config.json")
    scheduler = read_json_object(teacher / "scheduler" / "scheduler_config.json")
    if unet.get("time_cond_proj_dim") is not None:
        raise ValueError(f"{teacher / 'unet' / 'config.json'}: time_cond_proj_dim {unet['time_cond_proj_dim']}: the "
                         "teacher already takes the guidance scale as an input (a distilled student); distil from "
                         "the model it was made from")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{teacher / 'scheduler' / 'scheduler_config.json'}: prediction_type {prediction!r} is not "
                         f"one distill knows ({', '.join(PREDICTIONS)})")
    timesteps = scheduler.get("num_train_timesteps", 1000)
    if not isinstance(timesteps, int) or timesteps < num_ddim_timesteps:
        raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps} is more than the teacher's num_train_timesteps "
                         f"({timesteps!r}, {teacher / 'scheduler' / 'scheduler_config.json'})")
    return unet, scheduler


def _choose_mode(mode: str, unet_config: dict, teacher: Path) -> str:
    """``auto``: full for a teacher UNet under FULL_MODE_LIMIT parameters (the shipped model: a few M), else LoRA
    (Stable Diffusion 1.x: 860 M)."""
    if mode != "auto":
        return mode
    from .model_folder import estimate_size

    params, _ = estimate_size("unet", unet_config, teacher / "unet" / "config.json")
    return "full" if params < FULL_MODE_LIMIT else "lora"


def _planned(rel: str, settings: dict, checkpoint_every: int) -> bool:
    """Whether this run may write the work-folder file ``rel`` (a file there that is not ours is refused first)."""
    if rel in ("settings.json", "log.jsonl", "record.json", "latents.pt", IMAGE_DIGESTS):
        return True
    m = re.fullmatch(rf"checkpoints/({STAGE}|{TINY_STAGE})-(\d{{7}})/(meta\.json|(model|optimizer|scheduler)(_\d+)?"
                     r"\.(safetensors|bin)|scaler\.pt|(random_states|custom_checkpoint)_\d+\.pkl)", rel)  # save_state's
    if m:
        step = int(m[2])
        total = settings["steps"] if m[1] == STAGE else settings.get("tiny_decoder_steps") or 0
        return 0 < step <= total and (step % checkpoint_every == 0 or step == total)
    return False


# ----------------------------------------------------------------------------- the run


@keeps_caller_state
def distill(manifest: str | Path, teacher: str | Path, out: str | Path, *, mode: str = "auto", steps: int = 2000,
            batch_size: int = 16, learning_rate: float | None = None, lr_schedule: str = "constant",
            guidance_min: float | None = None, guidance_max: float | None = None, guidance_scale: float = 4.0,
            num_ddim_timesteps: int = 50, student_steps: int = 4, time_cond_proj_dim: int | None = None,
            ema_decay: float | None = None, huber_c: float = 0.001, lora_rank: int | None = None,
            tiny_decoder_steps: int = 0, recommend_dtype: str = "float32", template: str = "synthmed-v1",
            late_guidance: dict | str | None = None, checkpoint_every: int = 250, resume: bool = False,
            overwrite: bool = False, work_dir: str | Path | None = None, seed: int = 0, threads: int | None = None,
            device: str = "auto", mixed_precision: str = "no", allow_pickle: bool = False,
            save_dtype: str = "float16", progress: bool = True, gradient_checkpointing: bool = False,
            dataset_kind: str | None = None, column_map: str | Path | None = None, prompts: str = "labels",
            no_report: str | None = None, uncertain: str | None = None, views: str = "all", size: int | None = None,
            crop: str = "center") -> DistillResult:
    """Distil a few-step student of ``teacher`` on a manifest or a real dataset; save it as a diffusers folder.

    Args:
        manifest: what to distil on, as finetune reads it (:func:`synthmed.finetune.read_training_set`): a
            synthmed manifest.csv or its folder (rows of split train), or a real dataset's folder or CSV;
            ``dataset_kind``, ``column_map``, ``prompts``, ``no_report``, ``uncertain``, ``views``, ``size``,
            ``crop`` and ``template`` as in :func:`synthmed.finetune.finetune`.
        teacher: a local Stable-Diffusion-shaped diffusers folder (loaded as the backend loads models: offline,
            safetensors unless ``allow_pickle``), or ``"default"`` for the shipped model.
        out: the student folder to write (at the end, atomically).
        mode: ``"full"`` (every UNet weight; the guidance scale becomes a UNet input), ``"lora"`` (LoRA adapters,
            merged into the saved UNet; the guidance fixed at ``guidance_scale``) or ``"auto"`` (full for a teacher
            UNet under 200 M parameters, else lora).
        steps: optimiser steps of ``batch_size`` examples.
        learning_rate: AdamW's rate after a 100-step warm-up (default 1e-4, the LCM scripts'); ``lr_schedule``
            ``"constant"`` or ``"cosine"`` (down to a tenth at the last step).
        guidance_min, guidance_max: full mode: the guidance scales the student learns (default 2 to 8; the
            teacher's at each, as ``uncond + g (cond - uncond)``).
        guidance_scale: full mode: the scale recommended for generation (within the range); lora mode: the one
            scale distilled into the weights (a lora student then samples at guidance 1: no guidance pass).
        late_guidance: the teacher's guidance at its least noisy steps, as ``generator.late_guidance``:
            ``{"scale": s, "below_timestep": t}`` guides the teacher's solver steps from below t at s instead of
            the student's guidance (the student learns the teacher as it samples, and needs no late guidance of
            its own); ``"none"``: the same guidance throughout; None (default): the teacher folder's
            recommendation (its sampling.json; the shipped default's is 2 below 500).
        num_ddim_timesteps: N of the DDIM solver (the teacher's timesteps, every num_train_timesteps / N-th).
        student_steps: the sampling steps the student's card and distillation.json recommend (default 4); a resume
            may change it without training again.
        time_cond_proj_dim: full mode: the width of the guidance embedding (default 256, as LCM's).
        ema_decay: full mode: the target network's moving-average decay (default 0.95).
        huber_c: the Huber loss's c (0.001).
        lora_rank: lora mode: the adapters' rank (default 64, LCM-LoRA's).
        tiny_decoder_steps: also train a TAESD-style autoencoder (diffusers ``AutoencoderTiny``) on the teacher's
            latents of the same images for this many steps, into the student's ``tiny_vae/``, for
            ``generator.decoder: tiny`` (the student still recommends the teacher's VAE: how the tiny decoder's
            images read is for the user's auditor to judge). 0 (default): none. A resume may add or lengthen it.
        recommend_dtype: the dtype the student recommends for generation (distillation.json
            ``recommended.dtype``): float32 (default), bfloat16, or auto (bfloat16 where the machine computes it
            natively). Recommend a lower precision only after checking its images (the shipped default-fast's card
            did). A resume may change it.
        checkpoint_every: save the whole training state every N steps in ``work_dir/checkpoints``.
        resume: continue from the newest checkpoint in ``work_dir`` (the same settings are required): the same
            weights as a run that never stopped; a damaged checkpoint is skipped (warned) for the one before.
        overwrite: start again, replacing the student and work files an earlier run wrote; distill deletes or
            overwrites only files it recorded as its own, anything else stays and is named in a warning.
        work_dir: checkpoints, the latent cache and the log (default ``<out>.training``).
        device, mixed_precision, gradient_checkpointing, threads, seed, save_dtype: as in finetune.

    Returns:
        DistillResult with the folder, the mode, the steps, the last loss and the warnings given.

    Raises:
        ManifestError: the manifest has problems (every one, before any training).
        ModelFolderError: the teacher folder cannot be used (naming the file).
        ValueError: a bad argument, or arguments that do not go together, naming them.

    Example:
        >>> result = distill("out/drr", "default", "models/student", steps=2000)  # doctest: +SKIP
        >>> json.loads((result.model_dir / "distillation.json").read_text())["recommended"]  # doctest: +SKIP
        {'scheduler': 'lcm', 'steps': 4, 'guidance_scale': 4.0}
    """
    # 1. Check inputs, before any weight is loaded and any folder made
    check_arguments(manifest=manifest, out=out, work_dir=work_dir, column_map=column_map, resume=resume,
                    overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                    gradient_checkpointing=gradient_checkpointing, steps=steps, batch_size=batch_size,
                    checkpoint_every=checkpoint_every, threads=threads, size=size, seed=seed,
                    learning_rate=learning_rate, lr_schedule=lr_schedule, device=device,
                    mixed_precision=mixed_precision, save_dtype=save_dtype, prompts=prompts, views=views, crop=crop,
                    dataset_kind=dataset_kind, no_report=no_report, uncertain=uncertain, template=template)
    _check_distill_arguments(teacher, mode, guidance_min, guidance_max, guidance_scale, num_ddim_timesteps,
                             student_steps, time_cond_proj_dim, ema_decay, huber_c, lora_rank, tiny_decoder_steps,
                             recommend_dtype)
    teacher_path = _teacher_folder(teacher)
    unet_config, _ = _check_teacher(teacher_path, allow_pickle, num_ddim_timesteps)
    from .backends.diffusion import recommended_sampling
    from .spec import parse_late_guidance

    late_guidance = recommended_sampling(teacher_path)["late_guidance"] if late_guidance is None \
        else parse_late_guidance(late_guidance)
    mode = _choose_mode(mode, unet_config, teacher_path)
    if mode == "full":
        if lora_rank is not None:
            raise ValueError("lora_rank is the rank of mode 'lora''s adapters; mode 'full' trains every UNet weight: "
                             "leave lora_rank out")
        guidance_min = 2.0 if guidance_min is None else guidance_min
        guidance_max = 8.0 if guidance_max is None else guidance_max
        if not guidance_min <= guidance_scale <= guidance_max:
            raise ValueError(f"guidance_scale {guidance_scale} (the student's recommended guidance) must lie within "
                             f"guidance_min..guidance_max ({guidance_min}..{guidance_max}), the scales it learns")
        time_cond_proj_dim = 256 if time_cond_proj_dim is None else time_cond_proj_dim
        ema_decay = 0.95 if ema_decay is None else ema_decay
    else:
        given = [n for n, v in (("guidance_min", guidance_min), ("guidance_max", guidance_max),
                                ("time_cond_proj_dim", time_cond_proj_dim), ("ema_decay", ema_decay)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for mode 'full' (a student that takes the guidance scale as an "
                             "input, with a moving-average target); mode 'lora' distils the one guidance_scale into "
                             "its adapters, with the student as its own target: leave them out")
        lora_rank = 64 if lora_rank is None else lora_rank
    out, work_path = run_folders(out, work_dir, teacher_path, "teacher")
    if os.path.lexists(work_path) and not work_path.is_dir():
        raise ValueError(f"work_dir {work_path} exists and is not a folder")
    check_device(device, mixed_precision)
    work = WorkFolder(work_path, tool="distill")
    work.check(out, overwrite=overwrite)
    work.clean_staging()  # a killed run's half-done saves (a student caught mid-swap is put back first)
    work.ledger.remove_temp_files()
    student_folder = ModelFolder(out, MODEL_FILES, tool="distill")
    student_folder.check(resume=resume, overwrite=overwrite)  # its files are replaced only if synthmed wrote them
    data = read_training_set(manifest, template=template, dataset_kind=dataset_kind, column_map=column_map,
                             prompts=prompts, no_report=no_report, uncertain=uncertain, views=views)
    examples = data.examples
    if size is None and data.size is not None:  # PNGs of one size: distilled on as they are
        if crop != "center":
            raise ValueError(f"crop={crop!r} crops images brought to the training size, and these PNGs of one size "
                             f"({data.size[0]}x{data.size[1]}) are used as they are; give size= to resize and crop")
        width, height = data.size
    else:
        native, factor = model_geometry(teacher_path, allow_pickle)
        if size is not None and size % factor:
            raise ValueError(f"size={size}: the teacher needs sides that are a multiple of {factor}; its native "
                             f"size is {native}")
        width = height = size or native
    from .model_folder import model_hash

    manifest_path = Path(manifest) / "manifest.csv" if data.kind == "manifest" and Path(manifest).is_dir() \
        else Path(manifest)
    from .backends import SHIPPED_MODELS

    shipped = os.fspath(teacher) in SHIPPED_MODELS  # recorded by its name, not this machine's path to it
    settings = {"teacher": os.fspath(teacher) if shipped else str(teacher_path.resolve()), "teacher_hash": model_hash(teacher_path), "mode": mode,
                "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
                "lr_schedule": lr_schedule, "guidance_min": guidance_min, "guidance_max": guidance_max,
                "guidance_scale": guidance_scale, "num_ddim_timesteps": num_ddim_timesteps,
                "student_steps": student_steps, "time_cond_proj_dim": time_cond_proj_dim, "ema_decay": ema_decay,
                "huber_c": huber_c, "lora_rank": lora_rank, "timestep_scaling": TIMESTEP_SCALING,
                "tiny_decoder_steps": tiny_decoder_steps, "recommend_dtype": recommend_dtype,
                "mixed_precision": mixed_precision, "template": template, "seed": seed,
                "manifest_sha256": data.sha256, "images": len(examples),
                "images_sha256": images_sha256(examples, work),  # a resume must not distil on images replaced since
                "width": width, "height": height,
                "dataset_kind": None if data.kind == "manifest" else data.kind, "prompts": prompts,
                "no_report": (no_report or "skip") if prompts == "reports" else None,
                "uncertain": None if data.kind == "manifest" else uncertain or "ignore", "views": views,
                "size": None if data.size is not None and size is None else width, "crop": crop}
    if late_guidance is not None:  # only then: the settings of runs before it stay the same (and resume)
        settings["late_guidance"] = late_guidance
    work_path.mkdir(parents=True, exist_ok=True)
    settings_file = work_path / "settings.json"
    if settings_file.is_file() and resume:
        try:
            before = read_json_object(settings_file)
        except ValueError as e:
            raise ValueError(f"{e}; it records the settings of the run to resume: resume needs it as distill wrote "
                             "it (or start again: overwrite=True without resume=True)") from None
        # a resume may train longer, add the tiny decoder, or recommend another dtype or number of sampling steps
        # (what the student was measured to sample best with; neither is part of training)
        lengthened = ("steps", "tiny_decoder_steps", "recommend_dtype", "student_steps")
        before.setdefault("images_sha256", settings["images_sha256"])  # work folders from before it was recorded
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k)
                         and k not in lengthened)
        if changed:
            why = (" (the teacher's files are not those it started from)" if "teacher_hash" in changed else
                   f" ({IMAGES_CHANGED})" if "images_sha256" in changed else "")
            raise ValueError(f"{work_path} was distilled with other settings ({', '.join(changed)} changed){why}; "
                             "resume needs the same manifest, teacher and settings, or start a new work_dir")
    elif not resume and (overwrite or work.checkpoints(STAGE)):
        if not overwrite:
            raise ValueError(f"{work_path} holds checkpoints of an earlier run; pass resume=True to continue it or "
                             "overwrite=True to start again")
        # exactly the files the ledger names (its latent cache too: never reused); anything else stays, named
        work.clear()
    theirs = [r for r in work.foreign(PLANNED_TOPS) if not r.endswith("/") and _planned(r, settings, checkpoint_every)]
    if theirs:
        raise ValueError(f"{shown(theirs)} in the work folder {work_path}: this run would write there and distill did "
                         f"not write {'it' if len(theirs) == 1 else 'them'}; it overwrites only its own files. Move "
                         "them away or choose another work folder")
    work.keep_user_folders()
    work.write_json("settings", "settings.json", settings)
    work.write_image_memo()
    work.claim("log", ["log.jsonl"])  # appended to: its sha256 is recorded at the end

    try:
        import torch
        from accelerate import Accelerator

        if mode == "lora":
            import peft  # noqa: F401
    except ImportError as e:
        raise ImportError(f"synthmed distill needs {e.name}: pip install 'synthmed[finetune]'") from None
    torch.set_num_threads(int(threads or usable_cpus()))  # the caller's count is back after the call
    started = time.time()
    log = TrainingLog(work_path / "log.jsonl")
    if progress:
        for line in data.summary:
            print(line, file=sys.stderr)

    # 2. Components: the teacher's, loaded as the backend loads models
    torch.manual_seed(seed)
    parts = load_base(teacher_path, allow_pickle)
    tokenizer, text_encoder, vae, noise_scheduler = (parts[k] for k in ("tokenizer", "text_encoder", "vae",
                                                                         "scheduler"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(parts["unet"].config.block_out_channels) - 1)
    if width % factor or height % factor:
        raise ManifestError(f"images are {width}x{height}; the teacher needs sides that are multiples of {factor}")
    images = LazyImages(examples, progress, settings["size"], crop, seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    # the record names the teacher as it was given (settings hold it resolved, for resume), as finetune does
    record: dict[str, Any] = {"settings": {**settings, "teacher": os.fspath(teacher)}, "losses": {},
                              "data": {"kind": data.kind, **data.counts, "summary": data.summary}}

    # 3. The latent cache: every image encoded once by the teacher's VAE (finetune's cache, keyed the same way)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu"))
    latents = latent_cache(vae, images, work, {**settings, "base": settings["teacher"], "vae_steps": 0}, accelerator,
                           False, progress)
    images.release()
    ids = token_ids(tokenizer, [ex.prompt for ex in examples], text_encoder)
    empty_ids = token_ids(tokenizer, [""], text_encoder)[0]

    # 4. Distil
    unet, loss, done = _train_student(parts["unet"], text_encoder, noise_scheduler, latents, ids, empty_ids, work,
                                      settings, generator, accelerator, log, resume, checkpoint_every, progress,
                                      gradient_checkpointing)
    record["losses"]["consistency"] = loss
    extra_modules = {}
    if tiny_decoder_steps:
        tiny, record["losses"]["tiny_decoder"] = _train_tiny_vae(
            vae.config, latents, images, work, settings, torch.Generator("cpu").manual_seed(seed + 1),
            Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu")), log, resume, checkpoint_every,
            progress)
        extra_modules[TINY_VAE] = tiny

    # 5. Save the student folder (atomically), its card and distillation.json
    seconds = time.time() - started
    prev = earlier_record(work) if resume else {}
    record["seconds"] = seconds + prev.get("seconds", 0.0)
    record["steps"] = done
    record["logged_seconds"] = logged_seconds(work_path / "log.jsonl")
    record["save_dtype"] = save_dtype
    work.ledger.record_files("log", ["log.jsonl"])
    work.write_json("record", "record.json", record)
    card = _card_record(record, teacher_path, record["settings"], vae.config)
    scheduler = _student_scheduler(teacher_path, num_ddim_timesteps)
    copied = ["tokenizer"] + [c for c in ("text_encoder", "vae") if _safetensors_only(teacher_path / c)]
    save_pipeline(out, {**parts, "unet": unet, "scheduler": scheduler}, save_dtype, card, manifest_path, teacher_path,
                  work, progress, record_file="distillation.json", copied=copied,
                  extra_files={"README.md": _model_card(card, out, manifest_path)}, folder=student_folder,
                  extra_modules=extra_modules)
    return DistillResult(out, work_path, mode, done, {k: v for k, v in record["losses"].items() if v is not None},
                         record["seconds"], card, work.notes)


def _safetensors_only(component: Path) -> bool:
    """Whether a teacher's component folder holds weights as safetensors only (then it is copied as it is)."""
    from .model_folder import PICKLE_SUFFIXES

    files = [p for p in component.rglob("*") if p.is_file()]
    return any(p.suffix == ".safetensors" for p in files) and not any(p.suffix in PICKLE_SUFFIXES for p in files)


def _student_scheduler(teacher: Path, num_ddim_timesteps: int):
    """diffusers' LCMScheduler from the teacher's noise schedule, with the solver's N and the training's scaling.

    x0 is not clipped (the consistency function was trained unclipped), whatever the teacher's config says.
    """
    from diffusers import LCMScheduler

    config = read_json_object(teacher / "scheduler" / "scheduler_config.json")
    accepted = inspect.signature(LCMScheduler.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}
    config.update(original_inference_steps=num_ddim_timesteps, timestep_scaling=TIMESTEP_SCALING, clip_sample=False,
                  thresholding=False)
    return LCMScheduler(**config)


def _train_student(teacher_unet, text_encoder, noise_scheduler, latents, ids, empty_ids, work, settings, generator,
                   accelerator, log, resume, checkpoint_every, progress, gradient_checkpointing):
    """Latent consistency distillation; returns the student UNet (plain: LoRA merged), its running loss and the
    steps done. One optimiser step per step; every random draw comes from ``generator`` (checkpointed)."""
    import torch

    from .backends.diffusion import guidance_embedding
    from .progress import progress_bar

    total, batch, mode = settings["steps"], settings["batch_size"], settings["mode"]
    lr = settings["learning_rate"] or 1e-4
    n_ddim, huber_c = settings["num_ddim_timesteps"], settings["huber_c"]
    device = accelerator.device
    text_encoder.requires_grad_(False).eval().to(device)
    teacher_unet.requires_grad_(False).eval()
    if mode == "full":  # the student: the teacher's UNet with a guidance input, starting as exactly the teacher
        student = _guidance_conditioned(teacher_unet, settings["time_cond_proj_dim"])
        if gradient_checkpointing:
            enable_gradient_checkpointing(student)
        target = copy.deepcopy(student).requires_grad_(False).eval().to(device)
        teacher_unet.to(device)
    else:  # the teacher's own UNet with adapters: off, it is the teacher
        from peft import LoraConfig, get_peft_model

        if gradient_checkpointing:
            enable_gradient_checkpointing(teacher_unet)
        rank = settings["lora_rank"]
        student = get_peft_model(teacher_unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
        target = None
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = lr_scheduler(optimiser, settings["lr_schedule"], WARMUP_STEPS, total)
    state = TrainingProgress(STAGE, generator)
    student, optimiser, schedule = accelerator.prepare(student, optimiser, schedule)
    accelerator.register_for_checkpointing(*([state] if target is None else [state, target]))
    accelerator.register_save_state_pre_hook(only_trained)  # LoRA: the adapters only
    if resume:
        load_checkpoint(work, accelerator, STAGE)
    start, loss_avg = state.step, state.loss

    # the DDIM solver's timesteps [k - 1, 2k - 1, ..., T - 1] and its alpha-bars one solver step back
    alphas = noise_scheduler.alphas_cumprod.to(device, torch.float32)
    alpha, sigma = alphas.sqrt(), (1 - alphas).sqrt()
    skip = noise_scheduler.config.num_train_timesteps // n_ddim
    solver_t = torch.arange(1, n_ddim + 1, device=device) * skip - 1
    alpha_prev = torch.cat([alphas[:1], alphas[solver_t[:-1]]])
    prediction = noise_scheduler.config.prediction_type
    with torch.no_grad():
        uncond = text_encoder(empty_ids[None].to(device))[0]

    def x0_and_eps(output, t, sample):
        a, s = alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)
        if prediction == "epsilon":
            return (sample - s * output) / a, output
        if prediction == "v_prediction":
            return a * sample - s * output, a * output + s * sample
        return output, (sample - a * output) / s

    def boundary(t):  # c_skip, c_out of the consistency parametrisation (LCMScheduler's)
        scaled = TIMESTEP_SCALING * t.float().view(-1, 1, 1, 1)
        return SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2), scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5

    def teacher_off():  # lora: the same UNet with its adapters off is the teacher
        return accelerator.unwrap_model(student).disable_adapter() if mode == "lora" else contextlib.nullcontext()

    teacher = student if mode == "lora" else teacher_unet
    n = len(latents)
    bar = progress_bar(max(total, 1), progress)
    bar.set_description("distil")
    bar.update(start)
    for step in range(start, total):
        # 1. The draws: examples, noise, solver steps, guidance scales
        idx = torch.randint(n, (batch,), generator=generator)
        z0 = latents[idx].float()
        noise = torch.randn(z0.shape, generator=generator)
        index = torch.randint(n_ddim, (batch,), generator=generator)
        if mode == "full":
            g = settings["guidance_min"] + (settings["guidance_max"] - settings["guidance_min"]) * \
                torch.rand(batch, generator=generator)
        else:
            g = torch.full((batch,), float(settings["guidance_scale"]))
        z0, noise, index, tokens = z0.to(device), noise.to(device), index.to(device), ids[idx].to(device)
        cond = {"timestep_cond": guidance_embedding(g - 1.0, settings["time_cond_proj_dim"]).to(device)} \
            if mode == "full" else {}
        t_start = solver_t[index]
        late = settings.get("late_guidance")
        if late is not None:  # the teacher's own guidance at its least noisy steps (the student's input stays g)
            g = torch.where(t_start.cpu() < late["below_timestep"], torch.full_like(g, late["scale"]), g)
        w = (g - 1.0).to(device).view(-1, 1, 1, 1)
        t_end = (t_start - skip).clamp(min=0)
        with torch.no_grad():
            hidden = text_encoder(tokens)[0]
        noisy = noise_scheduler.add_noise(z0, noise, t_start)
        # 2. The student's consistency output at t_{n+k}
        with accelerator.autocast():
            out = student(noisy, t_start, encoder_hidden_states=hidden, **cond).sample
        skip_start, out_start = boundary(t_start)
        predicted = skip_start * noisy + out_start * x0_and_eps(out.float(), t_start, noisy)[0]
        with torch.no_grad():
            # 3. The teacher, with and without the prompt, guided on x0 and the noise; one DDIM step to t_n
            with teacher_off(), accelerator.autocast():
                both = teacher(torch.cat([noisy, noisy]), torch.cat([t_start, t_start]),
                               encoder_hidden_states=torch.cat([hidden, uncond.expand(len(hidden), -1, -1)])).sample
            x0_c, eps_c = x0_and_eps(both[:batch].float(), t_start, noisy)
            x0_u, eps_u = x0_and_eps(both[batch:].float(), t_start, noisy)
            x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
            a_prev = alpha_prev[index].view(-1, 1, 1, 1)
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            # 4. The target network's consistency output at t_n
            with accelerator.autocast():
                out_end = (target or student)(x_prev, t_end, encoder_hidden_states=hidden, **cond).sample
            skip_end, out_end_scale = boundary(t_end)
            wanted = skip_end * x_prev + out_end_scale * x0_and_eps(out_end.float(), t_end, x_prev)[0]
        # 5. Huber loss, one optimiser step, the target follows the student
        loss = torch.mean(torch.sqrt((predicted - wanted) ** 2 + huber_c ** 2) - huber_c)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        if target is not None:
            with torch.no_grad():
                decay = settings["ema_decay"]
                for kept, new in zip(target.parameters(), accelerator.unwrap_model(student).parameters()):
                    kept.mul_(decay).add_(new.detach(), alpha=1 - decay)
        loss_avg = _step_done(state, step, float(loss.detach()), (0.99, 0.01), 7, bar, log, work, accelerator,
                              checkpoint_every, total)
    bar.close()
    if target is not None:  # the saved student is the moving average (the target the loss pulled toward)
        unet = target
    else:
        unet = accelerator.unwrap_model(student).merge_and_unload()
    unet.eval().requires_grad_(False)
    return unet, loss_avg, max(start, total)


def _step_done(state, step: int, value: float, weights: tuple, digits: int, bar, log, work, accelerator,
               checkpoint_every: int, total: int) -> float:
    """After optimiser step ``step`` of a stage: its running loss (``weights`` of the old and the new value), the
    progress bar, the log every 25 steps, a checkpoint every ``checkpoint_every`` and at the end."""
    loss = value if state.loss is None else weights[0] * state.loss + weights[1] * value
    state.step, state.loss = step + 1, loss
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.{digits - 2}f}")
    if (step + 1) % 25 == 0:
        log.write(stage=state.stage, step=step + 1, loss=round(loss, digits), t=round(time.time(), 1))
    if (step + 1) % checkpoint_every == 0 or step + 1 == total:
        save_checkpoint(work, accelerator, state.stage, step + 1)
    return loss


def _guidance_conditioned(teacher_unet, dim: int):
    """A copy of the teacher's UNet whose time embedding also takes the guidance embedding (``time_cond_proj_dim``).

    Every teacher weight is loaded; the new ``cond_proj`` (Linear dim -> time embedding, no bias) starts at zero,
    so the copy computes exactly what the teacher computes until training moves it.
    """
    import torch
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("time_embedding.cond_proj.")]
    if new or unexpected:  # pragma: no cover - diffusers' UNet changed its layout
        raise ValueError(f"the guidance-conditioned UNet does not take the teacher's weights: missing {new[:3]}, "
                         f"unexpected {unexpected[:3]}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(teacher_unet.parameters()).device, torch.float32)


def tiny_vae_config(vae_config) -> dict:
    """The TAESD-style autoencoder (diffusers ``AutoencoderTiny``) for a teacher VAE: its channels and latents, as
    many stages as the VAE has (so the same 2^(n-1) scale), one width throughout (DecoderTiny's design).

    The decoder runs its blocks at the lower resolutions and none at full size (there the cost is quadratic in
    width): at 256² with 8 latent channels it decodes in about a third of the shipped VAE's time.

    Example:
        >>> tiny_vae_config({"in_channels": 1, "out_channels": 1, "latent_channels": 8,
        ...                  "block_out_channels": [16, 32, 64, 64]})["num_decoder_blocks"]
        (3, 3, 1, 0)
    """
    get = vae_config.get if isinstance(vae_config, dict) else lambda k: getattr(vae_config, k)
    n = len(get("block_out_channels"))
    if n < 2:
        raise ValueError(f"the teacher's VAE has {n} stage; a tiny decoder needs a VAE that downscales (2 stages or "
                         "more)")
    blocks = ((3,) * (n - 2) + (1, 0))
    return {"in_channels": int(get("in_channels")), "out_channels": int(get("out_channels")),
            "latent_channels": int(get("latent_channels")),
            "encoder_block_out_channels": (TINY_ENCODER_WIDTH,) * n, "decoder_block_out_channels": (TINY_WIDTH,) * n,
            "num_encoder_blocks": (1,) * n, "num_decoder_blocks": blocks, "upsampling_scaling_factor": 2,
            "scaling_factor": 1.0}


def _train_tiny_vae(vae_config, latents, images, work, settings, generator, accelerator, log, resume,
                    checkpoint_every, progress):
    """Train a tiny autoencoder on the teacher's latents: its decoder maps a latent (as the UNet makes them:
    scaled) to the training image (L1 + image-gradient L1, finetune's VAE loss), its encoder maps the image to the
    latent (MSE); both on aligned random crops of TINY_CROP latents. Returns it (eval) and its running loss."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderTiny

    from .progress import progress_bar

    total = settings["tiny_decoder_steps"]
    batch = settings["batch_size"]
    torch.manual_seed(settings["seed"] + 1)  # the initial weights
    tiny = AutoencoderTiny(**tiny_vae_config(vae_config))
    optimiser = torch.optim.AdamW(tiny.parameters(), lr=TINY_LEARNING_RATE, weight_decay=0.0)
    schedule = lr_scheduler(optimiser, "cosine", WARMUP_STEPS, total)
    tiny, optimiser, schedule = accelerator.prepare(tiny, optimiser, schedule)
    state = TrainingProgress(TINY_STAGE, generator)
    accelerator.register_for_checkpointing(state)
    if resume:
        load_checkpoint(work, accelerator, TINY_STAGE)
    start, loss_avg = state.step, state.loss
    model = accelerator.unwrap_model(tiny)
    if start < total:
        pixels = images.get()
        n, _, lh, lw = latents.shape
        scale = pixels.shape[-1] // lw
        crop = min(TINY_CROP, lh, lw)
        tiny.train()
        bar = progress_bar(total, progress)
        bar.set_description("tiny decoder")
        bar.update(start)
        for step in range(start, total):
            idx, ys, xs = random_crops(generator, n, lh, lw, crop, crop, batch)
            z = torch.stack([latents[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs)]).float()
            x = torch.stack([pixels[i, :, y * scale:(y + crop) * scale, x0 * scale:(x0 + crop) * scale]
                             for i, y, x0 in zip(idx, ys, xs)]).float()
            z, x = z.to(accelerator.device), x.to(accelerator.device)
            with accelerator.autocast():  # gray films to an RGB teacher's channels, as the latent cache feeds them
                decoded = model.decode(z).sample.float()
                encoded = model.encode(x.expand(-1, model.config.in_channels, -1, -1)).latents.float()
            x = x.expand(-1, model.config.out_channels, -1, -1)
            loss = F.l1_loss(decoded, x) + 0.5 * (F.l1_loss(decoded.diff(dim=-1), x.diff(dim=-1))
                                                  + F.l1_loss(decoded.diff(dim=-2), x.diff(dim=-2)))
            loss = loss + F.mse_loss(encoded, z)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(tiny.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            loss_avg = _step_done(state, step, float(loss.detach()), (0.98, 0.02), 6, bar, log, work, accelerator,
                                  checkpoint_every, total)
        bar.close()
    return model.eval().requires_grad_(False), loss_avg


# ----------------------------------------------------------------------------- the student's card


def _card_record(record: dict, teacher: Path, settings: dict, vae_config=None) -> dict:
    """distillation.json: what generation reads (``recommended``) and what the card says, machine-readable."""
    from . import __version__

    mode = settings["mode"]
    full = mode == "full"
    teacher_training = None
    if (teacher / "training.json").is_file():  # a synthmed-trained teacher: its lineage stays on record
        try:
            teacher_training = json.loads((teacher / "training.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    return {
        "format": FORMAT, "synthmed_version": __version__,
        "method": "latent consistency distillation",
        "references": ["Luo et al. 2023, Latent Consistency Models, arXiv:2310.04378"]
        + ([] if full else ["Luo et al. 2023, LCM-LoRA, arXiv:2311.05556"]),
        "mode": mode,
        "teacher": {"path": settings["teacher"], "model_hash": settings["teacher_hash"],
                    **({"training": teacher_training} if teacher_training else {})},
        "recommended": {"scheduler": "lcm", "steps": settings["student_steps"],
                        "guidance_scale": float(settings["guidance_scale"]) if full else 1.0,
                        **({"dtype": settings["recommend_dtype"]}
                           if settings.get("recommend_dtype", "float32") != "float32" else {})},
        "guidance": ({"input": True, "time_cond_proj_dim": settings["time_cond_proj_dim"],
                      "min": settings["guidance_min"], "max": settings["guidance_max"]} if full
                     else {"input": False, "distilled_scale": settings["guidance_scale"]}),
        "solver": {"kind": "DDIM", "num_ddim_timesteps": settings["num_ddim_timesteps"],
                   "timestep_scaling": TIMESTEP_SCALING, "sigma_data": SIGMA_DATA},
        **({"tiny_decoder": {"folder": TINY_VAE, "class": "AutoencoderTiny", "steps": settings["tiny_decoder_steps"],
                             "config": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in tiny_vae_config(vae_config).items()}}}
           if settings.get("tiny_decoder_steps") else {}),
        **record,
    }


def _tiny_decoder_text(card: dict) -> str:
    tiny = card.get("tiny_decoder")
    if not tiny:
        return ""
    c = tiny["config"]
    return f"""## Tiny decoder

`{tiny['folder']}/` holds a TAESD-style autoencoder (diffusers `AutoencoderTiny`, not in model_index.json, so
diffusers' own loading ignores it): a decoder of width {c['decoder_block_out_channels'][0]} with
{tuple(c['num_decoder_blocks'])} blocks per stage, trained {tiny['steps']:,} steps on the teacher's latents of the same
images (L1 + image-gradient L1 against the images; its encoder by MSE against the latents). `synthmed generate`
decodes with it when a spec says `generator.decoder: tiny` (`--decoder tiny`): about three times faster than the
teacher's VAE in `vae/`, which stays the default, and softer (judge its images with `synthmed qc` before training on
them). With diffusers: `pipe.vae = AutoencoderTiny.from_pretrained(folder, subfolder="{tiny['folder']}")`.

"""


def _model_card(card: dict, out: Path, manifest: Path) -> str:
    """README.md: the student, its teacher (path and model hash), the method, the data and how to sample it."""
    from .backends import SHIPPED_MODELS

    s, rec = card["settings"], card["recommended"]
    full = card["mode"] == "full"
    name = f"the shipped {s['teacher']} model" if s["teacher"] in SHIPPED_MODELS \
        else Path(os.path.abspath(s["teacher"])).name  # a local folder by its name (that of '.' too)
    guidance = (f"an input of the UNet (`time_cond_proj_dim` {s['time_cond_proj_dim']}), learnt over guidance scales "
                f"{s['guidance_min']:g} to {s['guidance_max']:g}; recommended {rec['guidance_scale']:g}" if full else
                f"guidance scale {s['guidance_scale']:g} distilled into the adapters (sample at guidance 1: no "
                "classifier-free guidance pass)")
    how = ("every UNet weight (a copy of the teacher's UNet with a guidance input whose new layer starts at zero); "
           f"target: a moving average of the student (decay {s['ema_decay']}), saved as the student" if full else
           f"LoRA adapters of rank {s['lora_rank']} on the UNet (LCM-LoRA), merged into the saved UNet; the teacher "
           "is the UNet with the adapters off, the target the student itself")
    losses = ", ".join(f"{k} {v:.5f}" for k, v in card["losses"].items() if v is not None) or "n/a (0 steps)"
    return f"""# {out.name}: a {rec['steps']}-step student of {name}

A few-step student distilled by `synthmed distill` (synthmed {card['synthmed_version']}) from its teacher by
**latent consistency distillation** (Luo et al. 2023, arXiv:2310.04378{'' if full else '; LCM-LoRA, arXiv:2311.05556'}).
It samples in {rec['steps']} steps with diffusers' `LCMScheduler` and one UNet evaluation per step: the
classifier-free guidance is distilled into it ({guidance}).

## Teacher

- folder: `{s['teacher']}`
- model hash (sha256 of its model_index.json and component files, as synthmed computes it): `{s['teacher_hash']}`
- its tokenizer, text encoder and VAE are this folder's (copied unchanged where they were safetensors)

## Distillation

- mode `{card['mode']}`: {how}
- {card['steps']:,} steps of {s['batch_size']} latents, AdamW at {s['learning_rate'] or 1e-4:g}
  ({s['lr_schedule']} after {WARMUP_STEPS} warm-up steps), seed {s['seed']}
- DDIM solver of {s['num_ddim_timesteps']} timesteps, boundary scalings of sigma_data {SIGMA_DATA} at timestep scaling
  {TIMESTEP_SCALING:g}, Huber loss c = {s['huber_c']}; last loss (running mean): {losses}
- data: `{manifest}` (sha256 {s['manifest_sha256'][:16]}..., {s['images']:,} images at {s['width']}x{s['height']},
  prompts from {s['prompts']} through template {s['template']})

{_tiny_decoder_text(card)}How close the student's images come to the teacher's is not measured here: compare them with `synthmed qc`
(`--reference`) on sets made by both.

## Sampling

Recommended: scheduler `lcm`, {rec['steps']} steps, guidance scale {rec['guidance_scale']:g} (also in
`distillation.json`, key `recommended`). `synthmed generate` uses these when the spec leaves
`generator.steps`, `generator.scheduler`, `generator.guidance_scale` (and `generator.decoder`) out:

```yaml
generator: {{backend: diffusion, model: {out}}}
```

With diffusers: `StableDiffusionPipeline.from_pretrained("{out}")(prompt, num_inference_steps={rec['steps']},
guidance_scale={rec['guidance_scale']:g})` (the folder's scheduler is the LCMScheduler).
"""


# Keep this at the end: `synthmed.distill(...)` calls the function `distill` above (see synthmed/_callable.py).
from ._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "synthmed.distill:distill")
