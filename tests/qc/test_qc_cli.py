"""synthmed qc and the checks at the end of generate: a clean set passes; each kind of broken file is caught,
named in the report and in the manifest's qc_flags, and fails the run; exit codes; spec fidelity by hand;
reject-and-regenerate; the auditor's sections, a plugged-in feature extractor and the memorisation audit.

Every build uses the pattern backend on 64x64 images (12 cases), made once per module and copied per test.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import json
import math
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from scipy import stats

from synthmed.build import BuildError, derive_retry_seed, generate
from synthmed.cli import main as cli_main
from synthmed.qc import QCError, QCResult, qc
from synthmed.spec import QCSpec, load_spec
from synthmed.backends.pattern import PatternBackend
from synthmed.writers.dicom import PRIVATE_CREATOR
from synthmed.writers.png import png_bytes

COUNT = 12


def spec_text(qc_section: str = "", count: int = COUNT) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: qc-test
        seed: 11
        count: {count}
        splits: {{train: 0.75, test: 0.25}}
        image: {{size: 64}}
        findings:
          - finding: no_finding
            weight: 0.5
          - finding: pneumonia
            weight: 0.5
            location: right_lower_lobe
            severity: {{mild: 0.5, severe: 0.5}}
        """) + qc_section


@pytest.fixture(scope="module")
def fast_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)  # durability is not what these tests check
        yield


@pytest.fixture(autouse=True)
def _fast(fast_fsync):
    yield


@pytest.fixture(scope="module")
def built(tmp_path_factory, fast_fsync) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    result = generate(spec_text(), out, backend="pattern", progress=False)
    assert result.qc is not None and result.qc.passed, result.qc.report["failed_checks"]
    return out


