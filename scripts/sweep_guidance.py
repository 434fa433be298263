"""Label fidelity and FID of a model at several guidance scales, on validation cases that are not the card's.

The card (scripts/model_card.py) reads a model at the guidance its evaluation spec names. Which guidance to name
is a measurement: more guidance usually makes the findings read better and the films look less like films. This
script makes the same cases at each scale, reads them with the auditor of the films the model learned from, and
prints one row per scale beside the films' own reading (the ceiling). The cases are the evaluation spec's mix
with another seed, so that the card's held-out cases stay unseen by the choice.

    python scripts/sweep_guidance.py --model synthmed/models/default --guidance 2,3,4,6,8 --count 160

FID here is between the model's images and the films of the same cases, at this script's count: comparable
between the rows, not with the card's figure (FID is biased upward at small counts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="the model folder")
    p.add_argument("--spec", type=Path, default=ROOT / "dataset_specs/default_model_evaluation.yaml",
                   help="the mix of cases (its seed is replaced by --seed)")
    p.add_argument("--seed", type=int, default=424242, help="the cases' seed (not the card's)")
    p.add_argument("--count", type=int, default=160, help="cases per scale")
    p.add_argument("--guidance", default="2,3,4,6,8", help="comma-separated guidance scales")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the spec's; a distilled student's own, e.g. 4)")
    p.add_argument("--late-guidance", default=None, metavar="SCALE@TIMESTEP|none",
                   help="the guidance below a timestep, the same at every scale swept (default: the model folder's "
                        "recommendation, as generate samples it; the shipped default's is 2@500)")
    p.add_argument("--films", choices=("drr", "phantom"), default="drr")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: out/guidance-<model>)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    try:
        args.scales = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        p.error(f"--guidance {args.guidance!r}: numbers separated by commas, e.g. 2,4,6")
    if not args.scales or args.count < 2:
        p.error("give at least one guidance scale and --count of 2 or more")
    if args.late_guidance not in (None, "none"):
        from synthmed.spec import parse_late_guidance

        try:
            args.late_guidance = parse_late_guidance(args.late_guidance)
        except ValueError as e:
            p.error(f"--late-guidance: {e}")
    args.work = args.work or ROOT / "out" / f"guidance-{args.model.name}"
    return args


def reading(fidelity: dict) -> dict:
    """The card's figures from a label_fidelity report: agreements, the lowest and each finding's sensitivity."""
    from model_card import lowest_sensitivity

    worst = lowest_sensitivity(fidelity)
    return {"finding_set": fidelity["findings"]["exact_set_agreement"],
            "location": fidelity["location"]["accuracy"], "severity": fidelity["severity"]["accuracy"],
            "lowest_sensitivity": worst[1], "lowest_sensitivity_finding": worst[0],
            "sensitivity": {name: v["sensitivity"] for name, v in fidelity["findings"]["per_finding"].items()
                            if v["support"]}}


def main(argv=None) -> int:
    args = parse_args(argv)
    from model_card import by_view, read_set

    from synthmed.build import generate
    from synthmed.qc.auditor import Auditor, label_fidelity, shipped_auditor_dir
    from synthmed.qc.metrics import fid_from_features
    from synthmed.spec import load_spec

    spec = load_spec(args.spec)
    spec = dataclasses.replace(spec, seed=args.seed, count=args.count)
    if (args.model / "distillation.json").is_file():  # a student samples with its own scheduler and steps
        spec = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, steps=None, scheduler=None))
    if args.steps:
        spec = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, steps=args.steps))
    if args.late_guidance is not None:
        spec = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, late_guidance=args.late_guidance))
    from synthmed.backends import resolve_generator

    late = resolve_generator(spec, model=str(args.model)).late_guidance  # what every row below samples with
    auditor = Auditor.load(shipped_auditor_dir(args.films))
    generate(spec, args.work / args.films, backend=args.films, overwrite=True, progress=False, qc=False)
    ref_rows, ref = read_set(args.work / args.films / "manifest.csv")
    f_ref, ref_read = auditor.embed(ref), auditor.predict(ref)
    figures = {"model": str(args.model), "spec": str(args.spec), "seed": args.seed, "count": args.count,
               "steps": spec.generator.steps, "late_guidance": late,
               "auditor": auditor.name, "films": reading(label_fidelity(ref_read, ref_rows)),
               "scales": {}}
    for scale in args.scales:
        scaled = dataclasses.replace(spec, generator=dataclasses.replace(spec.generator, guidance_scale=scale))
        folder = args.work / f"guidance-{scale:g}"
        started = time.perf_counter()
        made = generate(scaled, folder, model=str(args.model), overwrite=True, progress=False, qc=False)
        seconds = time.perf_counter() - started
        rows, images = read_set(folder / "manifest.csv")
        assert [r["case_id"] for r in rows] == [r["case_id"] for r in ref_rows]
        read = auditor.predict(images)
        figures["scales"][f"{scale:g}"] = {**reading(label_fidelity(read, rows)),
                                           "fid_to_films": fid_from_features(auditor.embed(images), f_ref,
                                                                             method="eigh"),
                                           "images_per_s": made.written / seconds,
                                           "by_view": by_view(read, ref_read, rows, ref_rows)}
        shown = {k: v for k, v in figures["scales"][f"{scale:g}"].items() if k not in ("sensitivity", "by_view")}
        print(f"guidance {scale:g}: {json.dumps(shown)}", flush=True)

    late_text = f"; below timestep {late['below_timestep']} every row guides at {late['scale']:g}" if late else ""
    print(f"\n{args.count} cases of {args.spec.name} (seed {args.seed}), read by {auditor.name}{late_text}")
    print("| guidance | finding set | location | severity | lowest sensitivity | FID to films |")
    print("|---|---|---|---|---|---|")
    film = figures["films"]
    print(f"| films (ceiling) | {film['finding_set']:.3f} | {film['location']:.3f} | {film['severity']:.3f} | "
          f"{film['lowest_sensitivity']:.2f} ({film['lowest_sensitivity_finding']}) | - |")
    for scale, f in figures["scales"].items():
        print(f"| {scale} | {f['finding_set']:.3f} | {f['location']:.3f} | {f['severity']:.3f} | "
              f"{f['lowest_sensitivity']:.2f} ({f['lowest_sensitivity_finding']}) | {f['fid_to_films']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
