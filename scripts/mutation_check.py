"""Mutation check: put one small, plausible bug at a time into a core module and see the relevant tests fail.

Each mutant is one or more exact text replacements in one file, with the test files (or test ids) that
should catch it. The check runs on a copy of the repository in a temporary folder (never on the working
tree), imports the copy's synthmed (PYTHONPATH, checked before anything runs), runs the selected tests
once unmutated (the baseline: if they fail there, nothing is measured), then each mutant with
``pytest -x -q``, restoring the file after each. A mutant is killed when its tests fail.

    .venv/bin/python scripts/mutation_check.py                 # every mutant (a few minutes)
    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py --only lr-smallest-remainder --only qc-verdict-per-image-only

A replacement whose text is not found exactly once stops the check before the baseline, naming the
mutant: when the code changes, the mutant must be updated, not silently skipped.

Exit code: 0 every mutant killed, 1 some survived, 2 the check could not run (a target text not found,
the copy not imported, the baseline failing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = (".venv", ".git", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info", "out",
               "dist", ".benchmarks", ".whl")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str                              # relative to the repository root
    edits: tuple[tuple[str, str], ...]     # (exact old text, found once; new text)
    tests: tuple[str, ...]                 # pytest arguments: files or test ids
    bug: str                               # what a user would see


SAMPLER_TESTS = ("tests/test_sampler.py",)
ATOMIC_TESTS = ("tests/test_atomic.py", "tests/writers/test_manifest.py")
SPEC_TESTS = ("tests/test_spec.py",)
PROMPT_TESTS = ("tests/test_prompts.py", "tests/test_vocabulary.py")
QC_TESTS = ("tests/qc/test_qc_cli.py",)
MANIFEST_TESTS = ("tests/writers/test_manifest.py", "tests/test_data.py")
BUILD_TESTS = ("tests/test_build.py", "tests/writers/test_png.py")
RESUME_LABEL_TESTS = tuple("tests/hostile/test_generate.py::" + t for t in (
    "test_an_edited_label_in_a_part_does_not_reach_the_manifest",
    "test_resume_without_run_record_and_a_changed_spec_remakes_every_image"))
HOSTILE_TEMP_TESTS = tuple("tests/hostile/test_generate.py::" + t for t in (
    "test_a_link_at_a_temp_name_is_never_written_through",))
HOSTILE_CHANGED_TESTS = tuple("tests/hostile/test_generate.py::" + t for t in (
    "test_resume_does_not_overwrite_a_file_the_user_changed",))
HOSTILE_LINK_TESTS = tuple("tests/hostile/test_generate.py::" + t for t in (
    "test_overwrite_never_deletes_through_a_linked_folder_named_in_a_claim",))
PART_PATH_TESTS = tuple("tests/hostile/test_generate.py::" + t for t in (
    "test_a_part_naming_a_file_outside_the_folder_is_not_kept",
    "test_adopting_an_old_run_never_takes_a_file_outside_the_folder"))

LR_KEY = "order = sorted(range(len(probs)), key=lambda j: (-(targets[j] - counts[j]), j))"

MUTANTS = (
    # ------------------------------------------------------------------ sampler.py
    Mutant("lr-smallest-remainder", "synthmed/sampler.py",
           ((LR_KEY, LR_KEY.replace("(-(targets[j] - counts[j]), j)", "((targets[j] - counts[j]), j)")),),
           SAMPLER_TESTS, "largest_remainder gives the leftover units to the smallest remainders"),
    Mutant("lr-ties-to-later", "synthmed/sampler.py",
           ((LR_KEY, LR_KEY.replace("counts[j]), j))", "counts[j]), -j))")),),
           SAMPLER_TESTS, "largest_remainder breaks ties in favour of the later choice"),
    Mutant("lr-rounds-instead-of-floors", "synthmed/sampler.py",
           (("\n    targets = [total * p for p in probs]\n    counts = [int(t) for t in targets]\n",
             "\n    targets = [total * p for p in probs]\n    counts = [round(t) for t in targets]\n"),),
           SAMPLER_TESTS, "rounded targets: the counts no longer sum to the total"),
    Mutant("case-seed-64-bit", "synthmed/sampler.py",
           (("<< np.uint64(32))) & np.uint64(2**63 - 1)", "<< np.uint64(32))) & np.uint64(2**64 - 1)"),),
           SAMPLER_TESTS, "case seeds keep the top bit (not the documented 63-bit rule)"),
    Mutant("uniform-age-misses-max", "synthmed/sampler.py",
           (("np.floor(u * (age.max - age.min + 1)), age.max)", "np.floor(u * (age.max - age.min)), age.max)"),),
           SAMPLER_TESTS, "uniform ages never reach max"),
    # ------------------------------------------------------------------ atomic.py
    Mutant("atomic-bytes-straight-to-final", "synthmed/atomic.py",
           (('    tmp, fh = open_temp(path)\n    try:\n        with fh:\n            fh.write(data)\n'
             '            commit_temp(tmp, path, fh)\n    except BaseException:\n'
             '        tmp.unlink(missing_ok=True)  # ours: open_temp made it\n        raise\n',
             "    path.write_bytes(data)\n"),),
           ATOMIC_TESTS, "atomic_write_bytes writes straight to the final name"),
    Mutant("atomic-bytes-temp-is-final", "synthmed/atomic.py",
           (('    tmp, fh = open_temp(path)\n    try:\n        with fh:\n            fh.write(data)',
             '    tmp, fh = path, open(path, "wb")\n    try:\n        with fh:\n            fh.write(data)'),),
           ATOMIC_TESTS, "atomic_write_bytes uses the final name as its temp name"),
    Mutant("atomic-lines-leaves-temp", "synthmed/atomic.py",
           (('                fh.write("\\n")\n            commit_temp(tmp, path, fh)\n    except BaseException:\n'
             '        tmp.unlink(missing_ok=True)  # ours: open_temp made it\n        raise\n',
             '                fh.write("\\n")\n            commit_temp(tmp, path, fh)\n    except BaseException:\n'
             '        raise\n'),),
           ATOMIC_TESTS, "a failed atomic_write_text_lines leaves its temp file behind"),
    Mutant("atomic-temp-follows-links", "synthmed/atomic.py",
           (("flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, \"O_NOFOLLOW\", 0)",
             "flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC"),),
           HOSTILE_TEMP_TESTS, "a temp file is opened through a planted link, or over a user's file"),
    # ------------------------------------------------------------------ ledger.py
    Mutant("ledger-changed-files-are-ours", "synthmed/ledger.py",
           (("            if changed and not repair:", "            if False:"),),
           HOSTILE_CHANGED_TESTS, "--resume overwrites a recorded file whose bytes someone changed"),
    Mutant("ledger-follows-linked-folders", "synthmed/ledger.py",
           (("            if path.parent.resolve().is_relative_to(self.root.resolve()):", "            if True:"),),
           HOSTILE_LINK_TESTS, "a claim naming a path through a linked folder lets --overwrite delete outside OUT"),
    # ------------------------------------------------------------------ spec.py
    Mutant("spec-hash-key-order", "synthmed/spec.py",
           (("canonical = json.dumps(d, sort_keys=True,", "canonical = json.dumps(d, sort_keys=False,"),),
           SPEC_TESTS, "the spec hash depends on key order"),
    Mutant("spec-hash-other-canonical-form", "synthmed/spec.py",
           (('canonical = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))',
             'canonical = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))'),),
           SPEC_TESTS, "every spec hash changes (every built folder's resume breaks)"),
    Mutant("spec-weights-sum-warning-narrowed", "synthmed/spec.py",
           (("if out and not single and len(out) > 1 and 0.9 < total < 1.1",
             "if out and not single and len(out) > 1 and 0.96 < total < 1.1"),),
           SPEC_TESTS, "weights summing to 0.95 are normalised without a warning"),
    # ------------------------------------------------------------------ prompts.py, vocabulary
    Mutant("prompt-severity-prefix-skipped", "synthmed/prompts.py",
           (("        if severity is None:\n            for sev, rest in _prefixes(",
             "        if severity is not None:\n            for sev, rest in _prefixes("),),
           PROMPT_TESTS, "'[finding: moderate pneumonia]' loses its severity"),
    Mutant("prompt-text-outside-tags-ignored", "synthmed/prompts.py",
           (('    leftover = _TAG.sub("", text).strip()\n', '    leftover = ""\n'),),
           PROMPT_TESTS, "text outside [key: value] tags is silently dropped"),
    Mutant("vocab-bare-right-means-left", "schemas/vocabulary.yaml",
           (("zh: [右侧, 右肺, 右]}", "zh: [右侧, 右肺]}"), ("zh: [左侧, 左肺, 左]}", "zh: [左侧, 左肺, 左, 右]}")),
           PROMPT_TESTS, "bare 右 (right) is moved into left's Chinese synonyms"),
    Mutant("vocab-no-width-folding", "synthmed/vocabulary.py",
           (('text = unicodedata.normalize("NFKC", str(text))', 'text = unicodedata.normalize("NFC", str(text))'),),
           PROMPT_TESTS, "full-width letters and digits (２级, ＰＴＸ) no longer resolve"),
    Mutant("vocab-hyphen-not-a-separator", "synthmed/vocabulary.py",
           ((r'return re.sub(r"[\s_\-]+", " ", text)', r'return re.sub(r"[\s_]+", " ", text)'),),
           PROMPT_TESTS, "'Right-Lower_Lobe' no longer resolves"),
    # ------------------------------------------------------------------ qc verdicts
    Mutant("qc-verdict-per-image-only", "synthmed/qc/run.py",
           (('failed_gates = tuple(name for name, c in checks.items() if c["gating"] and c["status"] == "fail")',
             'failed_gates = tuple(name for name, c in checks.items() if c["gating"] and c["status"] == "fail"'
             ' and name in PER_IMAGE_CHECKS)'),),
           QC_TESTS, "a gated set-level check (dciodvfy, spec_fidelity, duplicates) never fails a run"),
    Mutant("qc-any-flag-fails-an-image", "synthmed/qc/run.py",
           (('statuses = {r.case_id: ("fail" if any(f in gate for f in r.flags) else',
             'statuses = {r.case_id: ("fail" if r.flags else'),),
           QC_TESTS, "an image flagged only by a non-gating check is marked fail, not warn"),
    Mutant("qc-spec-fidelity-best-score", "synthmed/qc/spec_fidelity.py",
           (("    overall = min(scores)\n", "    overall = max(scores)\n"),),
           QC_TESTS, "spec fidelity reports the best attribute instead of the worst"),
    Mutant("qc-png-sha256-unchecked", "synthmed/qc/checks.py",
           (('if row.get("png_sha256") and _sha256(data) != row["png_sha256"]:',
             'if row.get("png_sha256") and _sha256(data) != row["png_sha256"] and False:'),),
           QC_TESTS, "a PNG changed after the build passes qc"),
    # ------------------------------------------------------------------ writers/manifest.py
    Mutant("manifest-merge-keeps-extra-rows", "synthmed/writers/manifest.py",
           (("            for row in read_part(path)[:n]:\n", "            for row in read_part(path):\n"),),
           MANIFEST_TESTS, "merged manifests keep rows beyond each part's count"),
    Mutant("manifest-line-keeps-cr", "synthmed/writers/manifest.py",
           (("        line = self.buf.getvalue()[:-2]\n", "        line = self.buf.getvalue()[:-1]\n"),),
           MANIFEST_TESTS, "every manifest line ends in a stray \\r (CRLF in a file written with LF)"),
    Mutant("metadata-file-name-not-relative", "synthmed/writers/manifest.py",
           (('"file_name": os.path.basename(row["png_path"])', '"file_name": row["png_path"]'),),
           MANIFEST_TESTS + ("tests/test_build.py",), "imagefolder's metadata.csv names files it cannot find"),
    # ------------------------------------------------------------------ build/: resume and parts
    Mutant("resume-trusts-existing-files", "synthmed/build/chunks.py",
           (("file_sha256(out / rel) != digest", "file_sha256(out / rel) is None"),),
           BUILD_TESTS, "--resume keeps a corrupted image because the file exists"),
    Mutant("resume-trusts-the-part-labels", "synthmed/build/chunks.py",
           (("if row != {**row, **_planned_labels(case, spec, vocab)}:", 'if row["case_id"] != case.case_id:'),),
           BUILD_TESTS + RESUME_LABEL_TESTS,
           "--resume keeps rows of another spec or with edited labels (#17.9) as long as the case ids match"),
    Mutant("part-paths-may-leave-the-folder", "synthmed/build/run_folder.py",
           (('return bool(rel) and not p.is_absolute() and ".." not in p.parts',
             "return bool(rel) and not p.is_absolute()"),),
           PART_PATH_TESTS,
           "a part naming ../ paths is kept on resume, or adopted as synthmed's files (which --overwrite removes)"),
    Mutant("png-8-bit-truncated", "synthmed/writers/png.py",
           (("return ((stored.astype(np.uint32) * 255 + 2047) // 4095).astype(np.uint8)",
             "return (stored >> 4).astype(np.uint8)"),),
           ("tests/writers/test_png.py",), "8-bit PNGs truncate the 12-bit values instead of rounding them"),
    Mutant("retry-seed-64-bit", "synthmed/build/chunks.py",
           (('return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2 ** 63 - 1)',
             'return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")'),),
           QC_TESTS, "regeneration seeds can exceed 63 bits"),
)


def copy_repository(dest: Path) -> Path:
    """The repository's files (no .venv, .git or caches) copied to ``dest``."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    return dest


