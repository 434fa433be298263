"""Benchmark planning a large dataset: load a spec, sample its cases, count them, write cases.jsonl.

Targets (per allocation, on 2 cores): plan 1,000,000 cases in <= 10 s with <= 1 GiB peak RSS.

Each allocation (exact, then random) runs in a fresh Python process, so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux) is its own and not the maximum
of everything run before it. The spec is read as YAML text with ``yaml.safe_load``, its
``count`` (and ``allocation``) set, and the dict passed to ``synthmed.load_spec`` (the mapping form).

Also times the per-case seeds two ways: a plain Python loop of
``np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(2)`` over 100,000 cases
(extrapolated to the full count), against ``synthmed.sampler.seed_sequence_state`` over all of them.

Usage:
    python benchmarks/bench_plan.py                       # pneumonia.yaml at 1,000,000 cases
    python benchmarks/bench_plan.py --count 200000 --spec dataset_specs/icu_multifinding.yaml

This is a script, not a test: it prints numbers and exits 0 unless something fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "dataset_specs" / "pneumonia.yaml"
TARGET_SECONDS = 10.0
TARGET_RSS_KIB = 1024 * 1024  # 1 GiB
SEED_LOOP_CASES = 100_000


def _peak_rss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB


def run_one(spec_path: Path, count: int, allocation: str) -> dict:
    """One timed plan in this process; returns the timings as a dict."""
    t_start = time.perf_counter()
    import yaml

    import synthmed
    from synthmed.sampler import sample_cases

    t_imported = time.perf_counter()
    data = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    data["count"] = count
    data["allocation"] = allocation
    t0 = time.perf_counter()
    spec = synthmed.load_spec(data, source=str(spec_path))
    t1 = time.perf_counter()
    cases = sample_cases(spec)
    t2 = time.perf_counter()
    rows = cases.counts()
    t3 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synthmed-bench-") as tmp:
        out = Path(tmp) / "cases.jsonl"
        cases.write_jsonl(out)
        t4 = time.perf_counter()
        size = out.stat().st_size
    assert len(cases) == count and sum(r["total"] for r in rows) == count
    return {"allocation": allocation, "count": count, "cells": len(rows), "import_s": t_imported - t_start,
            "load_s": t1 - t0, "sample_s": t2 - t1, "counts_s": t3 - t2, "write_s": t4 - t3,
            "jsonl_bytes": size, "total_s": t4 - t0, "peak_rss_kib": _peak_rss_kib()}


def seed_comparison(seed: int, count: int) -> dict:
    """Per-case seeds: a SeedSequence loop over a sample (extrapolated) vs the vectorised transcription."""
    import numpy as np

    from synthmed.sampler import seed_sequence_state

    n_loop = min(SEED_LOOP_CASES, count)
    t0 = time.perf_counter()
    looped = np.array([np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(2) for i in range(n_loop)],
                      dtype=np.uint32)
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vectorised = seed_sequence_state(seed, np.arange(count, dtype=np.uint64), 2)
    vec_s = time.perf_counter() - t0
    return {"seed": seed, "count": count, "loop_cases": n_loop, "loop_s": loop_s,
            "loop_extrapolated_s": loop_s * count / n_loop, "vectorised_s": vec_s,
            "identical": bool(np.array_equal(looped, vectorised[:n_loop]))}


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OVER TARGET"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="spec to plan (default: %(default)s)")
    parser.add_argument("--count", type=int, default=1_000_000, help="cases to plan (default: %(default)s)")
    parser.add_argument("--_worker", choices=["exact", "random"], help=argparse.SUPPRESS)
    parser.add_argument("--_seeds", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec_path = args.spec if args.spec.is_absolute() else (Path.cwd() / args.spec)

    if args._worker:
        print(json.dumps(run_one(spec_path, args.count, args._worker)))
        return 0
    import numpy as np
    import yaml

    seed = int(yaml.safe_load(spec_path.read_text(encoding="utf-8")).get("seed", 0))
    if args._seeds:
        print(json.dumps(seed_comparison(seed, args.count)))
        return 0

    print(f"machine: {platform.processor() or platform.machine()} | os.cpu_count() {os.cpu_count()} | "
          f"numpy {np.__version__} | python {platform.python_version()} | {platform.system()} {platform.release()}")
    print(f"spec: {spec_path} (count set to {args.count:,} via the mapping form)")
    print(f"targets: total <= {TARGET_SECONDS:g} s, peak RSS <= {TARGET_RSS_KIB / 1024 ** 2:g} GiB, on 2 cores")
    print("each allocation runs in a fresh process; total = load + sample_cases + counts + write_jsonl")
    print()
    results = []
    for allocation in ("exact", "random"):
        r = _child(["--spec", str(spec_path), "--count", str(args.count), "--_worker", allocation])
        results.append(r)
        print(f"allocation: {allocation}  ({r['count']:,} cases, {r['cells']} cells)")
        print(f"  import synthmed+yaml  {r['import_s']:8.3f} s   (not in total)")
        print(f"  load_spec             {r['load_s']:8.3f} s")
        print(f"  sample_cases          {r['sample_s']:8.3f} s")
        print(f"  CaseList.counts()     {r['counts_s']:8.3f} s")
        print(f"  write_jsonl           {r['write_s']:8.3f} s   cases.jsonl {r['jsonl_bytes'] / 1e6:,.1f} MB "
              f"({r['jsonl_bytes'] / r['count']:.0f} B/case)")
        print(f"  total                 {r['total_s']:8.3f} s   target <= {TARGET_SECONDS:g} s: "
              f"{_verdict(r['total_s'] <= TARGET_SECONDS)}")
        print(f"  peak RSS              {r['peak_rss_kib'] / 1024:8.1f} MiB target <= 1024 MiB: "
              f"{_verdict(r['peak_rss_kib'] <= TARGET_RSS_KIB)}")
        print()

    s = _child(["--spec", str(spec_path), "--count", str(args.count), "--_seeds"])
    print(f"per-case seeds (seed {s['seed']}, generate_state(2)), side by side:")
    print(f"  SeedSequence loop     {s['loop_s']:8.3f} s for {s['loop_cases']:,} cases"
          f" -> {s['loop_extrapolated_s']:8.3f} s extrapolated to {s['count']:,}")
    print(f"  seed_sequence_state   {s['vectorised_s']:8.3f} s for {s['count']:,} cases")
    ratio = s["loop_extrapolated_s"] / max(s["vectorised_s"], 1e-12)
    print(f"  ratio (loop / vectorised): {ratio:,.1f}x   identical on the first {s['loop_cases']:,}: {s['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
