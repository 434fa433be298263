"""The Ray executor on one machine: 2 Ray workers against 1, and the fixed cost of the Ray path.

Issue 9 item 5. One plan throughout: the first N cases (default 512) of dataset_specs/pneumonia.yaml
at 256x256, DICOM + PNG, with the phantom backend (the pattern backend if the phantom is not
installed), and the same spec with 2N cases. What is timed:

- local: ``generate(..., executor="local")``, the default executor, on N cases, for reference;
- ray.init: starting a local Ray instance (once; a cluster that is already up does not pay it);
- start-up of the Ray path: a one-case build on Ray minus the same one-case build locally,
  i.e. dataset creation, actor start (a Ray worker process, its imports, the spec, the backend),
  scheduling and result collection, without ray.init;
- 1 and 2 Ray workers on N and on 2N cases, timed end to end (wall). Each worker count's steady rate
  is N / (wall(2N) - wall(N)): the images the N extra cases add over the time they add, so every
  cost that does not grow with the plan (start-up, the last chunk's wait, the driver's tail) drops out;
  wall(N) - N / rate is that fixed part. speed-up = rate(2) / rate(1); efficiency = speed-up / 2.
- the machine's own ceiling, without Ray: one plain process building N cases with the local executor,
  against two such processes started together (after their imports); ceiling = 2 t(1) / t(2). No
  executor beats it on this machine, so the Ray speed-up is also given as a share of it.

Every build writes to a fresh folder; the Ray builds of N cases are checked byte for byte against
the local one (manifest.csv and every file's sha256). Rounds alternate the order of the runs; the
medians are reported.

    python benchmarks/bench_ray.py [--count 512] [--size 256] [--rounds 3] [--cpus 2]

A speed-up needs at least two idle cores: on a machine whose cores are busy with other work the
two workers share what is left, and the figures say so (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from synthmed.testing import output_digests

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "dataset_specs" / "pneumonia.yaml"
TARGET_SPEEDUP = 1.8


tree = output_digests  # relative path -> sha256 of every file under out, .synthmed/ left out


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


def side_by_side(processes: int, count: int, size: int, backend: str, work: Path) -> float:
    """Seconds for ``processes`` plain Python processes (no Ray), started together, to build ``count`` cases each
    with the local executor (each into its own folder); imports and a one-case warm-up are done before the start."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_ray as b; "
            "spec = b.load_plan(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]); "
            "b.timed_build(b.load_plan(1, int(sys.argv[3]), sys.argv[4]), b.Path(sys.argv[5] + '-warm')); "
            "print('ready', flush=True); sys.stdin.readline(); print(b.timed_build(spec, b.Path(sys.argv[5])), flush=True)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO / "benchmarks"), str(count), str(size), backend,
                               str(work / f"side-{processes}-{i}")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for i in range(processes)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.stdout.readline()
        assert proc.wait() == 0
    seconds = time.perf_counter() - started
    for i in range(processes):
        shutil.rmtree(work / f"side-{processes}-{i}")
        shutil.rmtree(work / f"side-{processes}-{i}-warm")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=512, help="N: the smaller plan (the larger one is 2N)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="repeat the Ray and plain-process runs (order alternates)")
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
    n = args.count
    plans = {n: load_plan(n, args.size, backend), 2 * n: load_plan(2 * n, args.size, backend)}
    one_case = load_plan(1, args.size, backend)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    print(f"plans: {n} and {2 * n} cases of {SPEC_FILE.name} at {args.size}x{args.size} (dicom+png), {backend} backend")
    print(f"machine: {platform.platform()}, python {platform.python_version()}, ray {ray.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    try:
        # 1. the local executor (no Ray anywhere yet)
        local_s = timed_build(plans[n], work / "local")
        local_one_s = timed_build(one_case, work / "local-one")
        # 2. ray.init, once
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        init_s = time.perf_counter() - started
        # 3. the start-up of the Ray path: dataset creation + actor start + collection
        ray_one_s = timed_build(one_case, work / "ray-one", executor="ray", workers=1)
        startup_s = max(ray_one_s - local_one_s, 0.0)
        # 4. 1 worker against 2 on both plans, alternating the order
        wall: dict[tuple[int, int], list[float]] = {(w, c): [] for w in (1, 2) for c in plans}
        reference = tree(work / "local")
        runs = list(wall)
        plain: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for processes in ((1, 2) if r % 2 == 0 else (2, 1)):  # the machine's own ceiling, sampled in each round
                plain[processes].append(side_by_side(processes, n, args.size, backend, work))
            for workers, count in (runs if r % 2 == 0 else runs[::-1]):
                out = work / f"ray-{workers}-{count}-{r}"
                wall[workers, count].append(timed_build(plans[count], out, executor="ray", workers=workers))
                if count == n:
                    assert tree(out) == reference, f"the {workers}-worker Ray build differs from the local build"
                shutil.rmtree(out)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    median = {key: statistics.median(times) for key, times in wall.items()}
    rate = {w: n / max(median[w, 2 * n] - median[w, n], 1e-9) for w in (1, 2)}
    fixed = {w: median[w, n] - n / rate[w] for w in (1, 2)}
    speedup = rate[2] / rate[1]
    ceiling = 2 * statistics.median(plain[1]) / statistics.median(plain[2])
    print()
    print(f"{'run':<30}{'seconds':>9}{'images/s':>10}   (median of {args.rounds})")
    print(f"{'local executor, ' + str(n):<30}{local_s:>9.2f}{n / local_s:>10.1f}")
    for w in (1, 2):
        for count in plans:
            label = f"ray, {w} worker{'s' if w > 1 else ''}, {count}"
            print(f"{label:<30}{median[w, count]:>9.2f}{count / median[w, count]:>10.1f}")
    for w in (1, 2):
        label = f"ray, {w} worker{'s' if w > 1 else ''}, steady"
        print(f"{label:<30}{n / rate[w]:>9.2f}{rate[w]:>10.1f}   (the {n} extra cases; fixed part {fixed[w]:.2f} s)")
    print()
    print(f"speed-up 2 vs 1 worker (steady): {speedup:.2f}x, efficiency {speedup / 2:.0%} "
          f"(target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
          f"wall-clock speed-up {median[1, n] / median[2, n]:.2f}x on {n} cases, "
          f"{median[1, 2 * n] / median[2, 2 * n]:.2f}x on {2 * n}")
    print(f"this machine's own ceiling, no Ray: 2 local builds of {n} cases side by side in 2 processes against 1: "
          f"{ceiling:.2f}x (1 process {statistics.median(plain[1]):.2f} s, 2 processes {statistics.median(plain[2]):.2f} s); "
          f"Ray reaches {speedup / ceiling:.0%} of it")
    print("each run, seconds: " + "; ".join(
        [f"{p} process{'es' if p > 1 else ''} " + " ".join(f"{t:.2f}" for t in times) for p, times in plain.items()]
        + [f"{w}w/{c} " + " ".join(f"{t:.2f}" for t in times) for (w, c), times in wall.items()]))
    print(f"fixed start-up cost of the Ray path: ray.init {init_s:.2f} s + dataset and actor start {startup_s:.2f} s "
          f"= {init_s + startup_s:.2f} s (one-case build: local {local_one_s:.2f} s, ray {ray_one_s:.2f} s)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "every Ray build matched the local build file for file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
