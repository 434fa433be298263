"""synthmed distill: a latent consistency student of a tiny teacher, full and LoRA; the folder generate loads with
its own settings; resume to the same weights; refusals before anything is written; files it did not write stay.

The teacher and the training set are test_finetune.py's (a tiny SD-shaped folder, 8 pattern films of 64x64).
Whether the loss falls or a student's 4 steps come closer to the teacher's many steps than the teacher's own 4 is
not tested: on a random tiny teacher that takes hundreds of steps and is not reliable at a test's size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from test_finetune import _weights, phantom_set, tiny_base  # noqa: E402,F401 - fixtures shared with finetune

from synthmed.cli import main  # noqa: E402
from synthmed.distill import distill  # noqa: E402
from synthmed.model_folder import model_hash  # noqa: E402

FAST = dict(batch_size=2, checkpoint_every=2, threads=1, progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_student(phantom_set, tiny_base, tmp_path_factory):  # noqa: F811
    """mode auto on the tiny teacher (a UNet of a few thousand parameters: full)."""
    return distill(phantom_set, tiny_base, tmp_path_factory.mktemp("full") / "student", steps=2,
                   save_dtype="float32", learning_rate=1e-3, **FAST)


# ----------------------------------------------------------------------------- the student folder

def test_the_student_folder_is_its_teacher_with_a_guidance_conditioned_unet(full_student, tiny_base):  # noqa: F811
    folder = full_student.model_dir
    assert full_student.mode == "full" and full_student.steps == 2
    assert full_student.losses["consistency"] > 0
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] == 256
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    assert (scheduler["original_inference_steps"], scheduler["timestep_scaling"]) == (50, 10.0)
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    # the tokenizer, text encoder and VAE are the teacher's files, unchanged (as in finetune, only a
    # transformers-5-only tokenizer class name is made portable)
    student_files, teacher_files = _files(folder), _files(tiny_base)
    config = "tokenizer/tokenizer_config.json"
    mine_config, their_config = (json.loads(files.pop(config)) for files in (student_files, teacher_files))
    assert mine_config.pop("tokenizer_class") == "PreTrainedTokenizerFast"
    their_config.pop("tokenizer_class")
    assert mine_config == their_config
    for component in ("tokenizer", "text_encoder", "vae"):
        mine = {k: v for k, v in student_files.items() if k.startswith(component + "/")}
        theirs = {k: v for k, v in teacher_files.items() if k.startswith(component + "/")}
        assert mine and mine == theirs, component
    assert not any(k.endswith(".bin") for k in student_files)
    # distillation.json: machine-readable; README.md: the card, naming the teacher and its hash
    record = json.loads((folder / "distillation.json").read_text())
    assert record["recommended"] == {"scheduler": "lcm", "steps": 4, "guidance_scale": 4.0}
    assert record["teacher"] == {"path": str(tiny_base), "model_hash": model_hash(tiny_base)}  # as it was given
    assert record["mode"] == "full" and record["guidance"]["input"] is True
    assert record["settings"]["steps"] == 2 and record["losses"]["consistency"] > 0
    card = (folder / "README.md").read_text()
    assert str(tiny_base) in card and model_hash(tiny_base) in card
    assert "latent consistency distillation" in card and "scheduler `lcm`, 4 steps" in card


def test_a_student_of_no_steps_computes_exactly_its_teacher(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """The new guidance layer starts at zero: before training, the student is the teacher at every guidance scale."""
    from diffusers import UNet2DConditionModel

    from synthmed.backends.diffusion import guidance_embedding

    result = distill(phantom_set, tiny_base, tmp_path / "student", mode="full", steps=0, save_dtype="float32",
                     **FAST)
    student = UNet2DConditionModel.from_pretrained(result.model_dir / "unet")
    teacher = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    torch.manual_seed(0)
    x, hidden, t = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 16), torch.tensor([999, 500, 20])
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=hidden).sample
        for w in (1.0, 3.0, 7.0):
            cond = guidance_embedding(torch.full((3,), w), 256)
            assert torch.equal(student(x, t, encoder_hidden_states=hidden, timestep_cond=cond).sample, expected)
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0


def test_generate_loads_the_student_with_lcm_and_4_steps(full_student, tmp_path):
    from synthmed.build import generate

    spec = tmp_path / "spec.yaml"
    spec.write_text("spec_version: 1\nname: from-a-student\nseed: 3\ncount: 3\nimage: {size: 64, formats: [png]}\n"
                    "findings: [{finding: pneumothorax, weight: 1, location: {right: 1}}]\n"
                    f"generator: {{backend: diffusion, model: {json.dumps(str(full_student.model_dir))}, "
                    "threads: 1}\n", encoding="utf-8")
    result = generate(spec, tmp_path / "set", progress=False, qc=False)
    assert result.written == 3
    import csv

    with open(tmp_path / "set" / "manifest.csv", newline="", encoding="utf-8") as fh:
        generation = json.loads(next(csv.DictReader(fh))["generation"])
    assert (generation["scheduler"], generation["steps"], generation["guidance_scale"]) == ("lcm", 4, 4.0)
    assert generation["distilled"]["teacher_hash"] == full_student.record["teacher"]["model_hash"]


@pytest.mark.slow
def test_a_lora_student_is_a_plain_unet_with_its_guidance_distilled_in(phantom_set, tiny_base, tmp_path):  # noqa: F811
    from synthmed.backends.diffusion import DiffusionBackend

    result = distill(phantom_set, tiny_base, tmp_path / "student", mode="lora", steps=2, learning_rate=1e-2,
                     save_dtype="float32", lora_rank=4, **FAST)
    folder = result.model_dir
    assert json.loads((folder / "unet" / "config.json").read_text()).get("time_cond_proj_dim") is None
    before, after = _weights(tiny_base), _weights(folder)
    assert before.keys() == after.keys()  # merged: no adapter keys
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("unet/"))
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("unet/"))
    record = json.loads((folder / "distillation.json").read_text())
    assert record["recommended"] == {"scheduler": "lcm", "steps": 4, "guidance_scale": 1.0}
    assert record["guidance"] == {"input": False, "distilled_scale": 4.0} and record["mode"] == "lora"
    backend = DiffusionBackend(folder, width=64, height=64, threads=1)
    assert (backend.info.settings["scheduler"], backend.info.settings["steps"]) == ("lcm", 4)
    assert not backend.classifier_free  # guidance 1: one evaluation per step


# ----------------------------------------------------------------------------- resume

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_reaches_the_same_weights(phantom_set, tiny_base, tmp_path, mode):  # noqa: F811
    """save_state / load_state carry the student, the optimiser, the LR schedule, the target network, accelerate's
    RNG states and the generator every draw comes from: 2 steps, stop, resume to 4 equals 4 in one go."""
    options = dict(mode=mode, save_dtype="float32", learning_rate=1e-2, **FAST)
    if mode == "lora":
        options["lora_rank"] = 4
    straight = distill(phantom_set, tiny_base, tmp_path / "a", steps=4, **options)
    distill(phantom_set, tiny_base, tmp_path / "b", steps=2, **options)
    resumed = distill(phantom_set, tiny_base, tmp_path / "b", steps=4, resume=True, **options)
    assert resumed.steps == 4
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one_go = distill(phantom_set, tiny_base, tmp_path / "c", steps=2, **options)  # and the resume did train on
    assert any(not torch.equal(a[k], v) for k, v in _weights(one_go.model_dir).items())


def test_resume_with_other_settings_is_refused(phantom_set, tiny_base, tmp_path):  # noqa: F811
    distill(phantom_set, tiny_base, tmp_path / "s", steps=2, mode="full", **FAST)
    with pytest.raises(ValueError, match="other settings.*guidance_scale"):
        distill(phantom_set, tiny_base, tmp_path / "s", steps=4, mode="full", guidance_scale=5.0, resume=True, **FAST)


def test_resume_may_change_the_recommended_steps_and_keeps_the_weights(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """How many steps the student samples best with is measured after training: a resume records it, trains nothing."""
    first = distill(phantom_set, tiny_base, tmp_path / "s", steps=2, mode="full", save_dtype="float32", **FAST)
    before = _weights(first.model_dir)
    again = distill(phantom_set, tiny_base, tmp_path / "s", steps=2, mode="full", save_dtype="float32",
                    student_steps=8, resume=True, **FAST)
    record = json.loads((again.model_dir / "distillation.json").read_text(encoding="utf-8"))
    assert record["recommended"]["steps"] == 8 and record["steps"] == 2
    after = _weights(again.model_dir)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_student_learns_the_teachers_late_guidance(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """The teacher's solver steps below the timestep are guided at the late scale: taken from the teacher folder's
    recommendation unless given, recorded in the settings (only when on), and what the student learns changes."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_base, teacher)
    late = {"scale": 1.5, "below_timestep": 1000}  # every solver step: the difference cannot hide in the draws
    (teacher / "sampling.json").write_text(json.dumps({"recommended": {"late_guidance": late}}), encoding="utf-8")
    options = dict(steps=2, mode="full", save_dtype="float32", learning_rate=1e-2, **FAST)
    recommended = distill(phantom_set, teacher, tmp_path / "recommended", **options)
    given = distill(phantom_set, tiny_base, tmp_path / "given", late_guidance=late, **options)
    off = distill(phantom_set, teacher, tmp_path / "off", late_guidance="none", **options)
    records = [json.loads((r.model_dir / "distillation.json").read_text(encoding="utf-8"))
               for r in (recommended, given, off)]
    assert records[0]["settings"]["late_guidance"] == records[1]["settings"]["late_guidance"] == late
    assert "late_guidance" not in records[2]["settings"] and "late_guidance" not in records[0]["recommended"]
    a, b, c = (_weights(r.model_dir) for r in (recommended, given, off))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="late guidance scale must be a number from 1 to 50"):
        distill(phantom_set, tiny_base, tmp_path / "bad", late_guidance={"scale": -2, "below_timestep": 500},
                **options)
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- refusals, before anything is written

