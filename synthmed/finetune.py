"""Train or fine-tune a diffusers latent-diffusion model on a synthmed-format manifest or a real dataset.

The prompts are built from each row's labels by the same templates generation uses, so a model
trained here answers the prompts `synthmed generate` writes. A real dataset (CheXpert, MIMIC-CXR-JPG, NIH
ChestX-ray14, any CSV with a column map) is read by :mod:`synthmed.datasets`: its labels prompted the same way,
or its report impressions (RoentGen's recipe), its images of any size brought to the training size. Two
starting points:

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
Hang et al. 2023, EMA of the UNet) and its LoRA variant, with the library's own pieces: diffusers'
``EMAModel``, ``compute_snr`` and LR schedules, accelerate's gradient accumulation, mixed precision and
``save_state`` / ``load_state`` checkpoints (kept in finetune's record, see ``_save_checkpoint``).

Example:
    >>> from synthmed.finetune import finetune
    >>> finetune("out/phantom/manifest.csv", "scratch", "models/mine", steps=5000)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import manifest_root
from .process_state import keeps_caller_state, usable_cpus
from .prompts import build_prompt
from .spec import BUILTIN_TEMPLATES, check_template
from .vocabulary import get_vocabulary

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}
MODES = ("full", "lora")
LR_SCHEDULES = ("constant", "cosine")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = 2  # 2: accelerate save_state folders; 1 (state.pt) is not resumed
STATE_DIR = ".synthmed"  # the record of what finetune wrote, in the work folder and in the model folder
USER_FOLDERS = f"{STATE_DIR}/user-folders.json"  # a user's empty folders in the work folder that finetune writes into
MODEL_CLAIM = "model"
MODEL_PATHS = ("model_index.json", "training.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")

# The default design (issue #7), measured feasible on a 2-core CPU.
TEXT_ENCODER_CONFIG = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, projection_dim=128)
# Fully convolutional (no mid-block attention), so that a VAE trained on small crops applies unchanged to whole
# images. 4x down to a 64x64x4 latent: on DRR films the 8x-down VAE (blocks (16, 32, 64, 64), 8 latent channels)
# capped what the model could show (the auditor read 0.80 of the finding sets in its reconstructions after 8,000
# steps), this one read 0.91 after 2,000 and decodes faster (scripts/measure_model_capacity.py;
# docs/default_model.md, "Why these sizes").
VAE_CONFIG = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 64),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False)
# One resnet per level (5.7x cheaper per training step than two on 2 cores); a level more than the 32x32-latent
# UNet (32, 64, 128) before it, so that the lowest two (16x16 and 8x8) are the same size. Cross-attention (with
# self-attention) at 8x8 and in the mid block only: at 16x16 too it sampled at 605 against 441 ms an image, under
# the 1.5 images/s the default must keep (scripts/measure_model_capacity.py --unets u16l64,u16l64a1).
UNET_CONFIG = dict(in_channels=4, out_channels=4, block_out_channels=(16, 32, 64, 128), layers_per_block=1,
                   down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
                   up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
                   cross_attention_dim=128, attention_head_dim=8, norm_num_groups=8)
# Weights are saved unsharded, one safetensors file per model, so that a save writes only the names it claimed first
# (diffusers shards above 10 GB: an SDXL UNet in float32)
ONE_FILE = "100000GB"
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, steps_offset=1)


class FinetuneWarning(UserWarning):
    """The run goes on, but the user should know: files it left alone, a damaged checkpoint it skipped."""


class ManifestError(ValueError):
    """A training manifest that cannot be used; the message lists every problem with its row."""


@dataclass(frozen=True)
class TrainingExample:
    """One training image and the prompt its labels give."""

    path: Path
    prompt: str
    case_id: str
    split: str
    view: str | None = None  # PA, AP, LL; None where the manifest or dataset does not say
    masks: tuple[str, ...] = ()  # mask_paths of a synthmed manifest, relative to its folder: finding_loss_weight


@dataclass(frozen=True)
class TrainingSet:
    """What finetune trains on: the examples, and what reading them left out.

    Attributes:
        examples: the (image, prompt) examples, in the order of the manifest or dataset.
        kind: ``manifest`` (a synthmed manifest) or the real dataset's layout: chexpert, mimic, nih, csv.
        size: (width, height) when every image is a PNG of that one size (trained as it is), else None (each
            image is brought to the training size by :func:`synthmed.datasets.prepare_image`).
        sha256: the manifest's sha256; for a real dataset, that of its (image path, prompt) list.
        summary: what was read and what was left out, one line each, for the user.
        counts: the same as numbers (``images``, ``skipped`` reason -> count, ``notes``), for training.json.
    """

    examples: list[TrainingExample]
    kind: str
    size: tuple[int, int] | None
    sha256: str
    summary: tuple[str, ...] = ()
    counts: dict = field(default_factory=dict, hash=False)


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
    notes: list[str] = field(default_factory=list)  # the warnings it gave (FinetuneWarning)


# ----------------------------------------------------------------------------- manifest


def _png_size(path: Path) -> tuple[int, int, int]:
    """(width, height, bit depth) from a PNG's header, without decoding it."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24]


def _leaves_folder(folder: Path, rel: str) -> bool:
    """Whether a manifest's image path is absolute, climbs out with '..', or resolves (through a link) outside
    ``folder``, which is given resolved."""
    from .datasets import relative_parts

    parts = relative_parts(rel)
    return parts is None or not folder.joinpath(*parts).resolve().is_relative_to(folder)


def _header_problem(image: Path) -> str | None:
    """Why an image's header cannot be read as :func:`synthmed.datasets.read_image` opens the file (pydicom for
    DICOM, Pillow for the rest), or None; no pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    def read_dicom_header(force: bool) -> None:
        import pydicom

        header = pydicom.dcmread(image, stop_before_pixels=True, force=force)
        if "Rows" not in header or "Columns" not in header:
            raise ValueError("its header has no Rows and Columns")

    try:
        with open(image, "rb") as fh:
            preamble = fh.read(132)[128:132] == b"DICM"
        if preamble:
            read_dicom_header(force=False)
            return None
        try:
            with Image.open(image):  # the size is read from the header; Pillow's size limit is checked here
                pass
        except UnidentifiedImageError:
            if image.suffix.lower() not in (".dcm", ".dicom"):
                return "is not an image finetune reads (JPEG, PNG or DICOM)"
            read_dicom_header(force=True)  # a DICOM file without its 128-byte preamble
    except Image.DecompressionBombError as e:
        return f"is larger than Pillow's safety limit ({e})"
    except Exception as e:  # noqa: BLE001 - Pillow and pydicom raise many kinds on a damaged header
        return f"cannot be read ({type(e).__name__}: {e})"
    return None


def _first_bad_utf8(path: Path) -> tuple[int, int]:
    """(line, byte offset) of the first byte of a file that is not UTF-8, read in blocks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder held back from the last block (at most 3)
                start = max(e.start - len(e.object) + len(block), 0)
                return line + block[:start].count(b"\n"), offset + start
            line += block.count(b"\n")
            offset += len(block)
    return line, offset


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
    words = {}
    for column in ("sex", "view"):  # synonyms as a spec takes them (female, pa); anything else is named
        value = (row.get(column) or "").strip()
        words[column] = vocab.resolve(column, value) if value else None
        if value and words[column] is None:
            known = ", ".join(vocab.section(column))
            problems.append(f"{where}:row {number}: unknown {column} {value!r} (known: {known})")
    return Case(row.get("case_id") or f"row-{number}", number, row.get("split") or "train", 0, tuple(labels),
                words["sex"], age_value, words["view"])


def read_training_manifest(manifest: str | Path, *, template: str = "synthmed-v1", split: str | None = "train",
                           check_files: bool = True, any_size: bool = False,
                           skipped: dict | None = None) -> tuple[list[TrainingExample], tuple[int, int]]:
    """Read a synthmed-format manifest into training examples, checking it all first.

    The image column is ``png_path`` (else ``file_name``), relative to the manifest's folder; the
    labels are the ``findings`` column (``finding:location:severity|...``) with ``sex``, ``age``
    and ``view`` where the template uses them. Every problem (missing file, unknown label, mixed
    sizes) is collected and raised together.

    Args:
        any_size: images of any size and format (PNG, JPEG, DICOM; finetune brings them to one size): only
            their headers are read, and the size returned is (0, 0).
        skipped: a dict to count the rows of another split in, by reason (``split test (not train)``).

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
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            columns = reader.fieldnames or []
            image_column = "png_path" if "png_path" in columns else "file_name" if "file_name" in columns else None
            if image_column is None or "findings" not in columns:
                raise ManifestError(f"{path}: needs an image column (png_path or file_name) and a findings column; "
                                    f"it has {', '.join(columns) or 'no header'}")
            rows = list(reader)
        except UnicodeDecodeError:
            line, offset = _first_bad_utf8(path)
            raise ManifestError(f"{path}: line {line}: not UTF-8 text (byte {offset}); a manifest is a CSV text "
                                "file (is this an image or another binary file?)") from None
        except csv.Error as e:
            raise ManifestError(f"{path}: line {reader.line_num}: not a readable CSV file ({e})") from None
    examples: list[TrainingExample] = []
    sizes: dict[tuple[int, int], int] = {}
    # png_path (and mask_paths) of a split's images/<split>/metadata.csv start at the dataset folder, as in
    # manifest.csv; file_name starts at the metadata file's own folder (Hugging Face imagefolder's rule)
    root = manifest_root(path)
    base = path.parent if image_column == "file_name" or root == Path(os.path.abspath(path.parent)) else root
    folder = base.resolve()
    other_splits: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        value = row.get("split") or "train"
        if split is not None and value != split:
            # Train, ' train' are named as written: only the exact name is read as the split
            reason = f"split {value if value.strip() == value else repr(value)} (not {split})"
            other_splits[reason] = other_splits.get(reason, 0) + 1
            continue
        case = _case_from_row(row, number, problems, str(path))
        image = base / (row.get(image_column) or "")
        if not row.get(image_column):
            problems.append(f"{path}:row {number}: {image_column} is empty")
            continue
        if _leaves_folder(folder, row[image_column]):
            problems.append(f"{path}:row {number}: {image_column} {row[image_column]!r} is outside the manifest's "
                            f"folder (an absolute path, '..', or a link out of it); finetune reads images only "
                            f"inside {base}")
            continue
        if check_files and any_size:
            if not image.is_file():
                problems.append(f"{path}:row {number}: image {image} "
                                + ("is a folder, not an image file" if image.is_dir() else "does not exist"))
                continue
            problem = _header_problem(image)
            if problem is not None:
                problems.append(f"{path}:row {number}: image {image} {problem}")
                continue
        elif check_files:
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
        masks = tuple(m for m in (row.get("mask_paths") or "").split("|") if m)  # read only with finding_loss_weight
        examples.append(TrainingExample(image, prompt, case.case_id, case.split, case.view, masks))
    if len(sizes) > 1:
        listing = ", ".join(f"{w}x{h} ({n} images)" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1]))
        problems.append(f"{path}: images have mixed sizes: {listing}; train on one size")
    if not examples and not problems:
        problems.append(f"{path}: no rows" + (f" in split {split!r}" if split else "")
                        + (f" (left out: {_counts(other_splits)})" if other_splits else ""))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ManifestError(f"{len(problems)} problem(s) in the training manifest:\n  " + "\n  ".join(shown))
    if skipped is not None:
        skipped.update(other_splits)
    size = next(iter(sizes)) if sizes else (0, 0)
    return examples, size


# What finetune trains on (issue #23): the settings of the training data, with the values a work folder written
# before these options holds implicitly (a synthmed manifest of one-size PNGs, trained as it is).
PROMPT_SOURCES = ("labels", "reports")
VIEWS = ("all", "frontal")
CROPS = ("center", "random")
DATA_DEFAULTS = {"dataset_kind": None, "prompts": "labels", "no_report": None, "uncertain": None, "views": "all",
                 "size": None, "crop": "center"}
# The splits a real dataset's records are trained on; a record without one counts as train. NIH's train_val list
# is its training pool (its test list is the held-out set), so it is trained on too.
TRAIN_SPLITS = ("train", "train_val")


def _is_synthmed_manifest(path: Path) -> bool:
    """Whether ``path`` is a synthmed manifest (or a folder holding manifest.csv), not a real dataset's layout."""
    if path.is_dir():
        return (path / "manifest.csv").is_file()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return True  # not a readable CSV: the manifest reader says why, naming the file and line
    return bool({"png_path", "file_name"} & set(header)) and "findings" in header


