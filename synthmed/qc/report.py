"""report.html: one self-contained page (inline PNG thumbnails as base64, inline SVG charts and CSS).

No external resource of any kind (a Content-Security-Policy forbids them), so the file can be
mailed, attached to a ticket or opened offline. The page is a pure function of the report and
the thumbnails, so the same run gives the same bytes.

Sections (each a ``<section id=...>``): ``summary`` (verdict and the check table, a row per check of
:mod:`synthmed.qc.registry`), ``spec-fidelity`` (spec-vs-actual bars per attribute, the pair table),
``samples`` (a grid per finding x severity), ``intensity`` (histograms and bands), ``set-metrics`` (FID /
KID / PRDC, over the set and per finding, diversity, duplicates, auditor, memorisation, dciodvfy; a check's section without a drawing of
its own gets its status in words) and ``failures`` (every flagged image, with thumbnails).

Example:
    >>> page = render_html({"verdict": "pass", "dataset": {"name": "d", "count": 0}, "checks": {}, "sections": {},
    ...                     "images": {"checked": 0, "failures": []}})
    >>> page.startswith("<!DOCTYPE html>") and 'id="summary"' in page
    True
"""

from __future__ import annotations

import base64
import math
from html import escape
from typing import Any, Mapping, Sequence

import numpy as np

from .registry import EXPLAIN_SKIP_SECTIONS, PER_IMAGE_CHECKS

SECTIONS = ("summary", "spec-fidelity", "samples", "intensity", "set-metrics", "failures")
# the sections of qc_report.json this page draws in their own way; any other gets its status in words
DRAWN_SECTIONS = ("spec_fidelity", "intensity", "manifest_consistency", "reference", "diversity", "duplicates",
                  "auditor", "memorisation", "dciodvfy")
