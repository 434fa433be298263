"""Hostile corpus: `synthmed generate` and `synthmed.generate` against users' files, damaged run state and odd
arguments. Each test reproduces one defect found by a hostile trial (issue #17 item in its docstring)."""

from __future__ import annotations

import csv
import errno
import io
import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from synthmed.build import BuildError, BuildResult, generate
from synthmed.cli import main as cli_main
from synthmed.spec import load_spec


def spec_text(seed: int = 7, count: int = 70) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: hostile
        seed: {seed}
        count: {count}
        splits: {{train: 0.8, val: 0.1, test: 0.1}}
        image: {{size: 64}}
        findings:
          - {{finding: no_finding, weight: 0.5}}
          - finding: pneumonia
            weight: 0.5
            location: {{right_lower_lobe: 0.5, left_lower_lobe: 0.5}}
            severity: {{mild: 0.5, severe: 0.5}}
        """)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(spec_text(), encoding="utf-8")
    return path


@pytest.fixture
def built(tmp_path, spec_file) -> Path:
    out = tmp_path / "out"
    generate(spec_file, out, backend="pattern", progress=False)
    return out


def rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def plant(out: Path, rel: str, text: str = "user data") -> Path:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


USER_FILES = ["images/real_cases/patient1.png", "images/train/my_annotation.json", "dicom/extra/real.dcm",
              "masks/train/notes.txt", ".my.tmp", "images/train/.draft.png.tmp", ".synthmed/parts/.keep.tmp"]


def test_overwrite_deletes_only_what_synthmed_wrote(built, spec_file):
    """#17.4: --overwrite removed user files in images/, dicom/, masks/ and hidden .*.tmp files at the top."""
    planted = {rel: plant(built, rel, f"user {rel}") for rel in USER_FILES}
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--overwrite", "-q"])
    assert result.exit_code == 0, result.output
    for rel, path in planted.items():
        assert path.read_text(encoding="utf-8") == f"user {rel}", rel
    assert "did not write" in result.output and "images/real_cases/patient1.png" in result.output
    assert ".my.tmp" in result.output  # re-trial: a file at the top of OUT was kept but not named
    assert len(rows(built)) == 70


def test_resume_keeps_hidden_tmp_files_of_the_user(built, spec_file):
    """#17.4: --resume deleted hidden `.*.tmp` user files (the glob was wider than synthmed's own temp names)."""
    planted = {rel: plant(built, rel) for rel in USER_FILES}
    result = generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert result.reused == 70
    assert all(p.read_text(encoding="utf-8") == "user data" for p in planted.values())


def test_resume_removes_the_temp_files_a_killed_run_left(built, spec_file):
    """#17.4 (the other half): synthmed's own temp files, named in its record with their pid, are removed."""
    import json

    claim = json.loads((built / ".synthmed/claims/chunk-000000.json").read_text())
    first = next(rel for rel in claim["files"] if rel.startswith("images/"))
    ours = plant(built, str(Path(first).with_name(f".{Path(first).name}.{claim['pids'][0]}.tmp")))
    theirs = plant(built, str(Path(first).with_name(f".{Path(first).name}.99999999.tmp")))
    generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert not ours.exists() and theirs.exists()


def test_a_user_file_at_a_planned_path_is_never_overwritten(tmp_path, spec_file):
    """#17 rule: a file synthmed did not write, where it would write, stops the run (exit 2) and stays as it was."""
    out = tmp_path / "out"
    generate(spec_file, out, backend="pattern", progress=False, limit=10)
    target = next(r["png_path"] for r in rows(out))
    claim = out / ".synthmed/claims/chunk-000000.json"
    claim.write_text('{"pids": [], "files": {}}')  # the record no longer says synthmed wrote it
    (out / target).write_bytes(b"the user's own image")
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(out), "--backend", "pattern",
                                           "--resume", "--limit", "10", "-q"])
    assert result.exit_code == 2, result.output
    assert "did not write" in result.output and "Traceback" not in result.output
    assert (out / target).read_bytes() == b"the user's own image"


def test_resume_refuses_an_image_replaced_by_a_link_and_never_reads_through_it(built, spec_file, tmp_path,
                                                                                monkeypatch):
    """A kept image that is now a link (to a copy outside OUT) is not taken as synthmed's: exit 2 naming it."""
    target = next(r["png_path"] for r in rows(built))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes((built / target).read_bytes())
    (built / target).unlink()
    (built / target).symlink_to(outside)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    assert target in result.output and "Traceback" not in result.output
    assert (built / target).is_symlink() and outside.read_bytes()
    assert not [f for f in opened if Path(f).resolve() == outside.resolve()]


