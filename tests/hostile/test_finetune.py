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

from synthmed.build import generate  # noqa: E402
from synthmed.cli import main  # noqa: E402
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