@pytest.fixture
def out(built, tmp_path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(built, target)
    return target


def run(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def report_of(out: Path) -> dict:
    return json.loads((out / "qc_report.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the end of generate

def test_generate_runs_the_checks_and_fills_the_manifest(built):
    report = report_of(built)
    assert report["verdict"] == "pass" and report["mode"] == "fast" and report["failed_checks"] == []
    assert report["images"]["checked"] == COUNT and report["images"]["passed"] == COUNT
    assert (built / "report.html").is_file()
    rows = manifest_rows(built)
    assert [r["qc_status"] for r in rows] == ["pass"] * COUNT
    assert [r["qc_flags"] for r in rows] == [""] * COUNT
    assert [r["qc_tries"] for r in rows] == ["0"] * COUNT
    assert [r["qc_seed"] for r in rows] == [r["seed"] for r in rows]
    # the split metadata.csv copies carry the same verdicts
    with open(built / "images" / "train" / "metadata.csv", newline="", encoding="utf-8") as fh:
        assert {r["qc_status"] for r in csv.DictReader(fh)} == {"pass"}
    # cheap mode: no diversity, no auditor
    assert report["checks"]["diversity"]["status"] == "skipped"
    assert "not run in the cheap checks" in report["sections"]["auditor"]["reason"]


def test_generate_qc_is_deterministic(built, tmp_path):
    again = tmp_path / "again"
    generate(spec_text(), again, backend=PatternBackend(64, 64), batch_size=1, progress=False)
    for name in ("qc_report.json", "report.html", "manifest.csv"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name


def test_generate_without_qc(tmp_path):
    out = tmp_path / "plain"
    result = generate(spec_text("qc: {enabled: false}\n"), out, backend="pattern", progress=False)
    assert result.qc is None and result.qc_passed
    assert not (out / "qc_report.json").exists()
    assert {r["qc_status"] for r in manifest_rows(out)} == {""}
    result = generate(spec_text(), tmp_path / "off", backend="pattern", progress=False, qc=False)
    assert result.qc is None


def test_precomputed_per_image_results_replace_reading_every_file(out, monkeypatch):
    """What a scaled-out build does: the workers check their images, the final qc only reads the thumbnails."""
    from synthmed.qc import run as qc_run
    from synthmed.qc.inputs import load_card_spec
    from synthmed.qc.spec_fidelity import finding_labels

    config = dataclasses.replace(load_spec(spec_text()).qc, samples_per_cell=1)
    qc(out, full=False, config=config)
    want = {name: (out / name).read_bytes() for name in ("qc_report.json", "report.html", "manifest.csv")}
    checked = qc_run.check_rows(out, load_card_spec(out), manifest_rows(out))
    assert sorted(checked) == sorted(r["case_id"] for r in manifest_rows(out))
    read, real = [], qc_run.check_row
    monkeypatch.setattr(qc_run, "check_row", lambda o, row, *a: read.append(row["case_id"]) or real(o, row, *a))
    qc(out, full=False, config=config, precomputed=checked)
    assert {name: (out / name).read_bytes() for name in want} == want
    cells = {finding_labels(r["findings"])[::2] for r in manifest_rows(out)}
    assert 0 < len(read) <= len(cells) < COUNT  # one thumbnail per grid cell, nothing else read
    # what a worker found is what the report says (it is not checked again)...
    case_id = manifest_rows(out)[-1]["case_id"]
    checked[case_id].fail("blank", "the worker found it blank")
    result = qc(out, full=False, config=config, precomputed=checked)
    assert result.flagged == {case_id: ("blank",)} and not result.passed
    # ...unless the run's thresholds differ from those the workers used
    stricter = dataclasses.replace(config, thresholds=dataclasses.replace(config.thresholds, min_dynamic_range=0.01))
    assert qc(out, full=False, config=stricter, precomputed=checked).flagged == {}


# ----------------------------------------------------------------------------- synthmed qc

def test_cli_clean_set_passes(out):
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("PASS: 12 images checked")
    assert str(out / "qc_report.json") in result.output and str(out / "report.html") in result.output
    report = report_of(out)
    assert report["verdict"] == "pass" and report["mode"] == "full"
    assert report["checks"]["diversity"]["status"] in ("pass", "fail")  # the full run measures diversity
    assert {r["qc_status"] for r in manifest_rows(out)} == {"pass"}


def blank_png(out, row):
    (out / row["png_path"]).write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))


def saturate_png(out, row):
    from synthmed.qc.checks import decode_png

    pixels, _ = decode_png((out / row["png_path"]).read_bytes())
    pixels[:, :40] = np.iinfo(pixels.dtype).max
    (out / row["png_path"]).write_bytes(png_bytes(pixels))


def shrink_png(out, row):
    from synthmed.qc.checks import decode_png

    pixels, _ = decode_png((out / row["png_path"]).read_bytes())
    (out / row["png_path"]).write_bytes(png_bytes(np.ascontiguousarray(pixels[::2, ::2])))


def tamper_png(out, row):
    with open(out / row["png_path"], "ab") as fh:
        fh.write(b"\x00")  # after IEND: still a valid image, different bytes


def alter_dicom(out, row):
    path = out / row["dicom_path"]
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[5:10, 5:10] = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("damage, checks", [
    (blank_png, {"blank", "saturated", "sha256", "dicom_match"}),
    (saturate_png, {"saturated", "sha256", "dicom_match"}),
    (shrink_png, {"size", "sha256", "dicom_match"}),
    (tamper_png, {"sha256"}),
    (alter_dicom, {"sha256", "dicom_match"}),
], ids=["blank", "saturated", "wrong-size", "sha256", "dicom-differs"])
def test_cli_catches_each_broken_image(out, damage, checks):
    rows = manifest_rows(out)
    victim = rows[5]
    damage(out, victim)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAIL:")
    for check in checks:
        assert f"FAIL {check}: 1 of 12 images" in result.output
    report = report_of(out)
    assert report["verdict"] == "fail" and set(report["failed_checks"]) == checks
    failures = {f["case_id"]: f for f in report["images"]["failures"]}
    assert list(failures) == [victim["case_id"]]
    assert set(failures[victim["case_id"]]["flags"]) == checks and failures[victim["case_id"]]["status"] == "fail"
    after = manifest_rows(out)
    assert after[5]["qc_status"] == "fail" and set(after[5]["qc_flags"].split("|")) == checks
    assert {r["qc_status"] for i, r in enumerate(after) if i != 5} == {"pass"}
    # the other columns are untouched
    assert [{k: v for k, v in r.items() if not k.startswith("qc_")} for r in after] == \
        [{k: v for k, v in r.items() if not k.startswith("qc_")} for r in rows]
    html = (out / "report.html").read_text(encoding="utf-8")
    failures_html = html[html.index('id="failures"'):]
    assert victim["case_id"] in failures_html and all(f"<code>{c}</code>" in failures_html for c in checks)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_runs_on_a_sample_and_names_the_file(out):
    victim = manifest_rows(out)[7]
    path = out / victim["dicom_path"]
    ds = pydicom.dcmread(path)
    del ds.PresentationIntentType  # Type 1 in the DX Series module (DX is the default IOD)
    ds.save_as(path, enforce_file_format=True)
    result = run("qc", out, "-q", "--no-auditor")  # the default sample: the first 5 files
    assert result.exit_code == 1 and "FAIL dciodvfy" not in result.output  # only sha256 sees it
    assert report_of(out)["sections"]["dciodvfy"]["checked"] == 5
    result = run("qc", out, "-q", "--no-auditor", "--dciodvfy-sample", 100)
    assert result.exit_code == 1 and "FAIL dciodvfy: 1 of 12 images" in result.output
    section = report_of(out)["sections"]["dciodvfy"]
    assert section["checked"] == 12 and list(section["failures"]) == [victim["case_id"]]
    assert "PresentationIntentType" in section["failures"][victim["case_id"]][0]
    assert set(manifest_rows(out)[7]["qc_flags"].split("|")) == {"sha256", "dciodvfy"}


def test_non_gating_failure_warns_and_passes(out):
    from synthmed.qc.checks import PER_IMAGE_CHECKS

    blank_png(out, manifest_rows(out)[2])
    config = dataclasses.replace(QCSpec(), gate=("readable", "size"))
    result = qc(out, config=config, auditor=False)
    assert isinstance(result, QCResult) and result.passed and result.failed_checks == ()
    assert set(result.flagged) == {"case-0000002"}
    row = manifest_rows(out)[2]
    assert row["qc_status"] == "warn" and "blank" in row["qc_flags"].split("|")
    assert result.report["checks"]["blank"]["status"] == "fail" and not result.report["checks"]["blank"]["gating"]
    assert set(PER_IMAGE_CHECKS) <= set(result.report["checks"])


# A gated set-level check must fail the run when it is the only check failing: a verdict made of the
# per-image checks alone lets every one of these through.

def test_a_gated_dciodvfy_failure_alone_fails_the_run(out, monkeypatch):
    """#17: dciodvfy (gated by default) finding an error in one untouched file fails qc, exit code 1."""
    from synthmed.qc import dciodvfy

    victim = manifest_rows(out)[1]
    monkeypatch.setattr(dciodvfy, "dciodvfy_available", lambda: True)
    monkeypatch.setattr(dciodvfy, "dciodvfy_errors", lambda path, timeout=60.0: (
        ["Error - Missing attribute Type 1 Required Element=<ConversionType>"]
        if path.name == Path(victim["dicom_path"]).name else []))
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAIL:")
    report = report_of(out)
    assert report["verdict"] == "fail" and report["failed_checks"] == ["dciodvfy"]
    assert {name for name, c in report["checks"].items() if c["status"] == "fail" and c["gating"]} == {"dciodvfy"}
    after = {r["case_id"]: r for r in manifest_rows(out)}
    assert after[victim["case_id"]]["qc_status"] == "fail" and after[victim["case_id"]]["qc_flags"] == "dciodvfy"


def test_a_gated_spec_fidelity_failure_alone_fails_the_run(out):
    """#17: spec_fidelity, once in the gate, fails the run on its own (no image flagged)."""
    rows = manifest_rows(out)
    changed = 0
    for row in rows:  # 6 F / 6 M -> 1 F / 11 M: the sex score 1 - TVD falls to 0.58
        if row["sex"] == "F" and changed < 5:
            row["sex"], changed = "M", changed + 1
    from synthmed.writers.manifest import merge_parts, write_part

    write_part(out / "edited.csv", rows)
    merge_parts([(out / "edited.csv", len(rows))], out / "manifest.csv")
    (out / "edited.csv").unlink()
    result = qc(out, config=dataclasses.replace(QCSpec(), gate=("spec_fidelity",)), auditor=False, full=False)
    assert result.report["sections"]["spec_fidelity"]["status"] == "fail"
    assert result.flagged == {}  # no image failed anything
    assert not result.passed and result.failed_checks == ("spec_fidelity",)
    assert result.report["verdict"] == "fail" and report_of(out)["verdict"] == "fail"


def test_a_gated_duplicates_failure_alone_fails_the_run(out):
    """#17: duplicates, once in the gate, fails the run on its own."""
    rows = manifest_rows(out)
    shutil.copyfile(out / rows[0]["png_path"], out / rows[3]["png_path"])
    result = qc(out, config=dataclasses.replace(QCSpec(), gate=("duplicates",)), auditor=False, full=False)
    section = result.report["sections"]["duplicates"]
    assert section["status"] == "fail" and section["pairs"][0]["a"] == rows[0]["case_id"]
    assert not result.passed and result.failed_checks == ("duplicates",)
    assert result.report["verdict"] == "fail"
    assert {name for name, c in result.report["checks"].items() if c["status"] == "fail" and c["gating"]} == \
        {"duplicates"}


def test_spec_gate_and_thresholds_are_used(tmp_path):
    out = tmp_path / "strict"
    result = run("generate", _write(tmp_path, spec_text("qc: {thresholds: {min_dynamic_range: 0.99}}\n")),
                 "-o", out, "--backend", "pattern", "-q")
    assert result.exit_code == 1, result.output
    assert "qc:       FAIL: 12 images checked" in result.output
    assert "12 failed a gating check" in result.output and "FAIL blank: 12 of 12 images" in result.output
    assert str(out / "report.html") in result.output
    assert report_of(out)["thresholds"]["min_dynamic_range"] == 0.99
    assert run("qc", out, "-q", "--fast").exit_code == 1


def _write(folder: Path, text: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("args, message", [
    (lambda tmp: [tmp / "nowhere"], "does not exist"),
    (lambda tmp: [tmp], "is not a synthmed output folder: it has no manifest.csv"),
    (lambda tmp: [tmp / "file.txt"], "is not a folder"),
])
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    (tmp_path / "file.txt").write_text("x")
    result = run("qc", *args(tmp_path))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_missing_reference_and_bad_card(out):
    result = run("qc", out, "--reference", out / "missing.csv")
    assert result.exit_code == 2 and "the reference" in result.output and "is not a file" in result.output
    (out / "dataset_card.json").write_text("{}")
    result = run("qc", out)
    assert result.exit_code == 2 and "does not hold a readable spec" in result.output
    (out / "dataset_card.json").unlink()
    result = run("qc", out)
    assert result.exit_code == 2 and "no dataset_card.json" in result.output


def test_cli_refuses_a_folder_in_use(out):
    with open(out / ".synthmed" / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("qc", out, "-q")
    assert result.exit_code == 1 and "another synthmed run is writing" in result.output


def test_qc_api_errors(out, tmp_path):
    with pytest.raises(QCError) as info:
        qc(tmp_path / "nope")
    assert info.value.exit_code == 2
    with pytest.raises(QCError, match="unknown check"):
        qc(out, config=dataclasses.replace(QCSpec(), gate=("blnk",)))


# ----------------------------------------------------------------------------- spec fidelity by hand

def test_spec_fidelity_matches_a_hand_computation(out):
    rows = manifest_rows(out)
    # exact allocation: 6 F / 6 M. Relabel three F as M: 3 F / 9 M against 1/2, 1/2.
    changed = 0
    for row in rows:
        if row["sex"] == "F" and changed < 3:
            row["sex"], changed = "M", changed + 1
    from synthmed.writers.manifest import merge_parts, write_part

    write_part(out / "edited.csv", rows)
    merge_parts([(out / "edited.csv", len(rows))], out / "manifest.csv")
    (out / "edited.csv").unlink()

    report = qc(out, auditor=False, full=False).report
    sex = report["sections"]["spec_fidelity"]["attributes"]["sex"]
    n_f = sum(r["sex"] == "F" for r in rows)
    assert n_f == 3 and sex["n"] == 12
    assert sex["tvd"] == pytest.approx(0.5 * (abs(3 / 12 - 0.5) + abs(9 / 12 - 0.5)))  # 0.25
    assert sex["score"] == pytest.approx(0.75)
    chi2 = (3 - 6) ** 2 / 6 + (9 - 6) ** 2 / 6
    assert sex["chi2"] == pytest.approx(chi2) and sex["dof"] == 1
    assert sex["p_value"] == pytest.approx(stats.chi2.sf(chi2, 1))
    # finding: 6 no_finding / 6 pneumonia against 1/2, 1/2 -> exact
    finding = report["sections"]["spec_fidelity"]["attributes"]["finding"]
    counts = {c["category"]: c["observed_n"] for c in finding["cells"]}
    assert counts == {"no_finding": 6, "pneumonia": 6} and finding["tvd"] == 0.0
    # severity: '-' for no_finding (1/2), mild and severe 1/4 each
    severity = {c["category"]: c["expected_p"] for c in report["sections"]["spec_fidelity"]["attributes"]["severity"]["cells"]}
    assert severity == pytest.approx({"-": 0.5, "mild": 0.25, "severe": 0.25})
    # finding x sex: expected the product of the marginals
    pair = report["sections"]["spec_fidelity"]["pairs"]["finding x sex"]
    assert {c["category"]: c["expected_p"] for c in pair["cells"]} == pytest.approx(
        {"no_finding | F": 0.25, "no_finding | M": 0.25, "pneumonia | F": 0.25, "pneumonia | M": 0.25})
    observed = {}
    for r in rows:
        key = f"{r['findings'].split(':')[0]} | {r['sex']}"
        observed[key] = observed.get(key, 0) + 1
    assert pair["tvd"] == pytest.approx(0.5 * sum(abs(observed.get(k, 0) / 12 - 0.25) for k in
                                                  ("no_finding | F", "no_finding | M", "pneumonia | F", "pneumonia | M")))
    # the overall score is the lowest one, and the limit 0.9 fails it (not gating by default)
    overall = report["sections"]["spec_fidelity"]
    assert overall["score"] == pytest.approx(min([a["score"] for a in overall["attributes"].values()]
                                                 + [p["score"] for p in overall["pairs"].values()]))
    assert overall["score"] <= 0.75 and overall["status"] == "fail" and not report["checks"]["spec_fidelity"]["gating"]
    # the edited rows disagree with cases.jsonl: the gating manifest_consistency names them
    assert report["failed_checks"] == ["manifest_consistency"]
    assert report["sections"]["manifest_consistency"]["rows_failed"] == 3


def test_age_bands_follow_the_spec(out):
    report = qc(out, auditor=False, full=False, write=False).report
    age = report["sections"]["spec_fidelity"]["attributes"]["age"]
    expected = {c["category"]: c["expected_p"] for c in age["cells"]}
    assert sum(expected.values()) == pytest.approx(1.0)
    spec = load_spec(spec_text())
    # default ages: truncated normal mean 55, sd 15 on 18..90 -> the 50-59 band is the largest
    assert max(expected, key=expected.get) == "50-59" and spec.age.mean == 55
    assert not (out / "qc_report.json").read_bytes() == b""  # write=False left the earlier report alone


# ----------------------------------------------------------------------------- reject-and-regenerate

class BlankFirstTry(PatternBackend):
    """Blank images for some cases' own seeds; any other seed (a regeneration's) draws normally."""

    def __init__(self, blank_ids, **kw):
        super().__init__(64, 64, **kw)
        self.blank_ids, self.seeds = set(blank_ids), {}

    def generate(self, cases, prompts):
        images = super().generate(cases, prompts)
        for case, image in zip(cases, images):
            self.seeds.setdefault(case.case_id, case.seed)
            if case.case_id in self.blank_ids and case.seed == self.seeds[case.case_id]:
                image.pixels[:] = 0.0
        return images


def test_blank_images_fail_the_build_without_rejection(tmp_path):
    result = generate(spec_text(), tmp_path / "o", backend=BlankFirstTry({"case-0000004"}), progress=False)
    assert not result.qc_passed and set(result.qc.failed_checks) == {"blank", "saturated"}
    # only the blank image fails (at 8 bits two 64-pixel pattern films are also near-duplicates: reported only)
    gate = set(result.qc.report["gate"])
    failing = {case_id: flags for case_id, flags in result.qc.flagged.items() if set(flags) & gate}
    assert failing == {"case-0000004": ("blank", "saturated")}


def test_reject_and_regenerate_records_tries_and_seed(tmp_path):
    text = spec_text("qc: {reject: {max_tries: 2}}\n")
    result = generate(text, tmp_path / "o", backend=BlankFirstTry({"case-0000004", "case-0000009"}), progress=False)
    assert result.qc_passed, result.qc.report["failed_checks"]
    rows = {r["case_id"]: r for r in manifest_rows(tmp_path / "o")}
    for case_id, row in rows.items():
        if case_id in ("case-0000004", "case-0000009"):
            assert row["qc_tries"] == "1"
            assert row["qc_seed"] == str(derive_retry_seed(int(row["seed"]), 1, case_id)) != row["seed"]
            ds = pydicom.dcmread(tmp_path / "o" / row["dicom_path"])  # the DICOM records the seed it was made from
            assert ds.private_block(0x0009, PRIVATE_CREATOR)[0x08].value == row["qc_seed"]
        else:
            assert row["qc_tries"] == "0" and row["qc_seed"] == row["seed"]
        assert row["qc_status"] == "pass"
    # a rerun regenerates the same images
    generate(text, tmp_path / "again", backend=BlankFirstTry({"case-0000004", "case-0000009"}), progress=False)
    assert (tmp_path / "again" / "manifest.csv").read_bytes() == (tmp_path / "o" / "manifest.csv").read_bytes()


class AlwaysNaN(PatternBackend):
    def generate(self, cases, prompts):
        images = super().generate(cases, prompts)
        for case, image in zip(cases, images):
            if case.case_id == "case-0000001":
                image.pixels[0, 0] = np.nan
        return images


@pytest.mark.parametrize("tries", [0, 2])
def test_nan_images_stop_the_build_with_a_message(tmp_path, tries):
    text = spec_text(f"qc: {{reject: {{max_tries: {tries}}}}}\n")
    with pytest.raises(BuildError, match="NaN or infinite pixels for case-0000001") as info:
        generate(text, tmp_path / "o", backend=AlwaysNaN(64, 64), progress=False)
    assert (f"on {tries} regeneration(s)" in str(info.value)) == bool(tries)


def test_derived_seeds_are_63_bit_and_distinct():
    seeds = {derive_retry_seed(123, t) for t in range(1, 50)}
    assert len(seeds) == 49 and all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_retry_seed(None, 1, "case-0000001") != derive_retry_seed(None, 1, "case-0000002")


# ----------------------------------------------------------------------------- features, auditor, memorisation

class ThumbFeatures:
    """A plain numpy feature extractor: 8x8 box means."""

    name = "thumb-8x8"

    def __call__(self, images):
        images = np.asarray(images, dtype=np.float64)
        n, h, w = images.shape
        return images.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def test_plugged_in_extractor_gives_fid_against_a_reference(out, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    result = qc(out, reference=reference / "manifest.csv", feature_extractor=ThumbFeatures(), auditor=False)
    ref = result.report["sections"]["reference"]
    assert ref["status"] == "done" and ref["feature_extractor"] == "thumb-8x8"
    assert ref["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (ref["precision"], ref["recall"], ref["density"], ref["coverage"]) == (1.0, 1.0, 1.0, 1.0)
    assert result.report["checks"]["fid"]["status"] == "info"  # no limit set
    intensity = result.report["sections"]["intensity"]
    assert intensity["status"] == "pass" and intensity["checked"] == COUNT  # fitted on the same images
    # and through the CLI, by import path
    cli = run("qc", out, "-q", "--no-auditor", "--reference", reference / "manifest.csv",
              "--features", f"{__name__}:ThumbFeatures")
    assert cli.exit_code == 0, cli.output
    assert report_of(out)["feature_extractor"] == "thumb-8x8"


def test_cheap_run_computes_fid_only_with_a_reference(out, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    fast = qc(out, feature_extractor=ThumbFeatures(), auditor=False, full=False, write=False)
    assert fast.report["sections"]["reference"]["status"] == "skipped"
    assert fast.report["feature_extractor"] is None
    fast = qc(out, reference=reference / "manifest.csv", feature_extractor=ThumbFeatures(), auditor=False,
              full=False, write=False)
    assert fast.report["sections"]["reference"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert fast.report["sections"]["auditor"]["status"] == "skipped"


def test_the_module_is_callable(out):
    import synthmed.qc

    result = synthmed.qc(out, auditor=False, write=False)
    assert isinstance(result, QCResult) and result.passed and result.report_path is None
    assert synthmed.qc.metrics.hamming(1, 3) == 1


def test_the_spec_qc_section():
    spec = load_spec(spec_text(textwrap.dedent("""        qc:
          gate: [readable, sha256, spec_fidelity]
          thresholds: {min_spec_fidelity: 0.8, max_fid: 40}
          reject: {max_tries: 3}
          dciodvfy_sample: 0
        """)))
    assert spec.qc.gate == ("readable", "sha256", "spec_fidelity") and spec.qc.reject.max_tries == 3
    assert spec.qc.thresholds.min_spec_fidelity == 0.8 and spec.qc.thresholds.max_fid == 40
    assert spec.qc.thresholds.max_kid is None and spec.qc.dciodvfy_sample == 0
    assert any("no check that regeneration can fix" in w.message for w in spec.warnings)
    default = load_spec(spec_text())
    assert default.qc == QCSpec() and default.qc.enabled and default.qc.reject.max_tries == 0
    from synthmed.spec import SpecError

    with pytest.raises(SpecError) as info:
        load_spec(spec_text("qc: {gate: [blnk], reject: {max_tries: -1}, thresholds: {min_spec_fidelty: 1}}\n"))
    text = str(info.value)
    assert "did you mean 'blank'" in text and "qc.reject.max_tries" in text and "min_spec_fidelity" in text


def test_intensity_flags_images_outside_the_reference_bands(out, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    victim = manifest_rows(out)[7]
    from synthmed.qc.checks import decode_png

    pixels, _ = decode_png((out / victim["png_path"]).read_bytes())
    (out / victim["png_path"]).write_bytes(png_bytes(pixels // 3))  # much darker
    result = qc(out, reference=reference / "manifest.csv", auditor=False, full=False)
    assert "intensity" in result.flagged[victim["case_id"]]
    assert result.report["checks"]["intensity"]["failed"] == 1 and not result.report["checks"]["intensity"]["gating"]


def test_auditor_unavailable_is_skipped_with_a_reason(out, monkeypatch):
    auditor = pytest.importorskip("synthmed.qc.auditor")

    def no_weights(cls, path=None):
        raise FileNotFoundError("no shipped weights here")

    monkeypatch.setattr(auditor.Auditor, "load", classmethod(no_weights))
    result = qc(out)
    assert result.passed
    section = result.report["sections"]["auditor"]
    assert section["status"] == "skipped" and "no shipped weights here" in section["reason"]
    assert result.report["checks"]["label_fidelity"]["status"] == "skipped"
    assert "no shipped weights here" in result.report["sections"]["reference"]["reason"] or \
        result.report["sections"]["reference"]["reason"].startswith("no reference")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "no shipped weights here" in html


def test_auditor_sections_and_memorisation_with_a_tiny_auditor(out, tmp_path):
    auditor_module = pytest.importorskip("synthmed.qc.auditor")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    tiny = auditor_module.Auditor.from_config(seed=0)
    training = tmp_path / "training"
    shutil.copytree(out, training)
    result = qc(out, auditor=tiny, training_manifest=training / "manifest.csv")
    section = result.report["sections"]["auditor"]
    assert section["status"] == "done"
    assert section["label_fidelity"]["n_images"] == COUNT
    assert 0.0 <= section["label_fidelity_score"] <= 1.0
    assert 1.0 <= section["inception_score"] <= 19.0
    assert result.report["feature_extractor"] == tiny.name
    assert result.report["sections"]["duplicates"]["embedding"]["status"] == "done"
    # the training set is the set itself: every image is its own nearest training image
    memorisation = result.report["sections"]["memorisation"]
    assert memorisation["status"] == "fail" and memorisation["value"] == 1.0
    assert sorted(memorisation["flagged"]) == sorted(r["case_id"] for r in manifest_rows(out))
    assert "memorisation" not in result.failed_checks  # memorisation does not gate by default
    # an auditor the caller brings applies to any backend, but 12 images are too few for a verdict
    label_fidelity = result.report["checks"]["label_fidelity"]
    assert label_fidelity["status"] == "info" and not label_fidelity["gating"] and "too few" in label_fidelity["reason"]
    assert result.passed
    assert all("memorisation" in r["qc_flags"].split("|") for r in manifest_rows(out))
    assert all(r["qc_status"] == "warn" for r in manifest_rows(out))
    assert not math.isnan(section["inception_score"])


@pytest.mark.slow
def test_a_copied_image_is_a_duplicate_and_look_alike_films_are_not(tmp_path):
    """With the shipped auditor's embedding (which maps same-label films close together), only the copy counts."""
    pytest.importorskip("torch")
    auditor_module = pytest.importorskip("synthmed.qc.auditor")
    if not (auditor_module.shipped_auditor_dir() / "model.safetensors").is_file():
        pytest.skip("no shipped auditor weights")
    out = tmp_path / "out"
    spec = Path(__file__).resolve().parents[2] / "dataset_specs" / "pneumonia.yaml"
    generate(spec, out, backend="phantom", limit=64, progress=False, qc=False)
    rows = manifest_rows(out)
    shutil.copyfile(out / rows[0]["png_path"], out / rows[1]["png_path"])
    section = qc(out, progress=False).report["sections"]["duplicates"]
    assert section["images"] == sorted([rows[0]["case_id"], rows[1]["case_id"]])
    assert section["embedding"]["similar_pairs"] > section["embedding"]["pairs"]  # look-alikes seen, not counted


def test_qc_keeps_the_record_of_every_file_it_rewrites(out):
    """After qc, every claim naming a file qc rewrote holds its new sha256 (else --overwrite would take it as
    changed by someone and leave it)."""
    from synthmed.ledger import Ledger, file_sha256

    result = qc(out, auditor=False, full=False)
    assert result.passed and result.not_written == ()
    ledger = Ledger(out, out / ".synthmed")
    rewritten = {"manifest.csv", "qc_report.json", "report.html", "images/train/metadata.csv",
                 "images/test/metadata.csv"}
    assert rewritten <= set(ledger.read("qc")["files"])
    stale = [(key, rel) for key in ledger.keys() for rel, sha in ledger.read(key)["files"].items()
             if rel in rewritten and sha != file_sha256(out / rel)]
    assert stale == []


# ----------------------------------------------------------------------------- real datasets as the reference

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")


def test_a_chexpert_folder_is_a_reference_in_its_own_layout(out, tmp_path):
    """#23: `qc OUT --reference chexpert/train.csv` was refused ("lists no images"): CheXpert's column is Path."""
    root = tmp_path / "chexpert"
    write_chexpert(root, out, lambda n, row: {"No Finding": "1.0"})
    for reference in (root / "CheXpert-v1.0-small" / "train.csv", root / "CheXpert-v1.0-small"):
        result = qc(out, reference=reference, feature_extractor=ThumbFeatures(), auditor=False, write=False)
        ref = result.report["sections"]["reference"]
        assert ref["status"] == "done" and ref["fid"] == pytest.approx(0.0, abs=1e-6), reference
    cli = run("qc", out, "-q", "--no-auditor", "--reference", root / "CheXpert-v1.0-small" / "train.csv",
              "--features", f"{__name__}:ThumbFeatures")
    assert cli.exit_code == 0, cli.output
    # a model fine-tuned on that folder: its training set for the memorisation audit is the folder as it comes
    result = qc(out, training_manifest=root / "CheXpert-v1.0-small", feature_extractor=ThumbFeatures(),
                auditor=False, write=False)
    memo = result.report["sections"]["memorisation"]
    assert set(memo.get("flagged", [])) == {row["case_id"] for row in manifest_rows(out)}, memo  # copies, all found


def test_a_monochrome1_reference_reads_as_a_viewer_shows_it(out, tmp_path):
    """#23: QC's reference reader ignored MONOCHROME1 (inverted storage): the same film read as its negative."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from synthmed.qc.checks import decode_png

    folder = tmp_path / "mono1"
    folder.mkdir()
    lines = ["path"]
    for n, row in enumerate(manifest_rows(out)):
        pixels, depth = decode_png((out / row["png_path"]).read_bytes())
        full = (1 << depth) - 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "OT", "MONOCHROME1", 1
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = ds.BitsStored = 8 if depth == 8 else 16
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        dtype = np.uint8 if depth == 8 else np.uint16
        ds.PixelData = (full - pixels.astype(np.int64)).astype(dtype).tobytes()  # stored inverted
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
        lines.append(f"{n}.dcm")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    result = qc(out, reference=folder / "manifest.csv", feature_extractor=ThumbFeatures(), auditor=False, write=False)
    assert result.report["sections"]["reference"]["fid"] == pytest.approx(0.0, abs=1e-4)
    assert result.report["sections"]["intensity"]["status"] == "pass"


# ----------------------------------------------------------------------------- per-finding figures against a reference

def write_chexpert(root: Path, out: Path, labels_of) -> Path:
    """A CheXpert-v1.0-small folder holding out's PNGs, each row labelled by ``labels_of(manifest row)``."""
    rows = []
    for n, row in enumerate(manifest_rows(out)):
        rel = f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_frontal.png"
        (root / rel).parent.mkdir(parents=True)
        shutil.copyfile(out / row["png_path"], root / rel)
        rows.append({"Path": rel, "Sex": "Female", "Age": "61", "Frontal/Lateral": "Frontal", "AP/PA": "PA",
                     **{label: "" for label in CHEXPERT_LABELS}, **labels_of(n, row)})
    with open(root / "CheXpert-v1.0-small" / "train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "CheXpert-v1.0-small" / "train.csv"


def finding_counts(out: Path) -> dict[str, int]:
    from collections import Counter

    from synthmed.qc.inputs import finding_ids

    return dict(Counter(f for row in manifest_rows(out) for f in finding_ids(row["findings"])))


def test_per_finding_figures_against_a_labelled_manifest(out, tmp_path, monkeypatch):
    """#23 item 5: the set-level figures per finding, between the images of each finding on either side."""
    import synthmed.qc.reference_metrics as reference_metrics

    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    counts = finding_counts(out)
    assert set(counts) == {"no_finding", "pneumonia"} and min(counts.values()) >= 3
    # at the shipped minimum (20 a side), a 12-image set is too small for any finding: each is listed with why
    result = qc(out, reference=reference / "manifest.csv", feature_extractor=ThumbFeatures(), auditor=False, write=False)
    ref = result.report["sections"]["reference"]
    per = ref["per_finding"]
    assert per["status"] == "done" and per["min_images"] == 20 and per["findings"] == {}
    assert per["labels"] == "the manifest's findings column"
    assert per["skipped"] == {f: f"{n} generated and {n} reference images; at least 20 of each are needed"
                              for f, n in counts.items()}
    # with a lower minimum each finding is compared, and the same images give 0
    monkeypatch.setattr(reference_metrics, "MIN_IMAGES_PER_FINDING", 3)
    result = qc(out, reference=reference / "manifest.csv", feature_extractor=ThumbFeatures(), auditor=False)
    ref = result.report["sections"]["reference"]
    assert ref["fid"] == pytest.approx(0.0, abs=1e-6) and ref["n_generated"] == COUNT  # the set-level figures stay
    per = ref["per_finding"]
    assert list(per["findings"]) == ["no_finding", "pneumonia"] and per["skipped"] == {}  # the vocabulary's order
    for finding, n in counts.items():
        figures = per["findings"][finding]
        assert (figures["n_generated"], figures["n_reference"]) == (n, n)
        assert figures["fid"] == pytest.approx(0.0, abs=1e-4) and figures["precision"] == 1.0
    assert report_of(out)["sections"]["reference"]["per_finding"] == per
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Against the reference set, per finding" in html and "<code>pneumonia</code>" in html
    # a reference without labels: the set-level figures only, and why
    paths = tmp_path / "paths.csv"
    paths.write_text("png_path\n" + "".join(f"reference/{row['png_path']}\n" for row in manifest_rows(out)))
    ref = qc(out, reference=paths, feature_extractor=ThumbFeatures(), auditor=False, write=False).report["sections"]["reference"]
    assert ref["status"] == "done" and ref["per_finding"] == {
        "status": "skipped", "reason": "the reference has no labels (the manifest has no findings column)"}


def test_per_finding_figures_against_a_chexpert_folder_follow_the_uncertain_policy(out, tmp_path, monkeypatch):
    """CheXpert's labels in synthmed's vocabulary; an uncertain Pneumonia (-1) is in neither group under U-Ignore
    and counts under U-Ones (--reference-uncertain positive); findings only the reference has are listed."""
    import synthmed.qc.reference_metrics as reference_metrics
    from synthmed.qc.inputs import finding_ids

    monkeypatch.setattr(reference_metrics, "MIN_IMAGES_PER_FINDING", 3)
    counts = finding_counts(out)
    first = next(n for n, row in enumerate(manifest_rows(out)) if "pneumonia" in finding_ids(row["findings"]))

    def labels_of(n, row):
        if "pneumonia" not in finding_ids(row["findings"]):
            return {"No Finding": "1.0"}
        return {"Pneumonia": "-1.0", "Fracture": "1.0"} if n == first else {"Pneumonia": "1.0"}

    train_csv = write_chexpert(tmp_path / "chexpert", out, labels_of)
    result = qc(out, reference=train_csv, feature_extractor=ThumbFeatures(), auditor=False, write=False)
    per = result.report["sections"]["reference"]["per_finding"]
    assert per["labels"] == "the chexpert labels in synthmed's vocabulary (uncertain labels: ignore)"
    assert per["findings"]["pneumonia"]["n_reference"] == counts["pneumonia"] - 1
    assert per["findings"]["no_finding"]["fid"] == pytest.approx(0.0, abs=1e-4)
    assert per["reference_only"] == ["fracture"]
    cli = run("qc", out, "-q", "--no-auditor", "--reference", train_csv, "--reference-uncertain", "positive",
              "--features", f"{__name__}:ThumbFeatures")
    assert cli.exit_code == 0, cli.output
    per = report_of(out)["sections"]["reference"]["per_finding"]
    assert per["labels"].endswith("(uncertain labels: positive)")
    assert per["findings"]["pneumonia"]["n_reference"] == counts["pneumonia"]
    assert per["findings"]["pneumonia"]["fid"] == pytest.approx(0.0, abs=1e-4)


def test_a_finding_counts_under_the_finding_above_it(out, tmp_path, monkeypatch):
    """NIH's Nodule is synthmed's nodule, CheXpert's Lung Lesion its parent: a nodule film is compared under both."""
    import synthmed.qc.reference_metrics as reference_metrics

    monkeypatch.setattr(reference_metrics, "MIN_IMAGES_PER_FINDING", 3)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    rows = manifest_rows(reference)
    for row in rows:
        row["findings"] = "nodule::" if "pneumonia" in row["findings"] else row["findings"]
    with open(reference / "relabelled.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    per = qc(out, reference=reference / "relabelled.csv", feature_extractor=ThumbFeatures(), auditor=False,
             write=False).report["sections"]["reference"]["per_finding"]
    assert "pneumonia" in per["skipped"] and per["skipped"]["pneumonia"].endswith("and 0 reference images; at least "
                                                                                  "3 of each are needed")
    assert per["reference_only"] == ["lung_lesion", "nodule"]