def _one_png_size(examples: Sequence[TrainingExample]) -> tuple[int, int] | None:
    """(width, height) when every image is a PNG of that one size (read from the headers); else None."""
    size = None
    for ex in examples:
        try:
            width, height, _ = _png_size(ex.path)
        except (OSError, ValueError):
            return None
        if size not in (None, (width, height)):
            return None
        size = (width, height)
    return size


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def read_training_set(source: str | Path, *, template: str = "synthmed-v1", dataset_kind: str | None = None,
                      column_map: str | Path | None = None, prompts: str = "labels", no_report: str | None = None,
                      uncertain: str | None = None, views: str = "all") -> TrainingSet:
    """Read what finetune trains on: a synthmed manifest, or a real dataset's folder or CSV, checked first.

    A synthmed manifest (a CSV with ``png_path`` or ``file_name`` and ``findings``, or the folder holding
    ``manifest.csv``) is read by :func:`read_training_manifest`: its ``train`` rows, prompted from their findings.
    Anything else is a real dataset (CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14, or any CSV with ``column_map``),
    read by :func:`synthmed.datasets.read_dataset` and turned into (image, prompt) pairs by
    :func:`synthmed.datasets.training_pairs`: the records of split train (NIH: train_val) or of none, prompted
    from their labels through ``template`` or from their report's impression. What is left out, and why, is in
    the result's ``summary`` and ``counts``.

    Args:
        source: a manifest.csv or its folder; a dataset's folder or CSV.
        template: the prompt template for label prompts (a built-in name or a template string).
        dataset_kind: chexpert, mimic, nih or csv to force the layout (None: told from the files).
        column_map: for a CSV in no known layout: a YAML file naming its columns (docs/datasets.md).
        prompts: ``labels`` or ``reports`` (the impression; RoentGen's recipe).
        no_report: with ``prompts="reports"``, a record without an impression: ``skip`` (default) or ``labels``.
        uncertain: a dataset's uncertain labels (-1): ``ignore`` (default), ``positive`` or ``negative``.
        views: ``all``, or ``frontal`` (PA and AP only; laterals and unknown views left out, counted).

    Raises:
        ManifestError: a manifest with problems (every one, with its row), or nothing to train on.
        DatasetError: a dataset file that does not hold what its layout says (naming the file and line).
        ValueError: arguments that do not fit together or do not fit the source, naming them.

    Example:
        >>> data = read_training_set("/data/CheXpert-v1.0-small", views="frontal")  # doctest: +SKIP
        >>> data.kind, len(data.examples), data.summary[-1]  # doctest: +SKIP
        ('chexpert', 191027, '191027 training pairs, prompts from labels (template synthmed-v1); skipped: ...')
    """
    from collections import Counter
    from dataclasses import replace

    from .datasets import (FRONTAL_VIEWS, KINDS, LATERAL, NO_REPORT_POLICIES, UNCERTAIN_POLICIES, UNKNOWN_VIEW,
                           DatasetError, TrainingPairs, detect_kind, read_dataset, training_pairs)

    # 1. The arguments, and how they go together
    for name, value, choices in (("prompts", prompts, PROMPT_SOURCES), ("views", views, VIEWS),
                                 ("dataset_kind", dataset_kind, (None, *KINDS)),
                                 ("no_report", no_report, (None, *NO_REPORT_POLICIES)),
                                 ("uncertain", uncertain, (None, *UNCERTAIN_POLICIES))):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(str(c) for c in choices)}, got {value!r}")
    if no_report is not None and prompts != "reports":
        raise ValueError(f"no_report={no_report!r} says what to do with a record without a report impression under "
                         "prompts='reports'; with label prompts there is no report to miss: leave no_report out")
    if column_map is not None and dataset_kind not in (None, "csv"):
        raise ValueError(f"column_map names the columns of a CSV in no known layout (dataset_kind='csv'); the "
                         f"{dataset_kind} layout names its own columns: leave column_map out")
    if dataset_kind == "csv" and column_map is None:
        raise ValueError("dataset_kind='csv' needs column_map (a YAML file naming the CSV's columns; "
                         "docs/datasets.md)")
    path = Path(source)
    if not path.exists():
        raise ManifestError(f"{path}: no such file or folder (give a synthmed manifest.csv or the folder holding "
                            "one, or a real dataset's folder or CSV)")
    # 2. A synthmed manifest: its train rows, prompted from its findings column
    if dataset_kind is None and column_map is None and _is_synthmed_manifest(path):
        if prompts == "reports":
            raise ValueError(f"prompts='reports' needs report impressions, and the synthmed manifest {path} has none "
                             "(its prompts come from its findings column); use prompts='labels'")
        if uncertain is not None:
            raise ValueError(f"uncertain={uncertain!r} says how to read a real dataset's uncertain labels (-1); the "
                             f"synthmed manifest {path} has none: leave it out")
        skipped: Counter = Counter()
        examples, _ = read_training_manifest(path, template=template, any_size=True, skipped=skipped)
        if views == "frontal":
            skipped.update(LATERAL if ex.view == "LL" else UNKNOWN_VIEW for ex in examples
                           if ex.view not in FRONTAL_VIEWS)
            examples = [ex for ex in examples if ex.view in FRONTAL_VIEWS]
        file = path / "manifest.csv" if path.is_dir() else path
        line = f"{len(examples)} training images of split train in {file}; skipped: {_counts(skipped)}"
        if not examples:
            raise ManifestError(f"nothing to train on: {line}")
        return TrainingSet(examples, "manifest", _one_png_size(examples), _sha256_file(file), (line,),
                           {"images": len(examples), "skipped": dict(skipped)})
    # 3. A real dataset: its records of the training split, as (image, prompt) pairs
    if dataset_kind is None and column_map is None:
        try:
            detect_kind(path)
        except DatasetError as e:
            what = ("holds no manifest.csv (a synthmed set) and no real dataset synthmed knows" if path.is_dir()
                    else "is not a synthmed manifest (a png_path or file_name column and a findings column) nor a "
                    "real dataset synthmed knows")
            raise ManifestError(f"{path} {what}: {str(e).replace(' kind=', ' dataset_kind=')}") from None
    dataset = read_dataset(path, dataset_kind, uncertain=uncertain or "ignore", column_map=column_map)
    if prompts == "reports" and not any(record.impression for record in dataset.records):
        raise ValueError(f"prompts='reports': no record of the {dataset.kind} dataset {path} has a report "
                         "impression (CheXpert Plus' section_impression, MIMIC-CXR's report files, a column map's "
                         "report column); use prompts='labels'")
    split_skipped: Counter = Counter(f"split {r.split} (not train)" for r in dataset.records
                                     if (r.split or "train") not in TRAIN_SPLITS)
    training = [r for r in dataset.records if (r.split or "train") in TRAIN_SPLITS]
    pairs = training_pairs(replace(dataset, records=training), prompts=prompts, template=template,
                           frontal_only=views == "frontal", no_report=no_report or "skip")
    pairs = TrainingPairs(pairs.pairs, pairs.prompts, pairs.template_id, {**split_skipped, **pairs.skipped},
                          pairs.notes)
    summary = (dataset.summary(), pairs.summary())
    if not pairs.pairs:
        raise ManifestError(f"nothing to train on in {path}: {summary[1]} (the dataset: {summary[0]})")
    digest = hashlib.sha256()
    for pair in pairs:  # the list trained on, by paths inside the dataset: the same after the folder moves
        where = pair.path.relative_to(dataset.root).as_posix() if pair.path.is_relative_to(dataset.root) \
            else str(pair.path)
        digest.update((json.dumps([where, pair.prompt]) + "\n").encode("utf-8"))
    examples = [TrainingExample(p.path, p.prompt, p.case_id, p.split) for p in pairs]
    counts = {"images": len(examples), "records": len(dataset.records), "skipped": pairs.skipped,
              "notes": pairs.notes, "dataset_skipped": dataset.skipped, "unmapped": dataset.unmapped,
              "uncertain": dataset.uncertain_policy}
    return TrainingSet(examples, dataset.kind, None, digest.hexdigest(), summary, counts)


def _model_geometry(base: str | Path, allow_pickle: bool) -> tuple[int, int]:
    """(native size, the multiple every side must be) of the model to train, from its configs, before loading it.

    The native size is the UNet's sample_size times the VAE's scale factor (512 for Stable Diffusion 1.x and
    RoentGen); the scratch design's is 256 (``default_components``).
    """
    if str(base) == "scratch":
        vae_scale = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
        return 256, vae_scale * 2 ** (len(UNET_CONFIG["block_out_channels"]) - 1)
    from .model_folder import check_model_folder

    check_model_folder(base, allow_pickle=allow_pickle)  # the folder's own problems first, named by file
    unet = _read_json_object(Path(base) / "unet" / "config.json")
    vae = _read_json_object(Path(base) / "vae" / "config.json")
    sample, levels, unet_levels = unet.get("sample_size"), vae.get("block_out_channels"), unet.get("block_out_channels")
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"{Path(base) / 'unet' / 'config.json'}: sample_size {sample!r} is not one whole number; "
                         "give size= (the training size) yourself")
    vae_scale = 2 ** (len(levels or [1]) - 1)
    return sample * vae_scale, vae_scale * 2 ** (len(unet_levels or [1]) - 1)


class _LazyImages:
    """The training images, read on first use (a resumed run past the latent cache never reads them).

    ``size`` None: the PNGs as they are (one size); else each image brought to ``size`` x ``size`` by
    :func:`synthmed.datasets.prepare_image`, a random crop drawn once per image (see :func:`_load_images`).
    """

    def __init__(self, examples, progress, size: int | None = None, crop: str = "center", seed: int = 0):
        self.examples, self.progress, self._tensor = examples, progress, None
        self.size, self.crop, self.seed = size, crop, seed

    def __len__(self) -> int:
        return len(self.examples)

    def get(self):
        if self._tensor is None:
            self._tensor = _load_images(self.examples, self.progress, self.size, self.crop, self.seed)
        return self._tensor

    def batch(self, start: int, stop: int):
        """Images ``start:stop``, from memory when all were read, else read now (the latent cache of a base model
        needs no more than a batch in memory)."""
        if self._tensor is not None:
            return self._tensor[start:stop]
        return _load_images(self.examples[start:stop], False, self.size, self.crop, self.seed, first=start)

    def release(self) -> None:
        self._tensor = None


def _crop_rng(seed: int, index: int):
    """The generator of image ``index``'s random crop: one per image, from the run's seed and the image's place in
    the training list, so the crop is the same in every run and after a resume."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence(seed % 2 ** 64, spawn_key=(index,)))


def _load_images(examples: Sequence[TrainingExample], progress: bool, size: int | None = None, crop: str = "center",
                 seed: int = 0, first: int = 0):
    """The images as one float16 tensor [N, 1, H, W] in [-1, 1].

    Each image is read by :func:`synthmed.datasets.read_image` (PNG, JPEG, DICOM; palette, 1-bit, grey+alpha and
    colour as a viewer shows them). ``size`` None: as they are (all of one size). Else shorter side to ``size`` and a
    square crop (:func:`synthmed.datasets.prepare_image`); a random crop's offset comes from :func:`_crop_rng`
    (``first`` is the index of ``examples[0]``).
    """
    import torch

    from .datasets import prepare_image, read_image
    from .progress import progress_bar

    out = None
    bar = progress_bar(len(examples), progress)
    bar.set_description("reading images")
    for i, ex in enumerate(examples):
        if size is not None:
            rng = _crop_rng(seed, first + i) if crop == "random" else None
            pixels = prepare_image(ex.path, size, crop=crop, rng=rng) * 2 - 1
        else:  # as they are, read as --size reads them (palette, 1-bit, grey+alpha, colour by luma; files named)
            pixels = read_image(ex.path) * 2 - 1
        if out is None:
            out = torch.empty((len(examples), 1, *pixels.shape), dtype=torch.float16)
        out[i, 0] = torch.from_numpy(pixels)
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
    # views added after the shipped model (LL) go last, so every earlier word keeps its token id
    texts += [s.text for s in vocab.sexes.values()] + ["PA", "AP"] + ["mild", "moderate", "severe"]
    texts += [str(n) for n in range(0, 121)]
    texts += [v for v in vocab.views if v not in ("PA", "AP")]
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
    """The components of a local diffusers folder, checked and loaded by model_folder as the backend loads them."""
    import diffusers
    import torch

    from .model_folder import REQUIRED_COMPONENTS, check_model_folder, load_component

    index = check_model_folder(base, allow_pickle=allow_pickle)
    parts = {name: load_component(base, index, name, dtype=torch.float32, allow_pickle=allow_pickle)
             for name in REQUIRED_COMPONENTS}
    parts["scheduler"] = diffusers.DDPMScheduler.from_config(parts["scheduler"].config)
    return parts


# ----------------------------------------------------------------------------- training state


def _sha256_file(path: Path) -> str:
    from .ledger import file_sha256

    digest = file_sha256(path)
    if digest is None:
        raise FileNotFoundError(path)
    return digest


class _Progress:
    """What a checkpoint holds beside accelerate's state: the data generator, the stage, its step and running loss.

    Registered with ``accelerator.register_for_checkpointing``, so ``save_state`` / ``load_state`` carry it.
    """

    def __init__(self, stage: str, generator):
        self.stage, self.generator, self.step, self.loss = stage, generator, 0, None

    def state_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "loss": self.loss, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss = state["step"], state["loss"]
        self.generator.set_state(state["generator"])


def _lr_scheduler(optimiser, schedule: str, warmup: int, total: int):
    """The UNet's learning-rate schedule: a linear warm-up, then constant or a cosine down to a tenth of the rate.

    diffusers' cosine ends at zero; transformers' cosine with a floor is the one ``lr_schedule="cosine"`` promises.
    """
    if schedule == "cosine":
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

        return get_cosine_with_min_lr_schedule_with_warmup(optimiser, warmup, total, min_lr_rate=0.1)
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimiser, num_warmup_steps=warmup)


def _only_trained(models, weights, _output_dir) -> None:
    """accelerate save_state pre-hook: keep only the trained weights (LoRA adapters, not the frozen base)."""
    for model, state in zip(models, weights):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trained]:
            del state[key]


def _enable_gradient_checkpointing(module) -> None:
    """Recompute activations in the backward pass (non-reentrant: LoRA weights behind frozen layers get gradients)."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
        module.activation_checkpointing_enable()
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------- what finetune wrote: its records
#
# finetune deletes or overwrites only files it recorded as its own (synthmed.ledger): in the work folder
# (WORK/.synthmed) and in the model folder (OUT/.synthmed, which travels with the model and which diffusers and
# synthmed's model checks ignore). A save is staged in a folder this run creates under a new name and records
# (in WORK/.synthmed/staging.json) before creating it; only that folder, and only its recorded files, are removed.