MAX_FAILURE_THUMBS = 60
SEVERITY_ORDER = ("-", "mild", "moderate", "severe")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d2430}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:1px solid #d6dbe3;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #d6dbe3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#0a7a36;font-weight:600}.fail{color:#b3261e;font-weight:600}.warn{color:#a15c00;font-weight:600}
.skipped,.info{color:#5b6472}
.banner{padding:10px 14px;border-radius:6px;font-size:17px;font-weight:600;margin:10px 0}
.banner.pass{background:#e3f4e8}.banner.fail{background:#fbe4e2}
.grid td{text-align:center}.grid img,.thumbs img{image-rendering:pixelated;border:1px solid #c7ccd6;margin:1px}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumbs figure{margin:0;width:200px;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:18px}.chart{font-size:12px}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
small,.muted{color:#5b6472}code{background:#f2f4f8;padding:0 3px;border-radius:3px}
"""

# every <img> decoded -> data attributes a headless browser (or a person's console) can read
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
  document.body.setAttribute('data-report-ready', 'yes');
});
"""

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")


# ----------------------------------------------------------------------------- small pieces

def jsonable(value):
    """A JSON-safe copy: numpy scalars and arrays become numbers and lists, tuples lists, NaN/inf strings.

    Example:
        >>> jsonable({"n": np.int64(3), "x": (np.float32(0.5), float("nan"))})
        {'n': 3, 'x': [0.5, 'nan']}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def png_data_uri(pixels: np.ndarray) -> str:
    """A uint8 [H, W] image as a ``data:image/png;base64,...`` URI (synthmed's deterministic PNG writer)."""
    from ..writers.png import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(np.ascontiguousarray(pixels, np.uint8))).decode("ascii")


def _img(pixels: np.ndarray | None, title: str, scale: int = 1) -> str:
    if pixels is None:
        return f'<span class="muted" title="{escape(title)}">(no image)</span>'
    h, w = pixels.shape
    return (f'<img src="{png_data_uri(pixels)}" width="{w * scale}" height="{h * scale}" alt="{escape(title)}" '
            f'title="{escape(title)}">')


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def _status(status: str | None) -> str:
    status = status or "skipped"
    return f'<span class="{escape(status)}">{escape(status)}</span>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ----------------------------------------------------------------------------- charts (inline SVG)

def bar_chart_svg(cells: Sequence[Mapping], title: str) -> str:
    """Expected (light) vs observed (dark) share per category, as an inline SVG."""
    n = max(len(cells), 1)
    bar, gap, left, top, height = 12, 10, 36, 18, 120
    width = left + n * (2 * bar + gap) + 10
    top_value = max([c["expected_p"] for c in cells] + [c["observed_p"] for c in cells] + [1e-9])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 70}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="{left}" y="12" font-size="12" font-weight="600">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + height}" x2="{width - 6}" y2="{top + height}" stroke="#888"/>']
    for frac in (0.0, 0.5, 1.0):
        y = top + height - frac * height
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="9" text-anchor="end">'
                     f'{frac * top_value:.2f}</text>')
    for k, cell in enumerate(cells):
        x = left + k * (2 * bar + gap) + gap / 2
        for offset, key, colour in ((0, "expected_p", "#9db8e0"), (bar, "observed_p", "#1f4e99")):
            h = height * cell[key] / top_value
            parts.append(f'<rect x="{x + offset:.1f}" y="{top + height - h:.1f}" width="{bar}" height="{h:.1f}" '
                         f'fill="{colour}"><title>{escape(str(cell["category"]))}: {key.split("_")[0]} '
                         f'{cell[key]:.3f}</title></rect>')
        label = escape(str(cell["category"]))
        label = label if len(label) <= 22 else label[:21] + "…"
        parts.append(f'<text transform="translate({x + bar:.1f},{top + height + 8}) rotate(40)" font-size="9">'
                     f'{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(histograms: Mapping[str, Mapping], title: str = "pixel histogram (share of pixels per bin)") -> str:
    """The set's mean histogram with its 5th-95th percentile band, and the reference's mean if given."""
    chosen = histograms.get("set")
    if not chosen:
        return '<p class="muted">no readable image</p>'
    mean = np.asarray(chosen["mean"])
    low, high = np.asarray(chosen["p5"]), np.asarray(chosen["p95"])
    ref = np.asarray(histograms["reference"]["mean"]) if histograms.get("reference") else None
    bins = mean.size
    left, top, width, height = 40, 18, 520, 160
    peak = max(float(high.max()), float(ref.max()) if ref is not None else 0.0, 1e-9)

    def points(values) -> str:
        return " ".join(f"{left + (i + 0.5) * width / bins:.1f},{top + height - height * v / peak:.1f}"
                        for i, v in enumerate(values))

    band = points(high) + " " + " ".join(reversed(points(low).split(" ")))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 10}" height="{top + height + 30}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="12" font-size="12" font-weight="600">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + height}" x2="{left + width}" y2="{top + height}" stroke="#888"/>',
             f'<polygon points="{band}" fill="#9db8e0" fill-opacity="0.55"><title>5th-95th percentile over images'
             f'</title></polygon>',
             f'<polyline points="{points(mean)}" fill="none" stroke="#1f4e99" stroke-width="2"><title>mean over '
             f'images</title></polyline>']
    if ref is not None:
        parts.append(f'<polyline points="{points(ref)}" fill="none" stroke="#c2410c" stroke-width="2" '
                     f'stroke-dasharray="5,3"><title>reference mean</title></polyline>')
    for frac in (0.0, 0.5, 1.0):
        x = left + frac * width
        parts.append(f'<text x="{x:.1f}" y="{top + height + 14}" font-size="9" text-anchor="middle">{frac:g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" font-size="9" text-anchor="end">{peak:.2f}</text>')
    parts.append("</svg>")
    legend = ('<div class="legend"><span style="background:#1f4e99"></span>mean<span style="background:#9db8e0">'
              '</span>5th-95th percentile' + ('<span style="background:#c2410c"></span>reference mean'
                                               if ref is not None else "") + "</div>")
    return "".join(parts) + legend


