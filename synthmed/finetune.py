"""Train or fine-tune a diffusers latent-diffusion model on a synthmed-format manifest.

The prompts are built from each row's labels by the same templates generation uses, so a model
trained here answers the prompts `synthmed generate` writes. Two starting points:

- ``base="scratch"``: the small default design (a word-level tokenizer built from the vocabulary,
  a 2-layer 128-d CLIP text encoder, a 1-channel AutoencoderKL, a small UNet). Stage 1 trains
  the VAE on random crops; stage 2 encodes every image once (the latent cache); stage 3 trains
  the UNet and the text encoder on the cached latents.
- ``base=MODEL_DIR``: any local Stable-Diffusion-shaped folder (loaded as the diffusion backend
  loads it: offline, safetensors unless pickle is allowed). The VAE stays frozen; the UNet is
  trained in full or through LoRA adapters (peft), the text encoder optionally.

Every random draw of training (batches, crops, noise, timesteps, prompt dropout) comes from one
``torch.Generator`` whose state is checkpointed, so a run resumed from a checkpoint reaches the
same weights as one that never stopped. Training recipe, adapted from diffusers'
``examples/text_to_image/train_text_to_image.py`` (noise, timesteps, min-SNR weighting of
Hang et al. 2023, EMA of the UNet) and its LoRA variant.

Example:
    >>> from synthmed.finetune import finetune
    >>> finetune("out/phantom/manifest.csv", "scratch", "models/mine", steps=5000)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .prompts import BUILTIN_TEMPLATES, build_prompt, check_template
from .vocabulary import get_vocabulary

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}
MODES = ("full", "lora")
LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_FORMAT = 1

# The default design (issue #7), measured feasible on a 2-core CPU.
TEXT_ENCODER_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, projection_dim=128)
# Narrower than the (32, 64, 128, 128) first sketched: 2.2x cheaper per step on 2 cores, and fully convolutional
# (no mid-block attention) so that a VAE trained on small crops applies unchanged to whole images.
VAE_CONFIG = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False)
# One resnet per level: 5.7x cheaper per training step than two on 2 cores.
UNET_CONFIG = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, steps_offset=1)


class ManifestError(ValueError):
    """A training manifest that cannot be used; the message lists every problem with its row."""


@dataclass(frozen=True)
class TrainingExample:
    """One training image and the prompt its labels give."""

    path: Path
    prompt: str
    case_id: str
    split: str


@dataclass
class FinetuneResult:
    """What a finetune run made: the model folder and its training record."""

    model_dir: Path
    work_dir: Path
    steps: int
    vae_steps: int
    losses: dict[str, float]
    seconds: float
    record: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- manifest


def _png_size(path: Path) -> tuple[int, int, int]:
    """(width, height, bit depth) from a PNG's header, without decoding it."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24]


def _case_from_row(row: dict, number: int, problems: list[str], where: str):
    from .sampler import Case, FindingLabel

    vocab = get_vocabulary()
    labels = []
    text = (row.get("findings") or "").strip()
    if not text:
        problems.append(f"{where}:row {number}: 'findings' is empty (write no_finding for a normal image)")
    for item in filter(None, text.split("|")):
        parts = item.split(":") + ["", ""]
        finding, location, severity = parts[0].strip(), parts[1].strip() or None, parts[2].strip() or None
        if finding not in vocab.findings:
            problems.append(f"{where}:row {number}: unknown finding {finding!r} (known: see schemas/vocabulary.yaml)")
            continue
        if location is not None and location not in vocab.locations:
            problems.append(f"{where}:row {number}: unknown location {location!r} for {finding}")
            continue
        if severity is not None and severity not in ("mild", "moderate", "severe"):
            problems.append(f"{where}:row {number}: unknown severity {severity!r} for {finding}")
            continue
        labels.append(FindingLabel(finding, location, severity))
    age = (row.get("age") or "").strip()
    try:
        age_value = int(float(age)) if age else None
    except ValueError:
        problems.append(f"{where}:row {number}: age {age!r} is not a number")
        age_value = None
    return Case(row.get("case_id") or f"row-{number}", number, row.get("split") or "train", 0, tuple(labels),
                (row.get("sex") or None), age_value, (row.get("view") or None))