def _shown(rels: Sequence[str], limit: int = 5) -> str:
    return ", ".join(rels[:limit]) + (f" and {len(rels) - limit} more" if len(rels) > limit else "")


def _read_json_object(path: Path, limit: int = 16 * 1024 * 1024) -> dict:
    """A JSON object from a file; ValueError naming the file (and line) when it is not one."""
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path}: larger than {limit // (1024 * 1024)} MB; not a file synthmed finetune wrote")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def _files_under(folder: Path, tops: Sequence[str] | None = None) -> list[str]:
    """Every file, link and empty folder under ``folder`` (or its entries ``tops``), relative, '/'-separated;
    the state folder excepted."""
    found = []
    for dirpath, dirs, names in os.walk(folder):
        here = Path(dirpath)
        if here == folder:
            dirs[:] = [d for d in dirs if d != STATE_DIR and (tops is None or d in tops)]
            names = [n for n in names if tops is None or n in tops]
        rel = lambda name: Path(os.path.relpath(here / name, folder)).as_posix()  # noqa: E731
        found += [rel(n) for n in names] + [rel(d) for d in dirs if (here / d).is_symlink()]
        if here != folder and not names and not dirs:
            found.append(Path(os.path.relpath(here, folder)).as_posix() + "/")
    return sorted(found)


def _remove_empty_folders(folder: Path) -> None:
    """Remove the empty folders under ``folder``, and ``folder`` if it ends up empty (a folder this run made)."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for dirpath, _dirs, _names in os.walk(folder, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass  # not empty: something stays


def _remove_recorded(folder: Path) -> list[str]:
    """Remove the files a staged folder's own record names (unchanged since), then its empty folders.

    Returns what is left in it (files synthmed did not record there), empty when the folder is gone.
    """
    from .ledger import Ledger

    if not folder.is_dir() or folder.is_symlink():
        return []
    Ledger(folder, folder / STATE_DIR).remove_owned()
    _remove_empty_folders(folder)
    return _files_under(folder) if folder.exists() else []


def _running(pid) -> bool:
    """Whether another process with this id is running (a staged save of a live run is not a leftover)."""
    if not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


class _WorkFolder:
    """The work folder and its ledger (WORK/.synthmed): the files finetune wrote there, the only ones it replaces."""

    def __init__(self, root: Path, tool: str = "finetune"):
        from .ledger import Ledger

        self.root, self.tool = root, tool  # tool: the command named in messages (finetune, distill)
        self.state = root / STATE_DIR
        self.ledger = Ledger(root, self.state)
        self.notes: list[str] = []  # warnings the run gave (also raised as FinetuneWarning)
        self.image_memo: dict | None = None  # the images' sha256 by size and time, for write_image_memo

    def warn(self, text: str) -> None:
        self.notes.append(text)
        warnings.warn(text, FinetuneWarning, stacklevel=3)

    def run_tool(self) -> str | None:
        """The command whose run the folder holds (finetune or distill), from its record; None when it holds none."""
        keys = self.ledger.keys() if self.root.is_dir() and self.ledger.is_safe() else []
        for tool, stages in RUN_STAGES.items():
            if any(k.startswith(f"checkpoint-{stage}-") for k in keys for stage in stages):
                return tool
        if "settings.json" not in (self.ledger.read("settings")["files"] if "settings" in keys else {}):
            return None
        try:
            settings = _read_json_object(self.root / "settings.json")
        except (OSError, ValueError):
            return None
        return "distill" if "teacher" in settings else "finetune" if "base" in settings else None

    def check(self, out: Path, *, overwrite: bool = False) -> None:
        """Before anything is written or removed: refuse a work folder that is, holds or lies in another
        command's folder (the model folder ``out``, a dataset, a model), or (without ``overwrite``) that holds a
        run of the other training command."""
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise ValueError(f"work_dir {self.root} exists and is not a folder")
        work, model = self.root.resolve(), Path(out).resolve()
        inside = model.relative_to(work).parts[0] if model != work and model.is_relative_to(work) else None
        # a model saved into place moves its whole folder aside: a work folder in it would go too
        if work == model or work.is_relative_to(model) or inside in (*PLANNED_TOPS, STATE_DIR):
            raise ValueError(f"work_dir {self.root} and the output folder {out} must be separate folders (the model "
                             f"folder may lie in the work folder, but not at a name it uses: {', '.join(PLANNED_TOPS)})")
        other = self.ledger.other_kind("work") if self.root.is_dir() and self.ledger.is_safe() else None
        if other:
            raise ValueError(f"work_dir {self.root} holds {other}; synthmed {self.tool} keeps its checkpoints in a "
                             "work folder of its own and does not write into it. Choose another work_dir")
        tool = self.run_tool()
        if tool not in (None, self.tool) and not overwrite:
            raise ValueError(f"work_dir {self.root} holds a run of synthmed {tool}; {self.tool} does not take it "
                             f"over. Give {self.tool} a work_dir of its own (resume that run with synthmed {tool} and "
                             f"resume=True), or pass overwrite=True to remove that run's files and start a "
                             f"{self.tool} run there")

    # ------------------------------------------------------------------ writing
    def claim(self, key: str, rels: Sequence[str]) -> None:
        from .ledger import ForeignFileError

        # finetune's own caches and checkpoints, read by nobody else: changed bytes there are damage to repair
        repair = key in ("latents", "vae") or key.startswith("checkpoint-")
        try:
            moved = self.ledger.claim(key, rels, repair=repair)
        except ForeignFileError as e:
            raise ValueError(f"{e} (in the work folder {self.root}); {self.tool} overwrites only files it wrote. Move "
                             f"{'it' if len(e.rels) == 1 else 'them'} away or choose another work folder") from None
        for rel, aside in moved:
            self.warn(f"{self.root / rel} had changed since {self.tool} wrote it; it is kept as {self.root / aside} "
                      "and made again")

    def write_bytes(self, key: str, rel: str, data: bytes) -> None:
        from .atomic import atomic_write_bytes

        self.claim(key, [rel])
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / rel, data)
        self.ledger.record(key, {rel: hashlib.sha256(data).hexdigest()})

    def write_json(self, key: str, rel: str, obj: Any) -> None:
        self.write_bytes(key, rel, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))

    def write_image_memo(self) -> None:
        """Keep the images' sha256 by size and time (:func:`_images_sha256`) for the next start."""
        if self.image_memo is not None:
            self.write_bytes("image-digests", IMAGE_DIGESTS, json.dumps(self.image_memo).encode("utf-8"))

    def torch_save(self, key: str, rel: str, obj: Any) -> None:
        """torch.save to a temp name the ledger knows (see synthmed.atomic), then rename: never a partial file."""
        import torch

        self.claim(key, [rel])
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        from .atomic import open_temp

        tmp, fh = open_temp(path)  # new, never through a link, at the name the ledger knows
        try:
            with fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.ledger.record_files(key, [rel])

    # ------------------------------------------------------------------ reading
    def damage(self, key: str, rels: Sequence[str] | None = None) -> str | None:
        """None when every file of a claim (or ``rels`` of it) is as recorded; else what is wrong, naming the file."""
        from .ledger import file_sha256

        files = self.ledger.read(key)["files"]
        for rel in (sorted(files) if rels is None else rels):
            sha = files.get(rel)
            if rel not in files:
                return f"{rel} was never written"
            actual = file_sha256(self.root / rel, follow_links=False)
            if actual is None:
                return f"{rel} is missing"
            if sha is None:
                return f"{rel} was not finished (the run writing it stopped)"
            if actual != sha:
                return f"{rel} does not match its record (truncated or changed)"
        return None if files or rels else f"{key} was never written"

    def checkpoints(self, stage: str) -> list[tuple[int, str]]:
        """(step, name) of the checkpoints of a stage that the ledger names, oldest first."""
        prefix = f"checkpoint-{stage}-"
        return sorted((int(k[len(prefix):]), k[len("checkpoint-"):]) for k in self.ledger.keys()
                      if k.startswith(prefix) and k[len(prefix):].isdigit())

    def foreign(self, tops: Sequence[str] | None = None) -> list[str]:
        """What is in the work folder (or its entries ``tops``) that finetune did not write."""
        owned = self.ledger.owned()
        return [r for r in _files_under(self.root, tops) if r not in owned]

    def user_folders(self) -> list[str]:
        """The folders that were the user's (empty) before finetune wrote into them, from its record."""
        path = self.root / USER_FOLDERS
        try:
            folders = _read_json_object(path).get("folders", []) if path.is_file() else []
        except (OSError, ValueError):
            return []
        return [r for r in folders if isinstance(r, str) and not Path(r).is_absolute() and ".." not in Path(r).parts
                and Path(r).parts and Path(r).parts[0] in PLANNED_TOPS]

    def keep_user_folders(self) -> None:
        """Record the user's empty folders where this run may write, so that no removal of ours takes them."""
        empty = {r.rstrip("/") for r in self.foreign(PLANNED_TOPS) if r.endswith("/")}
        known = set(self.user_folders())
        if empty - known:
            self.write_json("user-folders", USER_FOLDERS, {"folders": sorted(empty | known)})

    # ------------------------------------------------------------------ removing
    def clear(self) -> None:
        """--overwrite: remove exactly the files the ledger names; name what stays."""
        kept = self.user_folders()
        removal = self.ledger.remove_owned()
        for rel in kept:  # the user's (empty) folders finetune wrote into: emptied, not removed
            (self.root / rel).mkdir(parents=True, exist_ok=True)
        left = self.foreign() + [f"{r} (changed since {self.tool} wrote it)" for r in removal.changed]
        if left:
            self.warn(f"overwrite=True left {len(left)} file(s) in {self.root} that {self.tool} did not write: "
                      f"{_shown(left)}")

    def remove(self, keys: Sequence[str]) -> None:
        """Remove the files of these claims (unchanged since written), then the claims and emptied folders."""
        changed = []
        for key in keys:
            rels = list(self.ledger.read(key)["files"])
            changed += self.ledger.remove(key, rels).changed
            self.ledger.forget(key)
            for folder in sorted({p for r in rels for p in (self.root / r).parents if self.root in p.parents},
                                 key=lambda p: len(p.parts), reverse=True):
                try:
                    folder.rmdir()  # only an empty folder: anything a user put there stays
                except OSError:
                    pass
        if changed:
            self.warn(f"left {_shown(changed)} in {self.root}: changed since {self.tool} wrote it")

    # ------------------------------------------------------------------ staged saves
    def _staging_record(self) -> list[dict]:
        path = self.state / "staging.json"
        try:
            entries = _read_json_object(path).get("folders", []) if path.is_file() else []
        except (OSError, ValueError):
            entries = []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]

    def _write_staging_record(self, entries: list[dict]) -> None:
        self.write_json("staging", f"{STATE_DIR}/staging.json", {"folders": entries})

    def begin_staging(self, near: Path, kind: str, target: Path | None = None) -> Path:
        """Create a new folder ``<near>-<pid>[-n]`` for a staged save, recorded before it is created."""
        near.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            folder = near.with_name(f"{near.name}-{os.getpid()}" + (f"-{n}" if n else ""))
            if os.path.lexists(folder):
                continue  # someone else's (or an earlier run's, cleaned by its record): never reused
            entry = {"path": str(folder.absolute()), "kind": kind, "pid": os.getpid(),
                     "target": str(target.absolute()) if target else None}
            self._write_staging_record(self._staging_record() + [entry])
            try:
                folder.mkdir()
            except FileExistsError:  # made by someone else just now: not ours, so not in the record
                self._write_staging_record([e for e in self._staging_record() if e["path"] != str(folder.absolute())])
                continue
            return folder
        raise ValueError(f"cannot find a free name for a staging folder next to {near}")

    def end_staging(self, folder: Path) -> None:
        """Remove a staged folder's recorded files and empty folders; name anything else left in it."""
        left = _remove_recorded(folder)
        if left:
            self.warn(f"left {folder}: it holds file(s) {self.tool} did not record there ({_shown(left)}); "
                      "remove it yourself if it is yours to remove")
        else:
            self._write_staging_record([e for e in self._staging_record() if e["path"] != str(folder.absolute())])

    def clean_staging(self) -> None:
        """A killed run's staged saves: restore a model folder caught mid-swap, then remove what they recorded."""
        for entry in self._staging_record():
            folder, target = Path(entry["path"]), entry.get("target")
            if not os.path.lexists(folder):
                self._write_staging_record([e for e in self._staging_record() if e["path"] != entry["path"]])
                continue
            if _running(entry.get("pid")):
                continue  # another finetune on this work folder is saving right now
            if entry.get("kind") == "old" and target and not os.path.lexists(target):
                os.replace(folder, target)  # killed between the two renames of a swap: the previous model returns
                self._write_staging_record([e for e in self._staging_record() if e["path"] != entry["path"]])
                continue
            self.end_staging(folder)