def check_targets(repo: Path, mutants) -> list[str]:
    """Every replacement's text must occur exactly once in its file; the problems otherwise."""
    problems = []
    for m in mutants:
        path = repo / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        text = path.read_text(encoding="utf-8")
        for old, _ in m.edits:
            n = text.count(old)
            if n != 1:
                problems.append(f"{m.name}: {m.path}: the text to replace occurs {n} times (want 1): {old[:70]!r}")
        for t in m.tests:
            if not (repo / t.split("::")[0]).exists():
                problems.append(f"{m.name}: test file {t} does not exist")
    return problems


def environment(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(repo)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a same-size edit within the same second must not reuse a .pyc
    return env


def check_import(repo: Path, env: dict) -> str | None:
    """None when python in the copy imports the copy's synthmed (and its schemas); else what it imports."""
    code = ("import synthmed, synthmed.qc.run, synthmed.writers.manifest, synthmed.build\n"
            "from synthmed.vocabulary import schemas_dir\n"
            "for m in (synthmed, synthmed.qc.run, synthmed.writers.manifest, synthmed.build):\n"
            "    print(m.__file__)\n"
            "print(schemas_dir())\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return run.stderr.strip()[-2000:]
    paths = run.stdout.split()
    wrong = [p for p in paths if not Path(p).resolve().is_relative_to(repo.resolve())]
    return f"imported from outside the copy: {', '.join(wrong)}" if wrong else None


def run_tests(repo: Path, env: dict, tests, timeout: float) -> tuple[int | None, float, str]:
    """(pytest's exit code or None on timeout, seconds, the output's tail)."""
    shutil.rmtree(repo / ".hypothesis", ignore_errors=True)  # no examples saved by an earlier mutant
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pytest we started, and its children
        out, _ = proc.communicate()
        code = None
    return code, time.perf_counter() - started, out[-3000:]


def first_failure(output: str) -> str:
    """The first failing test pytest's summary names (``-ra``), or what stopped the run."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0].split(" ", 1)[1]
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutant (repeat)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per test run (default %(default)s)")
    args = parser.parse_args(argv)

    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            print(f"error: unknown mutant(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:36} {m.path:30} {m.bug}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="synthmed-mutants-"))
    try:
        repo = copy_repository(tmp / "repo")
        print(f"copy of {ROOT} in {repo}", flush=True)
        problems = check_targets(repo, mutants)
        if problems:
            print("error: the mutants do not match the code any more; update them:\n  " + "\n  ".join(problems),
                  file=sys.stderr)
            return 2
        env = environment(repo)
        wrong = check_import(repo, env)
        if wrong:
            print(f"error: the copy's synthmed is not what its tests import: {wrong}", file=sys.stderr)
            return 2
        selection = list(dict.fromkeys(t for m in mutants for t in m.tests))
        code, seconds, out = run_tests(repo, env, selection, args.timeout * 2)
        if code != 0:
            print(f"error: the tests fail on the UNMUTATED copy (exit code {code}), so no mutant can be judged; "
                  f"fix those first (a half-done edit in the tree?):\n{out}", file=sys.stderr)
            return 2
        print(f"baseline: {len(selection)} test files pass unmutated ({seconds:.0f} s)\n", flush=True)

        results = []
        print(f"{'mutant':36} {'file':28} {'result':9} {'s':>6}  first failing test", flush=True)
        for m in mutants:
            path = repo / m.path
            original = path.read_text(encoding="utf-8")
            mutated = original
            for old, new in m.edits:
                mutated = mutated.replace(old, new, 1)
            try:
                path.write_text(mutated, encoding="utf-8")
                code, seconds, out = run_tests(repo, env, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            if code == 5:
                print(f"error: {m.name}: no tests collected from {' '.join(m.tests)}", file=sys.stderr)
                return 2
            result = "survived" if code == 0 else "timeout" if code is None else "killed"
            results.append((m, result, seconds))
            print(f"{m.name:36} {m.path.removeprefix('synthmed/'):28} {result:9} {seconds:6.1f}  {first_failure(out)}",
                  flush=True)

        killed = sum(r != "survived" for _, r, _ in results)
        print(f"\nscore: {killed} of {len(results)} mutants killed ({100 * killed / len(results):.0f}%)")
        for m, r, _ in results:
            if r == "survived":
                print(f"  survived: {m.name}: {m.bug} ({m.path}; tests: {' '.join(m.tests)})")
        return 0 if killed == len(results) else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
