"""synthmed finetune: manifest checks, scratch / full / LoRA training, resume to the same state, loadable output."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from synthmed.build import generate  # noqa: E402
from synthmed.cli import main  # noqa: E402
from synthmed.finetune import (ManifestError, build_word_tokenizer, finetune,  # noqa: E402
                               read_training_manifest, read_training_set, vocabulary_words)

SPEC = """
spec_version: 1
name: finetune-test
seed: 7
count: 8
splits: {train: 1.0}
image: {size: 64, formats: [png]}
findings:
  - finding: no_finding
    weight: 1
  - finding: pneumothorax
    weight: 1
    location: {right: 1, left: 1}
    severity: {severe: 1}
generator: {backend: pattern}
"""
FAST = dict(batch_size=2, vae_batch_size=2, vae_crop=32, checkpoint_every=2, threads=1, progress=False,
            validation_prompts=["PA chest radiograph of a 40 year old female. Severe right pneumothorax."])


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "set"
    spec = tmp_path_factory.mktemp("spec") / "spec.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    generate(spec, out, progress=False, qc=False)  # 64x64: below the phantom's 128 minimum
    return out


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny SD-shaped folder with an RGB VAE (the fine-tuning path must feed it gray images as RGB)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = build_word_tokenizer(max_length=32)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, projection_dim=16,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=4, sample_size=64)
    folder = tmp_path_factory.mktemp("base") / "tiny"
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=DDPMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


# ----------------------------------------------------------------------------- manifest checks

def test_manifest_gives_the_generation_prompts(phantom_set):
    examples, size = read_training_manifest(phantom_set / "manifest.csv")
    assert size == (64, 64) and len(examples) == 8
    with open(phantom_set / "manifest.csv", newline="", encoding="utf-8") as fh:
        written = {r["case_id"]: r["prompt"] for r in csv.DictReader(fh)}
    assert all(ex.prompt == written[ex.case_id] for ex in examples)  # the same template, the same text


def test_a_splits_metadata_csv_reads_the_same_images_and_masks_as_the_manifest(phantom_set):
    """images/<split>/metadata.csv (Hugging Face imagefolder's file): png_path and mask_paths start at the dataset
    folder, file_name at the metadata file's own; both lead to the manifest's images."""
    from synthmed.finetune import finding_cells

    whole, size = read_training_manifest(phantom_set / "manifest.csv")
    split, split_size = read_training_manifest(phantom_set / "images" / "train" / "metadata.csv")
    assert split_size == size and [e.case_id for e in split] == [e.case_id for e in whole]
    assert [e.path.resolve() for e in split] == [e.path.resolve() for e in whole]
    assert [e.masks for e in split] == [e.masks for e in whole] and any(e.masks for e in split)
    grid = (size[1] // 4, size[0] // 4)
    assert torch.equal(finding_cells(split, phantom_set, grid, 4), finding_cells(whole, phantom_set, grid, 4))


def _broken_copy(phantom_set: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "set"
    shutil.copytree(phantom_set, out)
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    edit(out, rows)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_bad_manifest_reports_every_problem_before_training(phantom_set, tmp_path):
    def edit(out, rows):
        (out / rows[0]["png_path"]).unlink()
        rows[1]["findings"] = "pneumonitis:right_lower_lobe:mild"
        rows[2]["findings"] = "pneumothorax:upper_left:severe"

    out = _broken_copy(phantom_set, tmp_path, edit)
    with pytest.raises(ManifestError) as err:
        read_training_manifest(out)
    text = str(err.value)
    assert "3 problem(s)" in text and "row 2: image" in text and "does not exist" in text
    assert "row 3: unknown finding 'pneumonitis'" in text and "row 4: unknown location 'upper_left'" in text
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(out), "--base", "scratch", "-o",
                                       str(tmp_path / "model")])
    assert result.exit_code == 2 and "unknown finding" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "model").exists()


def test_mixed_sizes_are_refused(phantom_set, tmp_path):
    from PIL import Image

    def edit(out, rows):
        Image.new("I;16", (32, 32)).save(out / rows[0]["png_path"])

    with pytest.raises(ManifestError, match="mixed sizes: 64x64 \\(7 images\\), 32x32 \\(1 images\\)"):
        read_training_manifest(_broken_copy(phantom_set, tmp_path, edit))


def test_image_paths_outside_the_manifest_folder_are_refused_with_their_rows(phantom_set, tmp_path):
    """'..', an absolute path and a link out of the folder would train on files the user did not hand over."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def edit(out, rows):
        shutil.copyfile(out / rows[0]["png_path"], outside / "x.png")
        link = Path(rows[2]["png_path"]).parent / "link.png"
        (out / link).symlink_to(outside / "x.png")
        rows[0]["png_path"], rows[1]["png_path"], rows[2]["png_path"] = ("../outside/x.png", str(outside / "x.png"),
                                                                          link.as_posix())

    out = _broken_copy(phantom_set, tmp_path, edit)
    for read in (read_training_manifest, read_training_set):
        with pytest.raises(ManifestError) as err:
            read(out)
        text = str(err.value)
        assert "3 problem(s)" in text and text.count("outside the manifest's folder") == 3, text
        assert "row 2: png_path '../outside/x.png'" in text and f"row 3: png_path '{outside / 'x.png'}'" in text
        assert "row 4: png_path" in text and "link.png" in text


def _huge_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit PNG of side x side zeros: a few kB on disk, beyond Pillow's decompression-bomb limit."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # the filter byte and the packed bits of one row
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_damaged_images_are_listed_with_their_rows_before_anything_is_written(phantom_set, tmp_path):
    """Images of any size are checked by their headers up front: every bad one named by its row, nothing written."""
    def edit(out, rows):
        (out / rows[0]["png_path"]).write_bytes(b"not an image at all")
        _huge_png(out / rows[1]["png_path"])

    out = _broken_copy(phantom_set, tmp_path, edit)
    with pytest.raises(ManifestError) as err:
        read_training_set(out)
    text = str(err.value)
    assert "2 problem(s)" in text and "row 2: image" in text and "row 3: image" in text, text
    assert "larger than Pillow's safety limit" in text
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(out), "--base", "scratch", "-o",
                                       str(tmp_path / "model")])
    assert result.exit_code == 2 and "row 2: image" in result.stderr and "row 3: image" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.training").exists()