def test_resume_without_run_record_and_a_changed_spec_remakes_every_image(built, tmp_path):
    """#17.9: with .synthmed/run.json deleted and the seed changed, --resume kept all the old images."""
    (built / ".synthmed" / "run.json").unlink()
    changed = tmp_path / "changed.yaml"
    changed.write_text(spec_text(seed=8), encoding="utf-8")
    result = generate(changed, built, backend="pattern", resume=True, progress=False)
    assert result.reused == 0 and result.written == 70
    spec = load_spec(changed)
    assert {r["spec_hash"] for r in rows(built)} == {spec.spec_hash}
    listed = {p for r in rows(built) for p in [r["png_path"], r["dicom_path"], r["sr_path"], r["seg_path"],
                                               *r["mask_paths"].split("|")] if p}
    on_disk = {str(p.relative_to(built)) for top in ("images", "dicom", "masks") for p in (built / top).rglob("*")
               if p.is_file() and p.name != "metadata.csv"}
    assert on_disk == listed  # the old plan's files (other splits, other findings) are gone, none is orphaned


def test_an_edited_label_in_a_part_does_not_reach_the_manifest(built, spec_file):
    """#17.9: an edited label in a manifest part went straight into manifest.csv on --resume."""
    part = built / ".synthmed" / "parts" / "part-000000.csv"
    with open(part, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    column = table[0].index("sex")
    truth = table[1][column]
    table[1][column] = "M" if truth == "F" else "F"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    part.write_text(buffer.getvalue(), encoding="utf-8")
    result = generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert result.written == 64  # the chunk is made again
    assert rows(built)[0]["sex"] == truth


def test_interrupt_hint_keeps_the_command_line_overrides(spec_file, tmp_path, monkeypatch):
    """#17.10: the printed resume command dropped --backend phantom --threads 1 and so was refused."""
    import synthmed.build as build

    def interrupted(*args, **kwargs):
        return BuildResult(out=tmp_path, total=70, written=3, reused=0, interrupted=True, seconds=1.0)

    monkeypatch.setattr(build, "generate", interrupted)
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(tmp_path / "o"), "--backend",
                                           "phantom", "--threads", "1", "--limit", "9", "--overwrite", "-q"])
    assert result.exit_code == 130
    hint = result.output.strip().splitlines()[-1]
    for word in ("--backend phantom", "--threads 1", "--limit 9", "--resume", str(spec_file)):
        assert word in hint, hint
    assert "--overwrite" not in hint


