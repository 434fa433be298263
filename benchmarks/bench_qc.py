"""QC cost per image relative to generation (the issue's target: the per-image checks <= 10 %).

Builds a set with the chosen backend (default: the phantom at 256², the cheapest radiograph
synthmed makes, so the hardest ratio to meet), timing the build without QC; then times the
per-image pass of ``synthmed qc`` (read PNG + DICOM + masks once, sha256, decode, pixel checks,
DICOM read-back), the cheap run ``generate`` does at its end, and the full run (diversity, and the
auditor's sections when its weights are shipped). Imports are warmed first, so the figures are
steady state. One torch thread.

    python benchmarks/bench_qc.py [--count 48] [--size 256] [--backend phantom|pattern|diffusion]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import textwrap
import time
from pathlib import Path


def spec_text(count: int, size: int, backend: str) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: bench-qc
        seed: 2026
        count: {count}
        image: {{size: {size}}}
        splits: {{train: 0.8, test: 0.2}}
        findings:
          - {{finding: no_finding, weight: 0.4}}
          - {{finding: pneumonia, weight: 0.3, location: {{right_lower_lobe: 0.5, left_upper_lobe: 0.5}},
             severity: {{mild: 0.5, severe: 0.5}}}}
          - {{finding: [pleural_effusion, cardiomegaly], weight: 0.2, severity: moderate}}
          - {{finding: pneumothorax, weight: 0.1, location: left}}
        generator: {{backend: {"diffusion" if backend == "diffusion" else "phantom"}, steps: 20}}
        """)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backend", choices=["phantom", "pattern", "diffusion"], default="phantom")
    ap.add_argument("--keep", type=Path, help="Build here and keep it (default: a temporary folder).")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from synthmed.build import generate
    from synthmed.qc import qc

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"1 torch thread; backend {args.backend}, {args.count} images at {args.size}²")
    root = Path(tempfile.mkdtemp(prefix="bench-qc-"))
    try:
        # warm every import (pydicom, scipy.stats, PIL, the backend) on a tiny set
        warm = root / "warm"
        generate(spec_text(4, args.size, args.backend), warm, backend=args.backend, progress=False, qc=False)
        qc(warm, auditor=False)

        out = args.keep or root / "out"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        generate(spec_text(args.count, args.size, args.backend), out, backend=args.backend, progress=False, qc=False)
        build = (time.perf_counter() - t0) / args.count

        fast = qc(out, full=False)
        full = qc(out, auditor=False)
        with_auditor = qc(out)  # the shipped auditor, where its weights exist; skipped otherwise
        per_image = fast.per_image_seconds / args.count
        rows = [("generation (backend + writers)", build, None),
                ("per-image checks (the qc pass over the files)", per_image, per_image / build),
                ("cheap run, as at the end of generate (total)", fast.seconds / args.count, fast.seconds / args.count / build),
                ("full run without the auditor (total)", full.seconds / args.count, full.seconds / args.count / build)]
        auditor = with_auditor.report["sections"]["auditor"]
        if auditor["status"] == "done":
            rows.append(("full run with the auditor (total)", with_auditor.seconds / args.count,
                         with_auditor.seconds / args.count / build))
        for label, seconds, ratio in rows:
            share = f"{100 * ratio:6.1f} % of generation" if ratio is not None else ""
            print(f"  {label:<48} {1000 * seconds:8.2f} ms/image  {share}")
        if auditor["status"] != "done":
            print(f"  (auditor sections skipped: {auditor['reason'][:120]})")
        verdict = "met" if per_image <= 0.10 * build else "NOT met"
        print(f"target: per-image checks <= 10 % of generation: {verdict} ({100 * per_image / build:.1f} %)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