def test_word_tokenizer_knows_every_prompt_word(phantom_set):
    tok = build_word_tokenizer()
    examples, _ = read_training_manifest(phantom_set)
    for ex in examples:
        ids = tok(ex.prompt).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids, ex.prompt
    assert {"pneumothorax", "lingular", "cardiomegaly", "58", "female", "pa"} <= set(vocabulary_words())


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_scratch_trains_saves_and_loads_in_the_backend(phantom_set, tmp_path):
    from synthmed.backends.diffusion import DiffusionBackend
    from synthmed.prompts import Prompt
    from synthmed.sampler import Case

    result = finetune(phantom_set, "scratch", tmp_path / "model", steps=2, vae_steps=2, **FAST)
    assert result.steps == 2 and result.vae_steps == 2 and set(result.losses) == {"vae", "unet"}
    folder = result.model_dir
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert all(p.suffix != ".bin" for p in folder.rglob("*"))
    weights = _weights(folder)
    assert weights and all(v.dtype == torch.float16 for v in weights.values())
    assert (result.work_dir / "validation" / "step-0000002.png").is_file()
    backend = DiffusionBackend(folder, width=64, height=64, steps=2, threads=1)
    case = Case("c", 0, "train", 5, (), "F", 40, "PA")
    image = backend.generate([case], [Prompt("PA chest radiograph of a 40 year old female. Severe right pneumothorax.")])[0]
    assert image.pixels.shape == (64, 64) and 0 <= image.pixels.min() <= image.pixels.max() <= 1


@pytest.mark.slow
def test_resume_reaches_the_same_weights(phantom_set, tmp_path):
    straight = finetune(phantom_set, "scratch", tmp_path / "a", steps=4, vae_steps=2, **FAST)
    finetune(phantom_set, "scratch", tmp_path / "b", steps=2, vae_steps=2, **FAST)
    resumed = finetune(phantom_set, "scratch", tmp_path / "b", steps=4, vae_steps=2, resume=True, **FAST)
    assert resumed.steps == 4
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    grid = "validation/step-0000004.png"  # made with the trained VAE in both, not a fresh one
    assert (straight.work_dir / grid).read_bytes() == (resumed.work_dir / grid).read_bytes()


def test_changed_settings_refuse_resume_and_existing_output_needs_overwrite(phantom_set, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x").write_text("keep")
    with pytest.raises(ValueError, match="already holds files"):
        finetune(phantom_set, "scratch", tmp_path / "model", steps=0, vae_steps=0, **FAST)
    assert (tmp_path / "model" / "x").read_text() == "keep"
    work = tmp_path / "work"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(ValueError, match="other settings"):
        finetune(phantom_set, "scratch", tmp_path / "m2", work_dir=work, resume=True, steps=0, vae_steps=0, **FAST)


def test_resume_refuses_checkpoints_of_another_scratch_design(phantom_set, tmp_path, monkeypatch):
    import synthmed.finetune as finetune_module

    work = tmp_path / "work"
    finetune(phantom_set, "scratch", tmp_path / "a", work_dir=work, steps=0, vae_steps=0, **FAST)
    monkeypatch.setattr(finetune_module, "UNET_CONFIG", {**finetune_module.UNET_CONFIG, "attention_head_dim": 4})
    with pytest.raises(ValueError, match=r"unet_design changed.*scratch design is not the one"):
        finetune(phantom_set, "scratch", tmp_path / "b", work_dir=work, steps=0, vae_steps=0, resume=True, **FAST)
    monkeypatch.undo()  # the design it was made with: resume goes on
    finetune(phantom_set, "scratch", tmp_path / "c", work_dir=work, steps=0, vae_steps=0, resume=True, **FAST)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tunes_a_base_model(phantom_set, tiny_base, tmp_path, mode):
    from synthmed.backends.diffusion import DiffusionBackend

    before = _weights(tiny_base)
    result = finetune(phantom_set, tiny_base, tmp_path / "model", mode=mode, steps=3, save_dtype="float32",
                      learning_rate=1e-2, **FAST)
    after = _weights(result.model_dir)
    assert json.loads((result.model_dir / "training.json").read_text())["save_dtype"] == "float32"
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert after.keys() == before.keys()  # LoRA is merged: a plain diffusers folder, no adapter keys
    changed = {k.split("/")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"unet"}  # VAE frozen, text encoder frozen by default
    if mode == "lora":  # only the attention projections the adapters wrap
        moved = [k for k in after if k.startswith("unet/") and not torch.equal(after[k], before[k])]
        assert moved and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in moved)
    backend = DiffusionBackend(result.model_dir, width=64, height=64, steps=2, threads=1)
    assert backend.vae.config.in_channels == 3
    # the untrained tokenizer is the base's (only a transformers-5-only class name is made portable);
    # no config remembers a local path
    saved, original = ({p.name: p.read_bytes() for p in (folder / "tokenizer").iterdir()}
                       for folder in (result.model_dir, tiny_base))
    assert saved.keys() == original.keys()
    assert all(saved[k] == original[k] for k in saved if k != "tokenizer_config.json")
    config, base_config = (json.loads(c["tokenizer_config.json"]) for c in (saved, original))
    assert config.pop("tokenizer_class") == "PreTrainedTokenizerFast"
    base_config.pop("tokenizer_class")
    assert config == base_config
    assert not any("_name_or_path" in json.loads(c.read_text()) for c in result.model_dir.glob("*/config.json"))


def test_lora_from_scratch_is_refused(phantom_set, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapts existing weights"):
        finetune(phantom_set, "scratch", tmp_path / "m", mode="lora", **FAST)


def test_cosine_schedule_warms_up_then_anneals_to_a_tenth():
    from synthmed.finetune import _lr_scheduler

    def rates(schedule: str) -> list[float]:
        optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, out = _lr_scheduler(optimiser, schedule, 200, 1000), []
        for _ in range(1000):
            out.append(optimiser.param_groups[0]["lr"])
            optimiser.step()
            scheduler.step()
        return out

    cosine, constant = rates("cosine"), rates("constant")
    assert cosine[0] == 0 and cosine[100] == pytest.approx(0.5) and cosine[200] == pytest.approx(1.0)
    assert cosine[600] == pytest.approx(0.55, abs=0.01)  # half way: between 1 and 0.1
    assert cosine[999] == pytest.approx(0.1, abs=1e-4) and min(cosine[200:]) >= 0.1
    assert constant[:201] == pytest.approx(cosine[:201]) and constant[999] == 1.0


def test_unknown_lr_schedule_is_refused(phantom_set, tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        finetune(phantom_set, "scratch", tmp_path / "m", lr_schedule="linear", **FAST)
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(phantom_set), "--base", "scratch",
                                       "-o", str(tmp_path / "m"), "--lr-schedule", "linear"])
    assert result.exit_code == 2 and "linear" in result.output and not (tmp_path / "m").exists()


