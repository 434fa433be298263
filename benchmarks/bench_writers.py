"""What writing costs per image: DICOM + PNG (+ masks) + manifest row, at 256² and 512².

Measured side by side in one run: the pattern backend's generation, the writers alone,
and a whole `generate()` (writing overlaps the next batch's generation on a writer thread).
The issue's target is writers <= 5 % of generation time with the shipped diffusion model;
until that model exists, the figure to compare is the writer cost in ms per image printed
here against the diffusion backend's seconds per image.

First, the DICOM SR writer alone (its largest part): ms per SR built with highdicom every time
(the reference, what sr_bytes did before templates), by sr_bytes the first time of a template key
(highdicom + making the template), and by sr_bytes from the template, for 1- and 3-finding cases;
each way's bytes are checked to be the same.

    python benchmarks/bench_writers.py [--count 200] [--sr-only] [--sr-count 40]
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


def bench_sr(count: int) -> None:
    """ms per SR: highdicom every time, sr_bytes' first case of a key, sr_bytes from its template."""
    from synthmed.sampler import Case, FindingLabel
    from synthmed.writers import sr
    from synthmed.writers.dicom import dicom_dataset

    provenance = dict(spec_hash="ab" * 32, backend="pattern", model_id="pattern-1", model_hash="0" * 64,
                      synthmed_version="0.1.0")
    shapes = {1: (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),),
              3: (FindingLabel("pleural_effusion", "right", "moderate"), FindingLabel("nodule", "right_upper_zone",
                  "severe"), FindingLabel("enlarged_cardiomediastinum", None, "mild"))}
    print(f"DICOM SR, {count} cases per shape (ms per SR, best of 3 passes):")
    for n, findings in shapes.items():
        cases = [Case(f"case-{i:07d}", i, "train", i, findings, sex="FM"[i % 2], age=20 + i % 60, view="PA")
                 for i in range(count)]
        images = [dicom_dataset(np.zeros((16, 16), np.uint16), c, dataset_name="bench", prompt="p", **provenance)
                  for c in cases]
        reference = [sr._sr_bytes_highdicom(im, c, **provenance) for im, c in zip(images, cases)]

        def per_sr(fn, k=count) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for im, c in zip(images[:k], cases[:k]):
                    fn(im, c)
                best = min(best, (time.perf_counter() - t0) / k)
            return best * 1000

        def first(im, c):
            sr._TEMPLATES.clear()
            return sr.sr_bytes(im, c, **provenance)

        highdicom = per_sr(lambda im, c: sr._sr_bytes_highdicom(im, c, **provenance))
        first_of_key = per_sr(first, max(1, count // 4))
        sr._TEMPLATES.clear()
        got = [sr.sr_bytes(im, c, **provenance) for im, c in zip(images, cases)]
        assert got == reference, "sr_bytes differs from highdicom"
        cached = per_sr(lambda im, c: sr.sr_bytes(im, c, **provenance))
        print(f"  {n} finding(s): highdicom {highdicom:8.2f} | sr_bytes first of its key {first_of_key:8.2f} | "
              f"from the template {cached:6.3f}  ({highdicom / cached:.0f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--sr-count", type=int, default=40)
    parser.add_argument("--sr-only", action="store_true", help="only the SR writer's figures")
    args = parser.parse_args()
    print(f"machine: {platform.machine()} | cpus {os.cpu_count()} | python {platform.python_version()} | numpy {np.__version__}")
    bench_sr(args.sr_count)
    if args.sr_only:
        return
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