class _ModelFolder:
    """The output model folder and its record (OUT/.synthmed/claims/model.json): the files finetune wrote there."""

    def __init__(self, out: Path, paths: Sequence[str] = MODEL_PATHS, tool: str = "finetune"):
        from .ledger import Ledger

        self.out = out
        self.ledger = Ledger(out, out / STATE_DIR)
        self.paths, self.tool = tuple(paths), tool  # paths: the model's top-level entries; tool: named in messages

    def survey(self) -> tuple[list[str], list[str], list[str]]:
        """(ours, changed, foreign): what the record names unchanged, names but changed since, and does not name."""
        from .ledger import file_sha256

        if not self.out.is_dir():
            return [], [], []
        owned = self.ledger.owned()
        ours, changed, foreign = [], [], []
        for rel in _files_under(self.out):
            if rel not in owned:
                foreign.append(rel)
            elif owned[rel] is not None and file_sha256(self.out / rel, follow_links=False) == owned[rel]:
                ours.append(rel)
            else:
                changed.append(rel)
        return ours, changed, foreign

    def _in_the_model(self, rels: Sequence[str]) -> list[str]:
        return [r for r in rels if r.split("/")[0].split(" ")[0] in self.paths]

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Before training: refuse a folder whose files finetune would overwrite or mix with the model it writes."""
        out = self.out
        if os.path.lexists(out) and not out.is_dir():
            raise ValueError(f"{out} exists and is not a folder")
        if out.is_symlink():
            raise ValueError(f"{out} is a symbolic link; give the model folder itself")
        other = self.ledger.other_kind("model") if out.is_dir() and self.ledger.is_safe() else None
        if other:  # a mistyped -o: not even overwrite=True replaces it
            raise ValueError(f"{out} holds {other}; synthmed {self.tool} writes a model and does not replace or "
                             "write into it. Choose another output folder")
        ours, changed, foreign = self.survey()
        if not (ours or changed or foreign):
            return
        theirs = foreign + [f"{r} (changed since {self.tool} wrote it)" for r in changed]
        clash = self._in_the_model(theirs)
        if clash:
            raise ValueError(f"{out} holds model files that synthmed {self.tool} did not write ({_shown(clash)}); it "
                             "replaces only a model it wrote. Choose another output folder, or move them out")
        if not theirs:
            if not (overwrite or resume):
                raise ValueError(f"{out} already holds files (a model {self.tool} wrote); pass overwrite=True "
                                 "to replace it, or resume=True to continue its training")
            return
        if not overwrite and not (resume and ours):
            raise ValueError(f"{out} already holds files synthmed did not write ({_shown(theirs)}); choose another "
                             "output folder, or pass overwrite=True to write the model beside them "
                             "(they are left alone)")

    def save(self, staged: Path, work: _WorkFolder) -> None:
        """Put a staged model folder (with its own record) in place of the one finetune wrote before."""
        from .ledger import Ledger, file_sha256

        digests = Ledger(staged, staged / STATE_DIR).read(MODEL_CLAIM)["files"]
        ours, changed, foreign = self.survey()  # again: the folder may have changed while the model trained
        out = self.out
        if not (changed or foreign):  # nothing but our model, or nothing: swap the whole folder
            if os.path.lexists(out) and any(out.iterdir()):
                old = work.begin_staging(out.with_name(out.name + ".old"), "old", out)
                os.replace(out, old)  # onto the empty folder just made (POSIX rename)
                os.replace(staged, out)
                work.end_staging(old)
            else:
                os.replace(staged, out)
            work.end_staging(staged)  # gone: only drops it from the record
            return
        theirs = foreign + [f"{r} (changed since {self.tool} wrote it)" for r in changed]
        clash = self._in_the_model(theirs)
        if clash:
            raise ValueError(f"{out} now holds model files that synthmed {self.tool} did not write ({_shown(clash)}); "
                             f"the trained model is left in {staged}")
        # a user's files beside the model: replace ours one by one, leave theirs
        from .ledger import ForeignFileError

        try:
            self.ledger.claim(MODEL_CLAIM, list(digests))
        except ForeignFileError as e:
            raise ValueError(f"{e} (in {out}); the trained model is left in {staged}") from None
        for rel in sorted(digests):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / rel, out / rel)
        for rel in ours:
            if rel not in digests and file_sha256(out / rel) is not None:
                (out / rel).unlink()  # ours, unchanged, and not part of the new model
                for folder in (out / rel).parents:
                    if folder == out or not folder.is_relative_to(out) or any(folder.iterdir()):
                        break
                    folder.rmdir()
        self.ledger.forget(MODEL_CLAIM)  # the claim now names exactly the new model's files
        self.ledger.record(MODEL_CLAIM, digests)
        Ledger(staged, staged / STATE_DIR).forget(MODEL_CLAIM)  # its files moved out: its record names nothing
        work.end_staging(staged)
        work.warn(f"{out}: the model was written beside {len(theirs)} file(s) {self.tool} did not write, left alone: "
                  f"{_shown(theirs)}")


RUN_STAGES = {"finetune": ("vae", "unet"), "distill": ("student", "tiny_vae")}  # their checkpoints' stages
IMAGE_DIGESTS = "image-digests.json"  # the work folder's memo: image path -> [size, mtime_ns, sha256]
PLANNED_TOPS = ("settings.json", "log.jsonl", "record.json", "latents.pt", IMAGE_DIGESTS, "vae", "checkpoints",
                "validation")


def _planned(rel: str, settings: dict, checkpoint_every: int, validate_every: int) -> bool:
    """Whether this run may write the work-folder file ``rel`` (a file there that is not ours is refused first)."""
    import re

    if rel in ("settings.json", "log.jsonl", "record.json", "latents.pt", IMAGE_DIGESTS) or rel.startswith("vae/"):
        return True
    m = re.fullmatch(r"checkpoints/(vae|unet)-(\d{7})/(meta\.json|(model|optimizer|scheduler)(_\d+)?\.(safetensors|bin)"
                     r"|scaler\.pt|(random_states|custom_checkpoint)_\d+\.pkl)", rel)  # ours and save_state's
    if m:
        total = settings["vae_steps"] if m[1] == "vae" else settings["steps"]
        step = int(m[2])
        return 0 < step <= total and (step % checkpoint_every == 0 or step == total)
    m = re.fullmatch(r"validation/step-(\d{7})\.png", rel)
    if m:
        step, total = int(m[1]), settings["steps"]
        return 0 < step == total or bool(validate_every and 0 < step < total and step % validate_every == 0)
    return False


def _record_staged(staged: Path) -> dict[str, str]:
    """Record every file in a staged folder (this run made it, under a new name) in its own record; their sha256."""
    from .ledger import Ledger, file_sha256

    digests = {r: file_sha256(staged / r) for r in _files_under(staged) if not r.endswith("/")}
    Ledger(staged, staged / STATE_DIR).record("staged", {r: d for r, d in digests.items() if d})
    return digests


def _move_in(work: _WorkFolder, staged: Path, key: str, dest: str) -> None:
    """Move a staged save into ``dest`` in the work folder, file by file, recorded under ``key`` with their sha256."""
    from .ledger import Ledger

    digests = _record_staged(staged)
    targets = {rel: f"{dest}/{rel}" for rel in digests}
    work.claim(key, list(targets.values()))
    for rel, target in targets.items():
        (work.root / target).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, work.root / target)
    Ledger(staged, staged / STATE_DIR).forget("staged")
    work.ledger.record(key, {targets[rel]: digest for rel, digest in digests.items()})
    work.end_staging(staged)


def _state_names(accelerator) -> list[str]:
    """The files ``accelerator.save_state`` writes (safetensors; see ``_planned``), and our meta.json."""
    def numbered(count: int, stem: str, ext: str) -> list[str]:
        return [f"{stem}{f'_{i}' if i else ''}.{ext}" for i in range(count)]

    return ["meta.json", *numbered(len(accelerator._models), "model", "safetensors"),
            *numbered(len(accelerator._optimizers), "optimizer", "bin"),
            *numbered(len(accelerator._schedulers), "scheduler", "bin"), "scaler.pt",
            f"random_states_{accelerator.process_index}.pkl",
            *(f"custom_checkpoint_{i}.pkl" for i in range(len(accelerator._custom_objects)))]


def _save_checkpoint(work: _WorkFolder, accelerator, stage: str, step: int) -> None:
    """Save the training state to checkpoints/<stage>-<step>; keep the two newest complete ones of the stage.

    ``accelerator.save_state`` writes the trained weights (safetensors), the optimiser, the LR schedule, the
    registered objects (EMA, :class:`_Progress`) and the RNG states into a new recorded staging folder, never under
    a final name; the files are then moved in and recorded with their sha256 (pickles among them: only these
    recorded bytes are ever loaded again).
    """
    from .ledger import Ledger

    name = f"{stage}-{step:07d}"
    staged = work.begin_staging(work.state / f"checkpoint-{name}", "checkpoint")
    Ledger(staged, staged / STATE_DIR).claim("staged", _state_names(accelerator))  # before save_state writes them
    try:
        accelerator.save_state(output_dir=str(staged), safe_serialization=True)
        meta = {"format": CHECKPOINT_FORMAT, "stage": stage, "step": step}
        (staged / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    except BaseException:
        _record_staged(staged)  # a half-written save: every file in it is this run's, removed by its record
        work.end_staging(staged)
        raise
    _move_in(work, staged, f"checkpoint-{name}", f"checkpoints/{name}")
    found = work.checkpoints(stage)
    complete = [n for _, n in found if all(work.ledger.read(f"checkpoint-{n}")["files"].values())]
    keep = set(complete[-2:])
    work.remove([f"checkpoint-{n}" for s, n in found if n not in keep and s < step])


def _checkpoint_problem(work: _WorkFolder, stage: str, step: int, name: str) -> str | None:
    """None when checkpoints/<name> is whole, as recorded, and of this format; else what is wrong with it."""
    problem = work.damage(f"checkpoint-{name}")
    if problem is not None:
        return problem
    recorded = work.ledger.read(f"checkpoint-{name}")["files"]
    folder = work.root / "checkpoints" / name
    # files a repair set aside (<name>.changed-<token>) are never read; anything else must be ours
    extra = [r for r in _files_under(folder) if f"checkpoints/{name}/{r}" not in recorded and ".changed-" not in r]
    if extra:
        return f"checkpoints/{name} holds {_shown(extra)}, which {work.tool} did not write"
    try:
        meta = _read_json_object(folder / "meta.json")
    except (OSError, ValueError) as e:
        return str(e)
    if meta.get("format") != CHECKPOINT_FORMAT:
        return (f"checkpoints/{name} is in the format of an earlier synthmed (format {meta.get('format')}), which this "
                "version does not resume from")
    if meta.get("stage") != stage or meta.get("step") != step:
        return f"checkpoints/{name} holds another state than its name says"
    return None


def _load_checkpoint(work: _WorkFolder, accelerator, stage: str) -> int | None:
    """Load the newest intact checkpoint of a stage into the prepared objects (``accelerator.load_state``).

    Every file is checked against its recorded sha256 first, so only files finetune wrote are unpickled; a damaged
    checkpoint is skipped, named in a warning, for the one before it. Returns the step loaded, or None.
    """
    skipped = []
    for step, name in reversed(work.checkpoints(stage)):
        problem = _checkpoint_problem(work, stage, step, name)
        if problem is not None:
            skipped.append(problem)
            continue
        try:  # strict=False: a LoRA checkpoint holds the adapters only (see _only_trained)
            accelerator.load_state(str(work.root / "checkpoints" / name), strict=False)
        except Exception as e:  # noqa: BLE001 - our own intact files that this setup cannot take
            raise ValueError(f"checkpoints/{name} in {work.root} is as {work.tool} wrote it but does not load here "
                             f"({str(e).splitlines()[0] if str(e) else e!r}); start again (overwrite=True) or "
                             "choose another work_dir") from None
        if skipped:
            work.warn(f"skipped a damaged checkpoint in {work.root}: {'; '.join(skipped)}; "
                      f"continuing from checkpoints/{name} (the same steps are trained again)")
        return step
    if skipped:
        work.warn(f"no usable {stage} checkpoint in {work.root} ({'; '.join(skipped)}); the {stage} stage starts "
                  "again from its first step")
    return None


# ----------------------------------------------------------------------------- the run

_ARGUMENT_NAMES = ("manifest", "base", "out", "mode", "train_text_encoder", "steps", "vae_steps", "batch_size",
                   "vae_batch_size", "vae_crop", "learning_rate", "vae_learning_rate", "lr_schedule", "template",
                   "checkpoint_every", "validate_every", "validation_prompts", "resume", "overwrite", "work_dir",
                   "seed", "threads", "device", "mixed_precision", "lora_rank", "cond_dropout", "ema_decay",
                   "min_snr_gamma", "allow_pickle", "save_dtype", "progress", "gradient_accumulation",
                   "gradient_checkpointing", "dataset_kind", "column_map", "prompts", "no_report", "uncertain",
                   "views", "size", "crop", "finding_loss_weight")


def _check_arguments(**args: Any) -> None:
    """Refuse wrong argument types (TypeError) and values (ValueError) at the door, naming the argument.

    An argument not given is not checked: synthmed.distill passes the ones it shares with finetune.
    """
    def name_of(value) -> str:
        numpy = type(value).__module__ == "numpy"  # np.int64(2) is not an int: say how to pass it
        return f"{type(value).__name__} {value!r}"[:120] + (" (a numpy scalar: pass int(x) or float(x))" if numpy else "")

    def number(name: str, *, whole: bool, low: float | None = None, high: float | None = None, open_low=False,
               optional: bool = False) -> None:
        if name not in args:
            return
        value = args[name]
        if value is None and optional:
            return
        kinds = int if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or (not whole and not math.isfinite(value)):
            raise TypeError(f"{name} must be {'a whole number' if whole else 'a number'}"
                            f"{' or None' if optional else ''}, got {name_of(value)}")
        if low is not None and (value <= low if open_low else value < low):
            raise ValueError(f"{name} must be {'more than' if open_low else 'at least'} {low}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{name} must be at most {high}, got {value!r}")

    def choice(name: str, choices: Sequence[str]) -> None:
        if name not in args:
            return
        if not isinstance(args[name], str) or args[name] not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {name_of(args[name])}")

    for name in ("manifest", "base", "out", "work_dir", "column_map"):
        if name not in args:
            continue
        value = args[name]
        if name in ("work_dir", "column_map") and value is None:
            continue
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            what = {"manifest": "the path of a manifest.csv (or its folder), or of a real dataset's folder or CSV",
                    "out": "the path of the model folder",
                    "base": "'scratch' or the path of a local diffusers model folder",
                    "work_dir": "None or the path of the work folder",
                    "column_map": "None or the path of a column map (YAML)"}[name]
            raise TypeError(f"{name} must be {what}, got {name_of(value)}")
    for name in ("resume", "overwrite", "allow_pickle", "progress", "gradient_checkpointing"):
        if name in args and not isinstance(args[name], bool):
            raise TypeError(f"{name} must be True or False, got {name_of(args[name])}")
    if args.get("train_text_encoder") is not None and not isinstance(args["train_text_encoder"], bool):
        raise TypeError(f"train_text_encoder must be True, False or None (the default for the base), "
                        f"got {name_of(args['train_text_encoder'])}")
    for name, low in (("steps", 0), ("vae_steps", 0), ("batch_size", 1), ("vae_batch_size", 1), ("vae_crop", 8),
                      ("checkpoint_every", 1), ("validate_every", 0), ("lora_rank", 1), ("gradient_accumulation", 1)):
        number(name, whole=True, low=low)
    number("threads", whole=True, low=1, optional=True)
    number("size", whole=True, low=8, optional=True)
    number("seed", whole=True, low=-(2 ** 63), high=2 ** 64 - 1)  # what torch.manual_seed takes
    number("learning_rate", whole=False, low=0, open_low=True, optional=True)
    number("vae_learning_rate", whole=False, low=0, open_low=True)
    number("cond_dropout", whole=False, low=0, high=1)
    number("ema_decay", whole=False, low=0, high=1)
    number("min_snr_gamma", whole=False, low=0)
    number("finding_loss_weight", whole=False, low=0, high=1000)
    choice("mode", MODES)
    choice("lr_schedule", LR_SCHEDULES)
    choice("device", DEVICES)
    choice("mixed_precision", ("no", "fp16", "bf16"))
    choice("save_dtype", ("float16", "float32", "bfloat16"))
    choice("prompts", PROMPT_SOURCES)
    choice("views", VIEWS)
    choice("crop", CROPS)
    for name, choices in (("dataset_kind", ("chexpert", "mimic", "nih", "csv")), ("no_report", ("skip", "labels")),
                          ("uncertain", ("ignore", "positive", "negative"))):
        if args.get(name) is not None and (not isinstance(args[name], str) or args[name] not in choices):
            raise ValueError(f"{name} must be None or one of {', '.join(choices)}, got {name_of(args[name])}")
    if "template" in args and not isinstance(args["template"], str):
        raise TypeError(f"template must be a template name or string, got {name_of(args['template'])}")
    prompts = args.get("validation_prompts")
    if prompts is not None and (isinstance(prompts, str) or not isinstance(prompts, Sequence)
                                or not all(isinstance(p, str) for p in prompts)):
        raise TypeError(f"validation_prompts must be None or a list of prompt strings, got {name_of(prompts)}")


def _check_device(device: str, mixed_precision: str) -> None:
    """Refuse a device or a mixed precision this machine does not have (ValueError), before anything is written.

    fp16 needs a CUDA GPU (accelerate would quietly train in float32 on a CPU); bf16 runs on CPUs and on GPUs that
    have it. accelerate fixes its state once per process: a second run (a notebook's) that asks for another
    precision or device is refused here, not after its work folder is written.
    """
    _check_machine(device, mixed_precision)  # first: what this machine cannot do at all
    state = sys.modules.get("accelerate.state")  # not imported yet: no state is fixed in this process
    if state is not None and state.is_initialized():
        import torch

        fixed = state.AcceleratorState()
        cpu_lost = device == "cpu" and fixed.device.type != "cpu"  # accelerate would refuse it
        gpu_lost = device != "cpu" and fixed.device.type == "cpu" and torch.cuda.is_available()  # silently the CPU
        if fixed.mixed_precision != mixed_precision or cpu_lost or gpu_lost:
            raise ValueError(f"accelerate fixes mixed precision once per Python process (and its device): this "
                             f"process set it up with mixed_precision={fixed.mixed_precision!r} on "
                             f"{fixed.device.type}, and this run asks for mixed_precision={mixed_precision!r}, "
                             f"device={device!r}; restart the kernel/process to change it")


def _check_machine(device: str, mixed_precision: str) -> None:
    """The device and mixed precision checks of :func:`_check_device` that hold whatever ran before."""
    if device == "auto" and mixed_precision == "no":
        return
    try:
        import torch
    except ImportError:
        return  # named, with the install command, when training starts
    cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU here (a CPU build of torch, or no "
                         f"driver; torch {torch.__version__}); use device='auto' or device='cpu'")
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU and this run is on the CPU; use "
                         "mixed_precision='bf16' or 'no'")
    if mixed_precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision='bf16': this GPU ({torch.cuda.get_device_name()}) has no bfloat16; use "
                         "mixed_precision='fp16'")


@keeps_caller_state
def finetune(manifest: str | Path, base: str | Path, out: str | Path, *, mode: str = "full",
             train_text_encoder: bool | None = None, steps: int = 2000, vae_steps: int = 1000, batch_size: int = 16,
             vae_batch_size: int = 8, vae_crop: int = 64, learning_rate: float | None = None,
             vae_learning_rate: float = 1e-3, lr_schedule: str = "constant", template: str = "synthmed-v1",
             checkpoint_every: int = 250, validate_every: int = 0, validation_prompts: Sequence[str] | None = None,
             resume: bool = False, overwrite: bool = False, work_dir: str | Path | None = None, seed: int = 0,
             threads: int | None = None, device: str = "auto", mixed_precision: str = "no", lora_rank: int = 8,
             cond_dropout: float = 0.1, ema_decay: float = 0.999, min_snr_gamma: float = 5.0, allow_pickle: bool = False,
             save_dtype: str = "float16", progress: bool = True, gradient_accumulation: int = 1,
             gradient_checkpointing: bool = False, dataset_kind: str | None = None,
             column_map: str | Path | None = None, prompts: str = "labels", no_report: str | None = None,
             uncertain: str | None = None, views: str = "all", size: int | None = None,
             crop: str = "center", finding_loss_weight: float = 0.0) -> FinetuneResult:
    """Train a latent-diffusion model on a manifest or a real dataset and save it as a diffusers folder at ``out``.

    Args:
        manifest: a synthmed manifest.csv (or the folder holding one; rows of the ``train`` split are used), or
            a real dataset's folder or CSV: CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14, or any CSV with
            ``column_map`` (records of split train, or of none; see :func:`read_training_set`).
        dataset_kind: chexpert, mimic, nih or csv, to force a real dataset's layout (None: told from its files).
        column_map: a YAML file naming the columns of a CSV in no known layout (docs/datasets.md).
        prompts: a real dataset's prompts: ``"labels"`` (its labels through ``template``, so the model answers
            synthmed's specs) or ``"reports"`` (the report's impression, RoentGen's recipe).
        no_report: with ``prompts="reports"``, a record without an impression: ``"skip"`` (default) or
            ``"labels"``.
        uncertain: a real dataset's uncertain labels (-1): ``"ignore"`` (default), ``"positive"``, ``"negative"``.
        views: ``"all"``, or ``"frontal"`` (PA and AP; laterals and unknown views left out, counted).
        size: the training size: each image's shorter side resized to it, then a square crop (aspect kept;
            :func:`synthmed.datasets.prepare_image`). Default: a manifest of PNGs of one size is trained at that
            size as it is; anything else (a real dataset, mixed sizes, JPEG, DICOM) at the model's native size
            (UNet sample_size x VAE scale: 512 for Stable Diffusion 1.x / RoentGen, 256 from scratch).
        crop: ``"center"``, or ``"random"``: an offset along the longer side drawn once per image from the seed
            and the image's index (the latent cache holds one crop per image; a resume finds the same crops).
        finding_loss_weight: w > 0 weighs the UNet's loss 1 + w on the latent cells a finding's mask covers (the
            manifest's ``mask_paths``, max-pooled to the latent grid) and 1 elsewhere, normalised per image, so
            that a small finding (a nodule: about 3 % of a drr film's cells) counts for more than its area.
            Needs a synthmed manifest trained at its own size; 0 (default): every cell alike.
        base: ``"scratch"`` for the small default design, or a local diffusers model folder to fine-tune.
        out: the model folder to write (written at the end, atomically).
        mode: ``"full"`` (every UNet weight) or ``"lora"`` (low-rank adapters, merged into the saved UNet).
        train_text_encoder: also train the text encoder (always, from scratch; default off for a base).
        steps: UNet optimiser steps; vae_steps: VAE steps (scratch only).
        batch_size: UNet images per micro-step; ``gradient_accumulation`` micro-steps make one optimiser step
            (the batch the optimiser sees is batch_size x gradient_accumulation).
        lr_schedule: the UNet learning rate after its 200 warm-up steps: ``"constant"``, or ``"cosine"``
            (down to a tenth of it at the last step; useful to anneal a model trained at a constant rate;
            resuming with more ``steps`` stretches what is left of the curve).
        checkpoint_every: save the whole training state every N steps in ``work_dir/checkpoints``.
        validate_every: write a grid of validation images every N UNet steps (0: only at the end).
        resume: continue from the newest checkpoint in ``work_dir`` (the same settings are required); a damaged
            checkpoint or latent cache is skipped (warned) and its steps trained again, to the same weights.
        overwrite: start again, replacing the model and work files an earlier run wrote. finetune deletes or
            overwrites only files it recorded as its own (``.synthmed/`` in both folders, each file's sha256);
            anything else in either folder stays and is named in a :class:`FinetuneWarning`.
        work_dir: checkpoints, the latent cache, logs and validation grids (default: ``<out>.training``).
        device: ``"auto"`` (a CUDA GPU when torch sees one), ``"cpu"`` or ``"cuda"``.
        mixed_precision: ``"no"``, ``"fp16"`` (CUDA only) or ``"bf16"`` (CPUs, and GPUs that have it); the
            weights stay float32, the forward pass runs in the lower precision (accelerate's autocast).
        gradient_checkpointing: recompute activations in the backward pass (UNet, and the text encoder when
            trained): far less memory for about a third more time per step, the same weights.

    Returns:
        FinetuneResult with the folder, the steps, the last losses and the warnings given.

    Raises:
        ManifestError: the manifest has problems (reported before any training).
        DatasetError: a real dataset's file or image that cannot be read, naming the file (and line).
        ValueError: a bad argument, or arguments that do not go together, naming them.

    Example:
        >>> finetune("out/phantom", "scratch", "models/mine", steps=4000, vae_steps=1500)  # doctest: +SKIP
    """
    # 1. Check inputs, before anything heavy is loaded (and before any folder is made)
    _check_arguments(**{k: v for k, v in locals().items() if k in _ARGUMENT_NAMES})
    scratch = str(base) == "scratch"
    if scratch and mode == "lora":
        raise ValueError("mode 'lora' needs a base model (LoRA adapts existing weights); use mode 'full' from scratch")
    if not scratch and not Path(base).is_dir():
        raise ValueError(f"base must be 'scratch' or a local diffusers model folder; {base} does not exist")
    out, work_path = _run_folders(out, work_dir, None if scratch else Path(base), "base model")
    if os.path.lexists(work_path) and not work_path.is_dir():
        raise ValueError(f"work_dir {work_path} exists and is not a folder")
    _check_device(device, mixed_precision)
    work = _WorkFolder(work_path)
    work.check(out, overwrite=overwrite)
    work.clean_staging()  # a killed run's half-done saves (a model caught mid-swap is put back first)
    work.ledger.remove_temp_files()  # and its temp files, by the names and pids its claims recorded
    _ModelFolder(out).check(resume=resume, overwrite=overwrite)  # its files are replaced only if finetune wrote them
    data = read_training_set(manifest, template=template, dataset_kind=dataset_kind, column_map=column_map,
                             prompts=prompts, no_report=no_report, uncertain=uncertain, views=views)
    examples = data.examples
    if scratch and prompts == "reports":
        work.warn("prompts='reports' from scratch: the scratch design's word-level tokenizer knows only the words of "
                  "synthmed's templates, so most words of an impression become [UNK]; fine-tune a base model with a "
                  "CLIP tokenizer (RoentGen, Stable Diffusion) on reports")
    if size is None and data.size is not None:  # PNGs of one size: trained as they are, as before these options
        if crop != "center":
            raise ValueError(f"crop={crop!r} crops images brought to the training size, and these PNGs of one size "
                             f"({data.size[0]}x{data.size[1]}) are trained as they are; give size= to resize and "
                             "crop them")
        width, height = data.size
    else:
        native, factor = _model_geometry(base, allow_pickle)
        if size is not None and size % factor:
            raise ValueError(f"size={size}: this model needs sides that are a multiple of {factor} (its VAE's scale "
                             f"times its UNet's downsampling); its native size is {native}")
        width = height = size or native
    if train_text_encoder is None:
        train_text_encoder = scratch
    manifest_path = Path(manifest) / "manifest.csv" if data.kind == "manifest" and Path(manifest).is_dir() \
        else Path(manifest)
    settings = {"base": "scratch" if scratch else str(Path(base).resolve()), "mode": mode,
                "train_text_encoder": bool(train_text_encoder), "steps": steps, "vae_steps": vae_steps if scratch else 0,
                "batch_size": batch_size, "vae_batch_size": vae_batch_size, "vae_crop": vae_crop,
                "learning_rate": learning_rate, "vae_learning_rate": vae_learning_rate, "lr_schedule": lr_schedule,
                "gradient_accumulation": gradient_accumulation, "mixed_precision": mixed_precision,
                "template": template, "seed": seed, "lora_rank": lora_rank, "cond_dropout": cond_dropout,
                "ema_decay": ema_decay,
                "min_snr_gamma": min_snr_gamma, "manifest_sha256": data.sha256,
                # the images' bytes: a resume must not train on images replaced under the same names
                "images": len(examples), "images_sha256": _images_sha256(examples, work), "width": width,
                "height": height,
                # what is trained on (DATA_DEFAULTS: a manifest of one-size PNGs as it is, as before these options)
                "dataset_kind": None if data.kind == "manifest" else data.kind, "prompts": prompts,
                "no_report": (no_report or "skip") if prompts == "reports" else None,
                "uncertain": None if data.kind == "manifest" else uncertain or "ignore", "views": views,
                "size": None if data.size is not None and size is None else width, "crop": crop}
    if finding_loss_weight:  # only then: the settings of runs before the option stay the same (and resume)
        if data.kind != "manifest" or settings["size"] is not None:
            raise ValueError("finding_loss_weight needs a synthmed manifest trained at its own size (leave size "
                             "out): its mask_paths say where each finding is")
        if not any(ex.masks for ex in examples):
            raise ValueError(f"finding_loss_weight: no row of {manifest_path} names a mask (mask_paths); a manifest "
                             "of a procedural backend (drr, phantom) has them")
        settings["finding_loss_weight"] = float(finding_loss_weight)
    if not scratch:  # resume must not mix checkpoints made from other base weights (a retrained base, same path)
        from .model_folder import model_hash

        settings["base_hash"] = model_hash(base)
    else:  # nor load checkpoints of another design (a synthmed whose *_CONFIG changed since they were made)
        settings.update(json.loads(json.dumps({"vae_design": VAE_CONFIG, "unet_design": {
            "unet": UNET_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG}})))
    work_path.mkdir(parents=True, exist_ok=True)
    settings_file = work_path / "settings.json"
    if settings_file.is_file() and resume:
        try:
            before = _read_json_object(settings_file)
        except ValueError as e:
            raise ValueError(f"{e}; it records the settings of the run to resume: resume needs it as finetune "
                             "wrote it (or start again: overwrite=True without resume=True)") from None
        for key, value in (("lr_schedule", "constant"), ("gradient_accumulation", 1), ("mixed_precision", "no"),
                           *DATA_DEFAULTS.items()):
            before.setdefault(key, value)  # work folders from before these options
        # work folders from before these were recorded
        for key in ("base_hash", "vae_design", "unet_design", "images_sha256"):
            if key in settings:
                before.setdefault(key, settings[key])
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k) and k != "steps")
        if changed:
            why = (" (the base model's files are not those it started from)" if "base_hash" in changed else
                   " (this synthmed's scratch design is not the one its checkpoints were made with)"
                   if {"vae_design", "unet_design"} & set(changed) else
                   f" ({IMAGES_CHANGED})" if "images_sha256" in changed else "")
            raise ValueError(f"{work_path} was trained with other settings ({', '.join(changed)} changed){why}; "
                             "resume needs the same manifest, base and settings, or start a new work_dir")
    elif not resume and (overwrite or any(work.checkpoints(stage) for stage in ("vae", "unet"))):
        if not overwrite:
            raise ValueError(f"{work_path} holds checkpoints of an earlier run; pass resume=True to continue it "
                             "or overwrite=True to start again")
        # exactly the files the ledger names (its latent cache too: never reused); anything else stays, named
        work.clear()
    # an empty folder holds nothing of the user's: this run may write into it (and never removes it)
    theirs = [r for r in work.foreign(PLANNED_TOPS)
              if not r.endswith("/") and _planned(r, settings, checkpoint_every, validate_every)]
    if theirs:
        why = (" (it has no record of what finetune wrote there: made by a synthmed that kept "
               "none, or not a finetune work folder)" if work.ledger.is_empty() else "")
        raise ValueError(f"{_shown(theirs)} in the work folder {work_path}: this run would write there and finetune "
                         f"did not write {'it' if len(theirs) == 1 else 'them'}{why}; it overwrites only its own "
                         "files. Move them away or choose another work folder")
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
        raise ImportError(f"synthmed finetune needs {e.name}: pip install 'synthmed[finetune]'") from None
    torch.set_num_threads(int(threads or usable_cpus()))  # the caller's count is back after the call

    accelerate_options = dict(mixed_precision=mixed_precision, cpu=(device == "cpu"))
    started = time.time()
    log = _Log(work_path / "log.jsonl")
    if progress:  # what is trained on, and what was left out and why, before the hours of training
        for line in data.summary:
            print(line, file=sys.stderr)

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
    images = _LazyImages(examples, progress, settings["size"], crop, seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    # the record names the base as it was given (settings hold it resolved, for resume): a shared model's
    # training.json does not carry this machine's folders
    as_given = settings if scratch else {**settings, "base": os.fspath(base)}
    record: dict[str, Any] = {"settings": as_given, "losses": {}, "data": {"kind": data.kind, **data.counts,
                                                                        "summary": data.summary}}
    if not scratch and (Path(base) / "training.json").is_file():  # the base's own training: the model's lineage
        try:
            record["base_training"] = json.loads((Path(base) / "training.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass

    # 3. Stage 1 (scratch): the VAE
    vae_loss = None
    if scratch:
        vae, vae_loss, generator = _train_vae(vae, images, work, settings, generator, Accelerator(**accelerate_options),
                                              log, resume, checkpoint_every, progress)
        record["losses"]["vae"] = vae_loss
        parts["vae"] = vae  # a resumed run loads the trained VAE as a new object

    # 4. The latent cache: every image encoded once (the posterior mean, scaled)
    # An accelerator per stage, so that each checkpoints only its own models; this one is made after the VAE
    # stage because accelerate keeps the gradient-accumulation setting process-wide.
    accelerator = Accelerator(**accelerate_options, gradient_accumulation_steps=gradient_accumulation)
    latents = _latent_cache(vae, images, work, settings, accelerator, scratch, progress)
    images.release()
    finding_maps = None
    if settings.get("finding_loss_weight"):  # the masks on the latent grid (the VAE's scale: image / latent side)
        grid = tuple(latents.shape[-2:])
        finding_maps = finding_cells(examples, manifest_root(manifest_path), grid, height // grid[0], progress)
    ids = _token_ids(tokenizer, [ex.prompt for ex in examples], text_encoder)
    empty_ids = _token_ids(tokenizer, [""], text_encoder)[0]

    # 5. Stage 3: the UNet (and text encoder)
    if steps:
        unet, text_encoder, unet_loss, steps = _train_unet(
            unet, text_encoder, noise_scheduler, latents, ids, empty_ids, work, settings, generator, accelerator,
            log, resume, checkpoint_every, validate_every, validation_prompts or [ex.prompt for ex in examples[:8]],
            parts, progress, gradient_checkpointing, finding_maps)
        record["losses"]["unet"] = unet_loss

    # 6. Save the pipeline (atomically) and its card
    seconds = time.time() - started
    prev = _earlier_record(work) if resume else {}
    record["seconds"] = seconds + prev.get("seconds", 0.0)
    record["steps"], record["vae_steps"] = steps, settings["vae_steps"]
    record["logged_seconds"] = _logged_seconds(work_path / "log.jsonl")  # across every resumed session
    record["save_dtype"] = save_dtype  # every component is stored in it, the frozen ones too
    work.ledger.record_files("log", ["log.jsonl"])
    work.write_json("record", "record.json", record)
    _save_pipeline(out, {**parts, "vae": vae, "unet": unet, "text_encoder": text_encoder}, save_dtype,
                   record, manifest_path, None if scratch else Path(base), work, progress)
    return FinetuneResult(out, work_path, steps, settings["vae_steps"], {k: v for k, v in record["losses"].items()
                                                                         if v is not None}, record["seconds"], record,
                          work.notes)


def _run_folders(out: str | Path, work_dir: str | Path | None, model: Path | None,
                 role: str) -> tuple[Path, Path]:
    """The model folder and the work folder (default ``<out>.training``), checked before anything is written.

    Refused (ValueError): a model folder that is or holds the current folder (a save renames the model folder
    into place), either folder inside, at or around ``model`` (the base or teacher, named ``role``), whose
    files and hash the run would change, and either folder inside a dataset or a model that synthmed wrote (its
    files would go into that folder and break it: a dataset that no longer loads, a model whose hash changed).
    """
    out = Path(out)
    here = Path.cwd().resolve()
    if here.is_relative_to(out.resolve()):
        where = "the current folder" if here == out.resolve() else "a folder that holds the current folder"
        raise ValueError(f"the output folder {out} is {where} ({out.resolve()}); a finished model is put in place by "
                         "renaming its folder, which cannot be done to the folder you are in. Name the model folder "
                         "from outside it (e.g. from its parent folder)")
    named = Path(os.path.abspath(out)) if out.name in ("", "..") else out  # /data/..: the name of what it means
    work = Path(work_dir) if work_dir else named.with_name(named.name + ".training")
    if model is not None:
        theirs = model.resolve()
        for what, path in (("the output folder", out), ("work_dir", work)):
            mine = path.resolve()
            if mine == theirs:
                raise ValueError(f"{what} {path} is the {role} ({model}); write the new model and its work folder "
                                 "elsewhere")
            if mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
                how = "lies inside" if mine.is_relative_to(theirs) else "holds"
                raise ValueError(f"{what} {path} {how} the {role} {model}: the run's files would go into or around "
                                 f"the {role}'s own (and could change them and its model hash); choose a folder "
                                 "outside it")
    for what, path in (("the output folder", out), ("work_dir", work)):
        enclosing = _enclosing_folder(path)
        if enclosing:
            from .ledger import FOLDER_KINDS

            folder, kind = enclosing
            harm = ("it would no longer load as a dataset" if kind == "dataset" else
                    "its files and model hash would change")
            raise ValueError(f"{what} {path} lies inside {folder}, which holds {FOLDER_KINDS[kind]}: the run's "
                             f"files would go into it and {harm}; choose a folder outside it")
    return out, work


def _enclosing_folder(path: Path) -> tuple[Path, str] | None:
    """The nearest folder above ``path`` that holds a dataset or a model synthmed wrote (told by the claims in its
    ``.synthmed/``), with its kind (``"dataset"`` or ``"model"``); None when no folder above it does.

    Example:
        >>> _enclosing_folder(Path("/")) is None
        True
    """
    from .ledger import Ledger

    for folder in Path(os.path.abspath(path)).resolve().parents:
        try:
            kinds = Ledger(folder, folder / STATE_DIR).kinds() if (folder / STATE_DIR).is_dir() else set()
        except OSError:  # a folder we may not read holds nothing we could tell
            continue
        for kind in ("dataset", "model"):  # a work folder (a model folder may lie in its own) or a qc report: fine
            if kind in kinds:
                return folder, kind
    return None


def _earlier_record(work: _WorkFolder) -> dict:
    """record.json of the sessions before a resume (its seconds add up); a damaged one counts as none, named."""
    if not (work.root / "record.json").is_file():
        return {}
    try:
        prev = _read_json_object(work.root / "record.json")
    except (OSError, ValueError) as e:
        work.warn(f"{e}; the training time of the earlier sessions is not counted")
        return {}
    return prev if isinstance(prev.get("seconds", 0.0), (int, float)) else {}


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


def random_crops(generator, n: int, height: int, width: int, crop_h: int, crop_w: int, batch: int):
    """One training batch's random crops: (which of the ``n`` examples, top rows, left columns), drawn from
    ``generator`` in that order (checkpoints restore it, so a resume draws the same crops)."""
    import torch

    idx = torch.randint(n, (batch,), generator=generator)
    ys = torch.randint(height - crop_h + 1, (batch,), generator=generator)
    xs = torch.randint(width - crop_w + 1, (batch,), generator=generator)
    return idx, ys, xs


def _train_vae(vae, images, work, settings, generator, accelerator, log, resume, checkpoint_every, progress):
    """Stage 1: L1 + image-gradient L1 + a small KL term on random crops."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler

    from .progress import progress_bar

    total, crop, batch = settings["vae_steps"], settings["vae_crop"], settings["vae_batch_size"]
    trained = resume and work.damage("vae") is None  # the trained VAE, as recorded
    if trained and not total:  # a stage of 0 steps drew nothing and saved no checkpoint
        return AutoencoderKL.from_pretrained(work.root / "vae"), None, generator
    if resume and not trained and work.ledger.read("vae")["files"]:
        work.warn(f"the trained VAE in {work.root} is damaged ({work.damage('vae')}); it is trained again from "
                  "its newest checkpoint (to the same weights)")
    optimiser = torch.optim.AdamW(vae.parameters(), lr=settings["vae_learning_rate"], weight_decay=0.0)
    lr_scheduler = get_scheduler("cosine", optimiser, num_warmup_steps=100, num_training_steps=total)
    vae, optimiser, lr_scheduler = accelerator.prepare(vae, optimiser, lr_scheduler)
    state = _Progress("vae", generator)
    accelerator.register_for_checkpointing(state)
    loaded = _load_checkpoint(work, accelerator, "vae") if resume else None
    if trained:
        if loaded is None:
            raise ValueError(f"{work.root / 'checkpoints'} has no VAE checkpoint to resume the trained VAE from; "
                             "start a new work_dir (or pass overwrite=True)")
        if loaded >= total:
            return AutoencoderKL.from_pretrained(work.root / "vae"), state.loss, generator
        # the last checkpoint is damaged: train the last steps again from this one (the same draws, the same VAE)
    images = images.get()
    vae.train()
    start, loss_avg = state.step, state.loss
    n, _, h, w = images.shape
    crop_h, crop_w = min(crop, h), min(crop, w)
    bar = progress_bar(total, progress)
    bar.set_description("VAE")
    bar.update(start)
    for step in range(start, total):
        idx, ys, xs = random_crops(generator, n, h, w, crop_h, crop_w, batch)
        x = torch.stack([images[i, :, y:y + crop_h, x0:x0 + crop_w] for i, y, x0 in zip(idx, ys, xs)]).float()
        x = x.to(accelerator.device)
        with accelerator.accumulate(vae):
            posterior = accelerator.unwrap_model(vae).encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
            recon = accelerator.unwrap_model(vae).decode(z).sample
            loss = F.l1_loss(recon, x)
            loss = loss + 0.5 * (F.l1_loss(recon.diff(dim=-1), x.diff(dim=-1))
                                 + F.l1_loss(recon.diff(dim=-2), x.diff(dim=-2)))
            loss = loss + 1e-6 * posterior.kl().mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(vae.parameters(), 1.0)
            optimiser.step()
            lr_scheduler.step()
            optimiser.zero_grad(set_to_none=True)
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        state.step, state.loss = step + 1, loss_avg
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 25 == 0:
            log.write(stage="vae", step=step + 1, loss=round(loss_avg, 6), t=round(time.time(), 1))
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(work, accelerator, "vae", step + 1)
    bar.close()
    vae = accelerator.unwrap_model(vae).eval()
    with _library_bars(progress):
        _save_vae(vae, work)
    return vae, loss_avg, generator


def _save_vae(vae, work: _WorkFolder) -> None:
    """Save the trained VAE to work/vae: staged in a recorded folder of its own, then moved in file by file."""
    from .ledger import Ledger

    staged = work.begin_staging(work.state / "vae", "vae")
    Ledger(staged, staged / STATE_DIR).claim("staged", _saved_names("", vae))
    vae.save_pretrained(staged, safe_serialization=True, max_shard_size=ONE_FILE)
    _move_in(work, staged, "vae", "vae")


IMAGES_CHANGED = "the training images' bytes are not those it was trained on: images replaced under the same names"


def _images_sha256(examples: Sequence[TrainingExample], work: "_WorkFolder | None" = None) -> str:
    """One sha256 of every training image's bytes, in order.

    With ``work``, a file whose size and modification time are those the work folder's memo (:data:`IMAGE_DIGESTS`,
    written by an earlier start and recorded in its ledger) holds keeps the sha256 noted there, so a resume reads no
    image again (as make and rsync judge a file unchanged); the new memo is left on ``work.image_memo``.
    """
    memo = _read_image_memo(work) if work is not None else {}
    digest, noted = hashlib.sha256(), {}
    for ex in examples:
        stat = os.stat(ex.path)
        key = os.path.abspath(ex.path)
        known = memo.get(key)
        same = isinstance(known, list) and len(known) == 3 and known[:2] == [stat.st_size, stat.st_mtime_ns]
        sha = known[2] if same and isinstance(known[2], str) else _sha256_file(ex.path)
        noted[key] = [stat.st_size, stat.st_mtime_ns, sha]
        digest.update(sha.encode("ascii"))
    if work is not None:
        work.image_memo = noted
    return digest.hexdigest()


def _read_image_memo(work: "_WorkFolder") -> dict:
    """The memo an earlier start wrote, if the ledger records it as written (else none: every image is read)."""
    from .ledger import file_sha256

    path = work.root / IMAGE_DIGESTS
    try:
        if not path.is_file() or work.ledger.owned().get(IMAGE_DIGESTS) != file_sha256(path):
            return {}
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _weights_sha256(module) -> str:
    """The sha256 of a model's weights (names, dtypes, shapes, bytes), wherever they were loaded from."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _latent_cache(vae, images, work, settings, accelerator, scratch, progress):
    """Encode every image once; cached in work/latents.pt, keyed by what the latents are made of: the images'
    bytes, the VAE's weights and the data settings (a cache of other images or another VAE is made again).

    One latent per image: a random crop (``crop="random"``) is drawn once per image, not again at every step.
    """
    import torch

    from .progress import progress_bar

    key = {"manifest_sha256": settings["manifest_sha256"], "vae_steps": settings["vae_steps"],
           "images": settings["images"], "images_sha256": settings["images_sha256"],  # the run's: read once
           "vae_sha256": _weights_sha256(vae)}
    # the data settings only where they differ from a manifest trained as it is: caches written before they
    # existed keep their key
    data = {k: settings.get(k, v) for k, v in DATA_DEFAULTS.items() if settings.get(k, v) != v}
    if data:
        key["data"] = {**data, **({"seed": settings["seed"]} if data.get("crop") == "random" else {})}
    path = work.root / "latents.pt"
    if path.is_file():
        problem, cached = work.damage("latents", ["latents.pt"]), None
        if problem is None:
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(cached, dict):
                    raise ValueError(f"it holds a {type(cached).__name__}")
            except Exception as e:  # noqa: BLE001 - whatever torch says, our own cache is damaged
                problem, cached = f"latents.pt cannot be read ({str(e).splitlines()[0] if str(e) else e!r})", None
        if problem is not None:
            work.warn(f"the latent cache in {work.root} is damaged ({problem}); encoding the images again")
        elif cached.get("key") == json.dumps(key, sort_keys=True):
            if scratch:
                vae.register_to_config(scaling_factor=float(cached["scaling_factor"]))
            return cached["latents"]
    vae = vae.to(accelerator.device).eval()
    channels = vae.config.in_channels
    chunks = []
    bar = progress_bar(len(images), progress)
    bar.set_description("encoding latents")
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            x = images.batch(i, i + 16).float().to(accelerator.device)
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
    work.torch_save("latents", "latents.pt", {"key": json.dumps(key, sort_keys=True), "latents": latents,
                                              "scaling_factor": scaling})
    return latents


def finding_cells(examples: Sequence[TrainingExample], folder: str | Path, grid: tuple[int, int], scale: int,
                  progress: bool = False):
    """Which latent cells each example's findings cover: the union of its masks (relative to the manifest's
    ``folder``; each the size of its image, ``grid`` x ``scale``, the VAE's downsampling), max-pooled to ``grid``.

    Returns a uint8 tensor (examples, height, width) of 0 and 1; an example without masks (a normal film) is all 0.

    Raises:
        ManifestError: a mask outside the folder, missing, unreadable, or not the size of its image, naming it.

    Example:
        >>> finding_cells(examples, "out/drr", (64, 64), 4).shape  # doctest: +SKIP
        torch.Size([19000, 64, 64])
    """
    import numpy as np
    import torch
    from PIL import Image

    from .progress import progress_bar

    rows, cols = grid
    root = Path(folder).resolve()
    cells = np.zeros((len(examples), rows, cols), dtype=np.uint8)
    bar = progress_bar(len(examples), progress)
    bar.set_description("finding masks")
    for k, example in enumerate(examples):
        for rel in example.masks:
            mask = root / rel
            if _leaves_folder(root, rel):
                raise ManifestError(f"{mask}: a mask of {example.case_id} is outside the manifest's folder; finetune "
                                    f"reads files only inside {root}")
            try:
                with Image.open(mask) as im:
                    covered = np.asarray(im) > 0
            except (OSError, ValueError) as e:
                raise ManifestError(f"{mask}: the mask of {example.case_id} cannot be read ({e})") from None
            if covered.shape[:2] != (rows * scale, cols * scale):
                raise ManifestError(f"{mask}: a {covered.shape[1]}x{covered.shape[0]} mask, but {example.case_id}'s "
                                    f"image is {cols * scale}x{rows * scale}; masks are the size of their images")
            if covered.ndim == 3:
                covered = covered.any(axis=2)
            cells[k] |= covered.reshape(rows, scale, cols, scale).any(axis=(1, 3))
        bar.update(1)
    bar.close()
    return torch.from_numpy(cells)


def _token_ids(tokenizer, prompts: Sequence[str], text_encoder):
    limit = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                int(getattr(text_encoder.config, "max_position_embeddings", 77)))
    return tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                     return_tensors="pt").input_ids


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _train_unet(unet, text_encoder, noise_scheduler, latents, ids, empty_ids, work, settings, generator, accelerator,
                log, resume, checkpoint_every, validate_every, validation_prompts, parts, progress,
                gradient_checkpointing=False, finding_maps=None):
    """Stage 3: epsilon (or v) prediction with min-SNR weighting, prompt dropout for guidance, EMA.

    ``finding_maps`` (from :func:`finding_cells`): each image's loss is a mean weighted 1 + w on the cells its
    findings cover (w: ``settings["finding_loss_weight"]``) and 1 elsewhere.

    A step is one optimiser step over ``gradient_accumulation`` micro-batches of ``batch_size`` (accelerate's
    ``accumulate``); the learning rate, the EMA and checkpoints count optimiser steps.
    """
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import EMAModel, compute_snr

    from .progress import progress_bar

    total, batch, mode = settings["steps"], settings["batch_size"], settings["mode"]
    micro_steps = settings["gradient_accumulation"]
    lr = settings["learning_rate"] or (5e-4 if settings["base"] == "scratch" else 1e-4 if mode == "lora" else 1e-5)
    train_te = settings["train_text_encoder"]
    unet.requires_grad_(mode == "full")
    text_encoder.requires_grad_(train_te and mode == "full")
    if gradient_checkpointing:  # less memory, the same weights: activations are recomputed in the backward pass
        _enable_gradient_checkpointing(unet)
        if train_te:
            _enable_gradient_checkpointing(text_encoder)
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
    lr_scheduler = _lr_scheduler(optimiser, settings["lr_schedule"], 200, total)
    ema = EMAModel(params, decay=settings["ema_decay"])
    state = _Progress("unet", generator)
    if train_te:
        unet, text_encoder, optimiser, lr_scheduler = accelerator.prepare(unet, text_encoder, optimiser, lr_scheduler)
        trained = (unet, text_encoder)
    else:  # a frozen text encoder is not checkpointed: it is the base's
        unet, optimiser, lr_scheduler = accelerator.prepare(unet, optimiser, lr_scheduler)
        text_encoder, trained = text_encoder.to(accelerator.device), (unet,)
    accelerator.register_for_checkpointing(ema, state)
    accelerator.register_save_state_pre_hook(_only_trained)
    if resume:
        _load_checkpoint(work, accelerator, "unet")
    ema.to(accelerator.device)  # also after load_state, which puts the averages on the CPU
    start, loss_avg = state.step, state.loss
    unet.train()
    text_encoder.train(train_te)
    prediction, gamma = noise_scheduler.config.prediction_type, settings["min_snr_gamma"]
    n = len(latents)
    bar = progress_bar(max(total, 1), progress)
    bar.set_description("UNet")
    bar.update(start)
    for step in range(start, total):
        step_loss = 0.0
        for _ in range(micro_steps):
            idx = torch.randint(n, (batch,), generator=generator)
            z0 = latents[idx].float()
            noise = torch.randn(z0.shape, generator=generator)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
            drop = torch.rand(batch, generator=generator) < settings["cond_dropout"]
            tokens = torch.where(drop[:, None], empty_ids[None, :], ids[idx])
            z0, noise, t, tokens = (v.to(accelerator.device) for v in (z0, noise, t, tokens))
            with accelerator.accumulate(*trained):
                noisy = noise_scheduler.add_noise(z0, noise, t)
                with accelerator.autocast():
                    hidden = text_encoder(tokens)[0]
                    pred = unet(noisy, t, encoder_hidden_states=hidden).sample
                target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(z0, noise, t)
                error = F.mse_loss(pred.float(), target.float(), reduction="none")
                if finding_maps is None:
                    per_sample = error.mean(dim=(1, 2, 3))
                else:
                    weight = 1.0 + settings["finding_loss_weight"] * finding_maps[idx].float()[:, None]
                    weight = weight.to(error.device)
                    per_sample = (error * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
                if gamma:
                    snr = compute_snr(noise_scheduler, t)
                    per_sample = per_sample * snr.clamp(max=gamma) / (snr if prediction == "epsilon" else snr + 1)
                loss = per_sample.mean()
                accelerator.backward(loss)  # divided by the micro-steps; the optimiser steps on the last one
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimiser.step()
                lr_scheduler.step()
                optimiser.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / micro_steps
        ema.step(params)
        loss_avg = step_loss if loss_avg is None else 0.99 * loss_avg + 0.01 * step_loss
        state.step, state.loss = step + 1, loss_avg
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 25 == 0:
            log.write(stage="unet", step=step + 1, loss=round(loss_avg, 6), t=round(time.time(), 1))
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(work, accelerator, "unet", step + 1)
        if validate_every and (step + 1) % validate_every == 0 and step + 1 < total:
            _validation_grid(work, f"validation/step-{step + 1:07d}.png", accelerator.unwrap_model(unet),
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
    _validation_grid(work, f"validation/step-{done:07d}.png", unet, text_encoder, parts, None, None,
                     validation_prompts)
    return unet, text_encoder, loss_avg, done


def _validation_grid(work: _WorkFolder, rel: str, unet, text_encoder, parts, ema, params,
                     prompts: Sequence[str]) -> None:
    """Generate one image per validation prompt (EMA weights, fixed seeds) and write them as one PNG row."""
    import numpy as np
    import torch

    from .backends.diffusion import DiffusionBackend
    from .prompts import Prompt
    from .sampler import Case
    from .writers.png import png_bytes

    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    try:
        vae = parts["vae"].to(next(unet.parameters()).device)  # on the CPU when the latent cache was read back
        size = vae.config.sample_size
        backend = DiffusionBackend.from_components(unet=unet, vae=vae, text_encoder=text_encoder,
                                                   tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                                                   width=size, height=size, steps=20, guidance_scale=4.0,
                                                   threads=torch.get_num_threads(),
                                                   model_hash="in-training")  # writes no set: no need to hash
        cases = [Case(f"v{i}", i, "val", 1000 + i, (), None, None, None) for i in range(len(prompts))]
        images = backend.generate(cases, [Prompt(text=p) for p in prompts])
    finally:
        if ema is not None:
            ema.restore(params)
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    row = np.concatenate([im.pixels for im in images], axis=1)
    work.write_bytes("validation", rel, png_bytes((np.clip(row, 0, 1) * 255).round().astype(np.uint8)))


@contextlib.contextmanager
def _library_bars(progress: bool):
    """diffusers' and transformers' own progress bars ("Writing model shards") only when progress is on."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    if not progress:
        for lib, _ in was:
            lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in was:
            lib.enable_progress_bar() if enabled else lib.disable_progress_bar()


def _saved_names(folder: str, module) -> list[str]:
    """The files ``module.save_pretrained`` may write into ``folder`` ("": the folder itself), safetensors, unsharded:
    a tokenizer's, a scheduler's, a diffusers model's or a transformers model's."""
    if hasattr(module, "vocab_files_names"):
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja", *module.vocab_files_names.values()]
    elif hasattr(module, "config_name") and not hasattr(module, "state_dict"):
        names = [module.config_name]
    elif hasattr(module, "config_name"):
        names = [module.config_name, "diffusion_pytorch_model.safetensors"]
    else:
        names = ["config.json", "generation_config.json", "model.safetensors"]
    return [f"{folder}/{name}" if folder else name for name in dict.fromkeys(names)]


def _save_pipeline(out: Path, parts: dict, save_dtype: str, record: dict, manifest: Path,
                   base: Path | None, work: _WorkFolder, progress: bool = True, *,
                   record_file: str = "training.json", copied: Sequence[str] = ("tokenizer",),
                   extra_files: dict[str, str] | None = None, folder: _ModelFolder | None = None,
                   extra_modules: dict | None = None) -> None:
    """Write the diffusers folder into a new, recorded folder next to ``out``, then put it in place.

    The folder carries its own record (``out/.synthmed``: every file with its sha256), so a later run replaces
    exactly these files and nothing a user put beside them.

    From a base folder the tokenizer (never trained) is copied as it was, so the new folder loads wherever the
    base did; the configs do not keep the local path each component was loaded from (``_name_or_path``).

    Args:
        record_file: the name the record is written under (with ``manifest``).
        copied: the components copied from ``base`` as they are (distill copies the text encoder and VAE too).
        extra_files: more text files of the folder, relative path -> text (distill's model card).
        extra_modules: more diffusers models saved as subfolders (safetensors, ``save_dtype``), name -> model,
            not in model_index.json (distill's tiny decoder).
        folder: the output folder's checks (default: finetune's).
    """
    import torch

    from .model_folder import quiet_libraries

    dtype = getattr(torch, save_dtype)
    # neither diffusers' "modules that should be kept in float32" (the save casts on purpose) nor transformers'
    # "requires torchvision" lines that importing the pipeline class prints
    with quiet_libraries():
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=parts["vae"].to(dtype), text_encoder=parts["text_encoder"].to(dtype),
                                       tokenizer=parts["tokenizer"], unet=parts["unet"].to(dtype),
                                       scheduler=parts["scheduler"], safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    from .ledger import Ledger, file_sha256

    tmp = work.begin_staging(out.with_name(out.name + ".saving"), "saving", out)
    # every file this save may write is claimed (maybe written) before it is written: a run killed while saving
    # leaves only files its record names, which the next run removes
    staged = Ledger(tmp, tmp / STATE_DIR)
    names = ["model_index.json", record_file, *(extra_files or {})]
    names += [r for name, module in {**pipe.components, **(extra_modules or {})}.items() if module is not None
              for r in _saved_names(name, module)]
    names += [f"{c}/{r}" for c in copied if base is not None and (base / c).is_dir() for r in _files_under(base / c)
              if not r.endswith("/")]
    staged.claim(MODEL_CLAIM, names)
    with _library_bars(progress):
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=ONE_FILE)
    for component in copied:
        if base is None or not (base / component).is_dir():
            continue
        shutil.rmtree(tmp / component)  # the one just saved, in the folder this run made
        shutil.copytree(base / component, tmp / component)
        try:  # and the class the base names for it
            entry = json.loads((base / "model_index.json").read_text(encoding="utf-8"))[component]
            index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
            index[component] = entry
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
    (tmp / record_file).write_text(json.dumps({**record, "manifest": str(manifest)}, indent=1), encoding="utf-8")
    for rel, text in (extra_files or {}).items():
        (tmp / rel).write_text(text, encoding="utf-8")
    for name, module in (extra_modules or {}).items():
        with _library_bars(progress), quiet_libraries():
            module.to(dtype).save_pretrained(tmp / name, safe_serialization=True, max_shard_size=ONE_FILE)
            module.to(torch.float32)
        config = tmp / name / "config.json"
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = {r: file_sha256(tmp / r) for r in _files_under(tmp) if not r.endswith("/")}
    staged.record(MODEL_CLAIM, written)
    staged.remove(MODEL_CLAIM, [r for r in staged.read(MODEL_CLAIM)["files"] if r not in written])  # never written
    (_ModelFolder(out) if folder is None else folder).save(tmp, work)
    with quiet_libraries():
        for module in (parts["vae"], parts["text_encoder"], parts["unet"]):
            module.to(torch.float32)


# ----------------------------------------------------------------------------- shared with synthmed.distill
# distill trains on the same data and keeps the same run rules (its records, checkpoints, resume, the folders it
# may replace): the pieces it reuses, under public names (docs/architecture.md, rule 5).
WorkFolder = _WorkFolder
ModelFolder = _ModelFolder
LazyImages = _LazyImages
TrainingProgress = _Progress
TrainingLog = _Log
check_arguments = _check_arguments
check_device = _check_device
model_geometry = _model_geometry
load_base = _load_base
latent_cache = _latent_cache
token_ids = _token_ids
lr_scheduler = _lr_scheduler
only_trained = _only_trained
enable_gradient_checkpointing = _enable_gradient_checkpointing
save_checkpoint = _save_checkpoint
load_checkpoint = _load_checkpoint
save_pipeline = _save_pipeline
read_json_object = _read_json_object
earlier_record = _earlier_record
logged_seconds = _logged_seconds
run_folders = _run_folders
images_sha256 = _images_sha256
shown = _shown


# Keep this at the end: `synthmed.finetune(...)` calls the function `finetune` above (the module is made callable,
# because Python rebinds `synthmed.finetune` to this module whenever it is imported; see synthmed/_callable.py).
from ._callable import make_callable as _make_callable  # noqa: E402

_make_callable(__name__, "synthmed.finetune:finetune")