def test_save_dtype_is_a_command_line_choice(phantom_set, tmp_path):
    """The saved precision (float16 by default) is the user's to choose, not only the API's."""
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(phantom_set), "--base", "scratch",
                                       "-o", str(tmp_path / "m"), "--save-dtype", "float64"])
    assert result.exit_code == 2 and "float32" in result.output and not (tmp_path / "m").exists()
    assert "--save-dtype" in CliRunner().invoke(main, ["finetune", "--help"]).output


def test_work_folder_from_before_the_schedule_option_still_resumes(phantom_set, tmp_path):
    finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, **FAST)
    settings = tmp_path / "m.training" / "settings.json"
    old = json.loads(settings.read_text())
    del old["lr_schedule"]
    settings.write_text(json.dumps(old))
    from synthmed.ledger import Ledger, file_sha256  # as that version wrote it: its record names these bytes

    Ledger(settings.parent, settings.parent / ".synthmed").record("settings", {"settings.json": file_sha256(settings)})
    result = finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, resume=True, **FAST)
    assert result.steps == 0
    with pytest.raises(ValueError, match="lr_schedule"):
        finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, resume=True, lr_schedule="cosine",
                 **FAST)


@pytest.mark.slow
def test_a_model_fine_tuned_from_a_synthmed_model_keeps_its_lineage(phantom_set, tmp_path, monkeypatch):
    first = finetune(phantom_set, "scratch", tmp_path / "first", steps=2, vae_steps=2, **FAST)
    monkeypatch.chdir(tmp_path)  # the base given as a relative path is recorded so, not as this machine's folder
    second = finetune(phantom_set, "first", tmp_path / "second", steps=2, train_text_encoder=True,
                      lr_schedule="cosine", learning_rate=1e-3, **FAST)
    record = json.loads((second.model_dir / "training.json").read_text())
    assert record["settings"]["base"] == "first" and str(tmp_path) not in json.dumps(record)
    assert record["settings"]["lr_schedule"] == "cosine" and record["steps"] == 2
    assert record["base_training"]["settings"]["base"] == "scratch"
    assert record["base_training"]["vae_steps"] == 2 and record["base_training"]["steps"] == 2


