"""The Ray executor on one machine: 2 Ray workers against 1, and the fixed cost of the Ray path.

Issue 9 item 5. One plan throughout: the first N cases (default 512) of dataset_specs/pneumonia.yaml
at 256x256, DICOM + PNG, with the phantom backend (the pattern backend if the phantom is not
installed). What is timed:

- local: ``generate(..., executor="local")``, the default executor, for reference;
- ray.init: starting a local Ray instance (once; a cluster that is already up does not pay it);
- fixed cost of the Ray path: a one-case build on Ray minus the same one-case build locally,
  i.e. dataset creation, actor start (a Ray worker process, its imports, the spec, the backend),
  scheduling and result collection, without ray.init;
- 1 and 2 Ray workers: the whole plan, timed end to end (wall), and as images/s with the fixed
  cost taken off (steady rate). speed-up = rate(2) / rate(1); efficiency = speed-up / 2.

Every build writes to a fresh folder; the Ray builds are checked byte for byte against the local
one (manifest.csv and every file's sha256). Rounds alternate the order of the two Ray runs.

    python benchmarks/bench_ray.py [--count 512] [--size 256] [--rounds 1] [--cpus 2]

A speed-up needs at least two idle cores: on a machine whose cores are busy with other work the
two workers share what is left, and the figures say so (the load average is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "dataset_specs" / "pneumonia.yaml"
TARGET_SPEEDUP = 1.8


def tree(out: Path) -> dict[str, str]:
    found = {}
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d != ".synthmed"]
        for name in files:
            found[(rel_root / name).as_posix()] = hashlib.sha256((Path(root) / name).read_bytes()).hexdigest()
    return found


def load_plan(count: int, size: int, backend: str):
    import yaml

    from synthmed.spec import load_spec

    doc = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
    doc["count"] = count
    doc["image"]["size"] = size
    doc["generator"]["backend"] = backend
    return load_spec(doc, source=f"{SPEC_FILE.name} (count {count}, {size}x{size}, {backend})")


def timed_build(spec, out: Path, **options) -> float:
    from synthmed.build import generate

    started = time.perf_counter()
    result = generate(spec, out, progress=False, **options)
    seconds = time.perf_counter() - started
    assert result.written == result.total and not result.interrupted, result
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the 1- and 2-worker runs (order alternates)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()

    try:
        import ray
    except ImportError:
        print("needs Ray: pip install 'synthmed[ray]'", file=sys.stderr)
        return 2
    backend = "phantom"
    try:
        import synthmed.backends.phantom  # noqa: F401
    except ImportError:
        backend = "pattern"
    spec = load_plan(args.count, args.size, backend)
    one_case = load_plan(1, args.size, backend)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    print(f"plan: {args.count} cases of {SPEC_FILE.name} at {args.size}x{args.size} (dicom+png), {backend} backend")
    print(f"machine: {platform.platform()}, python {platform.python_version()}, ray {ray.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    try:
        # 1. the local executor (no Ray anywhere yet)
        local_s = timed_build(spec, work / "local")
        local_one_s = timed_build(one_case, work / "local-one")
        # 2. ray.init, once
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        init_s = time.perf_counter() - started
        # 3. the fixed cost of the Ray path: dataset creation + actor start + collection
        ray_one_s = timed_build(one_case, work / "ray-one", executor="ray", workers=1)
        fixed_s = max(ray_one_s - local_one_s, 0.0)
        # 4. 1 worker against 2 on the whole plan, alternating the order
        wall: dict[int, list[float]] = {1: [], 2: []}
        reference = tree(work / "local")
        for r in range(args.rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                out = work / f"ray-{n}-{r}"
                wall[n].append(timed_build(spec, out, executor="ray", workers=n))
                assert tree(out) == reference, f"the {n}-worker Ray build differs from the local build"
                shutil.rmtree(out)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.count
    w1, w2 = statistics.median(wall[1]), statistics.median(wall[2])
    rate1, rate2 = n / max(w1 - fixed_s, 1e-9), n / max(w2 - fixed_s, 1e-9)
    speedup = rate2 / rate1
    print()
    print(f"{'run':<28}{'seconds':>9}{'images/s':>10}")
    print(f"{'local executor':<28}{local_s:>9.2f}{n / local_s:>10.1f}")
    print(f"{'ray, 1 worker (wall)':<28}{w1:>9.2f}{n / w1:>10.1f}")
    print(f"{'ray, 2 workers (wall)':<28}{w2:>9.2f}{n / w2:>10.1f}")
    print(f"{'ray, 1 worker (steady)':<28}{w1 - fixed_s:>9.2f}{rate1:>10.1f}")
    print(f"{'ray, 2 workers (steady)':<28}{w2 - fixed_s:>9.2f}{rate2:>10.1f}")
    print()
    print(f"speed-up 2 vs 1 worker (steady): {speedup:.2f}x, efficiency {speedup / 2:.0%} "
          f"(target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
          f"wall-clock speed-up {w1 / w2:.2f}x")
    print(f"fixed start-up cost of the Ray path: ray.init {init_s:.2f} s + dataset and actor start {fixed_s:.2f} s "
          f"= {init_s + fixed_s:.2f} s (one-case build: local {local_one_s:.2f} s, ray {ray_one_s:.2f} s)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "every Ray build matched the local build file for file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
