"""drr backend throughput through ``synthmed.generate`` (DICOM + PNG + masks), beside the phantom, one process.

The build computes images on the main thread while a writer thread encodes and writes the previous batch
(two threads). Cases follow dataset_specs/icu_drr.yaml (AP/PA, devices and co-occurring findings).
Set-up (loading the CT, projecting each view once per size) is timed apart and excluded from images/s; the
findings' per-view caches (the heart's growth, lung and lobe fields) fill during the timed run, as in a build.
Prints images/s at 256² and 512², peak RSS, and what dominates the drr per-case time (cProfile).
The issue's targets: >= 5 images/s at 256², >= 1 at 512², <= 2 GiB per process.

    python benchmarks/bench_drr.py [--count 60] [--no-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import yaml  # noqa: E402

import synthmed  # noqa: E402
from synthmed.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _spec(backend: str, size: int, count: int, seed: int = 7):
    raw = yaml.safe_load((ROOT / "dataset_specs" / "icu_drr.yaml").read_text(encoding="utf-8"))
    raw.update(count=count, seed=seed)
    raw["image"] = {"size": size, "formats": ["dicom", "png"]}
    raw["generator"] = {"backend": backend, "batch_size": 8}
    raw.setdefault("qc", {})["enabled"] = False
    return load_spec(yaml.safe_dump(raw))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run(backend: str, size: int, count: int, tmp: Path, profile: bool = False):
    t0 = time.perf_counter()
    synthmed.generate(_spec(backend, size, 4, seed=1), tmp / f"warm-{backend}-{size}", progress=False)
    setup = time.perf_counter() - t0
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    synthmed.generate(_spec(backend, size, count), tmp / f"{backend}-{size}", progress=False)
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    return count / dt, setup, _rss_mib(), prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    rows, profs = [], {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for size, count in ((256, args.count), (512, max(10, args.count // 3))):
            for backend in ("phantom", "drr"):
                prof = backend == "drr" and not args.no_profile
                ips, setup, rss, p = _run(backend, size, count, tmp, profile=prof)
                rows.append((backend, size, count, ips, setup, rss))
                if p:
                    profs[size] = p
                print(f"  {backend:8s} {size}²: {ips:5.2f} images/s ({count} images), set-up {setup:4.1f} s, "
                      f"peak RSS so far {rss:6.0f} MiB", flush=True)
    print("\nbackend  size  images/s  ms/image  set-up s  peak RSS MiB (process, cumulative)")
    for backend, size, count, ips, setup, rss in rows:
        print(f"{backend:8s} {size:4d}  {ips:8.2f}  {1000 / ips:8.1f}  {setup:8.1f}  {rss:10.0f}")
    for size, p in profs.items():
        print(f"\nwhat dominates drr at {size}² (cProfile, own time, top 14):")
        pstats.Stats(p).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
