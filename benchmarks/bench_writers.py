"""What writing costs per image: DICOM + PNG (+ masks) + manifest row, at 256² and 512².

Measured side by side in one run: the pattern backend's generation, the writers alone,
and a whole `generate()` (writing overlaps the next batch's generation on a writer thread).
The issue's target is writers <= 5 % of generation time with the shipped diffusion model;
until that model exists, the figure to compare is the writer cost in ms per image printed
here against the diffusion backend's seconds per image.

    python benchmarks/bench_writers.py [--count 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from synthmed.build import generate
from synthmed.build.chunks import CaseWriter
from synthmed.prompts import build_prompt
from synthmed.sampler import sample_cases
from synthmed.spec import load_spec
from synthmed.backends.pattern import PatternBackend

SPEC = """
spec_version: 1
name: bench-writers
seed: 1
count: {count}
image: {{size: {size}, formats: [dicom, png]}}
splits: {{train: 0.8, val: 0.1, test: 0.1}}
findings:
  - {{finding: no_finding, weight: 0.4}}
  - {{finding: pneumonia, weight: 0.4, location: right_lower_lobe, severity: moderate}}
  - {{finding: [pleural_effusion, cardiomegaly], weight: 0.2, severity: mild}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} | cpus {os.cpu_count()} | python {platform.python_version()} | numpy {np.__version__}")
    for size in (256, 512):
        spec = load_spec(SPEC.format(count=args.count, size=size))
        cases = list(sample_cases(spec))
        backend = PatternBackend(size, size)
        prompts = [build_prompt(c, spec.prompt) for c in cases]
        t0 = time.perf_counter()
        images = backend.generate(cases, prompts)
        gen = (time.perf_counter() - t0) / len(cases)
        with tempfile.TemporaryDirectory() as tmp:
            writer = CaseWriter(spec, Path(tmp), backend.info, {})
            t0 = time.perf_counter()
            for c, p, im in zip(cases, prompts, images):
                writer.write(c, p, im)
            write = (time.perf_counter() - t0) / len(cases)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            generate(spec, Path(tmp) / "out", backend=backend, progress=False)
            whole = (time.perf_counter() - t0) / len(cases)
        print(f"{size}x{size}, {len(cases)} images (DICOM 12-bit + PNG 16-bit + masks + manifest):")
        print(f"  pattern backend generation  {gen * 1000:8.2f} ms/image")
        print(f"  writers alone               {write * 1000:8.2f} ms/image")
        print(f"  generate() end to end       {whole * 1000:8.2f} ms/image ({1 / whole:.1f} images/s)")
        print(f"  writers as share of a 0.65 s/image diffusion step (the design's estimate): {write / 0.65:.1%}")


if __name__ == "__main__":
    main()