def _cli(*args) -> "object":
    return CliRunner().invoke(main, ["distill", *map(str, args), "--threads", "1", "-q"])


def test_a_bad_teacher_folder_is_a_usage_error_naming_the_file(phantom_set, tiny_base, tmp_path):  # noqa: F811
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_base, broken)
    (broken / "model_index.json").unlink()
    result = _cli("--teacher", broken, "--manifest", phantom_set, "-o", tmp_path / "student", "--steps", 1)
    assert result.exit_code == 2, result.output
    assert "model_index.json" in result.output and "Traceback" not in result.output
    result = _cli("--teacher", tmp_path / "nowhere", "--manifest", phantom_set, "-o", tmp_path / "student")
    assert result.exit_code == 2 and "is not a folder" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]  # no student, no work folder


def test_a_student_is_not_a_teacher_and_mode_options_must_fit(full_student, phantom_set, tiny_base,  # noqa: F811
                                                               tmp_path):
    with pytest.raises(ValueError, match="already takes the guidance scale as an input"):
        distill(phantom_set, full_student.model_dir, tmp_path / "again", **FAST)
    with pytest.raises(ValueError, match="lora_rank"):
        distill(phantom_set, tiny_base, tmp_path / "s", mode="full", lora_rank=8, **FAST)
    with pytest.raises(ValueError, match="guidance_min"):
        distill(phantom_set, tiny_base, tmp_path / "s", mode="lora", guidance_min=2.0, **FAST)
    with pytest.raises(ValueError, match="within guidance_min..guidance_max"):
        distill(phantom_set, tiny_base, tmp_path / "s", mode="full", guidance_scale=9.0, **FAST)
    with pytest.raises(ValueError, match="is the teacher"):
        distill(phantom_set, tiny_base, tiny_base, **FAST)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- files distill did not write

