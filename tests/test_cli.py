"""The `synthmed` command: validate and plan."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from synthmed import build_prompt, load_spec, sample_cases
from synthmed.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "dataset_specs" / "pneumonia.yaml"
SHIPPED = sorted((ROOT / "dataset_specs").glob("*.yaml"))

CHEXPERT = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]

BAD = textwrap.dedent("""\
    spec_version: 1
    name: ../x
    count: 0
    findings:
      - {finding: pnuemonia, weight: 1}
    """)

PROBLEM_LINE = re.compile(r"^\s*(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<path>\S+): (?P<msg>.+)$")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def bad_spec(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD, encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- validate

def test_there_are_shipped_specs():
    assert EXAMPLE in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_validate_shipped_spec(path):
    result = run("validate", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {path}: '")
    assert "Traceback" not in result.output


def test_validate_all_shipped_specs_at_once():
    result = run("validate", *SHIPPED)
    assert result.exit_code == 0, result.output
    assert [line.split(": ")[1] for line in result.stdout.splitlines()] == [str(p) for p in SHIPPED]


def test_validate_example_summary():
    result = run("validate", EXAMPLE)
    spec = load_spec(EXAMPLE)
    assert result.stdout.strip() == (f"ok: {EXAMPLE}: 'pneumonia-balanced', 1,000 cases, 3 finding entries, "
                                     f"spec sha256 {spec.spec_hash[:12]}")
    assert result.stderr == ""


def test_validate_quiet_prints_nothing_for_a_good_spec():
    result = run("validate", "-q", EXAMPLE)
    assert (result.exit_code, result.stdout) == (0, "")


def test_validate_bad_spec_exits_2_with_located_problems(bad_spec):
    result = run("validate", bad_spec)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stdout == ""
    err = result.stderr.splitlines()
    assert err[0] == f"{bad_spec}: 3 problems in this spec"
    matches = [PROBLEM_LINE.match(line) for line in err[1:4]]
    assert all(matches), err
    assert [(m["file"], int(m["line"]), int(m["col"]), m["path"]) for m in matches] == [
        (str(bad_spec), 2, 7, "name"), (str(bad_spec), 3, 8, "count"), (str(bad_spec), 5, 15, "findings[0].finding")]
    assert "did you mean 'pneumonia'?" in matches[2]["msg"]
    assert err[-1] == "1 of 1 spec failed validation"


def test_validate_several_specs_one_bad(bad_spec):
    result = run("validate", EXAMPLE, bad_spec)
    assert result.exit_code == 2
    assert f"ok: {EXAMPLE}:" in result.stdout
    assert f"{bad_spec}:3:8: count: must be at least 1" in result.stderr
    assert "1 of 2 specs failed validation" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content, phrase", [
    (b"a: 1\n\x00", "binary file"),
    ("name: caf\xe9\n".encode("latin-1"), ":1:10: <root>: not UTF-8"),
    (b"", "the spec is empty"),
    (b"spec_version: 1\nspec_version: 1\n", ":2:1: spec_version: duplicate key"),
], ids=["binary", "latin-1", "empty", "duplicate-key"])
def test_validate_unreadable_files_exit_2_without_traceback(tmp_path, content, phrase):
    p = tmp_path / "x.yaml"
    p.write_bytes(content)
    result = run("validate", p)
    assert result.exit_code == 2
    assert phrase in result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_missing_file_and_directory_exit_2(tmp_path):
    for target in (tmp_path / "nope.yaml", tmp_path):
        result = run("validate", target)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert str(target) in result.output


def test_validate_needs_an_argument():
    result = run("validate")
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_validate_prints_warnings_and_passes(tmp_path):
    p = tmp_path / "warn.yaml"
    p.write_text(EXAMPLE.read_text(encoding="utf-8").replace("test: 0.1}", "test: 0.05}"), encoding="utf-8")
    result = run("validate", p)
    assert result.exit_code == 0, result.output
    assert f"{p}:8:9: warning: splits: weights sum to 0.95" in result.stderr


# ----------------------------------------------------------------------------- help and version

@pytest.mark.parametrize("args, phrase", [((), "validate"), (("validate",), "SPECS..."), (("plan",), "SPEC")],
                         ids=["main", "validate", "plan"])
def test_help(args, phrase):
    result = run(*args, "--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage:")
    assert phrase in result.output


def test_main_help_lists_commands():
    out = run("-h").output
    assert "validate" in out and "plan" in out


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.output


# ----------------------------------------------------------------------------- plan

def test_plan_prints_table_total_and_first_prompts():
    result = run("plan", EXAMPLE, "--show", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    spec = load_spec(EXAMPLE)
    assert out[0] == f"pneumonia-balanced  ({EXAMPLE})"
    header = next(line for line in out if line.startswith("finding"))
    assert header.split() == ["finding", "location", "severity", "train", "val", "test", "total", "target"]
    total = [line for line in out if line.startswith("total")]
    assert len(total) == 1 and total[0].split() == ["total", "800", "100", "100", "1000"]
    assert any(line.split()[:3] == ["no_finding", "-", "-"] and line.split()[-2:] == ["400", "400.00"] for line in out)
    i = out.index("first prompts (template synthmed-v1):")
    cases = sample_cases(spec, limit=3)
    expected = [f"  {c.case_id}  {build_prompt(c, spec.prompt).text}" for c in cases]
    assert out[i + 1:i + 4] == expected
    assert out[i + 4] == "  negative: text, letters, watermark"


def test_plan_bad_spec_exits_2(bad_spec):
    result = run("plan", bad_spec)
    assert result.exit_code == 2
    assert f"{bad_spec}:5:15: findings[0].finding: unknown finding 'pnuemonia'" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_plan_jsonl(tmp_path):
    out = tmp_path / "sub" / "cases.jsonl"
    result = run("plan", EXAMPLE, "-o", out, "--show", "0")
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == load_spec(EXAMPLE).count == 1000
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(1000))
    assert len({r["case_id"] for r in records}) == 1000
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert sum(r["split"] == "train" for r in records) == 800
    assert sum(r["findings"][0]["finding"] == "no_finding" for r in records) == 400
    first = records[0]
    assert set(first) >= {"case_id", "split", "seed", "findings", "patient", "view"}
    assert set(first["findings"][0]) >= {"finding", "location", "severity", "codes"}
    assert f"wrote 1,000 cases to {out}" in result.stdout


def test_plan_csv_file_has_chexpert_columns(tmp_path):
    out = tmp_path / "cases.csv"
    result = run("plan", EXAMPLE, "-o", out, "--show", "0")
    assert result.exit_code == 0, result.output
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert len(body) == 1000
    start = header.index("No Finding")
    assert header[start:start + 14] == CHEXPERT
    assert sum(h in CHEXPERT for h in header) == 14
    assert {"case_id", "split", "prompt"} <= set(header)
    records = [dict(zip(header, r)) for r in body]
    assert sum(r["No Finding"] == "1" for r in records) == 400
    assert sum(r["Pneumonia"] == "1" for r in records) == 400
    assert sum(r["Pleural Effusion"] == "1" and r["Cardiomegaly"] == "1" for r in records) == 200
    assert all(r["No Finding"] in ("0", "1") for r in records)


def test_plan_csv_to_stdout():
    result = run("plan", EXAMPLE, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["finding", "location", "severity", "train", "val", "test", "total", "target"]
    assert sum(int(r["total"]) for r in rows) == 1000
    assert sum(int(r["train"]) for r in rows) == 800
    assert rows[0]["finding"] == "no_finding" and float(rows[0]["target"]) == 400.0
    assert len(rows) == 16


def test_plan_csv_with_output_keeps_stdout_pure_csv(tmp_path):
    out = tmp_path / "c.jsonl"
    result = run("plan", EXAMPLE, "--csv", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "finding,location,severity,train,val,test,total,target"
    assert "wrote" not in result.stdout and "wrote 1,000 cases" in result.stderr


def test_plan_replaces_an_existing_file_only_with_overwrite_and_never_in_a_dataset(tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text("my notes\n", encoding="utf-8")
    result = run("plan", EXAMPLE, "-o", out, "--show", "0")
    assert result.exit_code == 2 and "pass --overwrite" in result.output, result.output
    assert out.read_text(encoding="utf-8") == "my notes\n"
    assert run("plan", EXAMPLE, "-o", out, "--show", "0", "--overwrite").exit_code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1000
    from synthmed.ledger import Ledger

    dataset = tmp_path / "dataset"
    Ledger(dataset, dataset / ".synthmed").claim("run", ["cases.jsonl"])  # as generate records its files
    (dataset / "cases.jsonl").write_text("the dataset's cases\n", encoding="utf-8")
    for target in (dataset / "cases.jsonl", dataset / "plans" / "new.jsonl"):
        result = run("plan", EXAMPLE, "-o", target, "--show", "0", "--overwrite")
        assert result.exit_code == 2 and "holds a dataset that synthmed generate wrote" in result.output, result.output
    assert (dataset / "cases.jsonl").read_text(encoding="utf-8") == "the dataset's cases\n"
    assert not (dataset / "plans").exists()


def test_plan_names_a_killed_plans_temp_file_and_leaves_it(tmp_path):
    """A plan killed mid-write leaves its hidden temp file; the next plan names it (with its size) for the user to
    remove, and removes nothing itself: no ledger recorded it."""
    out = tmp_path / "cases.jsonl"
    leftover = tmp_path / ".cases.jsonl.999999999-0a1b2c3d.tmp"  # no such pid runs
    leftover.write_bytes(b"x" * 2048)
    mine = tmp_path / ".cases.jsonl.notes.tmp"  # not the pattern: not mentioned
    mine.write_bytes(b"mine")
    result = run("plan", EXAMPLE, "-o", out, "--show", "0")
    assert result.exit_code == 0, result.output
    assert f"{leftover} (2,048 bytes) is the temp file of an interrupted plan" in result.output, result.output
    assert str(mine) not in result.output
    assert leftover.read_bytes() == b"x" * 2048 and mine.read_bytes() == b"mine"


@pytest.mark.parametrize("name", ["x.txt", "x.json", "x"])
def test_plan_bad_output_extension(tmp_path, name):
    out = tmp_path / name
    result = run("plan", EXAMPLE, "-o", out)
    assert result.exit_code == 2
    assert "must end in .jsonl or .csv" in result.output
    assert not out.exists()
    assert "Traceback" not in result.output


def test_plan_limit_is_a_prefix_of_the_full_plan(tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    assert run("plan", EXAMPLE, "-o", full, "--show", "0").exit_code == 0
    result = run("plan", EXAMPLE, "-o", part, "--limit", "5", "--show", "0")
    assert result.exit_code == 0, result.output
    part_lines = part.read_text(encoding="utf-8").splitlines()
    assert len(part_lines) == 5
    assert part_lines == full.read_text(encoding="utf-8").splitlines()[:5]


def test_plan_limit_must_be_positive():
    result = run("plan", EXAMPLE, "--limit", "0")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- processes

def test_import_does_not_load_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import synthmed"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "synthmed" in proc.stderr
    modules = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not [m for m in modules if m.split(".")[0] in ("torch", "diffusers")]
    assert "torch" not in proc.stderr


def test_cli_import_does_not_load_torch():
    proc = subprocess.run([sys.executable, "-c", "import synthmed.cli, sys; assert 'torch' not in sys.modules"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_console_script_validate():
    exe = shutil.which("synthmed")
    cmd = [exe] if exe else [sys.executable, "-m", "synthmed.cli"]
    proc = subprocess.run([*cmd, "validate", "dataset_specs/pneumonia.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: dataset_specs/pneumonia.yaml: 'pneumonia-balanced'")


def test_module_entry_point_reports_bad_spec_without_traceback(bad_spec):
    proc = subprocess.run([sys.executable, "-m", "synthmed.cli", "validate", str(bad_spec)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad_spec}:3:8: count:" in proc.stderr


# ---- the process's malloc tuning: applied by the command, never over the user's own settings

_MALLOC_PROBE = """
import ctypes, sys
from synthmed import cli
applied = cli._keep_freed_memory()
# glibc's mallinfo2 has no field for the mmap limit; a 64 MiB buffer freed and taken again shows it: with the
# limit at 0 it comes from the heap (hblkhd, the bytes in mmapped blocks, stays 0) instead of its own mmap
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.mallinfo2.restype = MallInfo2
p = libc.malloc(64 << 20)
print(applied, libc.mallinfo2().hblkhd >= 64 << 20)
libc.free(ctypes.c_void_p(p))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("user_env, expected", [({}, "True False"), ({"MALLOC_MMAP_MAX_": "65536"}, "False True"),
                                                ({"MALLOC_ARENA_MAX": "2"}, "False True"),
                                                ({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "False True")])
def test_commands_keep_freed_memory_unless_the_user_chose_malloc_settings(user_env, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], env={**env, **user_env}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert " ".join(out) == expected


def test_diffusion_options_on_another_backend_are_refused_before_anything_is_written(tmp_path):
    """Else they are recorded in the run and only block its --resume later."""
    out = tmp_path / "out"
    for args in (["--model", "nowhere"], ["--steps", "3", "--device", "cuda"], ["--dtype", "float32"]):
        result = run("generate", EXAMPLE, "-o", out, "--backend", "pattern", "--limit", "2", "-q", *args)
        assert result.exit_code == 2 and "diffusion backend only" in result.output, result.output
        assert args[0] in result.output and not out.exists()
    assert run("generate", EXAMPLE, "-o", out, "--backend", "pattern", "--limit", "2", "-q",
               "--batch-size", "2").exit_code == 0