@pytest.mark.slow
def test_resume_refuses_a_base_whose_weights_changed(phantom_set, tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    finetune(phantom_set, base, tmp_path / "m", steps=2, **FAST)
    weights = next((base / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the base retrained in place
    with pytest.raises(ValueError, match="base model's files"):
        finetune(phantom_set, base, tmp_path / "m", steps=4, resume=True, **FAST)


@pytest.mark.slow
def test_resume_without_the_vae_checkpoint_is_refused_not_silently_different(phantom_set, tmp_path):
    finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=2, **FAST)
    for ckpt in (tmp_path / "m.training" / "checkpoints").glob("vae-*"):
        shutil.rmtree(ckpt)
    with pytest.raises(ValueError, match="no VAE checkpoint"):
        finetune(phantom_set, "scratch", tmp_path / "m", steps=2, vae_steps=2, resume=True, **FAST)


# ----------------------------------------------------------------------------- what finetune wrote (issue #17)

def test_the_model_folder_carries_the_record_of_its_files(phantom_set, tmp_path):
    """OUT/.synthmed names every file of the model with its sha256; model checks and model_hash ignore it."""
    from synthmed.model_folder import check_model_folder, model_hash
    from synthmed.ledger import Ledger, file_sha256

    result = finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, **FAST)
    files = Ledger(result.model_dir, result.model_dir / ".synthmed").owned()
    on_disk = {p.relative_to(result.model_dir).as_posix() for p in result.model_dir.rglob("*")
               if p.is_file() and ".synthmed" not in p.parts}
    assert set(files) == on_disk and all(file_sha256(result.model_dir / r) == sha for r, sha in files.items())
    check_model_folder(result.model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(result.model_dir, copy, ignore=shutil.ignore_patterns(".synthmed"))
    assert model_hash(copy) == model_hash(result.model_dir)


def test_weights_are_saved_as_one_file_each_whatever_the_libraries_shard_size(phantom_set, tmp_path, monkeypatch):
    """diffusers shards a model above 10 GB (an SDXL UNet in float32) under names the save did not claim first; the
    save asks for one file per model, so a library default that would shard these tiny models does not."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    for cls in (ModelMixin, PreTrainedModel):
        def small_shards(self, *args, _save=cls.save_pretrained, max_shard_size="1KB", **kwargs):
            return _save(self, *args, max_shard_size=max_shard_size, **kwargs)
        monkeypatch.setattr(cls, "save_pretrained", small_shards)
    result = finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, **FAST)
    names = {p.name for p in result.model_dir.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in names and "model.safetensors" in names
    assert not [n for n in names if "-of-" in n or n.endswith(".index.json")]


def test_a_save_to_float16_prints_none_of_the_libraries_warnings(phantom_set, tmp_path):
    """The save casts to float16 on purpose; diffusers' "modules that should be kept in float32" line once reached
    the user's terminal twice per save."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, save_dtype="float16", **FAST)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not records, "\n".join(r.getMessage()[:150] for r in records)


def test_finetune_leaves_the_callers_threads_and_random_streams(phantom_set, tmp_path):
    """A notebook's seeded torch, numpy and Python streams and its thread count are as it left them (finetune
    seeds its model construction, and accelerate's resume sets every generator)."""
    import random

    import numpy as np

    before = torch.get_num_threads()
    torch.set_num_threads(3 if before != 3 else 2)
    mine = torch.get_num_threads()
    try:
        for seed in (1, 999):
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            expected = (random.random(), np.random.random(), torch.rand(2))
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            finetune(phantom_set, "scratch", tmp_path / f"m{seed}", steps=2, vae_steps=2, **FAST)
            finetune(phantom_set, "scratch", tmp_path / f"m{seed}", steps=4, vae_steps=2, resume=True, **FAST)
            got = (random.random(), np.random.random(), torch.rand(2))
            assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
            assert torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)


def test_a_save_killed_between_its_renames_is_put_back_and_its_folders_removed(phantom_set, tmp_path, monkeypatch):
    """Killed mid-swap, the next run restores the model and removes exactly the sibling folders it recorded."""
    import os

    import synthmed.finetune as ft

    out = tmp_path / "m"
    finetune(phantom_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    replace = os.replace

    def killed(src, dst):
        if ".saving-" in str(src) and Path(dst) == out and not out.exists():
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(ft.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(phantom_set, "scratch", out, steps=0, vae_steps=0, overwrite=True, **FAST)
    monkeypatch.setattr(ft.os, "replace", replace)
    assert not out.exists() and len(list(tmp_path.glob("m.old-*"))) == len(list(tmp_path.glob("m.saving-*"))) == 1
    with pytest.raises(ValueError, match="already holds files"):  # the model is back, so --overwrite is needed
        finetune(phantom_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.training"]


@pytest.mark.slow
def test_a_damaged_last_vae_checkpoint_trains_its_steps_again_to_the_same_weights(phantom_set, tmp_path):
    straight = finetune(phantom_set, "scratch", tmp_path / "a", steps=2, vae_steps=4, **FAST)
    finetune(phantom_set, "scratch", tmp_path / "b", steps=0, vae_steps=4, **FAST)
    state = tmp_path / "b.training" / "checkpoints" / "vae-0000004" / "optimizer.bin"
    state.write_bytes(state.read_bytes()[:500])
    with pytest.warns(UserWarning, match="vae-0000004.*continuing from checkpoints/vae-0000002"):
        resumed = finetune(phantom_set, "scratch", tmp_path / "b", steps=2, vae_steps=4, resume=True, **FAST)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a RoentGen-shaped base (#23.4, #19.2)

def _tiny_models():
    """The functions of tests/backends/conftest.py (its fixtures reach only tests/backends)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "backends" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_synthmed_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def roentgen_shaped(tmp_path_factory) -> Path:
    """Stable Diffusion 1.x layout as RoentGen has it: CLIP BPE tokenizer and text encoder, RGB VAE; tiny, random."""
    helpers = _tiny_models()
    root = tmp_path_factory.mktemp("roentgen-shaped")
    text_encoder, tokenizer = helpers.tiny_clip(root / "vocab")
    return helpers.save_pipeline(root / "model", text_encoder, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_roentgen_shaped_base_trains_with_checkpointing_and_accumulation(phantom_set, roentgen_shaped, tmp_path,
                                                                           mode):
    """#23.4: LoRA and full fine-tuning with gradient checkpointing and accumulation give a model the backend loads."""
    from synthmed.backends.diffusion import DiffusionBackend
    from synthmed.prompts import Prompt
    from synthmed.sampler import Case

    result = finetune(phantom_set, roentgen_shaped, tmp_path / "model", mode=mode, steps=2, learning_rate=1e-2,
                      gradient_checkpointing=True, gradient_accumulation=2, train_text_encoder=mode == "lora",
                      **FAST)
    assert result.steps == 2 and result.losses["unet"] > 0
    settings = json.loads((result.model_dir / "training.json").read_text())["settings"]
    assert settings["gradient_accumulation"] == 2 and settings["batch_size"] == 2
    before, after = _weights(roentgen_shaped), _weights(result.model_dir)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k].to(after[k].dtype)) for k in after if k.startswith("unet/"))
    backend = DiffusionBackend(result.model_dir, width=64, height=64, steps=2, threads=1)
    image = backend.generate([Case("c", 0, "train", 5, (), "F", 40, "PA")], [Prompt("PA chest radiograph")])[0]
    assert image.pixels.shape == (64, 64)


@pytest.mark.slow
def test_gradient_checkpointing_keeps_the_weights_and_accumulation_changes_them(phantom_set, roentgen_shaped,
                                                                                 tmp_path):
    """Checkpointing trades time for memory, not results; two micro-batches per step are another optimisation."""
    runs = {}
    for name, options in {"plain": {}, "checkpointed": {"gradient_checkpointing": True},
                          "accumulated": {"gradient_accumulation": 2}}.items():
        runs[name] = _weights(finetune(phantom_set, roentgen_shaped, tmp_path / name, mode="lora", steps=3,
                                       learning_rate=1e-2, save_dtype="float32", **options, **FAST).model_dir)
    plain, checkpointed, accumulated = runs["plain"], runs["checkpointed"], runs["accumulated"]
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert any(not torch.equal(plain[k], accumulated[k]) for k in plain)


@pytest.mark.slow
def test_resume_with_accumulation_lora_and_cosine_reaches_the_same_weights(phantom_set, roentgen_shaped, tmp_path):
    """#19.2: save_state/load_state carry the adapters, the optimiser, the LR schedule, the EMA, accelerate's RNG
    states and the data generator: 2 steps, stop, resume to 4 equals 4 in one go (accumulation 2, cosine, LoRA on
    the UNet and the text encoder)."""
    options = dict(mode="lora", train_text_encoder=True, lr_schedule="cosine", learning_rate=1e-2,
                   gradient_accumulation=2, gradient_checkpointing=True, save_dtype="float32", ema_decay=0.9, **FAST)
    straight = finetune(phantom_set, roentgen_shaped, tmp_path / "a", steps=4, **options)
    finetune(phantom_set, roentgen_shaped, tmp_path / "b", steps=2, **options)
    checkpoint = tmp_path / "b.training" / "checkpoints" / "unet-0000002"
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "model.safetensors")  # the adapters only, not the frozen base
    assert saved and all("lora_" in k for k in saved)
    resumed = finetune(phantom_set, roentgen_shaped, tmp_path / "b", steps=4, resume=True, **options)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses == resumed.losses


def test_a_device_or_precision_the_machine_lacks_is_refused_before_anything_is_written(phantom_set, tmp_path):
    """fp16 on a CPU would silently train in float32: refused (exit 2), as is --device cuda with no CUDA GPU."""
    def cli(*args):
        return CliRunner().invoke(main, ["finetune", "--manifest", str(phantom_set), "--base", "scratch",
                                         "-o", str(tmp_path / "m"), *args])

    result = cli("--device", "cpu", "--mixed-precision", "fp16")
    assert result.exit_code == 2 and "--mixed-precision fp16 needs a CUDA GPU" in result.stderr
    if not torch.cuda.is_available():
        result = cli("--device", "cuda")
        assert result.exit_code == 2 and "--device cuda" in result.stderr and "no CUDA GPU" in result.stderr
        with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA GPU"):
            finetune(phantom_set, "scratch", tmp_path / "m", mixed_precision="fp16", **FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a test that changes it resets it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.slow
def test_bf16_mixed_precision_trains_on_the_cpu(phantom_set, roentgen_shaped, tmp_path, fresh_accelerate_state):
    result = finetune(phantom_set, roentgen_shaped, tmp_path / "m", mode="lora", steps=2, mixed_precision="bf16",
                      device="cpu", **FAST)
    assert result.steps == 2 and 0 < result.losses["unet"] < float("inf")
    assert json.loads((result.model_dir / "training.json").read_text())["settings"]["mixed_precision"] == "bf16"


def test_a_second_run_with_another_mixed_precision_is_refused_before_anything_is_written(phantom_set, tmp_path,
                                                                                         fresh_accelerate_state):
    """accelerate's state is process-wide: a notebook's second run with another precision is refused up front."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="bf16", cpu=True)  # an earlier run in this process
    with pytest.raises(ValueError, match="accelerate fixes mixed precision once per Python process.*restart"):
        finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, mixed_precision="no", device="cpu",
                 **FAST)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a real dataset (#23.1-3)

def _dataset_builders():
    """The fake-dataset builders of tests/test_datasets.py (CheXpert's columns and value conventions, DICOM)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "test_datasets.py"
    spec = importlib.util.spec_from_file_location("_synthmed_dataset_builders", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gradient(path: Path, width: int, height: int, seed: int) -> Path:
    """A non-uniform image (so that where a crop lies shows), saved by its suffix: JPEG, PNG (16-bit for I;16)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = (xs / width * 0.6 + ys / height * 0.3 + rng.random((height, width)) * 0.1).clip(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        Image.fromarray((pixels * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path, "JPEG", quality=95)
    return path


IMPRESSIONS = {1: "Right lower lobe pneumonia.", 2: "No acute cardiopulmonary process.", 4: "Mild pulmonary edema."}


def _fake_chexpert(root: Path, *, reports: bool = True) -> Path:
    """CheXpert-v1.0-small/ (train.csv and valid.csv; CheXpert Plus' section_impression when ``reports``) with
    non-square JPEGs of mixed sizes: four frontal films and a lateral in train, one frontal in valid."""
    helpers = _dataset_builders()
    labels, folder = helpers.chexpert_labels, "CheXpert-v1.0-small"
    rows = [  # (patient, view file, size, sex, age, frontal/lateral, AP/PA, labels)
        (1, "view1_frontal", (80, 64), "Female", "68", "Frontal", "PA", labels(Pneumonia="1.0")),
        (1, "view2_lateral", (64, 80), "Female", "68", "Lateral", "", labels(Pneumonia="1.0")),
        (2, "view1_frontal", (64, 96), "Male", "41", "Frontal", "AP", labels(No_Finding="1.0")),
        (3, "view1_frontal", (96, 72), "Female", "55", "Frontal", "PA",
         labels(Pleural_Effusion="1.0", Cardiomegaly="-1.0")),
        (4, "view1_frontal", (72, 88), "Male", "70", "Frontal", "AP", labels(Edema="1.0")),
    ]
    header = helpers.CHEXPERT_HEADER + (["section_impression"] if reports else [])
    train = []
    for n, (patient, view, size, sex, age, frontal, appa, found) in enumerate(rows):
        rel = f"train/patient{patient:05d}/study1/{view}.jpg"
        _gradient(root / folder / rel, *size, seed=n)
        row = {"Path": f"{folder}/{rel}", "Sex": sex, "Age": age, "Frontal/Lateral": frontal, "AP/PA": appa, **found}
        if reports:
            row["section_impression"] = IMPRESSIONS.get(patient, "")
        train.append(row)
    helpers.write_csv(root / folder / "train.csv", header, train)
    _gradient(root / folder / "valid/patient64541/study1/view1_frontal.jpg", 88, 64, seed=9)
    helpers.write_csv(root / folder / "valid.csv", header, [
        {"Path": f"{folder}/valid/patient64541/study1/view1_frontal.jpg", "Sex": "Male", "Age": "73",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **labels(Edema="1.0")}])
    return root / folder


@pytest.fixture(scope="module")
def chexpert_folder(tmp_path_factory) -> Path:
    return _fake_chexpert(tmp_path_factory.mktemp("chexpert"))


def test_a_real_dataset_gives_label_or_report_prompts_of_its_training_split(chexpert_folder):
    """#23.2: labels through synthmed's template (as training_pairs makes them) or the impressions; the valid
    split, laterals under views='frontal' and records without a report are left out and counted."""
    from synthmed.datasets import LATERAL, NO_REPORT, read_dataset, training_pairs

    labels = read_training_set(chexpert_folder)
    assert labels.kind == "chexpert" and labels.size is None and len(labels.examples) == 5
    expected = training_pairs(read_dataset(chexpert_folder), split="train")
    assert [ex.prompt for ex in labels.examples] == [p.prompt for p in expected]
    assert labels.examples[0].prompt == "PA chest radiograph of a 68 year old female. Pneumonia."
    assert labels.counts["skipped"] == {"split valid (not train)": 1}
    assert "skipped: split valid (not train) 1" in labels.summary[1]

    frontal = read_training_set(chexpert_folder, views="frontal")
    assert len(frontal.examples) == 4 and frontal.counts["skipped"][LATERAL] == 1
    assert not any("lateral" in str(ex.path) for ex in frontal.examples)

    reports = read_training_set(chexpert_folder, prompts="reports", views="frontal")
    assert [ex.prompt for ex in reports.examples] == [IMPRESSIONS[1], IMPRESSIONS[2], IMPRESSIONS[4]]
    assert reports.counts["skipped"][NO_REPORT] == 1 and reports.sha256 != frontal.sha256
    filled = read_training_set(chexpert_folder, prompts="reports", no_report="labels", views="frontal")
    assert filled.examples[2].prompt == "PA chest radiograph of a 55 year old female. Pleural effusion."
    positive = read_training_set(chexpert_folder, uncertain="positive", views="frontal")
    assert "cardiomegaly" in positive.examples[2].prompt.lower()


def test_images_of_any_size_and_format_are_brought_to_the_training_size(tmp_path):
    """#23.3: a 16-bit PNG, a JPEG and a MONOCHROME1 DICOM, listed by a CSV with a column map; a random crop is one
    offset per image from the seed and the image's index, the same every time."""
    import numpy as np

    from synthmed.datasets import prepare_image
    from synthmed.finetune import _crop_rng, _load_images

    helpers = _dataset_builders()
    _gradient(tmp_path / "a.png", 96, 64, seed=1)
    _gradient(tmp_path / "b.jpg", 64, 80, seed=2)
    helpers.write_dicom(tmp_path / "c.dcm", (np.arange(70 * 50).reshape(70, 50) % 4096), "MONOCHROME1",
                        WindowCenter=2048, WindowWidth=4096)
    helpers.write_csv(tmp_path / "list.csv", ["file", "finding"], [
        {"file": f, "finding": "Edema"} for f in ("a.png", "b.jpg", "c.dcm")])
    (tmp_path / "map.yaml").write_text("path: file\nfindings: finding\n", encoding="utf-8")
    data = read_training_set(tmp_path / "list.csv", column_map=tmp_path / "map.yaml", template="roentgen-v1")
    assert data.kind == "csv" and len(data.examples) == 3
    centre = _load_images(data.examples, False, 32)
    assert centre.shape == (3, 1, 32, 32) and centre.dtype == torch.float16
    assert -1 <= float(centre.min()) < float(centre.max()) <= 1
    first, again = (_load_images(data.examples, False, 32, "random", 7) for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, centre)
    for i, ex in enumerate(data.examples):  # each image's own generator: the same crop read alone
        alone = prepare_image(ex.path, 32, crop="random", rng=_crop_rng(7, i)) * 2 - 1
        assert torch.equal(first[i, 0], torch.from_numpy(alone).half())
    assert not torch.equal(_load_images(data.examples, False, 32, "random", 8), first)  # another seed


@pytest.mark.slow
@pytest.mark.parametrize("prompts", ["labels", "reports"])
def test_fine_tunes_on_a_chexpert_folder_of_mixed_size_jpegs(chexpert_folder, tiny_base, tmp_path, monkeypatch,
                                                              prompts):
    """#23: scratch on label prompts, a base on report prompts; frontal only; the native size of the model; what was
    trained on (prompts) and what was left out (counts, in training.json)."""
    import synthmed.finetune as ft
    from synthmed.datasets import LATERAL

    used: list[list[str]] = []
    token_ids = ft._token_ids
    monkeypatch.setattr(ft, "_token_ids", lambda tok, texts, te: used.append(list(texts)) or token_ids(tok, texts, te))
    base, extra = ("scratch", {"size": 64, "vae_steps": 2}) if prompts == "labels" else (tiny_base, {})
    result = finetune(chexpert_folder, base, tmp_path / "m", steps=2, views="frontal", prompts=prompts, **extra,
                      **FAST)
    record = json.loads((result.model_dir / "training.json").read_text())
    settings, data = record["settings"], record["data"]
    assert (settings["dataset_kind"], settings["prompts"], settings["views"]) == ("chexpert", prompts, "frontal")
    assert settings["size"] == settings["width"] == settings["height"] == 64  # tiny_base's native size is 64
    assert settings["uncertain"] == "ignore" and settings["crop"] == "center"
    assert data["kind"] == "chexpert" and data["skipped"][LATERAL] == 1
    assert data["skipped"]["split valid (not train)"] == 1
    if prompts == "labels":
        assert data["images"] == settings["images"] == 4
        assert used[0][0] == "PA chest radiograph of a 68 year old female. Pneumonia."
    else:
        assert data["images"] == 3 and data["skipped"]["no report impression"] == 1
        assert used[0] == [IMPRESSIONS[1], IMPRESSIONS[2], IMPRESSIONS[4]]
    assert not any(IMPRESSIONS[1] in line for line in data["summary"])  # counts, never a report's text


@pytest.mark.slow
def test_random_crops_are_the_same_across_runs_and_after_resume(chexpert_folder, tiny_base, tmp_path):
    options = dict(views="frontal", size=64, crop="random", save_dtype="float32", learning_rate=1e-2, **FAST)
    straight = finetune(chexpert_folder, tiny_base, tmp_path / "a", steps=4, **options)
    finetune(chexpert_folder, tiny_base, tmp_path / "b", steps=2, **options)
    resumed = finetune(chexpert_folder, tiny_base, tmp_path / "b", steps=4, resume=True, **options)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    latents = [torch.load(r.work_dir / "latents.pt", weights_only=True) for r in (straight, resumed)]
    assert torch.equal(latents[0]["latents"], latents[1]["latents"])
    centre = finetune(chexpert_folder, tiny_base, tmp_path / "c", steps=0, views="frontal", size=64, **FAST)
    assert not torch.equal(torch.load(centre.work_dir / "latents.pt", weights_only=True)["latents"],
                           latents[0]["latents"])


@pytest.mark.slow
def test_a_manifest_trained_at_its_own_size_through_prepare_image_gives_the_same_weights(phantom_set, tiny_base,
                                                                                         tmp_path):
    """A synthmed manifest of one-size PNGs is trained as it is (settings size None, the latent cache keyed as
    before these options); given size= of that same size, prepare_image changes no pixel, so no weight."""
    plain = finetune(phantom_set, tiny_base, tmp_path / "a", steps=2, save_dtype="float32", **FAST)
    sized = finetune(phantom_set, tiny_base, tmp_path / "b", steps=2, save_dtype="float32", size=64, **FAST)
    settings = json.loads((plain.model_dir / "training.json").read_text())["settings"]
    assert settings["size"] is None and settings["dataset_kind"] is None and settings["width"] == 64
    key = json.loads(torch.load(plain.work_dir / "latents.pt", weights_only=True)["key"])
    assert set(key) == {"manifest_sha256", "vae_steps", "images", "images_sha256", "vae_sha256"}  # no "data"
    a, b = _weights(plain.model_dir), _weights(sized.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_work_folder_from_before_the_dataset_options_still_resumes(phantom_set, tmp_path):
    """A work folder whose settings.json predates prompts/uncertain/views/size/crop/dataset_kind resumes: the
    missing keys are what that version did (a synthmed manifest, label prompts, images as they are)."""
    from synthmed.finetune import DATA_DEFAULTS
    from synthmed.ledger import Ledger, file_sha256

    finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, **FAST)
    settings = tmp_path / "m.training" / "settings.json"
    old = json.loads(settings.read_text())
    assert {k: old.pop(k) for k in DATA_DEFAULTS} == DATA_DEFAULTS
    settings.write_text(json.dumps(old))
    Ledger(settings.parent, settings.parent / ".synthmed").record("settings", {"settings.json": file_sha256(settings)})
    assert finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, resume=True, **FAST).steps == 0
    settings.write_text(json.dumps(old))
    Ledger(settings.parent, settings.parent / ".synthmed").record("settings", {"settings.json": file_sha256(settings)})
    with pytest.raises(ValueError, match=r"\(size, views changed\)"):
        finetune(phantom_set, "scratch", tmp_path / "m", steps=0, vae_steps=0, resume=True, views="frontal",
                 size=64, **FAST)


def _cli_finetune(source: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["finetune", "--manifest", str(source), "--base", "scratch", "-o", str(out),
                                     "--steps", "0", "--vae-steps", "0", "--threads", "1", "-q", *args])


USAGE_ERRORS = {  # flags -> what the message names
    "reports without reports": (["--prompts", "reports"], "--prompts reports"),
    "column map with a layout": (["--column-map", "map.yaml", "--dataset-kind", "chexpert"], "--column-map"),
    "csv without a column map": (["--dataset-kind", "csv"], "--dataset-kind csv needs --column-map"),
    "no-report without reports": (["--no-report", "labels"], "--no-report labels"),
    "size not a multiple": (["--size", "100"], "--size 100"),
}


@pytest.mark.parametrize("name", sorted(USAGE_ERRORS))
def test_flags_that_do_not_fit_the_dataset_are_usage_errors(tmp_path, name):
    """Exit 2, no traceback, the flag named, nothing written."""
    source = _fake_chexpert(tmp_path / "data", reports=False)
    (tmp_path / "map.yaml").write_text("path: Path\nfindings: Pneumonia\n", encoding="utf-8")
    flags, named = USAGE_ERRORS[name]
    flags = [str(tmp_path / f) if f == "map.yaml" else f for f in flags]
    result = _cli_finetune(source, tmp_path / "m", *flags)
    assert result.exit_code == 2, result.output
    assert named in result.stderr and "Traceback" not in result.output and "=" not in result.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.training").exists()


def test_sex_and_view_outside_the_vocabulary_are_named_by_row_and_synonyms_are_read(phantom_set, tmp_path):
    """Trial C: a sex of 'O' or a view of 'oblique' gave a KeyError traceback from the prompt; 'female' and 'pa',
    which a spec takes, did too."""
    def edit(out, rows):
        rows[0]["sex"], rows[1]["view"] = "O", "oblique"
        rows[2]["sex"], rows[2]["view"] = "female", "pa"

    out = _broken_copy(phantom_set, tmp_path, edit)
    with pytest.raises(ManifestError) as err:
        read_training_manifest(out)
    text = str(err.value)
    assert "row 2: unknown sex 'O' (known: F, M)" in text and "row 3: unknown view 'oblique' (known: PA, AP, LL)" in text
    assert "row 4" not in text  # female / pa: the spec's synonyms


def test_images_of_one_size_are_read_as_a_viewer_shows_them(tmp_path):
    """Trial C: without --size, a palette, grey+alpha or 1-bit PNG trained on its raw samples (palette indices:
    a mean of 0.03 for a mid-grey image)."""
    import numpy as np
    from PIL import Image

    from synthmed.finetune import TrainingExample, _load_images

    grey = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(grey).convert("LA").save(tmp_path / "alpha.png")
    examples = [TrainingExample(tmp_path / f"{name}.png", "p", name, "train") for name in ("grey", "palette", "alpha")]
    images = _load_images(examples, False)
    assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])
    assert torch.equal(images[0, 0], torch.from_numpy(grey.astype(np.float32) / 255 * 2 - 1).half())


def test_manifest_only_flags_and_bad_dataset_rows_are_usage_errors(phantom_set, tmp_path):
    result = _cli_finetune(phantom_set, tmp_path / "m", "--uncertain", "positive")
    assert result.exit_code == 2 and "--uncertain positive" in result.stderr
    result = _cli_finetune(phantom_set, tmp_path / "m", "--crop", "random")
    assert result.exit_code == 2 and "--crop random" in result.stderr and "--size" in result.stderr
    result = _cli_finetune(phantom_set, tmp_path / "m", "--prompts", "reports")
    assert result.exit_code == 2 and "--prompts reports" in result.stderr
    source = _fake_chexpert(tmp_path / "data")
    text = (source / "train.csv").read_text(encoding="utf-8").splitlines()
    text[3] = text[3].replace(",1.0,", ",2.0,", 1)  # row 3 of the table: a label CheXpert never writes
    (source / "train.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    result = _cli_finetune(source, tmp_path / "m")
    assert result.exit_code == 2 and f"{source / 'train.csv'}:4" in result.stderr and "2.0" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()
    result = _cli_finetune(tmp_path, tmp_path / "m")  # neither a synthmed set nor a dataset: both are named
    assert result.exit_code == 2 and "manifest.csv" in result.stderr and "chexpert" in result.stderr


@pytest.mark.slow
def test_the_command_trains_on_a_csv_with_a_column_map_and_shows_what_it_left_out(tmp_path, tiny_base):
    helpers = _dataset_builders()
    _gradient(tmp_path / "imgs/a.png", 96, 64, seed=1)
    _gradient(tmp_path / "imgs/b.jpg", 64, 80, seed=2)
    helpers.write_csv(tmp_path / "list.csv", ["file", "finding", "projection"], [
        {"file": "imgs/a.png", "finding": "Edema", "projection": "PA"},
        {"file": "imgs/b.jpg", "finding": "Pneumonia", "projection": "LL"},
        {"file": "imgs/missing.jpg", "finding": "Pneumonia", "projection": "PA"}])
    (tmp_path / "map.yaml").write_text("path: file\nfindings: finding\nview: projection\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(tmp_path / "list.csv"), "--base", str(tiny_base),
                                       "--column-map", str(tmp_path / "map.yaml"), "--template", "roentgen-v1",
                                       "--views", "frontal", "--size", "32", "--crop", "random", "-o",
                                       str(tmp_path / "m"), "--steps", "1", "--batch-size", "1", "--threads", "1",
                                       "-q"])
    assert result.exit_code == 0, result.output
    assert "missing image file 1" in result.output and "lateral view (frontal_only) 1" in result.output
    settings = json.loads((tmp_path / "m" / "training.json").read_text())["settings"]
    assert (settings["dataset_kind"], settings["size"], settings["crop"], settings["images"]) == ("csv", 32,
                                                                                                 "random", 1)


def test_an_image_beyond_pillows_limit_in_a_dataset_is_a_usage_error_naming_it(tmp_path):
    """A real dataset's images are read in training: one too large for Pillow is exit 2 naming it, no traceback."""
    helpers = _dataset_builders()
    _gradient(tmp_path / "imgs/a.png", 64, 64, seed=1)
    _huge_png(tmp_path / "imgs/huge.png")
    helpers.write_csv(tmp_path / "list.csv", ["file", "finding"], [{"file": "imgs/a.png", "finding": "Edema"},
                                                                   {"file": "imgs/huge.png", "finding": "Edema"}])
    (tmp_path / "map.yaml").write_text("path: file\nfindings: finding\n", encoding="utf-8")
    result = _cli_finetune(tmp_path / "list.csv", tmp_path / "m", "--column-map", str(tmp_path / "map.yaml"),
                           "--template", "roentgen-v1", "--size", "32", "--batch-size", "1",
                           "--vae-batch-size", "1")
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "imgs/huge.png") in result.stderr and "Pillow's safety limit" in result.stderr
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- finding-weighted loss

def test_finding_cells_are_each_images_masks_on_the_latent_grid(phantom_set, tmp_path):
    """A cell is 1 where any of its image's masks covers a pixel of it (max-pooled), 0 on normal films."""
    import numpy as np
    from PIL import Image

    from synthmed.finetune import finding_cells

    examples, (width, height) = read_training_manifest(phantom_set)
    cells = finding_cells(examples, phantom_set, (height // 4, width // 4), 4)
    assert cells.shape == (len(examples), height // 4, width // 4) and cells.dtype == torch.uint8
    for example, got in zip(examples, cells):
        if not example.masks:  # no_finding
            assert not got.any()
            continue
        union = np.zeros((height, width), dtype=bool)
        for rel in example.masks:
            union |= np.asarray(Image.open(phantom_set / rel)) > 0
        want = union.reshape(height // 4, 4, width // 4, 4).any(axis=(1, 3))
        assert got.any() and np.array_equal(got.numpy().astype(bool), want)
    assert any(not e.masks for e in examples) and any(e.masks for e in examples)
    outside = [dataclasses.replace(examples[0], masks=("../elsewhere.png",))]
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        finding_cells(outside, phantom_set, (height // 4, width // 4), 4)
    wrong = tmp_path / "m.png"
    Image.fromarray(np.zeros((height // 2, width // 2), np.uint8)).save(wrong)  # divides the grid, not the image
    with pytest.raises(ManifestError, match="masks are the size of their images"):
        finding_cells([dataclasses.replace(examples[0], masks=(wrong.name,))], tmp_path, (height // 4, width // 4), 4)


@pytest.mark.slow
def test_finding_loss_weight_changes_training_resumes_exactly_and_is_recorded(phantom_set, tmp_path):
    plain = finetune(phantom_set, "scratch", tmp_path / "plain", steps=4, vae_steps=2, **FAST)
    weighted = finetune(phantom_set, "scratch", tmp_path / "w", steps=4, vae_steps=2, finding_loss_weight=10, **FAST)
    a, b = _weights(plain.model_dir), _weights(weighted.model_dir)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet/"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vae/"))  # the VAE stage is the same
    record = json.loads((weighted.model_dir / "training.json").read_text())
    assert record["settings"]["finding_loss_weight"] == 10.0
    assert "finding_loss_weight" not in json.loads((plain.model_dir / "training.json").read_text())["settings"]
    finetune(phantom_set, "scratch", tmp_path / "r", steps=2, vae_steps=2, finding_loss_weight=10, **FAST)
    with pytest.raises(ValueError, match="finding_loss_weight changed"):
        finetune(phantom_set, "scratch", tmp_path / "r", steps=4, vae_steps=2, resume=True, **FAST)
    resumed = finetune(phantom_set, "scratch", tmp_path / "r", steps=4, vae_steps=2, finding_loss_weight=10,
                       resume=True, **FAST)
    c = _weights(resumed.model_dir)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_finding_loss_weight_needs_masks_at_the_images_own_size(phantom_set, tmp_path):
    with pytest.raises(ValueError, match="at its own size"):
        finetune(phantom_set, "scratch", tmp_path / "m", size=32, finding_loss_weight=5, **FAST)
    bare = tmp_path / "bare"  # the same manifest without its mask_paths
    bare.mkdir()
    with open(phantom_set / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["mask_paths"] = ""
    with open(bare / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shutil.copytree(phantom_set / "images", bare / "images")
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(bare), "--base", "scratch", "-o",
                                       str(tmp_path / "m"), "--finding-loss-weight", "5"])
    assert result.exit_code == 2 and "names a mask" in result.output and not (tmp_path / "m").exists()
    assert not (tmp_path / "m.training").exists()
    result = CliRunner().invoke(main, ["finetune", "--manifest", str(phantom_set), "--base", "scratch", "-o",
                                       str(tmp_path / "m"), "--finding-loss-weight", "-1"])
    assert result.exit_code == 2 and "--finding-loss-weight" in result.output