def test_overwrite_never_deletes_a_file_distill_did_not_write(phantom_set, tiny_base, tmp_path):  # noqa: F811
    out, work = tmp_path / "student", tmp_path / "student.training"
    args = ("--teacher", tiny_base, "--manifest", phantom_set, "-o", out, "--steps", 2, "--batch-size", 2,
            "--checkpoint-every", 2)
    first = _cli(*args)
    assert first.exit_code == 0, first.output
    assert "generator.model" in first.output and "lcm, 4 steps" in first.output
    (out / "notes.txt").write_text("mine")
    (work / "checkpoints" / "notes.txt").write_text("mine too")
    again = _cli(*args)
    assert again.exit_code == 2 and "already holds files" in again.output
    replaced = _cli(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert (out / "notes.txt").read_text() == "mine" and (work / "checkpoints" / "notes.txt").read_text() == "mine too"
    assert "notes.txt" in replaced.output  # named in a warning
    assert json.loads((out / "distillation.json").read_text())["steps"] == 2
    # a model file of the user's where the student goes is refused, not replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("my model card")
    refused = _cli("--teacher", tiny_base, "--manifest", phantom_set, "-o", other, "--steps", 1, "--overwrite")
    assert refused.exit_code == 2 and "README.md" in refused.output and "synthmed distill did not write" in \
        refused.output
    assert (other / "README.md").read_text() == "my model card"


def test_a_dataset_given_as_the_student_folder_is_refused_and_kept(phantom_set, tiny_base, tmp_path):  # noqa: F811
    data = tmp_path / "dataset"
    shutil.copytree(phantom_set, data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for flag in ("--resume", "--overwrite"):
        result = _cli("--teacher", tiny_base, "--manifest", phantom_set, "-o", data, "--steps", 0, flag)
        assert result.exit_code == 2 and "holds a dataset that synthmed generate wrote" in result.output, result.output
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_synthmed_distill_is_callable_from_the_package():
    import synthmed

    assert callable(synthmed.distill) and synthmed.distill.__synthmed_call__ == "synthmed.distill:distill"


# ----------------------------------------------------------------------------- the tiny decoder

TINY = dict(mode="full", save_dtype="float32", learning_rate=1e-3, **FAST)


def test_the_tiny_decoder_is_an_autoencoder_tiny_the_student_recommends(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """tiny_decoder_steps: a diffusers AutoencoderTiny in tiny_vae/ (outside model_index.json, so diffusers' own
    loading is unchanged), decoding the teacher's latents to images of the teacher's size; carded, and on offer
    (generator.decoder: tiny) but not recommended: the teacher's VAE stays the default."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from synthmed.backends.diffusion import recommended_sampling

    result = distill(phantom_set, tiny_base, tmp_path / "s", steps=1, tiny_decoder_steps=2, **TINY)
    folder = result.model_dir
    assert (folder / "tiny_vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert "tiny_vae" not in json.loads((folder / "model_index.json").read_text())
    record = json.loads((folder / "distillation.json").read_text())
    assert "decoder" not in record["recommended"] and record["tiny_decoder"]["steps"] == 2
    assert "## Tiny decoder" in (folder / "README.md").read_text()
    tiny = AutoencoderTiny.from_pretrained(folder / "tiny_vae")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    z = torch.randn(1, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        assert tiny.decode(z).sample.shape == vae.decode(z).sample.shape
    assert result.losses["tiny_decoder"] > 0
    assert "dtype" not in record["recommended"]  # float32: the distillation.json of every earlier student
    plain = distill(phantom_set, tiny_base, tmp_path / "p", steps=1, recommend_dtype="auto", **TINY)
    assert not (plain.model_dir / "tiny_vae").exists() and "tiny_decoder" not in plain.record
    assert recommended_sampling(plain.model_dir)["dtype"] == "auto"  # what generate then runs in
    with pytest.raises(ValueError, match="recommend_dtype must be float32, bfloat16 or auto"):
        distill(phantom_set, tiny_base, tmp_path / "q", steps=1, recommend_dtype="float16", **TINY)


@pytest.mark.slow
def test_the_tiny_decoder_resumes_to_the_same_weights_and_can_be_added_later(phantom_set, tiny_base,  # noqa: F811
                                                                            tmp_path):
    straight = distill(phantom_set, tiny_base, tmp_path / "a", steps=2, tiny_decoder_steps=4, **TINY)
    distill(phantom_set, tiny_base, tmp_path / "b", steps=2, **TINY)  # a finished student, no tiny decoder
    distill(phantom_set, tiny_base, tmp_path / "b", steps=2, tiny_decoder_steps=2, resume=True, **TINY)
    resumed = distill(phantom_set, tiny_base, tmp_path / "b", steps=2, tiny_decoder_steps=4, resume=True, **TINY)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert any(k.startswith("tiny_vae/") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_tiny_decoder_learns_to_draw_the_films_from_their_latents(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """After training, decoding the teacher's latents of the training films comes much closer to the films than
    the same network's starting weights do (L1 over all 8 films)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from synthmed.distill import tiny_vae_config
    from synthmed.finetune import read_training_set

    options = {**TINY, "batch_size": 8}
    result = distill(phantom_set, tiny_base, tmp_path / "s", steps=1, tiny_decoder_steps=60, **options)
    vae = AutoencoderKL.from_pretrained(result.model_dir / "vae")
    films = read_training_set(phantom_set).examples
    from PIL import Image
    import numpy as np

    x = torch.stack([torch.from_numpy(np.asarray(Image.open(ex.path), np.float32) / 255 * 2 - 1)[None]
                     for ex in films]).expand(-1, 3, -1, -1)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        trained = AutoencoderTiny.from_pretrained(result.model_dir / "tiny_vae").decode(z).sample
        torch.manual_seed(1)  # the run's starting weights (seed 0 + 1)
        start = AutoencoderTiny(**tiny_vae_config(vae.config)).decode(z).sample
    assert (trained - x).abs().mean() < 0.6 * (start - x).abs().mean()


def test_a_users_tiny_vae_files_are_never_replaced(phantom_set, tiny_base, tmp_path):  # noqa: F811
    """tiny_vae/ is one of the student folder's entries: a user's file there is refused and left as it was, also
    one put beside the tiny decoder distill wrote."""
    other = tmp_path / "other"
    (other / "tiny_vae").mkdir(parents=True)
    (other / "tiny_vae" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="tiny_vae/config.json"):
        distill(phantom_set, tiny_base, other, steps=1, tiny_decoder_steps=1, overwrite=True, **TINY)
    assert (other / "tiny_vae" / "config.json").read_text() == "{}"
    out = tmp_path / "student"
    distill(phantom_set, tiny_base, out, steps=1, tiny_decoder_steps=1, **TINY)
    (out / "tiny_vae" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="tiny_vae/notes.txt"):
        distill(phantom_set, tiny_base, out, steps=1, tiny_decoder_steps=1, overwrite=True, **TINY)
    assert (out / "tiny_vae" / "notes.txt").read_text() == "mine"
    assert (out / "tiny_vae" / "diffusion_pytorch_model.safetensors").is_file()