def read_training_manifest(manifest: str | Path, *, template: str = "synthmed-v1", split: str | None = "train",
                           check_files: bool = True) -> tuple[list[TrainingExample], tuple[int, int]]:
    """Read a synthmed-format manifest into training examples, checking it all first.

    The image column is ``png_path`` (else ``file_name``), relative to the manifest's folder; the
    labels are the ``findings`` column (``finding:location:severity|...``) with ``sex``, ``age``
    and ``view`` where the template uses them. Every problem (missing file, unknown label, mixed
    sizes) is collected and raised together.

    Returns:
        (examples, (width, height)).

    Raises:
        ManifestError: listing every problem with its row number.

    Example:
        >>> examples, size = read_training_manifest("out/phantom/manifest.csv")  # doctest: +SKIP
    """
    from .spec import PromptSpec

    path = Path(manifest)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest (give a manifest.csv or the output folder holding one)")
    text = BUILTIN_TEMPLATES.get(template, template)
    bad = check_template(text)
    if bad:
        raise ManifestError(f"prompt template {template!r}: {'; '.join(bad)}")
    prompt_spec = PromptSpec(template=text, template_id=template if template in BUILTIN_TEMPLATES else "custom")
    problems: list[str] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        image_column = "png_path" if "png_path" in columns else "file_name" if "file_name" in columns else None
        if image_column is None or "findings" not in columns:
            raise ManifestError(f"{path}: needs an image column (png_path or file_name) and a findings column; "
                                f"it has {', '.join(columns) or 'no header'}")
        rows = list(reader)
    examples: list[TrainingExample] = []
    sizes: dict[tuple[int, int], int] = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        if split is not None and (row.get("split") or "train") != split:
            continue
        case = _case_from_row(row, number, problems, str(path))
        image = path.parent / (row.get(image_column) or "")
        if not row.get(image_column):
            problems.append(f"{path}:row {number}: {image_column} is empty")
            continue
        if check_files:
            try:
                width, height, _ = _png_size(image)
                sizes[(width, height)] = sizes.get((width, height), 0) + 1
            except FileNotFoundError:
                problems.append(f"{path}:row {number}: image {image} does not exist")
                continue
            except (OSError, ValueError) as e:
                problems.append(f"{path}:row {number}: image {image} is not a readable PNG ({e})")
                continue
        try:
            prompt = build_prompt(case, prompt_spec).text
        except ValueError as e:
            problems.append(f"{path}:row {number}: {e}")
            continue
        examples.append(TrainingExample(image, prompt, case.case_id, case.split))
    if len(sizes) > 1:
        listing = ", ".join(f"{w}x{h} ({n} images)" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        problems.append(f"{path}: images have mixed sizes: {listing}; train on one size")
    if not examples and not problems:
        problems.append(f"{path}: no rows" + (f" in split {split!r}" if split else ""))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ManifestError(f"{len(problems)} problem(s) in the training manifest:\n  " + "\n  ".join(shown))
    size = next(iter(sizes)) if sizes else (0, 0)
    return examples, size


class _LazyImages:
    """The training images, read on first use (a resumed run past the latent cache never reads them)."""

    def __init__(self, examples, progress):
        self.examples, self.progress, self._tensor = examples, progress, None

    def get(self):
        if self._tensor is None:
            self._tensor = _load_images(self.examples, self.progress)
        return self._tensor

    def release(self) -> None:
        self._tensor = None


def _load_images(examples: Sequence[TrainingExample], progress: bool):
    """All images as one float16 tensor [N, 1, H, W] in [-1, 1] (16-bit and 8-bit PNGs)."""
    import numpy as np
    import torch
    from PIL import Image

    from .build import _progress

    out = None
    bar = _progress(len(examples), progress)
    bar.set_description("reading images")
    for i, ex in enumerate(examples):
        with Image.open(ex.path) as im:
            mode = im.mode
            arr = np.asarray(im)
        if arr.ndim == 3:
            arr = arr[..., :3].mean(axis=-1)
        scale = 65535.0 if mode.startswith("I") or arr.dtype == np.uint16 else 255.0
        if out is None:
            out = torch.empty((len(examples), 1, *arr.shape), dtype=torch.float16)
        out[i, 0] = torch.from_numpy(arr.astype(np.float32) / scale * 2 - 1)
        bar.update(1)
    bar.close()
    return out


# ----------------------------------------------------------------------------- the default design


def vocabulary_words() -> list[str]:
    """Every word the built-in templates can put in a prompt, lower case (other words become [UNK])."""
    import re

    vocab = get_vocabulary()
    texts = list(BUILTIN_TEMPLATES.values()) + ["no acute cardiopulmonary abnormality", "and", "year old"]
    texts += [f.text for f in vocab.findings.values()]  # the words templates write; synonyms only parse tags
    texts += [loc.text for loc in vocab.locations.values()]
    texts += [s.text for s in vocab.sexes.values()] + list(vocab.views) + ["mild", "moderate", "severe"]
    texts += [str(n) for n in range(0, 121)]
    words: list[str] = []
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]", re.sub(r"\{[a-z_]+\}", " ", t.lower())):
            if w not in words:
                words.append(w)
    return words