def test_an_unwritable_output_folder_is_a_clear_error(built, spec_file, monkeypatch):
    """#17.11: a read-only output folder gave an OSError/PermissionError traceback on .synthmed/lock."""
    import builtins

    from synthmed.build import run_folder

    real_open = builtins.open

    def read_only_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("lock") and any(m in mode for m in "aw+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_folder, "open", read_only_open, raising=False)
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 2, result.output
    assert "Permission denied" in result.output and str(built) in result.output
    assert "Traceback" not in result.output and "cannot create" not in result.output


def test_resume_with_a_smaller_limit_is_refused_and_loses_nothing(built, spec_file):
    """#17.16: --resume --limit after a larger build left orphan images while manifest and card said fewer."""
    before = sorted(p for p in built.rglob("*.png"))
    with pytest.raises(BuildError) as info:
        generate(spec_file, built, backend="pattern", resume=True, limit=20, progress=False)
    assert info.value.exit_code == 2 and "beyond" in str(info.value)
    assert sorted(p for p in built.rglob("*.png")) == before and len(rows(built)) == 70


@pytest.mark.parametrize("kwargs, error, words", [
    ({"spec": None}, TypeError, "spec must be"),
    ({"limit": "5"}, TypeError, "limit must be a whole number"),
    ({"limit": 2.5}, TypeError, "limit must be a whole number"),
    ({"limit": True}, TypeError, "limit must be a whole number"),
    ({"limit": 0}, ValueError, "limit must be at least 1"),
    ({"batch_size": "8"}, TypeError, "batch_size"),
    ({"backend": 42}, TypeError, "backend must be"),
    ({"resume": "no"}, TypeError, "resume must be True or False"),
    ({"qc": "yes"}, TypeError, "qc must be"),
    ({"out": None}, TypeError, "out must be"),
    ({"model": 3}, TypeError, "model must be"),
])
def test_api_arguments_are_checked_at_the_door(tmp_path, spec_file, kwargs, error, words):
    """#17.17: wrong argument types gave AttributeError/TypeError deep inside, or were taken as True."""
    args = {"spec": spec_file, "out": tmp_path / "out", "backend": "pattern", "progress": False, **kwargs}
    with pytest.raises(error) as info:
        generate(args.pop("spec"), args.pop("out"), **args)
    assert words in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing left behind that would block a corrected call


def test_permission_denied_does_not_say_free_space(spec_file, tmp_path, monkeypatch):
    """#17.18: 'Permission denied … free space and rerun', and a disk-full message with '()' for the file."""
    from synthmed.build.errors import WriteFailed, os_error_message, write_failed_message

    denied = OSError(errno.EACCES, "Permission denied")
    message = write_failed_message(tmp_path, WriteFailed("images/a.png", denied))
    assert "Permission denied" in message and "free space" not in message
    full = os_error_message(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert "disk is full" in full and "()" not in full and str(tmp_path) in full
    in_the_way = write_failed_message(tmp_path, WriteFailed("images/a.png", IsADirectoryError(errno.EISDIR, "Is a "
                                                                                              "directory")))
    assert "move it away" in in_the_way  # not only "rerun with --resume", which fails the same way


def test_a_damaged_run_record_is_named_not_shown_as_a_change(built, spec_file):
    """#17.18: an unreadable run.json was reported as 'changed: format None -> 1'."""
    (built / ".synthmed" / "run.json").write_bytes(b"\x00\xff not json")
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert "format None" not in result.output and "run.json could not be read" in result.output


def _point_first_row_at(built: Path, victim: Path) -> None:
    import hashlib

    part = built / ".synthmed" / "parts" / "part-000000.csv"
    with open(part, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    header = table[0]
    table[1][header.index("png_path")] = os.path.relpath(victim, built)
    table[1][header.index("png_sha256")] = hashlib.sha256(victim.read_bytes()).hexdigest()
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    part.write_text(buffer.getvalue(), encoding="utf-8")


def test_a_part_naming_a_file_outside_the_folder_is_not_kept(built, spec_file, tmp_path):
    """#17 rule (mutation survivor): a part row naming ../victim/x.png with its true sha256 was trusted."""
    victim = plant(tmp_path, "victim/x.png", "someone else's image")
    _point_first_row_at(built, victim)
    result = generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert result.written == 64  # the chunk is made again, not kept
    assert all(not r["png_path"].startswith("..") for r in rows(built))
    assert victim.read_text(encoding="utf-8") == "someone else's image"


def test_adopting_an_old_run_never_takes_a_file_outside_the_folder(built, spec_file, tmp_path):
    """#17 rule (mutation survivor): a pre-ledger run's part naming ../victim/x.png must not make it ours."""
    import shutil

    victim = plant(tmp_path, "victim/x.png", "someone else's image")
    _point_first_row_at(built, victim)
    shutil.rmtree(built / ".synthmed" / "claims")  # a run from before the ledger: its parts are its record
    with pytest.raises(BuildError) as info:  # the row's own image is now named by no record: it is not ours
        generate(spec_file, built, backend="pattern", overwrite=True, progress=False)
    assert "did not write" in str(info.value) and info.value.exit_code == 2
    assert victim.read_text(encoding="utf-8") == "someone else's image"


# ----------------------------------------------------------------------------- found by the re-trial of the fixes

def test_a_link_at_a_temp_name_is_never_written_through(built, spec_file, tmp_path, monkeypatch):
    """#17 re-trial 1: the temp file was opened through a planted symlink, writing outside OUT."""
    import synthmed.atomic as atomic

    victim = plant(tmp_path, "victim/target", "someone else's file")
    first = rows(built)[0]["png_path"]
    (built / first).unlink()
    monkeypatch.setattr(atomic, "_TOKEN", f"{os.getpid()}-guessed")  # as if the user guessed the name
    (built / Path(first).parent / f".{Path(first).name}.{os.getpid()}-guessed.tmp").symlink_to(victim)
    with pytest.raises(BuildError) as info:
        generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert "in the way" in str(info.value)
    assert victim.read_text(encoding="utf-8") == "someone else's file"
    assert not (built / first).is_symlink()


def test_a_user_file_named_like_a_temp_file_is_never_renamed_onto_ours(built, spec_file):
    """#17 re-trial 1: a user's `.cases.jsonl.<pid>.tmp` was truncated and renamed onto cases.jsonl."""
    theirs = [plant(built, f".cases.jsonl.{pid}.tmp", "the user's notes") for pid in (os.getpid(), os.getpid() + 1)]
    generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert all(p.read_text(encoding="utf-8") == "the user's notes" for p in theirs)
    assert "the user's notes" not in (built / "cases.jsonl").read_text(encoding="utf-8")


def test_overwrite_never_deletes_through_a_linked_folder_named_in_a_claim(built, spec_file, tmp_path):
    """#17 re-trial 2: a claim naming userlink/v2 (userlink -> a folder outside OUT) made --overwrite delete v2."""
    import json

    victim = plant(tmp_path, "victim/v2", "someone else's file")
    (built / "userlink").symlink_to(victim.parent)
    claim_file = built / ".synthmed/claims/chunk-000000.json"
    claim = json.loads(claim_file.read_text())
    claim["files"]["userlink/v2"] = None
    claim_file.write_text(json.dumps(claim))
    generate(spec_file, built, backend="pattern", overwrite=True, progress=False)
    assert victim.read_text(encoding="utf-8") == "someone else's file"


@pytest.mark.parametrize("target", ["image", "cases.jsonl"])
def test_resume_does_not_overwrite_a_file_the_user_changed(built, spec_file, target):
    """#17 re-trial 3/4: --resume overwrote edited images and cases.jsonl silently (their sha256 was not checked)."""
    rel = rows(built)[0]["png_path"] if target == "image" else "cases.jsonl"
    if target == "image":
        (built / rows(built)[1]["dicom_path"]).unlink()  # so the first chunk is redone
    else:
        generate(spec_file, built, backend="pattern", resume=True, progress=False)
    path = built / rel
    path.write_bytes(path.read_bytes() + b"\nthe user's edit\n")
    edited = path.read_bytes()
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 2, result.output
    assert "changed since synthmed wrote it" in result.output and rel in result.output
    assert path.read_bytes() == edited


class _Killed(BaseException):
    """What SIGKILL leaves: no handler runs, the chunk's claim is not completed."""


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_file_of_a_killed_chunk_the_user_changed_is_never_overwritten(spec_file, tmp_path, monkeypatch, flag):
    """Trial A: files of the chunk a kill interrupted were claimed 'maybe written' (no sha256 yet), so one the user
    edited after the kill was taken as synthmed's and overwritten by --resume or --overwrite. Each written file's
    sha256 is now noted as it is written: the edit is named and kept."""
    from synthmed.build import chunks

    out = tmp_path / "out"
    real_write, calls = chunks.CaseWriter.write, []

    def write_then_die(self, case, prompt, image):
        if len(calls) == 67:  # the fourth case of the second chunk (64 cases each)
            raise _Killed()
        calls.append(case.case_id)
        return real_write(self, case, prompt, image)

    monkeypatch.setattr(chunks.CaseWriter, "write", write_then_die)
    with pytest.raises(_Killed):
        generate(spec_file, out, backend="pattern", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    (edited,) = out.glob("images/*/case-0000065.png")
    edited.write_bytes(b"the user's own image\n")
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(out), "--backend", "pattern", flag,
                                           "-q"])
    assert result.exit_code == 2, result.output
    assert edited.read_bytes() == b"the user's own image\n"
    assert edited.relative_to(out).as_posix() in result.output
    assert "Traceback" not in result.output
    edited.unlink()  # the user moves it away: the run finishes, to the same bytes as one never killed
    assert CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(out), "--backend", "pattern", flag,
                                         "-q"]).exit_code == 0
    clean = tmp_path / "clean"
    generate(spec_file, clean, backend="pattern", progress=False)
    assert (out / "manifest.csv").read_bytes() == (clean / "manifest.csv").read_bytes()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_user_file_where_a_split_folder_goes_stops_the_run_before_anything_is_removed(built, spec_file, flag):
    """Trial A: images/val made a file: --overwrite removed the whole set, then failed on it; --resume failed the
    same way on every rerun. Now both stop first (exit 2), naming it, and remove nothing."""
    import shutil

    shutil.rmtree(built / "images" / "val")
    (built / "images" / "val").write_text("my notes", encoding="utf-8")
    before = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern", flag,
                                           "-q"])
    assert result.exit_code == 2, result.output
    assert "images/val is a file where synthmed writes the folder val/" in result.output and flag in result.output
    assert sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()) == before
    assert (built / "images" / "val").read_text(encoding="utf-8") == "my notes"


