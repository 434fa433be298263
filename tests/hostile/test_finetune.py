"""Hostile corpus, finetune (#17): it never deletes or overwrites what it did not write; damage to its own files
is repaired or named, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from test_finetune import tiny_base  # noqa: E402,F401 - the tiny SD-shaped base (a teacher for distill)

from synthmed.build import generate  # noqa: E402
from synthmed.cli import main  # noqa: E402
from synthmed.distill import distill  # noqa: E402
from synthmed.finetune import ManifestError, finetune  # noqa: E402

SPEC = """
spec_version: 1
name: hostile-finetune
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
CLI_FAST = ["--batch-size", "2", "--vae-batch-size", "2", "--vae-crop", "32", "--checkpoint-every", "2",
            "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def training_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("set") / "set"
    spec = out.parent / "spec.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    generate(spec, out, progress=False, qc=False)
    return out


def _cli(training_set: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["finetune", "--manifest", str(training_set), "--base", "scratch", "-o", str(out),
                                     *CLI_FAST, *args])


def _user_files(folder: Path) -> dict[str, bytes]:
    """A user's project: notes, data and their own checkpoints, under names synthmed also uses."""
    files = {"README.md": b"my project\n", "data/cases.csv": b"a,b\n1,2\n", "checkpoints/mine.ckpt": b"\x00weights",
             "checkpoints/unet-0000001/state.pt": b"their own run", "notes.txt": b"keep me"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _unchanged(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / rel).is_file() and (folder / rel).read_bytes() == data for rel, data in files.items())


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(p).items()}


def test_resume_into_an_unrelated_output_folder_keeps_its_files(training_set, tmp_path):
    """#17.2: `finetune -o DIR --resume` with an unrelated DIR is refused (exit 2, naming DIR); DIR's files stay."""
    out = tmp_path / "project"
    out.mkdir()
    files = _user_files(out)
    result = _cli(training_set, out, "--steps", "0", "--vae-steps", "0", "--resume")
    assert result.exit_code == 2, result.output
    assert str(out) in result.stderr and "did not write" in result.stderr and "Traceback" not in result.output
    assert _unchanged(out, files) and sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoints", "data",
                                                                                  "notes.txt"]


@pytest.mark.slow
def test_overwrite_keeps_user_files_in_the_work_folder(training_set, tmp_path):
    """#17.3: --overwrite removes only finetune's files from --work-dir; a user's files stay and are named."""
    work = tmp_path / "project"
    work.mkdir()
    files = _user_files(work)
    first = _cli(training_set, tmp_path / "model", "--steps", "4", "--vae-steps", "2", "--work-dir", str(work),
                 "--overwrite")
    assert first.exit_code == 0, first.output
    assert _unchanged(work, files)  # checkpoint rotation deleted none of theirs
    again = _cli(training_set, tmp_path / "model", "--steps", "0", "--vae-steps", "2", "--work-dir", str(work),
                 "--overwrite")
    assert again.exit_code == 0, again.output
    assert _unchanged(work, files)
    assert "README.md" in again.stderr and "checkpoints/mine.ckpt" in again.stderr  # named in a warning
    assert not (work / "checkpoints" / "unet-0000004").exists()  # its own earlier checkpoints are gone


def test_overwrite_keeps_user_files_in_the_default_work_folder(training_set, tmp_path):
    """#17.3: --overwrite leaves a user's file inside the default DIR.training."""
    out = tmp_path / "model"
    assert _cli(training_set, out, "--steps", "2", "--vae-steps", "2").exit_code == 0
    (out.parent / "model.training" / "my_notes.md").write_text("keep")
    result = _cli(training_set, out, "--steps", "2", "--vae-steps", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out.parent / "model.training" / "my_notes.md").read_text() == "keep"
    assert "my_notes.md" in result.stderr


