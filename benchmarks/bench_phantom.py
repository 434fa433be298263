"""Phantom backend throughput: images per second at 256² and 512² (single process).

Cases are a realistic mix (no finding, pneumonia, effusion + cardiomegaly, pneumothorax, devices).
The issue's target is >= 20 images/s at 256² on a 2-core machine.

    python benchmarks/bench_phantom.py [--count 60]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from synthmed.backends.phantom import PhantomBackend
from synthmed.sampler import Case, FindingLabel

MIX = [
    (FindingLabel("no_finding"),),
    (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),),
    (FindingLabel("pleural_effusion", "bilateral", "mild"), FindingLabel("cardiomegaly", None, "moderate")),
    (FindingLabel("pneumothorax", "left", "severe"),),
    (FindingLabel("endotracheal_tube"), FindingLabel("central_venous_catheter"), FindingLabel("edema", "bilateral", "mild")),
]


def cases(count: int) -> list[Case]:
    return [Case(f"case-{i:07d}", i, "train", 1000 + i, MIX[i % len(MIX)], "FM"[i % 2], 30 + i % 50, ("PA", "AP")[i % 3 == 0])
            for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=60)
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for size, count in ((256, args.count), (512, max(10, args.count // 3))):
        backend = PhantomBackend(size, size)
        backend.generate(cases(2), [None, None])  # warm the coordinate grids
        batch = cases(count)
        t0 = time.perf_counter()
        backend.generate(batch, [None] * count)
        dt = time.perf_counter() - t0
        print(f"{size}x{size}: {count / dt:6.1f} images/s  ({1000 * dt / count:6.1f} ms/image, {count} images)")


if __name__ == "__main__":
    main()