@pytest.mark.parametrize("what", ["folder", "link"])
def test_overwrite_removes_nothing_when_a_folder_or_link_stands_where_an_image_goes(built, spec_file, tmp_path, what):
    """Re-trial: a user folder (or a link) at a planned image path was not seen as in the way: --overwrite removed
    the whole set, then failed on it."""
    rel = rows(built)[3]["png_path"]
    (built / rel).unlink()
    if what == "folder":
        (built / rel).mkdir()
        (built / rel / "note").write_text("mine", encoding="utf-8")
    else:
        (built / rel).symlink_to(tmp_path / "elsewhere.png")
    before = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--overwrite", "-q"])
    assert result.exit_code == 2 and rel in result.output and "nothing was removed" in result.output, result.output
    assert sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()) == before


def test_a_full_disk_while_the_run_record_is_written_is_a_message(built, spec_file, monkeypatch):
    """Trial A: a disk full at the first write of a resume (the ledger's claim of run.json) gave a traceback."""
    from synthmed import atomic

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "open_temp", full)
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "the disk is full. Free space and rerun with --resume" in result.output


def test_a_report_the_user_edited_is_kept_and_named_not_printed_as_none(built, spec_file):
    """Trial A: an edited report.html was kept, but the summary printed 'None' as its path and said nothing."""
    report = built / "report.html"
    report.write_text(report.read_text(encoding="utf-8") + "<!-- mine -->", encoding="utf-8")
    edited = report.read_bytes()
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 0, result.output
    assert "None" not in result.output and report.read_bytes() == edited
    assert "warning: report.html changed since synthmed wrote it: left as it is" in result.output


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_dataset_whose_record_was_deleted_is_named_as_such_and_left(built, spec_file, flag):
    """Trial A: with .synthmed/ deleted, --resume said only 'choose an empty or new folder'."""
    import shutil

    shutil.rmtree(built / ".synthmed")
    before = sorted(p.relative_to(built).as_posix() for p in built.rglob("*"))
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern", flag,
                                           "-q"])
    assert result.exit_code == 2 and "whose record (.synthmed/) is gone" in result.output, result.output
    assert sorted(p.relative_to(built).as_posix() for p in built.rglob("*")) == before