def values_svg(values: Mapping[str, float], title: str, limit: float | None = None) -> str:
    """Horizontal bars of values in [0, 1] (e.g. MS-SSIM per finding cell), with the limit as a line."""
    items = list(values.items())
    left, row, width = 260, 16, 300
    height = row * len(items) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 60}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text x="4" y="12" font-size="12" font-weight="600">{escape(title)}</text>']
    for k, (name, value) in enumerate(items):
        y = 20 + k * row
        w = width * min(max(float(value), 0.0), 1.0)
        label = name if len(name) <= 42 else name[:41] + "…"
        parts.append(f'<text x="{left - 6}" y="{y + 11}" font-size="10" text-anchor="end">{escape(label)}</text>'
                     f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 4}" fill="#1f4e99"/>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 11}" font-size="10">{float(value):.3f}</text>')
    if limit is not None:
        x = left + width * limit
        parts.append(f'<line x1="{x:.1f}" y1="18" x2="{x:.1f}" y2="{height - 4}" stroke="#b3261e" '
                     f'stroke-dasharray="4,3"><title>limit {limit}</title></line>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- the words every view shares

def check_detail(check: Mapping, with_limit: bool = True) -> str:
    """What a check found, in words: "3 of 12 images" or "0.8333 (limit 0.9)"."""
    if "failed" in check:
        return f"{check['failed']} of {check.get('checked', 0)} {check.get('unit', 'images')}"
    value = check.get("value")
    if value is None:
        return ""
    shown = f"{value:.4g}" if isinstance(value, float) else f"{value}"
    return shown + (f" (limit {check['threshold']})" if with_limit and check.get("threshold") is not None else "")


def headline(report: Mapping, seconds: float) -> str:
    """The verdict in one line, naming what failed: per-image checks by their image count, set-level ones by name.

    Example:
        >>> headline({"verdict": "fail", "failed_checks": ["manifest_consistency"],
        ...           "images": {"checked": 12, "failed": 0, "warned": 0}}, 0.1)
        'FAIL: 12 images checked in 0.1 s; set-level check(s) failed: manifest_consistency; 0 flagged by other checks'
    """
    images = report["images"]
    checked = f"{images['checked']:,} images checked in {seconds:.1f} s"
    flagged = f"{images['warned']:,} flagged by other checks"
    if report.get("verdict") == "pass":
        return f"PASS: {checked}; {images['failed']:,} failed a gating check, {flagged}"
    failed = list(report.get("failed_checks", []))
    set_level = [c for c in failed if c not in PER_IMAGE_CHECKS]
    parts = [f"{images['failed']:,} failed a gating check"] if images["failed"] or not set_level else []
    if set_level:
        parts.append(f"set-level check(s) failed: {', '.join(set_level)}")
    return f"FAIL: {checked}; " + "; ".join(parts) + f"; {flagged}"


def summary_lines(report: Mapping, *, skip_reasons: Sequence[str] = ()) -> list[str]:
    """The report's failed checks and skipped sections, one line each, for a terminal.

    Each line starts with the check's status as qc_report.json and report.html give it ("fail"; in capitals
    when the check gates, so fails the run), then says whether it gates: one verdict, three views.

    Example:
        >>> summary_lines({"checks": {"spec_fidelity": {"status": "fail", "gating": False, "value": 0.8,
        ...                                             "threshold": 0.9}}, "sections": {}})
        ['fail spec_fidelity: 0.8 (limit 0.9); not gating (not in qc.gate): the run still passes']
        >>> summary_lines({"checks": {"blank": {"status": "fail", "gating": True, "failed": 1, "checked": 9}}})
        ['FAIL blank: 1 of 9 images; gating']
    """
    lines = []
    for name, check in report.get("checks", {}).items():
        if check.get("status") == "fail":
            if check.get("gating"):
                lines.append(f"FAIL {name}: {check_detail(check)}; gating")
            else:
                lines.append(f"fail {name}: {check_detail(check)}; not gating (not in qc.gate): the run still passes")
            problems = report.get("sections", {}).get(name, {}).get("problems") or []
            lines += [f"  {p}" for p in problems[:3]]
            if len(problems) > 3:
                lines.append(f"  ... ({len(problems)} listed in qc_report.json)")
        elif check.get("status") == "info" and check.get("reason"):
            lines.append(f"info {name}: {check_detail(check)}; {check['reason']}")
    for name, section in report.get("sections", {}).items():
        if section.get("status") == "skipped" and name in EXPLAIN_SKIP_SECTIONS and name not in skip_reasons:
            lines.append(f"skipped {name}: {section.get('reason')}")
    return lines


# ----------------------------------------------------------------------------- sections

def _summary(report: Mapping) -> str:
    dataset = report.get("dataset", {})
    verdict = report.get("verdict", "fail")
    failed = report.get("failed_checks", [])
    images = report.get("images", {})
    banner = ("PASS: no gating check failed" if verdict == "pass"
              else f"FAIL: gating check(s) failed: {', '.join(failed)}")
    rows = []
    for name, check in report.get("checks", {}).items():
        detail = escape(check_detail(check, with_limit=False))
        if check.get("reason"):
            detail += f' <small>{escape(str(check["reason"]))}</small>'
        rows.append([f"<code>{escape(name)}</code>", escape(check.get("description", "")),
                     "yes" if check.get("gating") else "", _status(check.get("status")), detail,
                     _fmt(check.get("threshold"))])
    notes = "".join(f"<li>{escape(str(n))}</li>" for n in report.get("notes", []))
    problems = report.get("sections", {}).get("manifest_consistency", {}).get("problems") or []
    if problems:
        notes += ("<li>manifest_consistency: the rows that disagree with cases.jsonl or the spec<ul>"
                  + "".join(f"<li>{escape(str(p))}</li>" for p in problems) + "</ul></li>")
    return (f'<section id="summary"><h1>QC report: {escape(str(dataset.get("name", "?")))}</h1>'
            f'<div class="banner {escape(verdict)}">{escape(banner)}</div>'
            f'<p>{_fmt(dataset.get("count"))} images, {_fmt(dataset.get("width"))}×{_fmt(dataset.get("height"))}, '
            f'{_fmt(dataset.get("bit_depth"))}-bit'
            + (f' (PNG {_fmt(dataset["png_bit_depth"])}-bit)' if dataset.get("png_bit_depth") else "")
            + f', spec sha256 <code>{escape(str(dataset.get("spec_hash", ""))[:12])}'
            f'</code>, synthmed {escape(str(report.get("synthmed_version", "")))}, {escape(str(report.get("mode", "")))} run. '
            f'Images: {_fmt(images.get("passed"))} pass, {_fmt(images.get("warned"))} warn (non-gating flags), '
            f'{_fmt(images.get("failed"))} fail.</p>'
            + _table(["check", "what it tests", "gates", "status", "result", "limit"], rows)
            + (f"<ul>{notes}</ul>" if notes else "") + "</section>")


def _spec_fidelity(section: Mapping | None) -> str:
    if not section:
        return '<section id="spec-fidelity"><h2>Spec fidelity</h2><p class="muted">not computed</p></section>'
    charts = "".join(f'<div class="chart">{bar_chart_svg(result["cells"], name)}'
                     f'<div>1 − TVD {_fmt(result["score"])}, χ² {_fmt(result["chi2"])}, p {_fmt(result["p_value"])}'
                     f'</div></div>' for name, result in section.get("attributes", {}).items())
    rows = [[escape(name), _fmt(r["n"]), _fmt(r["tvd"]), _fmt(r["score"]), _fmt(r["chi2"]), _fmt(r["dof"]),
             _fmt(r["p_value"]), escape(", ".join(r["unexpected"][:5]))]
            for name, r in list(section.get("attributes", {}).items()) + list(section.get("pairs", {}).items())]
    return ('<section id="spec-fidelity"><h2>Spec fidelity: spec vs actual</h2>'
            f'<p>Overall score (the lowest 1 − TVD) {_fmt(section.get("score"))} '
            f'({escape(str(section.get("worst", "")))}), limit {_fmt(section.get("threshold"))}: '
            f'{_status(section.get("status"))}. Light bars: the spec; dark bars: the images.</p>'
            f'<div class="legend"><span style="background:#9db8e0"></span>spec<span style="background:#1f4e99">'
            f'</span>actual</div><div class="charts">{charts}</div>'
            + _table(["attribute or pair", "n", "TVD", "1 − TVD", "χ²", "dof", "p", "unexpected"], rows)
            + "</section>")


def _samples(grid: Mapping[tuple, Sequence[str]], thumbs: Mapping[str, np.ndarray]) -> str:
    findings = list(dict.fromkeys(f for f, _ in grid))
    severities = [s for s in SEVERITY_ORDER if any(sev == s for _, sev in grid)]
    severities += sorted({s for _, s in grid} - set(severities))
    rows = []
    for finding in findings:
        cells = [escape(finding)]
        for severity in severities:
            ids = grid.get((finding, severity), [])
            cells.append("".join(_img(thumbs.get(i), f"{i} {finding} {severity}") for i in ids) or "")
        rows.append(cells)
    return ('<section id="samples"><h2>Samples per finding × severity</h2>'
            '<p class="muted">The first images of each cell, in manifest order.</p>'
            + _table(["finding"] + [s if s != "-" else "(no severity)" for s in severities], rows, "grid")
            + "</section>")


def _intensity(report: Mapping) -> str:
    section = report.get("sections", {}).get("intensity", {})
    parts = ['<section id="intensity"><h2>Intensity</h2>', histogram_svg(report.get("histograms", {}))]
    if section.get("status") == "skipped":
        parts.append(f'<p class="muted">bands skipped: {escape(str(section.get("reason")))}</p>')
    else:
        parts.append(f'<p>Bands fitted on the {escape(str(section.get("fitted_on", "")))}, k = {_fmt(section.get("k"))}; '
                     f'{_fmt(section.get("failed"))} of {_fmt(section.get("checked"))} images outside '
                     f'({_status(section.get("status"))}).</p>')
        rows = [[escape(name), _fmt(lo), _fmt(hi)] for name, (lo, hi) in section.get("bounds", {}).items()]
        parts.append(_table(["figure (fraction of full scale)", "low", "high"], rows))
    parts.append("</section>")
    return "".join(parts)


def _set_metrics(report: Mapping, thumbs: Mapping[str, np.ndarray]) -> str:
    sections = report.get("sections", {})
    parts = ['<section id="set-metrics"><h2>Set-level figures</h2>']
    ref = sections.get("reference", {})
    parts.append("<h3>Against the reference set (FID, KID, precision / recall / density / coverage)</h3>")
    if ref.get("status") == "done":
        rows = [[k, _fmt(ref.get(k))] for k in ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage")
                if k in ref]
        parts.append(f'<p>Features: <code>{escape(str(ref.get("feature_extractor")))}</code>, '
                     f'{_fmt(ref.get("n_generated"))} generated vs {_fmt(ref.get("n_reference"))} reference images. '
                     f'{escape(str(ref.get("note", "")))}</p>' + _table(["figure", "value"], rows))
        parts.append(_per_finding(ref.get("per_finding")))
    else:
        parts.append(f'<p class="skipped">skipped: {escape(str(ref.get("reason")))}</p>')
    div = sections.get("diversity", {})
    parts.append("<h3>Diversity (MS-SSIM within a finding cell)</h3>")
    if div.get("status") in ("pass", "fail"):
        parts.append(f'<p>Mean {_fmt(div.get("overall"))} over {_fmt(div.get("pairs"))} pairs, limit '
                     f'{_fmt(div.get("threshold"))}: {_status(div.get("status"))}. {escape(str(div.get("method", "")))}'
                     f'</p>' + values_svg(div.get("per_group", {}), "MS-SSIM per finding cell", div.get("threshold")))
    else:
        parts.append(f'<p class="skipped">skipped: {escape(str(div.get("reason")))}</p>')
    dup = sections.get("duplicates", {})
    parts.append("<h3>Near-duplicates</h3>")
    if dup.get("status") in ("pass", "fail"):
        parts.append(f'<p>{len(dup.get("pairs", []))} pair(s); {_fmt(dup.get("fraction"))} of the images in one '
                     f'(limit {_fmt(dup.get("threshold"))}): {_status(dup.get("status"))}. '
                     f'{escape(str(dup.get("method", "")))}; embedding: '
                     f'{escape(str(dup.get("embedding", {}).get("status")))}.</p>')
        figures = []
        for pair in dup.get("pairs", [])[:24]:
            figures.append(f'<figure>{_img(thumbs.get(pair["a"]), pair["a"])}{_img(thumbs.get(pair["b"]), pair["b"])}'
                           f'<figcaption>{escape(pair["a"])} ≈ {escape(pair["b"])} ({escape(pair["method"])}, '
                           f'cos {_fmt(pair.get("cosine"))})</figcaption></figure>')
        parts.append(f'<div class="thumbs">{"".join(figures)}</div>')
    else:
        parts.append(f'<p class="skipped">skipped: {escape(str(dup.get("reason")))}</p>')
    aud = sections.get("auditor", {})
    parts.append("<h3>Label fidelity (auditor)</h3>")
    if aud.get("status") == "done":
        parts.append(_label_fidelity(aud))
    else:
        parts.append(f'<p class="skipped">skipped: {escape(str(aud.get("reason")))}</p>')
    mem = sections.get("memorisation", {})
    parts.append("<h3>Memorisation audit</h3>")
    if mem.get("status") in ("pass", "fail"):
        audit = mem.get("audit") if isinstance(mem.get("audit"), Mapping) else {}
        spaces = [[escape(space), _fmt(section.get("threshold")), escape(str(section.get("threshold_source", ""))),
                   _fmt((section.get("distances") or {}).get("min")), _fmt(section.get("flagged_fraction"))]
                  for space, section in audit.items() if isinstance(section, Mapping)]
        parts.append(f'<p>{len(mem.get("flagged", []))} generated image(s) flagged as close to one of '
                     f'{_fmt(mem.get("n_training"))} training images ({_fmt(mem.get("value"))} of the set, limit '
                     f'{_fmt(mem.get("threshold"))}): {_status(mem.get("status"))}.</p>'
                     + _table(["space", "threshold", "from", "nearest distance", "flagged"], spaces))
    else:
        parts.append(f'<p class="skipped">skipped: {escape(str(mem.get("reason")))}</p>')
    dcio = sections.get("dciodvfy", {})
    parts.append("<h3>dciodvfy</h3>")
    if dcio.get("status") == "skipped":
        parts.append(f'<p class="skipped">skipped: {escape(str(dcio.get("reason")))}</p>')
    else:
        objects = dcio.get("objects") if isinstance(dcio.get("objects"), Mapping) else {}
        files = (f' ({_fmt(objects.get("image"))} images, {_fmt(objects.get("sr"))} SR, {_fmt(objects.get("seg"))} '
                 f'SEG: {_fmt(dcio.get("files"))} files)' if objects else "")
        parts.append(f'<p>{_fmt(dcio.get("checked"))} of {_fmt(dcio.get("of"))} DICOM images checked with their SR '
                     f'and SEG{files} (sample {_fmt(dcio.get("sample"))}); {len(dcio.get("failures", {}))} with '
                     f'errors: {_status(dcio.get("status"))}.</p>')
    for name, section in sections.items():  # a check this page draws nothing for yet: its status in words
        if name not in DRAWN_SECTIONS and isinstance(section, Mapping):
            parts.append(f"<h3>{escape(str(name))}</h3>" + _section_words(section))
    parts.append("</section>")
    return "".join(parts)


PER_FINDING_FIGURES = ("fid", "kid", "precision", "recall", "density", "coverage")


def _per_finding(per: Any) -> str:
    """The reference figures per finding: a row per finding compared, then those skipped, with why."""
    if not isinstance(per, Mapping):
        return ""
    parts = ["<h3>Against the reference set, per finding</h3>"]
    if per.get("status") != "done":
        return parts[0] + f'<p class="skipped">skipped: {escape(str(per.get("reason")))}</p>'
    findings = per.get("findings") if isinstance(per.get("findings"), Mapping) else {}
    parts.append(f'<p>Labels: {escape(str(per.get("labels")))}. Generated images with a finding against reference '
                 f'images with it (an image counts under each of its findings and the findings above them); at least '
                 f'{_fmt(per.get("min_images"))} images a side. Reported, not gated.</p>')
    rows = [[f"<code>{escape(str(name))}</code>", _fmt(f.get("n_generated")), _fmt(f.get("n_reference")),
             *[_fmt(f.get(k)) for k in PER_FINDING_FIGURES]] for name, f in findings.items() if isinstance(f, Mapping)]
    if rows:
        parts.append(_table(["finding", "generated", "reference", *PER_FINDING_FIGURES], rows))
    else:
        parts.append('<p class="muted">no finding has enough images on both sides</p>')
    skipped = per.get("skipped") if isinstance(per.get("skipped"), Mapping) else {}
    if skipped:
        parts.append("<p>Not compared:</p><ul>" + "".join(f"<li><code>{escape(str(name))}</code>: {escape(str(why))}"
                                                          f"</li>" for name, why in skipped.items()) + "</ul>")
    only = per.get("reference_only") or []
    if only:
        parts.append(f'<p class="muted">In the reference only (no generated image has them): '
                     f'{escape(", ".join(map(str, only)))}</p>')
    return "".join(parts)


def _section_words(section: Mapping) -> str:
    if section.get("status") == "skipped":
        return f'<p class="skipped">skipped: {escape(str(section.get("reason")))}</p>'
    return (f'<p>{_fmt(section.get("value"))} (limit {_fmt(section.get("threshold"))}): '
            f'{_status(section.get("status"))}.</p>')


def _label_fidelity(aud: Mapping) -> str:
    lf = aud.get("label_fidelity") if isinstance(aud.get("label_fidelity"), Mapping) else {}
    findings = lf.get("findings") if isinstance(lf.get("findings"), Mapping) else {}
    location = lf.get("location") if isinstance(lf.get("location"), Mapping) else {}
    severity = lf.get("severity") if isinstance(lf.get("severity"), Mapping) else {}
    summary = [["findings exactly as labelled (the gated score)", _fmt(aud.get("label_fidelity_score"))],
               ["mean accuracy over findings", _fmt(findings.get("mean_accuracy"))],
               ["location: exact", _fmt(location.get("accuracy"))],
               ["location: side", _fmt(location.get("side_accuracy"))],
               ["severity", _fmt(severity.get("accuracy"))],
               ["IS-style figure", _fmt(aud.get("inception_score"))]]
    per_finding = findings.get("per_finding") if isinstance(findings.get("per_finding"), Mapping) else {}
    rows = [[escape(name), _fmt(v.get("support")), _fmt(v.get("accuracy")), _fmt(v.get("sensitivity")),
             _fmt(v.get("specificity"))]
            for name, v in per_finding.items() if isinstance(v, Mapping) and v.get("support")]
    reason = lf.get("reason") if lf.get("status") == "skipped" else aud.get("applies_reason")
    return (f'<p>Status {_status(aud.get("label_fidelity_status"))}'
            + (f': {escape(str(reason))}' if reason else "")
            + f'. <small>{escape(str(aud.get("inception_score_note", aud.get("inception_score_reason", ""))))}'
            f'</small></p>' + _table(["figure", "value"], summary)
            + (_table(["finding (labelled in the set)", "support", "accuracy", "sensitivity", "specificity"], rows)
               if rows else ""))


def _failures(report: Mapping, thumbs: Mapping[str, np.ndarray]) -> str:
    failures = report.get("images", {}).get("failures", [])
    if not failures:
        return '<section id="failures"><h2>Flagged images</h2><p class="pass">none</p></section>'
    shown = failures[:MAX_FAILURE_THUMBS]
    figures = []
    for item in shown:
        messages = "".join(f"<li><code>{escape(k)}</code>: {escape(str(v))}</li>" for k, v in item["messages"].items())
        figures.append(f'<figure>{_img(thumbs.get(item["case_id"]), item["case_id"])}'
                       f'<figcaption><b>{escape(item["case_id"])}</b> {_status(item["status"])}<ul>{messages}</ul>'
                       f'</figcaption></figure>')
    rest = failures[MAX_FAILURE_THUMBS:]
    table = _table(["case", "status", "flags"], [[escape(i["case_id"]), _status(i["status"]),
                                                  escape("|".join(i["flags"]))] for i in rest]) if rest else ""
    return (f'<section id="failures"><h2>Flagged images ({len(failures)})</h2>'
            f'<p class="muted">fail: a gating check failed; warn: only non-gating checks.</p>'
            f'<div class="thumbs">{"".join(figures)}</div>{table}</section>')


def render_html(report: Mapping, *, thumbs: Mapping[str, np.ndarray] | None = None,
                grid: Mapping[tuple, Sequence[str]] | None = None) -> str:
    """The whole page as text.

    Args:
        report: the qc_report.json content.
        thumbs: case_id -> uint8 [h, w] thumbnail, for the sample grid, duplicates and failures.
        grid: (finding, severity) -> case ids shown in the sample grid.
    """
    thumbs = thumbs or {}
    name = escape(str(report.get("dataset", {}).get("name", "synthmed")))
    body = "".join([_summary(report), _spec_fidelity(report.get("sections", {}).get("spec_fidelity")),
                    _samples(grid or {}, thumbs), _intensity(report), _set_metrics(report, thumbs),
                    _failures(report, thumbs)])
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>QC report: {name}</title>'
            f"<style>{_CSS}</style></head><body>{body}"
            f'<footer><p class="muted">Made by synthmed qc. SYNTHETIC images; not for diagnostic use.</p></footer>'
            f"<script>{_SCRIPT}</script></body></html>\n")
