"""The ``spec_fidelity`` check: the set's labels and patients are distributed as the plan of its cases says.

Per attribute (finding, location, severity, sex, view, split, age band) and per pair (:data:`PAIRS`): total
variation distance, chi-square and a 0-1 score (``1 - TVD``) against the plan of the cases built (cases.jsonl,
or the plan drawn again); the check's figure is the lowest score (``qc.thresholds.min_spec_fidelity``).

Example:
    >>> section = spec_fidelity_report(spec, rows, 0.9, planned=64)  # doctest: +SKIP
    >>> section["worst"], section["score"]  # doctest: +SKIP
    ('age', 0.93)
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping

import numpy as np

from .inputs import CheckInputs

ATTRIBUTES = ("finding", "location", "severity", "sex", "view", "split", "age")
PAIRS = (("finding", "location"), ("finding", "severity"), ("finding", "location", "severity"),
         ("finding", "split"), ("finding", "sex"), ("finding", "view"), ("sex", "view"))


def finding_labels(findings_field: str) -> tuple[str, str, str]:
    """(finding, location, severity) labels of a manifest row's ``findings``, as the sampler's Cell names them.

    Example:
        >>> finding_labels("pleural_effusion::mild|cardiomegaly::mild")
        ('pleural_effusion+cardiomegaly', '-', 'mild')
    """
    parts = [p.split(":") for p in findings_field.split("|") if p]
    finding = "+".join(p[0] for p in parts) or "-"
    location = "/".join(dict.fromkeys(p[1] for p in parts if len(p) > 1 and p[1])) or "-"
    severity = "/".join(dict.fromkeys(p[2] for p in parts if len(p) > 2 and p[2])) or "-"
    return finding, location, severity


def _age_band(age: int) -> str:
    low = (int(age) // 10) * 10
    return f"{low}-{low + 9}"


def _age_band_probs(age_spec) -> dict[str, float]:
    """Probability of each 10-year band under the spec's age distribution, by the sampler's own inverse CDF."""
    from ..sampler import age_from_uniform

    grid = (np.arange(200_000, dtype=np.float64) + 0.5) / 200_000  # midpoints: exact to 5e-6 per band
    values, freq = np.unique(age_from_uniform(age_spec, grid).astype(np.int64), return_counts=True)
    probs: dict[str, float] = {}
    for value, f in zip(values.tolist(), freq.tolist()):
        band = _age_band(value)
        probs[band] = probs.get(band, 0.0) + f / grid.size
    return probs


def expected_distributions(spec) -> tuple[dict[str, dict], dict[tuple, dict]]:
    """The spec's distribution of every attribute and of every pair in :data:`PAIRS`."""
    from ..cells import enumerate_cells

    cells = enumerate_cells(spec.findings)
    marginal: dict[str, dict] = {name: {} for name in ATTRIBUTES}
    joint_cell: dict[tuple, float] = {}
    for cell in cells:
        key = (cell.finding, cell.location, cell.severity)
        joint_cell[key] = joint_cell.get(key, 0.0) + cell.prob
        for name, value in zip(("finding", "location", "severity"), key):
            marginal[name][value] = marginal[name].get(value, 0.0) + cell.prob
    marginal["sex"] = spec.sex.as_dict()
    marginal["view"] = spec.view.as_dict()
    marginal["split"] = spec.splits.as_dict()
    marginal["age"] = _age_band_probs(spec.age)
    position = {"finding": 0, "location": 1, "severity": 2}
    pairs: dict[tuple, dict] = {}
    for pair in PAIRS:
        if all(p in position for p in pair):
            table: dict[tuple, float] = {}
            for key, prob in joint_cell.items():
                sub = tuple(key[position[p]] for p in pair)
                table[sub] = table.get(sub, 0.0) + prob
        else:  # the sampler draws sex, view and split independently of the finding cell
            table = {}
            for a, pa in marginal[pair[0]].items():
                for b, pb in marginal[pair[1]].items():
                    table[(a, b)] = pa * pb
        pairs[pair] = table
    return marginal, pairs


def _observed(rows: list[dict]) -> tuple[dict[str, Counter], dict[tuple, Counter]]:
    marginal = {name: Counter() for name in ATTRIBUTES}
    pairs = {pair: Counter() for pair in PAIRS}
    for row in rows:
        finding, location, severity = finding_labels(row.get("findings", ""))
        values = {"finding": finding, "location": location, "severity": severity, "sex": row.get("sex") or "-",
                  "view": row.get("view") or "-", "split": row.get("split") or "-",
                  "age": _age_band(int(row["age"])) if (row.get("age") or "").lstrip("-").isdigit() else "-"}
        for name in ATTRIBUTES:
            marginal[name][values[name]] += 1
        for pair in PAIRS:
            pairs[pair][tuple(values[p] for p in pair)] += 1
    return marginal, pairs