def test_saving_and_old_siblings_that_are_not_ours_stay(training_set, tmp_path):
    """#17.5: finetune leaves existing DIR.saving and DIR.old folders alone (they are not its own)."""
    out = tmp_path / "model"
    theirs = {"model.saving/a.txt": b"a", "model.old/b.txt": b"b"}
    for rel, data in theirs.items():
        (tmp_path / rel).parent.mkdir()
        (tmp_path / rel).write_bytes(data)
    finetune(training_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    finetune(training_set, "scratch", out, steps=0, vae_steps=0, overwrite=True, **FAST)  # replaces its own model
    assert _unchanged(tmp_path, theirs)
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old", "model.saving", "model.training"]


def test_overwrite_of_a_model_folder_keeps_the_users_files_beside_it(training_set, tmp_path):
    """#17.2: --overwrite replaces only the model files the record names; a user's file in DIR stays, named."""
    out = tmp_path / "model"
    finetune(training_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    (out / "MY_NOTES.txt").write_text("keep")
    result = _cli(training_set, out, "--steps", "0", "--vae-steps", "0", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "MY_NOTES.txt").read_text() == "keep" and "MY_NOTES.txt" in result.stderr
    assert (out / "model_index.json").is_file()


@pytest.mark.slow
def test_a_truncated_latent_cache_is_rebuilt(training_set, tmp_path):
    """#17.14: a truncated latents.pt is detected and rebuilt on resume; the weights match an unbroken run."""
    straight = finetune(training_set, "scratch", tmp_path / "a", steps=4, vae_steps=2, **FAST)
    finetune(training_set, "scratch", tmp_path / "b", steps=2, vae_steps=2, **FAST)
    cache = tmp_path / "b.training" / "latents.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    damaged = cache.read_bytes()
    resumed = finetune(training_set, "scratch", tmp_path / "b", steps=4, vae_steps=2, resume=True, **FAST)
    a, b = _weights(straight.model_dir), _weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # second re-trial: the changed bytes were overwritten silently; they are kept aside and named now
    kept = list(cache.parent.glob("latents.pt.changed-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert any(kept[0].name in note for note in resumed.notes)


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(training_set, tmp_path):
    """#17.14: a truncated newest checkpoint: resume warns and continues from the previous one, to the same weights."""
    straight = finetune(training_set, "scratch", tmp_path / "a", steps=6, vae_steps=2, **FAST)
    finetune(training_set, "scratch", tmp_path / "b", steps=4, vae_steps=2, **FAST)
    state = tmp_path / "b.training" / "checkpoints" / "unet-0000004" / "model.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    result = _cli(training_set, tmp_path / "b", "--steps", "6", "--vae-steps", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "unet-0000004" in result.stderr and "unet-0000002" in result.stderr  # the warning names both
    a, b = _weights(straight.model_dir), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Planted:
    """A pickle that writes a file when it is loaded: what a planted checkpoint file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.slow
def test_a_changed_pickle_in_a_checkpoint_is_never_loaded(training_set, tmp_path):
    """#19.2: accelerate's checkpoints hold pickles; one whose bytes are not those finetune recorded is skipped,
    named, unloaded (no code of it runs), and training resumes from the checkpoint before it."""
    import pickle

    finetune(training_set, "scratch", tmp_path / "m", steps=4, vae_steps=2, **FAST)
    marker = tmp_path / "ran.txt"
    planted = tmp_path / "m.training" / "checkpoints" / "unet-0000004" / "custom_checkpoint_1.pkl"
    planted.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.warns(UserWarning, match="unet-0000004/custom_checkpoint_1.pkl does not match its record.*"
                                         "continuing from checkpoints/unet-0000002"):
        result = finetune(training_set, "scratch", tmp_path / "m", steps=4, vae_steps=2, resume=True, **FAST)
    assert result.steps == 4 and not marker.exists()
    again = finetune(training_set, "scratch", tmp_path / "m", steps=4, vae_steps=2, resume=True, **FAST)
    assert not again.notes and not marker.exists()  # the remade checkpoint loads; the planted bytes stay aside


def test_a_checkpoint_save_interrupted_midway_leaves_nothing_under_a_final_name(training_set, tmp_path,
                                                                                monkeypatch):
    """#19.2: save_state writes into a recorded staging folder; interrupted, that folder goes and no checkpoint
    (whole or partial) is left to resume from; the next run resumes cleanly."""
    from accelerate import Accelerator

    def interrupted(self, output_dir=None, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 64)  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(training_set, "scratch", tmp_path / "m", steps=2, vae_steps=2, **FAST)
    monkeypatch.undo()
    work = tmp_path / "m.training"
    assert not (work / "checkpoints").exists()
    assert not [p for p in (work / ".synthmed").iterdir() if p.name.startswith("checkpoint-")]
    result = finetune(training_set, "scratch", tmp_path / "m", steps=2, vae_steps=2, resume=True, **FAST)
    assert result.steps == 2 and not result.notes


def test_a_binary_manifest_error_names_the_file(training_set, tmp_path):
    """#17.18: a binary file given as the manifest: the error names the file (exit 2, no traceback)."""
    manifest = tmp_path / "manifest.csv"
    header = (training_set / "manifest.csv").read_bytes().split(b"\n")[0]
    manifest.write_bytes(header + b"\n\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ManifestError, match=f"{manifest}.*line 2"):
        finetune(manifest, "scratch", tmp_path / "m", **FAST)
    result = _cli(manifest, tmp_path / "m")
    assert result.exit_code == 2 and str(manifest) in result.stderr and "Traceback" not in result.output


def test_a_garbage_settings_file_error_names_the_file(training_set, tmp_path):
    """#17.18: a garbage settings.json in the work folder: the error names the file (exit 2, no traceback)."""
    out = tmp_path / "m"
    finetune(training_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    settings = tmp_path / "m.training" / "settings.json"
    for garbage in (b"\x00\xff garbage", b'{"seed": 0,\n  oops}'):
        settings.write_bytes(garbage)
        result = _cli(training_set, out, "--steps", "0", "--vae-steps", "0", "--resume")
        assert result.exit_code == 2, result.output
        assert str(settings) in result.stderr and "Traceback" not in result.output
    assert "line 2" in result.stderr


# ----------------------------------------------------------------------------- re-trial of #17 (finetune)

BAD_ARGUMENTS = {"resume": "no", "overwrite": "no", "steps": 1.5, "batch_size": 2.5, "learning_rate": "1",
                 "seed": "x", "manifest": None, "base": 5, "work_dir": 5, "progress": "yes", "vae_steps": -1,
                 "learning_rate_zero": 0.0}


@pytest.mark.parametrize("name", sorted(BAD_ARGUMENTS))
def test_python_finetune_refuses_bad_arguments_at_the_door(training_set, tmp_path, name):
    """#17.8: resume='no', steps=1.5, learning_rate='1', seed='x', manifest=None, base=5, work_dir=5 ...: a
    TypeError or ValueError naming the argument, before any folder is made; the corrected call then runs."""
    arg = name.removesuffix("_zero")
    call = {"manifest": training_set, "base": "scratch", "out": tmp_path / "m", "steps": 0, "vae_steps": 0,
            **{k: v for k, v in FAST.items() if k != "batch_size"}, "batch_size": 2, arg: BAD_ARGUMENTS[name]}
    with pytest.raises((TypeError, ValueError), match=rf"^{arg} must"):
        finetune(**call)
    assert list(tmp_path.iterdir()) == []
    if name in ("resume", "seed"):  # nothing left behind blocks the corrected call
        call[arg] = {"resume": False, "seed": 0}[arg]
        assert finetune(**call).model_dir == tmp_path / "m"


def test_an_empty_user_folder_in_the_work_dir_is_used_and_kept(training_set, tmp_path):
    """#17.11: `--work-dir proj` with the user's empty proj/vae/ and proj/validation/: accepted, and kept by --overwrite."""
    work = tmp_path / "proj"
    (work / "vae").mkdir(parents=True)
    (work / "validation").mkdir()
    first = _cli(training_set, tmp_path / "model", "--steps", "2", "--vae-steps", "2", "--work-dir", str(work))
    assert first.exit_code == 0, first.output
    assert (work / "vae" / "config.json").is_file() and any((work / "validation").iterdir())
    again = _cli(training_set, tmp_path / "model", "--steps", "0", "--vae-steps", "0", "--work-dir", str(work),
                 "--overwrite")
    assert again.exit_code == 0, again.output
    assert (work / "validation").is_dir() and not any((work / "validation").iterdir())  # emptied, not removed


def test_messages_speak_to_their_audience_and_quiet_is_quiet(training_set, tmp_path):
    """#17.12: the CLI names flags (--overwrite), Python names arguments (overwrite=True); -q shows no shard bar."""
    out = tmp_path / "model"
    first = _cli(training_set, out, "--steps", "0", "--vae-steps", "0")
    assert first.exit_code == 0, first.output
    assert "Writing model shards" not in first.output and "%|" not in first.output
    again = _cli(training_set, out, "--steps", "0", "--vae-steps", "0")
    assert again.exit_code == 2, again.output
    assert "--overwrite" in again.stderr and "--resume" in again.stderr and "=True" not in again.stderr
    with pytest.raises(ValueError, match="already holds") as caught:
        finetune(training_set, "scratch", out, steps=0, vae_steps=0, **FAST)
    assert "overwrite=True" in str(caught.value) and "--" not in str(caught.value).replace(str(out), "")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_dataset_folder_given_as_the_model_folder_is_refused_and_kept(training_set, tmp_path, flag):
    """A dataset synthmed generate wrote, given as -o (a mistyped path), is not replaced by a model: exit 2, every
    file of it as it was, no sibling folder made."""
    import shutil

    out = tmp_path / "dataset"
    shutil.copytree(training_set, out)
    before = _snapshot(out)
    result = _cli(training_set, out, "--steps", "0", "--vae-steps", "0", flag)
    assert result.exit_code == 2, result.output
    assert "holds a dataset that synthmed generate wrote" in result.stderr and "Traceback" not in result.output
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_a_dataset_or_the_model_folder_as_the_work_folder_is_refused(training_set, tmp_path):
    import shutil

    data = tmp_path / "dataset"
    shutil.copytree(training_set, data)
    before = _snapshot(data)
    result = _cli(training_set, tmp_path / "model", "--steps", "0", "--vae-steps", "0", "--work-dir", str(data),
                  "--overwrite")
    assert result.exit_code == 2 and "holds a dataset" in result.stderr, result.output
    assert _snapshot(data) == before and not (tmp_path / "model").exists()
    nested = _cli(training_set, tmp_path / "model", "--steps", "0", "--vae-steps", "0", "--work-dir",
                  str(tmp_path / "model" / "training"))
    assert nested.exit_code == 2 and "must be separate folders" in nested.stderr, nested.output
    at_its_name = _cli(training_set, tmp_path / "run" / "checkpoints", "--steps", "0", "--vae-steps", "0",
                       "--work-dir", str(tmp_path / "run"))
    assert at_its_name.exit_code == 2 and "must be separate folders" in at_its_name.stderr, at_its_name.output
    beside = _cli(training_set, tmp_path / "run" / "model", "--steps", "0", "--vae-steps", "0", "--work-dir",
                  str(tmp_path / "run"))  # a model folder in its run's work folder: fine, as before
    assert beside.exit_code == 0, beside.output


def test_generate_and_qc_never_replace_a_model_or_another_datasets_report(training_set, tmp_path):
    """generate -o MODEL (even with --overwrite) and qc --report-dir OTHER_DATASET are refused; nothing changes."""
    import shutil

    model = tmp_path / "model"
    assert _cli(training_set, model, "--steps", "0", "--vae-steps", "0").exit_code == 0
    before = _snapshot(model)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    for flag in ("--overwrite", "--resume", "-q"):
        result = CliRunner().invoke(main, ["generate", str(spec), "-o", str(model), flag])
        assert result.exit_code == 2, result.output
        assert "holds a model that synthmed finetune or distill wrote" in result.stderr
        assert _snapshot(model) == before
    other = tmp_path / "other"
    shutil.copytree(training_set, other)
    CliRunner().invoke(main, ["qc", str(other), "-q"])
    theirs = _snapshot(other)
    result = CliRunner().invoke(main, ["qc", str(training_set), "--report-dir", str(other), "-q"])
    assert result.exit_code == 2 and "holds a dataset that synthmed generate wrote" in result.stderr, result.output
    assert _snapshot(other) == theirs
    reports = tmp_path / "reports"  # a report folder qc wrote is not a dataset generate may empty
    CliRunner().invoke(main, ["qc", str(training_set), "--report-dir", str(reports), "-q"])
    report = _snapshot(reports)
    assert "qc_report.json" in report
    result = CliRunner().invoke(main, ["generate", str(spec), "-o", str(reports), "--overwrite", "--no-qc"])
    assert result.exit_code == 2 and "quality report" in result.stderr, result.output
    assert _snapshot(reports) == report


# ----------------------------------------------------------------------------- hostile trial A (finetune, distill)

BASE_FAST = {k: v for k, v in FAST.items() if k not in ("vae_batch_size", "vae_crop")}
DISTILL_FAST = dict(batch_size=2, checkpoint_every=2, threads=1, progress=False)


def _latents(work: Path):
    return torch.load(work / "latents.pt", weights_only=True)["latents"]


def _labels_csv(folder: Path, shade) -> Path:
    """A user's own two films and a labels CSV in synthmed's columns; ``shade`` draws each film."""
    import numpy as np
    from PIL import Image

    (folder / "own").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate("ab"):
        Image.fromarray(shade(i).astype(np.uint8)).save(folder / "own" / f"{name}.png")
    labels = folder / "labels.csv"
    labels.write_text("file_name,findings,sex,age,view\nown/a.png,no_finding,F,40,PA\n"
                      "own/b.png,pneumothorax:right:severe,M,50,PA\n", encoding="utf-8")
    return labels


def test_the_latent_cache_is_made_again_for_other_image_bytes_and_never_reused_by_overwrite(tiny_base, tmp_path):
    """Trial A.1: the latent cache was keyed by the CSV and the base's path: images replaced under the same names
    were trained on as the old images' latents. Now keyed by the images' bytes; overwrite=True never reuses it; an
    unchanged input still does (resume)."""
    import numpy as np

    ramp = lambda i: np.tile(np.linspace(0, 255, 64), (64, 1)) * (i + 1) / 2  # noqa: E731
    labels = _labels_csv(tmp_path / "data", ramp)
    out, work = tmp_path / "m", tmp_path / "m.training"
    finetune(labels, tiny_base, out, steps=0, **BASE_FAST)
    before = _latents(work)
    _labels_csv(tmp_path / "data", lambda i: np.zeros((64, 64)))  # the right films, under the same names
    finetune(labels, tiny_base, out, steps=0, overwrite=True, **BASE_FAST)
    fresh = finetune(labels, tiny_base, tmp_path / "fresh", steps=0, **BASE_FAST)
    assert torch.equal(_latents(work), _latents(fresh.work_dir)) and not torch.equal(_latents(work), before)
    _labels_csv(tmp_path / "data", lambda i: np.full((64, 64), 255))
    with pytest.raises(ValueError, match="images_sha256 changed"):  # a resume on other bytes: refused (re-trial 4)
        finetune(labels, tiny_base, out, steps=0, resume=True, **BASE_FAST)
    finetune(labels, tiny_base, out, steps=0, overwrite=True, **BASE_FAST)  # same CSV, other bytes: made again
    white = finetune(labels, tiny_base, tmp_path / "white", steps=0, **BASE_FAST)
    assert torch.equal(_latents(work), _latents(white.work_dir))
    made = (work / "latents.pt").stat().st_mtime_ns
    finetune(labels, tiny_base, out, steps=0, resume=True, **BASE_FAST)
    assert (work / "latents.pt").stat().st_mtime_ns == made  # unchanged input: the cache is read, not made again


def test_a_teachers_vae_replaced_at_the_same_path_makes_the_latent_cache_again(training_set, tiny_base, tmp_path):
    """Trial A.1: a teacher whose VAE was replaced at the same path reused latents of the old VAE."""
    import shutil

    from diffusers import AutoencoderKL

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_base, teacher)
    distill(training_set, teacher, tmp_path / "s", steps=0, **DISTILL_FAST)
    vae = AutoencoderKL.from_pretrained(teacher / "vae")
    torch.manual_seed(1)
    for p in vae.parameters():
        p.data.normal_(0, 0.2)
    vae.save_pretrained(teacher / "vae", safe_serialization=True)
    distill(training_set, teacher, tmp_path / "s2", work_dir=tmp_path / "s.training", steps=0, **DISTILL_FAST)
    fresh = distill(training_set, teacher, tmp_path / "fresh", steps=0, **DISTILL_FAST)
    assert torch.equal(_latents(tmp_path / "s.training"), _latents(fresh.work_dir))


def test_a_work_folder_of_the_other_command_is_refused_before_anything_is_written(training_set, tiny_base, tmp_path):
    """Trial A.2: distill --work-dir <a finetune's work folder> took it over (settings, record, cache) and the
    finetune could never be resumed; finetune into distill's likewise. Refused (exit 2, naming it), unchanged."""
    finetune(training_set, tiny_base, tmp_path / "mine", steps=0, **BASE_FAST)
    distill(training_set, tiny_base, tmp_path / "student", steps=0, **DISTILL_FAST)
    for command, base, work in (("distill", "--teacher", "mine.training"), ("finetune", "--base", "student.training")):
        before = _snapshot(tmp_path / work)
        result = CliRunner().invoke(main, [command, base, str(tiny_base), "--manifest", str(training_set), "-o",
                                           str(tmp_path / "new"), "--work-dir", str(tmp_path / work), "--steps", "0",
                                           "--threads", "1", "-q"])
        other = "distill" if command == "finetune" else "finetune"
        assert result.exit_code == 2 and f"holds a run of synthmed {other}" in result.stderr, result.output
        assert "--work-dir" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.output
        assert _snapshot(tmp_path / work) == before and not (tmp_path / "new").exists()
    assert finetune(training_set, tiny_base, tmp_path / "mine", steps=0, resume=True, **BASE_FAST).steps == 0


def test_folders_inside_or_around_the_base_or_teacher_are_refused(training_set, tiny_base, tmp_path):
    """Trial A.3: -o base/unet/mine, --work-dir tiny/unet, -o tiny/vae/student2 wrote into the base or teacher
    (changing its hash, so that resume was refused for ever). Refused before anything is written; so is a folder
    that holds the base."""
    import shutil

    from synthmed.model_folder import model_hash

    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_base, base)
    before, digest = _snapshot(base), model_hash(base)
    cases = [("finetune", "--base", ["-o", base / "unet" / "mine"], "lies inside the base model"),
             ("finetune", "--base", ["-o", tmp_path / "m", "--work-dir", base / "unet"], "lies inside the base model"),
             ("finetune", "--base", ["-o", tmp_path / "models"], "holds the base model"),
             ("distill", "--teacher", ["-o", tmp_path / "s", "--work-dir", base / "unet"], "lies inside the teacher"),
             ("distill", "--teacher", ["-o", base / "vae" / "student2"], "lies inside the teacher"),
             ("distill", "--teacher", ["-o", tmp_path / "s", "--work-dir", tmp_path / "models"], "holds the teacher")]
    for command, flag, folders, message in cases:
        result = CliRunner().invoke(main, [command, flag, str(base), "--manifest", str(training_set), "--steps", "0",
                                           "--threads", "1", "-q", *map(str, folders)])
        assert result.exit_code == 2 and message in result.stderr, (folders, result.output)
        assert _snapshot(base) == before and model_hash(base) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def _killed_save(monkeypatch):
    """The model saved into its staging folder, then the run stopped (Ctrl-C, or a kill: nothing after it runs)."""
    from diffusers import StableDiffusionPipeline

    save = StableDiffusionPipeline.save_pretrained

    def killed(self, folder, **kwargs):
        save(self, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", killed)


def test_a_save_killed_while_writing_leaves_no_staging_folder_after_resume(training_set, tiny_base, tmp_path,
                                                                          monkeypatch):
    """Trial A.4: a save stopped while writing left OUT.saving-<pid>/ for ever ("holds file(s) it did not record");
    its files are claimed before they are written, so the next run removes them, and only them: a file the user
    put there is left and named."""
    out = tmp_path / "m"
    for users_file in (False, True):
        with monkeypatch.context() as patch:
            _killed_save(patch)
            with pytest.raises(KeyboardInterrupt):
                finetune(training_set, tiny_base, out, steps=0, overwrite=True, **BASE_FAST)
        staging = list(tmp_path.glob("m.saving-*"))
        assert len(staging) == 1 and (staging[0] / "unet" / "config.json").is_file()
        if users_file:
            (staging[0] / "unet" / "mine.txt").write_text("keep me")
        result = finetune(training_set, tiny_base, out, steps=0, resume=True, **BASE_FAST)
        if users_file:
            assert _snapshot(staging[0]) == {"unet/mine.txt": b"keep me"}
            assert any("mine.txt" in note for note in result.notes)
        else:
            assert not staging[0].exists() and not result.notes
    assert (out / "model_index.json").is_file()


def test_a_checkpoint_save_killed_before_its_record_leaves_nothing(training_set, tmp_path, monkeypatch):
    """Trial A.4: killed (SIGKILL: no clean-up of its own) while accelerate writes a checkpoint, the files it wrote
    are claimed already; the next run removes them with their staging folder."""
    import synthmed.finetune as ft
    from accelerate import Accelerator

    def killed(self, output_dir=None, **kwargs):
        for name in ("model.safetensors", "random_states_0.pkl"):
            (Path(output_dir) / name).write_bytes(b"\0" * 64)
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", killed)
    monkeypatch.setattr(ft, "_record_staged", lambda staged: {})  # as after a kill: nothing recorded after the write
    monkeypatch.setattr(ft._WorkFolder, "end_staging", lambda self, folder: None)
    with pytest.raises(KeyboardInterrupt):
        finetune(training_set, "scratch", tmp_path / "m", steps=0, vae_steps=2, **FAST)
    monkeypatch.undo()
    state = tmp_path / "m.training" / ".synthmed"
    assert [p.name for p in state.iterdir() if p.name.startswith("checkpoint-")]
    result = finetune(training_set, "scratch", tmp_path / "m", steps=0, vae_steps=2, resume=True, **FAST)
    assert not [p for p in state.iterdir() if p.name.startswith("checkpoint-")] and not result.notes


def test_a_local_teacher_is_not_called_the_shipped_model(training_set, tiny_base, tmp_path, monkeypatch):
    """Trial A.5: the card called any teacher given without a slash (a user's ./roentgen) "the shipped ... model"."""
    import shutil

    shutil.copytree(tiny_base, tmp_path / "roentgen")
    monkeypatch.chdir(tmp_path)
    result = distill(training_set, "roentgen", "student", steps=0, **DISTILL_FAST)
    title = (result.model_dir / "README.md").read_text(encoding="utf-8").splitlines()[0]
    assert "shipped" not in title and title.endswith("student of roentgen")


def test_rows_of_a_split_not_exactly_train_are_counted_and_named(training_set, tmp_path):
    """Trial A.6: rows whose split is Train, training or ' train' were dropped silently ("skipped: none")."""
    from synthmed.finetune import read_training_set

    import shutil

    images = sorted((training_set / "images" / "train").glob("*.png"))[:4]
    for image in images:
        shutil.copy(image, tmp_path / image.name)
    rows = [f"{p.name},no_finding,{split}" for p, split in zip(images, ["train", "Train", "training", " train"])]
    labels = tmp_path / "labels.csv"
    labels.write_text("file_name,findings,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    data = read_training_set(labels, template="roentgen-v1")
    assert len(data.examples) == 1
    assert data.counts["skipped"] == {"split Train (not train)": 1, "split training (not train)": 1,
                                      "split ' train' (not train)": 1}
    assert "skipped: none" not in data.summary[0] and "split ' train' (not train) 1" in data.summary[0]


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_the_current_folder_or_one_above_it_as_the_output_is_a_clear_usage_error(training_set, tiny_base, tmp_path,
                                                                                monkeypatch, command):
    """Trial A.7: -o . gave "PosixPath('.') has an empty name"; -o .. spoke of a --work-dir never given."""
    here = tmp_path / "models" / "student" / "sub"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    flag = "--base" if command == "finetune" else "--teacher"
    for out, message in ((".", "is the current folder"), ("..", "holds the current folder")):
        result = CliRunner().invoke(main, [command, flag, str(tiny_base), "--manifest", str(training_set), "-o", out,
                                           "--steps", "0", "--threads", "1", "-q"])
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert "PosixPath" not in result.output and "Traceback" not in result.output
        assert "--work-dir" not in result.stderr  # none was given
    assert sorted(p.name for p in (tmp_path / "models").rglob("*")) == ["student", "sub"]


def test_a_folder_named_like_an_image_is_named_as_a_folder(tmp_path):
    """Trial A.10: a manifest row naming a folder `x.png` said 'does not exist'; it says what it is."""
    from synthmed.finetune import ManifestError, read_training_manifest

    (tmp_path / "img" / "f.png").mkdir(parents=True)
    (tmp_path / "m.csv").write_text("file_name,findings\nimg/f.png,no_finding\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv:row 2: image .*img/f\.png is a folder, not an image file"):
        read_training_manifest(tmp_path / "m.csv", template="roentgen-v1", any_size=True)


def test_a_numpy_scalar_argument_says_how_to_pass_it():
    """Trial A.9: steps=np.int64(2) is refused (settings are written as JSON), and the message says how to pass it."""
    import numpy as np

    from synthmed.finetune import check_arguments

    with pytest.raises(TypeError, match=r"steps must be a whole number, got int64 .* pass int\(x\) or float\(x\)"):
        check_arguments(steps=np.int64(2))


# ----------------------------------------------------------------------------- re-trial (finetune, distill)

def test_an_output_or_work_folder_inside_a_dataset_or_a_model_is_refused(training_set, tiny_base, tmp_path):
    """Re-trial 1: --work-dir set/images and -o set/masks/student were taken: checkpoints, latents.pt and settings
    landed inside the dataset (which then no longer loaded as an imagefolder). A folder inside a dataset or a model
    synthmed wrote is refused (exit 2, naming it) before anything is written; a model in its own work folder and
    folders beside the dataset stay fine."""
    import shutil

    data = tmp_path / "set"
    shutil.copytree(training_set, data)
    assert finetune(data, tiny_base, tmp_path / "model", steps=0, **BASE_FAST).steps == 0
    shutil.rmtree(tmp_path / "model.training")  # not needed: only the model folder (its claims say "model")
    before = {"set": _snapshot(data), "model": _snapshot(tmp_path / "model")}
    cases = [("finetune", "--base", ["-o", tmp_path / "mine", "--work-dir", data / "images"], "set"),
             ("distill", "--teacher", ["-o", data / "masks" / "student"], "set"),
             ("finetune", "--base", ["-o", tmp_path / "model" / "unet" / "mine"], "model"),
             ("distill", "--teacher", ["-o", tmp_path / "s", "--work-dir", tmp_path / "model" / "w"], "model")]
    for command, flag, folders, inside in cases:
        for extra in ([], ["--overwrite"], ["--resume"]):
            result = CliRunner().invoke(main, [command, flag, str(tiny_base), "--manifest", str(data), "--steps", "0",
                                               "--threads", "1", "-q", *map(str, folders), *extra])
            holds = "a dataset that synthmed generate wrote" if inside == "set" else "a model that synthmed"
            assert result.exit_code == 2, (folders, result.output)
            assert f"lies inside {tmp_path / inside}, which holds {holds}" in result.stderr, result.output
            assert "Traceback" not in result.output
        assert {"set": _snapshot(data), "model": _snapshot(tmp_path / "model")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "set"]
    with pytest.raises(ValueError, match="lies inside .*which holds a dataset"):
        distill(data, tiny_base, tmp_path / "s", work_dir=data / "images" / "w", steps=0, **DISTILL_FAST)
    # as before: a model folder inside its own work folder, and folders beside the dataset and the model
    assert finetune(data, tiny_base, tmp_path / "run" / "model", work_dir=tmp_path / "run", steps=0,
                    **BASE_FAST).steps == 0
    assert distill(data, tiny_base, tmp_path / "student", steps=0, **DISTILL_FAST).steps == 0


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_a_resume_after_the_training_images_were_replaced_is_refused(tiny_base, tmp_path, command):
    """Re-trial 4: images replaced under the same names (same CSV) after a checkpoint, then --resume: the latent
    cache was made again without a word and training went on, steps 1-2 on the old images and 3-4 on the new.
    Refused (exit 2, naming what changed), nothing in the work folder touched; the same images resume, also in a
    work folder from before the images' sha256 was recorded, to the weights of a run that never stopped."""
    import numpy as np

    from synthmed.ledger import Ledger, file_sha256

    ramp = lambda i: np.tile(np.linspace(0, 255, 64), (64, 1)) * (i + 1) / 2  # noqa: E731
    labels = _labels_csv(tmp_path / "data", ramp)
    flag = "--base" if command == "finetune" else "--teacher"

    def run(out: str, steps: int, *args: str):
        return CliRunner().invoke(main, [command, flag, str(tiny_base), "--manifest", str(labels), "-o",
                                         str(tmp_path / out), "--steps", str(steps), "--batch-size", "2",
                                         "--checkpoint-every", "2", "--threads", "1", "-q", *args])

    assert run("m", 2).exit_code == 0
    work = tmp_path / "m.training"
    before = {"work": _snapshot(work), "model": _snapshot(tmp_path / "m")}
    _labels_csv(tmp_path / "data", lambda i: np.zeros((64, 64)))  # other films, under the same names
    result = run("m", 4, "--resume")
    assert result.exit_code == 2, result.output
    assert "images_sha256 changed" in result.stderr and "replaced under the same names" in result.stderr
    assert str(work) in result.stderr and "Traceback" not in result.output
    assert {"work": _snapshot(work), "model": _snapshot(tmp_path / "m")} == before
    _labels_csv(tmp_path / "data", ramp)  # the films it was trained on: a work folder from before the record
    settings = json.loads((work / "settings.json").read_text(encoding="utf-8"))
    del settings["images_sha256"]
    (work / "settings.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    Ledger(work, work / ".synthmed").record("settings", {"settings.json": file_sha256(work / "settings.json")})
    resumed = run("m", 4, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "images_sha256" in json.loads((work / "settings.json").read_text(encoding="utf-8"))
    assert run("straight", 4).exit_code == 0
    mine, straight = _weights(tmp_path / "m"), _weights(tmp_path / "straight")
    assert mine.keys() == straight.keys() and all(torch.equal(mine[k], straight[k]) for k in mine)


def test_a_resume_reads_no_image_again_to_hash_it(tmp_path, monkeypatch):
    """Review: every start read every training image to hash it (hours on a large real set, on every resume). The
    work folder keeps each image's sha256 by size and modification time; only a changed file is read again, and the
    digest is the same either way."""
    import os

    import synthmed.finetune as ft

    images = []
    for k in range(3):
        path = tmp_path / f"i{k}.png"
        path.write_bytes(bytes([k]) * 100)
        images.append(ft.TrainingExample(path=path, prompt="p", case_id=str(k), split="train"))
    work = ft._WorkFolder(tmp_path / "work")
    (tmp_path / "work").mkdir()
    first = ft._images_sha256(images, work)
    assert first == ft._images_sha256(images)  # the memo changes what is read, not the digest
    work.write_image_memo()
    read = []
    real = ft._sha256_file
    monkeypatch.setattr(ft, "_sha256_file", lambda p: read.append(p) or real(p))
    assert ft._images_sha256(images, ft._WorkFolder(tmp_path / "work")) == first and read == []
    images[1].path.write_bytes(b"another picture of the same length" + b"\0" * 66)  # replaced under its name
    os.utime(images[1].path, ns=(1, 1))
    assert ft._images_sha256(images, ft._WorkFolder(tmp_path / "work")) != first and read == [images[1].path]
    (tmp_path / "work" / ft.IMAGE_DIGESTS).write_text("{}", encoding="utf-8")  # not the memo synthmed recorded
    read.clear()
    ft._images_sha256(images, ft._WorkFolder(tmp_path / "work"))
    assert len(read) == 3