def build_word_tokenizer(max_length: int = 64):
    """A word-level tokenizer over the prompt vocabulary, saved and loaded as ``PreTrainedTokenizerFast``.

    Example:
        >>> tok = build_word_tokenizer()  # doctest: +SKIP
        >>> tok("PA chest radiograph").input_ids  # doctest: +SKIP
        [2, ..., 3]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary_words())}
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]),
                                                                                              (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=SPECIAL_TOKENS["pad"],
                                   unk_token=SPECIAL_TOKENS["unk"], model_max_length=max_length)


def default_components(tokenizer, *, sample_size: int = 256) -> dict:
    """Freshly initialised components of the default design (seeded by the caller's torch seed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **TEXT_ENCODER_CONFIG)
    vae = AutoencoderKL(sample_size=sample_size, **VAE_CONFIG)
    factor = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
    unet = UNet2DConditionModel(sample_size=sample_size // factor, **UNET_CONFIG)
    return {"text_encoder": CLIPTextModel(text_config), "vae": vae, "unet": unet,
            "scheduler": DDPMScheduler(**SCHEDULER_CONFIG), "tokenizer": tokenizer}


def _load_base(base: Path, allow_pickle: bool) -> dict:
    """The components of a local diffusers folder, checked and loaded as the diffusion backend loads them."""
    import diffusers
    import torch

    from .backends.diffusion import REQUIRED_COMPONENTS, check_model_folder, load_component

    index = check_model_folder(base, allow_pickle=allow_pickle)
    parts = {name: load_component(base, index, name, dtype=torch.float32, allow_pickle=allow_pickle)
             for name in REQUIRED_COMPONENTS}
    parts["scheduler"] = diffusers.DDPMScheduler.from_config(parts["scheduler"].config)
    return parts


# ----------------------------------------------------------------------------- training state


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of its decay."""

    def __init__(self, params, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    def update(self, params) -> None:
        import torch

        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                s.lerp_(p.detach(), 1 - d)

    def copy_to(self, params) -> None:
        import torch

        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s)


def _save_checkpoint(folder: Path, state: dict) -> None:
    """Atomically: write to a temporary folder, then rename; keep the two newest."""
    import torch

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT, "stage": state["stage"],
                                               "step": state["step"]}), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    done = sorted(p for p in folder.parent.glob(f"{state['stage']}-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _latest_checkpoint(work: Path, stage: str) -> Path | None:
    found = sorted(p for p in (work / "checkpoints").glob(f"{stage}-*")
                   if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").is_file())
    return found[-1] if found else None


def _load_checkpoint(folder: Path) -> dict:
    import torch

    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)  # no code runs on load


# ----------------------------------------------------------------------------- the run


def finetune(manifest: str | Path, base: str | Path, out: str | Path, *, mode: str = "full",
             train_text_encoder: bool | None = None, steps: int = 2000, vae_steps: int = 1000, batch_size: int = 16,
             vae_batch_size: int = 8, vae_crop: int = 64, learning_rate: float | None = None,
             vae_learning_rate: float = 1e-3, lr_schedule: str = "constant", template: str = "synthmed-v1",
             checkpoint_every: int = 250, validate_every: int = 0, validation_prompts: Sequence[str] | None = None,
             resume: bool = False, overwrite: bool = False, work_dir: str | Path | None = None, seed: int = 0,
             threads: int | None = None, device: str = "auto", mixed_precision: str = "no", lora_rank: int = 8,
             cond_dropout: float = 0.1, ema_decay: float = 0.999, min_snr_gamma: float = 5.0, allow_pickle: bool = False,
             save_dtype: str = "float16", progress: bool = True) -> FinetuneResult:
    """Train a latent-diffusion model on a manifest and save it as a diffusers folder at ``out``.

    Args:
        manifest: a synthmed manifest.csv (or the folder holding one); rows of the ``train`` split are used.
        base: ``"scratch"`` for the small default design, or a local diffusers model folder to fine-tune.
        out: the model folder to write (written at the end, atomically).
        mode: ``"full"`` (every UNet weight) or ``"lora"`` (low-rank adapters, merged into the saved UNet).
        train_text_encoder: also train the text encoder (always, from scratch; default off for a base).
        steps: UNet optimiser steps; vae_steps: VAE steps (scratch only).
        lr_schedule: the UNet learning rate after its 200 warm-up steps: ``"constant"``, or ``"cosine"``
            (down to a tenth of it at the last step; useful to anneal a model trained at a constant rate;
            resuming with more ``steps`` stretches what is left of the curve).
        checkpoint_every: save the whole training state every N steps in ``work_dir/checkpoints``.
        validate_every: write a grid of validation images every N UNet steps (0: only at the end).
        resume: continue from the newest checkpoint in ``work_dir`` (the same settings are required).
        work_dir: checkpoints, the latent cache, logs and validation grids (default: ``<out>.training``).

    Returns:
        FinetuneResult with the folder, the steps and the last losses.

    Raises:
        ManifestError: the manifest has problems (reported before any training).
        ValueError: a bad argument, naming it.

    Example:
        >>> finetune("out/phantom", "scratch", "models/mine", steps=4000, vae_steps=1500)  # doctest: +SKIP
    """
    # 1. Check inputs, before anything heavy is loaded
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    scratch = str(base) == "scratch"
    if scratch and mode == "lora":
        raise ValueError("mode 'lora' needs a base model (LoRA adapts existing weights); use mode 'full' from scratch")
    if not scratch and not Path(base).is_dir():
        raise ValueError(f"base must be 'scratch' or a local diffusers model folder; {base} does not exist")
    if steps < 0 or vae_steps < 0 or batch_size < 1 or vae_batch_size < 1:
        raise ValueError("steps and vae_steps must be >= 0 and batch sizes >= 1")
    if save_dtype not in ("float16", "float32", "bfloat16"):
        raise ValueError(f"save_dtype must be float16, float32 or bfloat16, got {save_dtype!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}")
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".training")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise ValueError(f"{out} already holds files; pass overwrite=True (--overwrite) to replace it")
    examples, (width, height) = read_training_manifest(manifest, template=template)
    if train_text_encoder is None:
        train_text_encoder = scratch
    manifest_path = Path(manifest) / "manifest.csv" if Path(manifest).is_dir() else Path(manifest)
    settings = {"base": "scratch" if scratch else str(Path(base).resolve()), "mode": mode,
                "train_text_encoder": bool(train_text_encoder), "steps": steps, "vae_steps": vae_steps if scratch else 0,
                "batch_size": batch_size, "vae_batch_size": vae_batch_size, "vae_crop": vae_crop,
                "learning_rate": learning_rate, "vae_learning_rate": vae_learning_rate, "lr_schedule": lr_schedule,
                "template": template, "seed": seed, "lora_rank": lora_rank, "cond_dropout": cond_dropout,
                "ema_decay": ema_decay,
                "min_snr_gamma": min_snr_gamma, "manifest_sha256": _sha256_file(manifest_path),
                "images": len(examples), "width": width, "height": height}
    if not scratch:  # resume must not mix checkpoints made from other base weights (a retrained base, same path)
        from .backends.diffusion import model_hash

        settings["base_hash"] = model_hash(base)
    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "settings.json"
    if settings_file.is_file() and resume:
        before = json.loads(settings_file.read_text(encoding="utf-8"))
        before.setdefault("lr_schedule", "constant")  # work folders from before these options
        if "base_hash" in settings:
            before.setdefault("base_hash", settings["base_hash"])
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k) and k != "steps")
        if changed:
            why = " (the base model's files are not those it started from)" if "base_hash" in changed else ""
            raise ValueError(f"{work} was trained with other settings ({', '.join(changed)} changed){why}; "
                             "resume needs the same manifest, base and settings, or start a new work_dir")
    elif any((work / "checkpoints").glob("*")) and not resume:
        if not overwrite:
            raise ValueError(f"{work} holds checkpoints of an earlier run; pass resume=True to continue it "
                             "or overwrite=True to start again")
        shutil.rmtree(work)
        work.mkdir(parents=True)
    settings_file.write_text(json.dumps(settings, indent=1), encoding="utf-8")

    try:
        import torch
        from accelerate import Accelerator

        if mode == "lora":
            import peft  # noqa: F401
    except ImportError as e:
        raise ImportError(f"synthmed finetune needs {e.name}: pip install 'synthmed[finetune]'") from None
    torch.set_num_threads(int(threads or os.cpu_count() or 1))

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=(device == "cpu"))
    started = time.time()
    log = _Log(work / "log.jsonl")

    # 2. Components
    torch.manual_seed(seed)
    if scratch:
        parts = default_components(build_word_tokenizer(), sample_size=max(width, height))
    else:
        parts = _load_base(Path(base), allow_pickle)
    tokenizer, text_encoder, vae, unet, noise_scheduler = (parts[k] for k in
                                                          ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    if width % factor or height % factor:
        raise ManifestError(f"images are {width}x{height}; this model needs sides that are multiples of {factor}")
    images = _LazyImages(examples, progress)
    generator = torch.Generator("cpu").manual_seed(seed)
    record: dict[str, Any] = {"settings": settings, "losses": {}}
    if not scratch and (Path(base) / "training.json").is_file():  # the base's own training: the model's lineage
        try:
            record["base_training"] = json.loads((Path(base) / "training.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass

    # 3. Stage 1 (scratch): the VAE
    vae_loss = None
    if scratch:
        vae, vae_loss, generator = _train_vae(vae, images, work, settings, generator, accelerator, log, resume,
                                              checkpoint_every, progress)
        record["losses"]["vae"] = vae_loss
        parts["vae"] = vae  # a resumed run loads the trained VAE as a new object

    # 4. The latent cache: every image encoded once (the posterior mean, scaled)
    latents = _latent_cache(vae, images, work, settings, accelerator, scratch, progress)
    images.release()
    ids = _token_ids(tokenizer, [ex.prompt for ex in examples], text_encoder)
    empty_ids = _token_ids(tokenizer, [""], text_encoder)[0]

    # 5. Stage 3: the UNet (and text encoder)
    if steps:
        unet, text_encoder, unet_loss, steps = _train_unet(
            unet, text_encoder, noise_scheduler, latents, ids, empty_ids, work, settings, generator, accelerator,
            log, resume, checkpoint_every, validate_every, validation_prompts or [ex.prompt for ex in examples[:8]],
            parts, progress)
        record["losses"]["unet"] = unet_loss

    # 6. Save the pipeline (atomically) and its card
    seconds = time.time() - started
    prev = json.loads((work / "record.json").read_text(encoding="utf-8")) if (work / "record.json").is_file() else {}
    record["seconds"] = seconds + (prev.get("seconds", 0.0) if resume else 0.0)
    record["steps"], record["vae_steps"] = steps, settings["vae_steps"]
    record["logged_seconds"] = _logged_seconds(work / "log.jsonl")  # across every resumed session
    record["save_dtype"] = save_dtype  # every component is stored in it, the frozen ones too
    (work / "record.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    _save_pipeline(out, {**parts, "vae": vae, "unet": unet, "text_encoder": text_encoder}, save_dtype,
                   record, manifest_path, None if scratch else Path(base))
    return FinetuneResult(out, work, steps, settings["vae_steps"], {k: v for k, v in record["losses"].items()
                                                                    if v is not None}, record["seconds"], record)


def _logged_seconds(path: Path) -> float:
    """Training time the log spans (its first to its last entry), summed over the gaps between sessions < 10 min."""
    try:
        times = [json.loads(line)["t"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return 0.0
    return float(sum(b - a for a, b in zip(times, times[1:]) if b - a < 600))


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **entry) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def _lr_at(step: int, base_lr: float, warmup: int, schedule: str = "constant", total: int = 1) -> float:
    rate = base_lr * min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "cosine" and step >= warmup:
        progress = (step - warmup) / max(total - 1 - warmup, 1)
        rate *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return rate


def _train_vae(vae, images, work, settings, generator, accelerator, log, resume, checkpoint_every, progress):
    """Stage 1: L1 + image-gradient L1 + a small KL term on random crops."""
    import torch
    import torch.nn.functional as F

    from .build import _progress

    total, crop, batch = settings["vae_steps"], settings["vae_crop"], settings["vae_batch_size"]
    done_file = work / "vae" / "config.json"
    if done_file.is_file() and resume:
        from diffusers import AutoencoderKL

        ckpt = _latest_checkpoint(work, "vae")  # none when the stage had 0 steps (and drew nothing)
        if ckpt is None and total:
            raise ValueError(f"{work / 'checkpoints'} has no VAE checkpoint to resume the trained VAE from; "
                             "start a new work_dir (or pass overwrite=True)")
        state = _load_checkpoint(ckpt) if ckpt else {}
        if state:
            generator.set_state(state["generator"])
        return AutoencoderKL.from_pretrained(work / "vae"), state.get("loss"), generator
    images = images.get()
    vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=settings["vae_learning_rate"], weight_decay=0.0)
    start, loss_avg = 0, None
    ckpt = _latest_checkpoint(work, "vae") if resume else None
    if ckpt:
        state = _load_checkpoint(ckpt)
        vae.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        start, loss_avg = state["step"], state.get("loss")
    vae, optimiser = accelerator.prepare(vae, optimiser)
    n, _, h, w = images.shape
    crop_h, crop_w = min(crop, h), min(crop, w)
    bar = _progress(total, progress)
    bar.set_description("VAE")
    bar.update(start)
    for step in range(start, total):
        for g in optimiser.param_groups:
            g["lr"] = _lr_at(step, settings["vae_learning_rate"], 100) * 0.5 * (1 + math.cos(math.pi * step / total))
        idx = torch.randint(n, (batch,), generator=generator)
        ys = torch.randint(h - crop_h + 1, (batch,), generator=generator)
        xs = torch.randint(w - crop_w + 1, (batch,), generator=generator)
        x = torch.stack([images[i, :, y:y + crop_h, x0:x0 + crop_w] for i, y, x0 in zip(idx, ys, xs)]).float()
        x = x.to(accelerator.device)
        posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        recon = accelerator.unwrap_model(vae).decode(z).sample
        loss = F.l1_loss(recon, x)
        loss = loss + 0.5 * (F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2)))
        loss = loss + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 25 == 0:
            log.write(stage="vae", step=step + 1, loss=round(loss_avg, 6), t=round(time.time(), 1))
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(work / "checkpoints" / f"vae-{step + 1:07d}",
                             {"stage": "vae", "step": step + 1, "model": accelerator.unwrap_model(vae).state_dict(),
                              "optimiser": optimiser.state_dict(), "generator": generator.get_state(),
                              "loss": loss_avg})
    bar.close()
    vae = accelerator.unwrap_model(vae).eval()
    vae.save_pretrained(work / "vae.tmp", safe_serialization=True)
    shutil.rmtree(work / "vae", ignore_errors=True)
    os.replace(work / "vae.tmp", work / "vae")
    return vae, loss_avg, generator


def _latent_cache(vae, images, work, settings, accelerator, scratch, progress):
    """Encode every image once; cached in work/latents.pt, keyed by the manifest and the VAE."""
    import torch

    from .build import _progress

    key = {"manifest_sha256": settings["manifest_sha256"], "vae_steps": settings["vae_steps"],
           "base": settings["base"], "images": settings["images"]}
    path = work / "latents.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == json.dumps(key, sort_keys=True):
            if scratch:
                vae.register_to_config(scaling_factor=float(cached["scaling_factor"]))
            return cached["latents"]
    images = images.get()
    vae = vae.to(accelerator.device).eval()
    channels = vae.config.in_channels
    chunks = []
    bar = _progress(len(images), progress)
    bar.set_description("encoding latents")
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            x = images[i:i + 16].float().to(accelerator.device)
            if channels != 1:
                x = x.expand(-1, channels, -1, -1)
            chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
            bar.update(len(x))
    bar.close()
    raw = torch.cat(chunks)
    if scratch:
        scaling = 1.0 / float(raw.std())
        vae.register_to_config(scaling_factor=scaling)
    else:
        scaling = float(vae.config.scaling_factor)
    latents = (raw * scaling).to(torch.float16)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": json.dumps(key, sort_keys=True), "latents": latents, "scaling_factor": scaling}, tmp)
    os.replace(tmp, path)
    return latents


def _token_ids(tokenizer, prompts: Sequence[str], text_encoder):
    limit = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                int(getattr(text_encoder.config, "max_position_embeddings", 77)))
    return tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                     return_tensors="pt").input_ids


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _train_unet(unet, text_encoder, noise_scheduler, latents, ids, empty_ids, work, settings, generator, accelerator,
                log, resume, checkpoint_every, validate_every, validation_prompts, parts, progress):
    """Stage 3: epsilon (or v) prediction with min-SNR weighting, prompt dropout for guidance, EMA."""
    import torch
    import torch.nn.functional as F

    from .build import _progress

    total, batch, mode = settings["steps"], settings["batch_size"], settings["mode"]
    lr = settings["learning_rate"] or (5e-4 if settings["base"] == "scratch" else 1e-4 if mode == "lora" else 1e-5)
    train_te = settings["train_text_encoder"]
    unet.requires_grad_(mode == "full")
    text_encoder.requires_grad_(train_te and mode == "full")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        rank = settings["lora_rank"]
        unet = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                               target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if train_te:
            text_encoder = get_peft_model(text_encoder, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                                   target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "out_proj"]))
    params = _trainable(unet) + (_trainable(text_encoder) if train_te else [])
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = _EMA(params, settings["ema_decay"])
    start, loss_avg = 0, None
    ckpt = _latest_checkpoint(work, "unet") if resume else None
    if ckpt:
        state = _load_checkpoint(ckpt)
        for p, v in zip(params, state["params"]):
            p.data.copy_(v)
        ema.shadow = [v.clone() for v in state["ema"]]
        ema.updates = state["ema_updates"]
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        start, loss_avg = state["step"], state.get("loss")
    unet, text_encoder, optimiser = accelerator.prepare(unet, text_encoder, optimiser)
    unet.train()
    text_encoder.train(train_te)
    alphas = noise_scheduler.alphas_cumprod.float()
    prediction = noise_scheduler.config.prediction_type
    n = len(latents)
    bar = _progress(max(total, 1), progress)
    bar.set_description("UNet")
    bar.update(start)
    for step in range(start, total):
        for g in optimiser.param_groups:
            g["lr"] = _lr_at(step, lr, 200, settings.get("lr_schedule", "constant"), total)
        idx = torch.randint(n, (batch,), generator=generator)
        z0 = latents[idx].float()
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        drop = torch.rand(batch, generator=generator) < settings["cond_dropout"]
        tokens = torch.where(drop[:, None], empty_ids[None, :], ids[idx])
        z0, noise, t, tokens = (v.to(accelerator.device) for v in (z0, noise, t, tokens))
        noisy = noise_scheduler.add_noise(z0, noise, t)
        with accelerator.autocast():
            hidden = text_encoder(tokens)[0]
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(z0, noise, t)
        a = alphas.to(t.device)[t]
        snr = a / (1 - a)
        gamma = settings["min_snr_gamma"]
        weight = torch.clamp(snr, max=gamma) / (snr if prediction == "epsilon" else snr + 1) if gamma else 1.0
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight).mean()
        optimiser.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimiser.step()
        ema.update(params)
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.99 * loss_avg + 0.01 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 25 == 0:
            log.write(stage="unet", step=step + 1, loss=round(loss_avg, 6), t=round(time.time(), 1))
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(work / "checkpoints" / f"unet-{step + 1:07d}",
                             {"stage": "unet", "step": step + 1, "params": [p.detach().clone() for p in params],
                              "ema": ema.shadow, "ema_updates": ema.updates, "optimiser": optimiser.state_dict(),
                              "generator": generator.get_state(), "loss": loss_avg})
        if validate_every and (step + 1) % validate_every == 0 and step + 1 < total:
            _validation_grid(work / "validation" / f"step-{step + 1:07d}.png", accelerator.unwrap_model(unet),
                             accelerator.unwrap_model(text_encoder), parts, ema, params, validation_prompts)
    bar.close()
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    ema.copy_to(params)  # the saved model carries the averaged weights
    if mode == "lora":
        unet = unet.merge_and_unload()
        if train_te:
            text_encoder = text_encoder.merge_and_unload()
    unet.eval()
    text_encoder.eval()
    done = max(start, total)
    _validation_grid(work / "validation" / f"step-{done:07d}.png", unet, text_encoder, parts, None, None,
                     validation_prompts)
    return unet, text_encoder, loss_avg, done


def _validation_grid(path: Path, unet, text_encoder, parts, ema, params, prompts: Sequence[str]) -> None:
    """Generate one image per validation prompt (EMA weights, fixed seeds) and write them as one PNG row."""
    import numpy as np
    import torch

    from .backends.diffusion import DiffusionBackend
    from .prompts import Prompt
    from .sampler import Case
    from .writers.png import png_bytes

    backup = None
    if ema is not None:
        backup = [p.detach().clone() for p in params]
        ema.copy_to(params)
    was_training = unet.training
    unet.eval()
    text_encoder.eval()
    try:
        size = parts["vae"].config.sample_size
        backend = DiffusionBackend.from_components(unet=unet, vae=parts["vae"], text_encoder=text_encoder,
                                                   tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                                                   width=size, height=size, steps=20, guidance_scale=4.0,
                                                   threads=torch.get_num_threads())
        cases = [Case(f"v{i}", i, "val", 1000 + i, (), None, None, None) for i in range(len(prompts))]
        images = backend.generate(cases, [Prompt(text=p) for p in prompts])
    finally:
        if backup is not None:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
        unet.train(was_training)
    row = np.concatenate([im.pixels for im in images], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .atomic import atomic_write_bytes

    atomic_write_bytes(path, png_bytes((np.clip(row, 0, 1) * 255).round().astype(np.uint8)))


def _save_pipeline(out: Path, parts: dict, save_dtype: str, record: dict, manifest: Path,
                   base: Path | None = None) -> None:
    """Write the diffusers folder next to ``out``, then swap it into place.

    From a base folder the tokenizer (never trained) is copied as it was, so the new folder loads wherever the
    base did; the configs do not keep the local path each component was loaded from (``_name_or_path``).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = getattr(torch, save_dtype)
    pipe = StableDiffusionPipeline(vae=parts["vae"].to(dtype), text_encoder=parts["text_encoder"].to(dtype),
                                   tokenizer=parts["tokenizer"], unet=parts["unet"].to(dtype),
                                   scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out.with_name(out.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if base is not None and (base / "tokenizer").is_dir():
        shutil.rmtree(tmp / "tokenizer")
        shutil.copytree(base / "tokenizer", tmp / "tokenizer")
        try:  # and the class the base names for it
            entry = json.loads((base / "model_index.json").read_text(encoding="utf-8"))["tokenizer"]
            index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
            index["tokenizer"] = entry
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except (OSError, ValueError, KeyError):
            pass
    # transformers 5 saves its fast tokenizer as "TokenizersBackend"; the older name loads in 4.x and 5.x
    for file, key in ((tmp / "model_index.json", "tokenizer"), (tmp / "tokenizer" / "tokenizer_config.json", None)):
        if not file.is_file():
            continue
        data = json.loads(file.read_text(encoding="utf-8"))
        if key and data.get(key, [None, None])[1] == "TokenizersBackend":
            data[key] = ["transformers", "PreTrainedTokenizerFast"]
        elif not key and data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            continue
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for config in tmp.glob("*/config.json"):
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (tmp / "training.json").write_text(json.dumps({**record, "manifest": str(manifest)}, indent=1), encoding="utf-8")
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    for module in (parts["vae"], parts["text_encoder"], parts["unet"]):
        module.to(torch.float32)


# Keep this at the end: `synthmed.finetune(...)` calls the function `finetune` above (the module is made callable,
# because Python rebinds `synthmed.finetune` to this module whenever it is imported; see synthmed/_callable.py).
from ._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "synthmed.finetune:finetune")