def planned_distributions(spec, n: int, cases: Iterable | None = None) -> tuple[dict[str, dict], dict[tuple, dict]]:
    """Counts of every attribute and pair in :data:`PAIRS` among the first ``n`` cases of the spec's plan.

    What a build of ``n`` cases (``--limit n``, or the whole ``count``) holds by construction: the first cases
    of an exact plan follow the spec only roughly, and a random plan never exactly. ``cases``: the build's
    own record of them (cases.jsonl), used instead of drawing the plan again.
    """
    from ..sampler import sample_cases

    if cases is not None:
        marginal, pairs = _observed([{"findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}"
                                                           for f in c.findings),
                                      "split": c.split, "sex": c.sex, "view": c.view, "age": str(c.age)}
                                     for c in cases])
        return {k: dict(v) for k, v in marginal.items()}, {k: dict(v) for k, v in pairs.items()}
    cases = sample_cases(spec, limit=n)
    columns = cases.columns()
    findings = ["|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in cell.findings)
                for cell in cases.cells]
    splits, sexes, views = cases.split_names, cases.sex_names, cases.view_names
    plan_rows = [{"findings": findings[c], "split": splits[sp], "sex": sexes[sx], "view": views[v], "age": str(a)}
                 for c, sp, sx, v, a in zip(*(columns[k].tolist() for k in ("cell", "split", "sex", "view", "age")))]
    marginal, pairs = _observed(plan_rows)
    return {k: dict(v) for k, v in marginal.items()}, {k: dict(v) for k, v in pairs.items()}


def planned_count(spec, rows: list[dict], cases: Mapping | None) -> int:
    """How many cases of the plan the build covers: cases.jsonl's count, else the largest index in the manifest."""
    if cases:
        return min(len(cases), spec.count)
    indices = [int(r["index"]) for r in rows if (r.get("index") or "").isdigit()]
    return min(max(indices) + 1, spec.count) if indices else min(len(rows), spec.count)


def spec_fidelity_report(spec, rows: list[dict], min_score: float, *, planned: int | None = None,
                         cases: Mapping | None = None) -> dict:
    """Spec fidelity of the manifest's rows: every attribute and pair, and the overall score (the lowest).

    Args:
        planned: compare with the plan of the first ``planned`` cases (what a build of that many cases holds);
            None compares with the spec's distribution itself.
        cases: the build's record of those cases (cases.jsonl, by case id), read instead of drawing the plan.
    """
    from .metrics import pair_fidelity, spec_fidelity

    if planned is None:
        expected, expected_pairs = expected_distributions(spec)
        against = "the spec's distribution"
    else:
        expected, expected_pairs = planned_distributions(spec, planned, None if cases is None else cases.values())
        against = (f"the plan of the {planned:,} cases built (the first {planned:,} of the spec's {spec.count:,}), "
                   + ("as cases.jsonl records it" if cases is not None
                      else "drawn again by synthmed.sampler.sample_cases(spec, limit=n)"))
    observed, observed_pairs = _observed(rows)
    attributes = {}
    for name in ATTRIBUTES:
        attributes[name] = _json_fidelity(spec_fidelity(expected[name], dict(observed[name])))
    pairs = {}
    for pair in PAIRS:
        result = pair_fidelity(expected_pairs[pair], dict(observed_pairs[pair]))
        pairs[" x ".join(pair)] = _json_fidelity(result)
    scores = [r["score"] for r in attributes.values()] + [r["score"] for r in pairs.values()]
    overall = min(scores)
    worst = min(list(attributes.items()) + list(pairs.items()), key=lambda kv: kv[1]["score"])[0]
    return {"status": "pass" if overall >= min_score else "fail", "value": overall, "threshold": min_score,
            "score": overall, "mean_score": float(np.mean(scores)), "worst": worst, "n": len(rows),
            "planned": planned, "against": against, "attributes": attributes, "pairs": pairs}


def _json_fidelity(result: dict) -> dict:
    def key(k):
        return " | ".join(k) if isinstance(k, tuple) else k

    out = dict(result)
    out["pooled"] = [key(k) for k in result["pooled"]]
    out["unexpected"] = [key(k) for k in result["unexpected"]]
    out["cells"] = [{**c, "category": key(c["category"])} for c in result["cells"]]
    if out["chi2"] is not None and math.isinf(out["chi2"]):
        out["chi2"] = "inf"
    return out


def section(inputs: CheckInputs) -> dict:
    """The ``spec_fidelity`` section, against the plan of the cases built (as cases.jsonl records it)."""
    return spec_fidelity_report(inputs.spec, inputs.rows, inputs.thresholds.min_spec_fidelity,
                                planned=planned_count(inputs.spec, inputs.rows, inputs.cases), cases=inputs.cases)