def test_overwrite_removes_nothing_when_a_kept_file_blocks_the_new_run(built, spec_file):
    """#17 re-trial 5: --overwrite deleted the old build first, then failed on a changed file it had kept."""
    edited = built / "images" / rows(built)[0]["split"] / "metadata.csv"
    edited.write_text("the user's own metadata\n", encoding="utf-8")
    before = {p: p.read_bytes() for p in built.rglob("*") if p.is_file() and ".synthmed" not in p.parts}
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--overwrite", "-q"])
    assert result.exit_code == 2, result.output
    assert "nothing was removed" in result.output
    after = {p: p.read_bytes() for p in built.rglob("*") if p.is_file() and ".synthmed" not in p.parts}
    assert after == before


def test_a_kept_chunk_whose_claim_was_deleted_is_claimed_again(built, spec_file):
    """#17 re-trial 5: after a deleted claim, --resume kept the chunk but never recorded its files again."""
    (built / ".synthmed/claims/chunk-000001.json").unlink()
    result = generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert result.reused == 70
    generate(spec_file, built, backend="pattern", overwrite=True, progress=False)  # finds every file its own


def test_a_split_dropped_from_the_spec_leaves_no_metadata_behind(built, tmp_path):
    """#17 re-trial 7: with run.json gone and the test split dropped, images/test/metadata.csv stayed behind."""
    (built / ".synthmed" / "run.json").unlink()
    two_splits = tmp_path / "two.yaml"
    two_splits.write_text(spec_text().replace("splits: {train: 0.8, val: 0.1, test: 0.1}",
                                              "splits: {train: 0.9, val: 0.1}"), encoding="utf-8")
    generate(two_splits, built, backend="pattern", resume=True, progress=False)
    assert not (built / "images" / "test").exists()
    assert not (built / "dicom" / "test").exists()


