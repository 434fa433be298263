"""report.html and qc_report.json: self-contained (no external resource), every section and image there,
deterministic, and rendered by a real browser: headless Chromium decodes every <img> and lays out every section."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthmed.build import generate
from synthmed.qc import qc
from synthmed.qc.report import SECTIONS, bar_chart_svg, histogram_svg, render_html, values_svg

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(Debian package chromium; scripts/install-system-deps.sh installs it)")

SPEC = textwrap.dedent("""\
    spec_version: 1
    name: report-test
    seed: 3
    count: 12
    image: {size: 64}
    findings:
      - {finding: no_finding, weight: 0.4}
      - {finding: pneumonia, weight: 0.4, location: left_lower_lobe, severity: {mild: 0.5, moderate: 0.5}}
      - {finding: [pleural_effusion, cardiomegaly], weight: 0.2, severity: severe}
    """)


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> Path:
    """A built set with one blanked image, checked by the full qc (no auditor)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        out = tmp_path_factory.mktemp("report") / "out"
        generate(SPEC, out, backend="pattern", progress=False, qc=False)
        from synthmed.writers.png import png_bytes

        (out / "images" / "train" / "case-0000004.png").write_bytes(png_bytes(np.zeros((64, 64), np.uint8)))
        result = qc(out, auditor=False)
    assert not result.passed and "case-0000004" in result.flagged
    return out


def images_of(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_json_has_every_figure_threshold_and_verdict(checked):
    report = json.loads((checked / "qc_report.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "fail" and "blank" in report["failed_checks"]
    for name, check in report["checks"].items():
        assert {"description", "gating", "status"} <= set(check), name
        assert check["status"] in ("pass", "fail", "skipped", "info"), name
        if check["status"] == "skipped":
            assert check.get("reason"), name
    assert report["thresholds"]["min_spec_fidelity"] == 0.9
    assert set(report["sections"]) >= {"spec_fidelity", "duplicates", "diversity", "intensity", "reference",
                                       "auditor", "memorisation", "dciodvfy"}
    assert report["sections"]["auditor"]["reason"] == "not requested"


def test_html_is_self_contained(checked):
    html = (checked / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"<link\b|@import|url\(|\bhref=", html)
    assert not re.search(r'\bsrc="(?!data:image/png;base64,)', html)
    # the only "http" is the SVG namespace, which is a name, not a fetch
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {"http://www.w3.org/2000/svg"}


def test_html_has_every_section_and_decodable_images(checked):
    html = (checked / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    sources = images_of(html)
    # the sample grid (3 finding labels, up to 4 each) and the flagged image
    assert len(sources) >= 9
    for src in sources:
        data = base64.b64decode(src.split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size[0] > 0 and im.mode == "L"
    failures = html[html.index('<section id="failures">'):]
    assert "case-0000004" in failures and "<code>blank</code>" in failures and "<img " in failures
    assert html.count("<svg") >= 8  # one bar chart per attribute, the histogram, diversity
    assert "spec vs actual" in html


def test_html_and_json_are_deterministic(checked, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(checked, again)
    qc(again, auditor=False)
    for name in ("qc_report.json", "report.html", "manifest.csv"):
        assert (again / name).read_bytes() == (checked / name).read_bytes(), name


def test_svg_charts_are_well_formed():
    cells = [{"category": "a", "expected_p": 0.5, "observed_p": 0.25}, {"category": "b & <c>", "expected_p": 0.5,
                                                                          "observed_p": 0.75}]
    for svg in (bar_chart_svg(cells, "sex"),
                histogram_svg({"set": {"mean": [0.5, 0.5], "p5": [0.4, 0.4], "p95": [0.6, 0.6]},
                               "reference": {"mean": [0.3, 0.7]}}).split("<div")[0],
                values_svg({"p": 0.4, "q": 0.9}, "MS-SSIM", 0.8)):
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_render_html_of_a_minimal_report():
    page = render_html({"verdict": "pass", "dataset": {"name": "<x>"}, "checks": {}, "sections": {},
                        "images": {"checked": 0, "failures": []}})
    assert "&lt;x&gt;" in page and "<x>" not in page
    for section in SECTIONS:
        assert f'<section id="{section}">' in page


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


@needs_chromium
def test_chromium_renders_every_section_and_decodes_every_image(checked, tmp_path):
    page = (checked / "report.html").resolve()
    run = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    dom = run.stdout
    assert run.returncode == 0 and dom, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attributes.get("data-report-ready") == "yes", attributes
    total = int(attributes["data-images-total"])
    assert total == len(images_of((checked / "report.html").read_text(encoding="utf-8"))) >= 9
    assert int(attributes["data-images-decoded"]) == total  # every <img> has naturalWidth > 0
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section

    shot = tmp_path / "report.png"
    run = _chromium("--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10  # text, charts and thumbnails, not a blank page