# ----------------------------------------------------------------------------- found by the second re-trial

def test_qc_never_writes_a_claim_through_a_linked_claims_folder(built, tmp_path):
    """#17 re-trial 2.1: qc followed .synthmed/claims -> a folder outside OUT and overwrote a user's file there."""
    import shutil

    from synthmed.qc import qc

    elsewhere = tmp_path / "elsewhere"
    shutil.move(built / ".synthmed" / "claims", elsewhere)
    (elsewhere / "qc.json").write_text('{"files": {}, "user": "my notes"}', encoding="utf-8")
    (built / ".synthmed" / "claims").symlink_to(elsewhere)
    qc(built, full=False, progress=False)
    assert (elsewhere / "qc.json").read_text(encoding="utf-8") == '{"files": {}, "user": "my notes"}'


def test_a_bare_pid_in_a_claim_never_makes_a_users_file_a_leftover(built, spec_file):
    """#17 re-trial 2.3: a claim with a guessable integer pid made `.<name>.<pid>.tmp` user files deletable."""
    import json

    claim_file = built / ".synthmed/claims/chunk-000000.json"
    claim = json.loads(claim_file.read_text())
    claim["pids"].append(12345)
    claim_file.write_text(json.dumps(claim))
    first = Path(rows(built)[0]["png_path"])
    theirs = plant(built, str(first.with_name(f".{first.name}.12345.tmp")), "the user's own file")
    generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert theirs.read_text(encoding="utf-8") == "the user's own file"


def test_a_claims_own_temp_file_is_removed_by_the_next_run(built, spec_file):
    """#17 re-trial 2.4: a writer killed while writing a claim left `.chunk-000001.json.<token>.tmp` for good."""
    leftover = plant(built, ".synthmed/claims/.chunk-000001.json.4242-0badc0de.tmp", "{")
    theirs = plant(built, ".synthmed/claims/notes.tmp", "not a claim's temp name")
    generate(spec_file, built, backend="pattern", resume=True, progress=False)
    assert not leftover.exists() and theirs.exists()


def test_a_run_recorded_with_a_model_path_relative_to_the_current_folder_still_resumes(tmp_path, monkeypatch):
    """Runs before generator.model was taken relative to the spec recorded it as written; the same folder is no
    change, another one is."""
    from synthmed.build.run_folder import _same_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    new = str((tmp_path / "models" / "mine").resolve())
    run = {"model": new, "generator": {"model": new, "steps": 20}}
    old = {"model": "models/mine", "generator": {"model": "models/mine", "steps": 20}}
    assert _same_model_path(old, run) == run
    other = {"model": "models/other", "generator": {"model": "models/other", "steps": 20}}
    assert _same_model_path(other, run) == other


def test_a_folder_where_the_run_lock_goes_is_named_and_kept(built, spec_file):
    """`.synthmed/lock` made a folder: --resume stops (exit 2) naming the run lock, not "cannot write to the output
    folder: Is a directory", and leaves the folder and the dataset as they were."""
    (built / ".synthmed" / "lock").unlink()
    (built / ".synthmed" / "lock").mkdir()
    before = sorted(p.relative_to(built) for p in built.rglob("*"))
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 2, result.output
    assert f"cannot open the run lock {built / '.synthmed' / 'lock'}" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(built) for p in built.rglob("*")) == before


def test_a_set_the_user_may_not_write_is_named_as_such(built, spec_file, monkeypatch):
    """A shared, read-only copy: --resume stops (exit 2) saying the folder is not writable and how to read it
    instead, not only "Permission denied". (Provoked in the module: tests may run as root, whom chmod does not stop.)"""
    import builtins

    from synthmed.build import run_folder

    def refused(path, *args, **kwargs):
        if str(path).endswith("lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(run_folder, "open", refused, raising=False)
    result = CliRunner().invoke(cli_main, ["generate", str(spec_file), "-o", str(built), "--backend", "pattern",
                                           "--resume", "-q"])
    assert result.exit_code == 2, result.output
    assert f"{built} is not writable by you" in result.output and "synthmed qc --report-dir" in result.output
    assert "Traceback" not in result.output
