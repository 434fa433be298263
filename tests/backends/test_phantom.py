"""The phantom backend: anatomy where it belongs, findings where their labels say, exact labels."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from synthmed.backends import GeneratedImage
from synthmed.backends.phantom import PhantomBackend, render_case
from synthmed.sampler import Case, FindingLabel
from synthmed.vocabulary import get_vocabulary

SIZE = 128


def make_case(*findings: FindingLabel, seed: int = 7, sex: str = "M", age: int = 55, view: str = "PA") -> Case:
    return Case("case-0000000", 0, "train", seed, tuple(findings) or (FindingLabel("no_finding"),), sex, age, view)


def without(case: Case, finding: str) -> Case:
    return replace(case, findings=tuple(f for f in case.findings if f.finding != finding))


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]


def test_pixels_are_float32_in_unit_range_and_masks_match():
    case = make_case(FindingLabel("pneumonia", "right_lower_lobe", "moderate"), FindingLabel("pleural_effusion", "left", "mild"))
    image = render_case(case, SIZE, SIZE)
    assert isinstance(image, GeneratedImage)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (SIZE, SIZE)
    assert np.isfinite(image.pixels).all() and image.pixels.min() >= 0 and image.pixels.max() <= 1
    assert set(image.masks) == {"pneumonia", "pleural_effusion"}
    for mask in image.masks.values():
        assert mask.dtype == bool and mask.shape == (SIZE, SIZE)


def test_lungs_are_darker_than_mediastinum_and_spine():
    image = render_case(make_case(), SIZE, SIZE)
    p = image.pixels
    h, w = p.shape
    lung_r = p[int(0.3 * h):int(0.5 * h), int(0.2 * w):int(0.3 * w)]   # image left = patient right
    lung_l = p[int(0.3 * h):int(0.5 * h), int(0.7 * w):int(0.8 * w)]
    mediastinum = p[int(0.25 * h):int(0.45 * h), int(0.47 * w):int(0.53 * w)]
    below_diaphragm = p[int(0.85 * h):int(0.95 * h), int(0.3 * w):int(0.7 * w)]
    assert lung_r.mean() < mediastinum.mean() - 0.2
    assert lung_l.mean() < mediastinum.mean() - 0.2
    assert lung_r.mean() < below_diaphragm.mean() - 0.2
    assert p[2:6, 2:6].mean() < 0.15  # air outside the body is dark


def test_right_lower_lobe_pneumonia_is_in_the_lower_image_left_lung():
    image = render_case(make_case(FindingLabel("pneumonia", "right_lower_lobe", "moderate")), SIZE, SIZE)
    x, y = centroid(image.masks["pneumonia"])
    assert x < 0.45 and 0.45 < y < 0.75


@pytest.mark.parametrize("location, side", [("left_upper_lobe", "L"), ("right_upper_lobe", "R"),
                                            ("lingula", "L"), ("right_middle_lobe", "R")])
def test_lobes_land_on_their_side_and_height(location, side):
    image = render_case(make_case(FindingLabel("consolidation", location, "moderate")), SIZE, SIZE)
    x, y = centroid(image.masks["consolidation"])
    assert (x < 0.5) == (side == "R")
    if "upper" in location:
        assert y < 0.4
    else:
        assert y > 0.4


@pytest.mark.parametrize("location", ["right", "left", "bilateral"])
def test_effusion_sits_at_the_base_of_its_side(location):
    image = render_case(make_case(FindingLabel("pleural_effusion", location, "moderate")), SIZE, SIZE)
    mask = image.masks["pleural_effusion"]
    x, y = centroid(mask)
    assert y > 0.55
    left_half, right_half = mask[:, :SIZE // 2].sum(), mask[:, SIZE // 2:].sum()
    if location == "right":
        assert left_half > 0 and right_half == 0
    elif location == "left":
        assert right_half > 0 and left_half == 0
    else:
        assert left_half > 0 and right_half > 0


@pytest.mark.parametrize("severity, lo, hi", [("mild", 0.52, 0.55), ("moderate", 0.55, 0.60), ("severe", 0.60, 0.9)])
@pytest.mark.parametrize("view", ["PA", "AP"])
def test_cardiomegaly_ctr_is_in_its_band(severity, lo, hi, view):
    for seed in (1, 2, 3):
        image = render_case(make_case(FindingLabel("cardiomegaly", None, severity), seed=seed, view=view), SIZE, SIZE)
        assert lo < image.measurements["cardiothoracic_ratio"] < hi


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_ctr_is_below_half_without_cardiomegaly(view):
    for seed in range(6):
        for sex in "FM":
            image = render_case(make_case(seed=seed, sex=sex, view=view), SIZE, SIZE)
            assert image.measurements["cardiothoracic_ratio"] < 0.5


def test_ctr_is_measured_from_the_heart_mask():
    image = render_case(make_case(FindingLabel("cardiomegaly", None, "moderate")), 256, 256)
    heart = image.masks["cardiomegaly"]
    width = heart.sum(axis=1).max() / 256
    assert 0.3 < width / image.measurements["cardiothoracic_ratio"] < 0.9  # thoracic width, as a fraction


OPACITIES = [("pneumonia", "right_lower_lobe"), ("consolidation", "left_lower_lobe"), ("lung_opacity", "right_upper_zone"),
             ("atelectasis", "right_lower_lobe"), ("pleural_effusion", "right"), ("edema", "bilateral"),
             ("nodule", "left_upper_lobe"), ("mass", "right_middle_lobe"), ("lung_lesion", "lingula"),
             ("pleural_other", "left"), ("enlarged_cardiomediastinum", None), ("endotracheal_tube", None),
             ("central_venous_catheter", None), ("pacemaker", None)]


@pytest.mark.parametrize("finding, location", OPACITIES)
def test_opacities_brighten_their_mask(finding, location):
    severe = "moderate" if get_vocabulary().findings[finding].severity else None
    case = make_case(FindingLabel(finding, location, severe), FindingLabel("cardiomegaly", None, "mild"))
    image = render_case(case, SIZE, SIZE)
    plain = render_case(without(case, finding), SIZE, SIZE)
    mask = image.masks[finding]
    assert mask.any()
    assert image.pixels[mask].mean() > plain.pixels[mask].mean() + 0.01
    # the rest of the case is untouched
    assert plain.measurements["cardiothoracic_ratio"] == image.measurements["cardiothoracic_ratio"]


def test_pneumothorax_darkens_its_mask():
    case = make_case(FindingLabel("pneumothorax", "left", "moderate"))
    image, plain = render_case(case, SIZE, SIZE), render_case(without(case, "pneumothorax"), SIZE, SIZE)
    mask = image.masks["pneumothorax"]
    assert mask[:, SIZE // 2:].sum() > 0 and mask[:, :SIZE // 2].sum() == 0
    assert image.pixels[mask].mean() < plain.pixels[mask].mean()


def test_fracture_changes_a_rib_on_its_side():
    case = make_case(FindingLabel("fracture", "right"))
    image, plain = render_case(case, 256, 256), render_case(without(case, "fracture"), 256, 256)
    mask = image.masks["fracture"]
    assert mask.any() and centroid(mask)[0] < 0.5
    assert np.abs(image.pixels - plain.pixels)[mask].max() > 0.02


@pytest.mark.parametrize("finding, location", [("pneumonia", "right_lower_lobe"), ("pleural_effusion", "left"),
                                               ("pneumothorax", "right"), ("nodule", "right_upper_lobe"),
                                               ("mass", "left_lower_lobe"), ("consolidation", "lingula"),
                                               ("atelectasis", "left_lower_lobe"), ("edema", "bilateral"),
                                               ("lung_opacity", "right"), ("cardiomegaly", None),
                                               ("enlarged_cardiomediastinum", None)])
def test_severity_orders_the_effect(finding, location):
    areas = []
    for severity in ("mild", "moderate", "severe"):
        image = render_case(make_case(FindingLabel(finding, location, severity)), SIZE, SIZE)
        areas.append(int(image.masks[finding].sum()))
    assert areas[0] < areas[1] < areas[2], areas


def test_nodule_smaller_than_3cm_and_mass_larger():
    sizes = {}
    for finding in ("nodule", "mass"):
        image = render_case(make_case(FindingLabel(finding, "right_upper_lobe", "severe" if finding == "nodule" else "mild")), 256, 256)
        sizes[finding] = image.masks[finding].sum()
    assert sizes["nodule"] < sizes["mass"]


def test_same_case_same_pixels_and_different_seeds_differ():
    case = make_case(FindingLabel("pneumonia", "left_lower_lobe", "severe"))
    a, b = render_case(case, SIZE, SIZE), render_case(case, SIZE, SIZE)
    assert np.array_equal(a.pixels, b.pixels)
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
    other = render_case(replace(case, seed=8), SIZE, SIZE)
    assert np.abs(other.pixels - a.pixels).mean() > 0.005


def test_removing_a_finding_keeps_the_anatomy():
    case = make_case(FindingLabel("nodule", "right_upper_lobe", "mild"), FindingLabel("pleural_effusion", "left", "mild"))
    image, plain = render_case(case, SIZE, SIZE), render_case(without(case, "nodule"), SIZE, SIZE)
    outside = ~(image.masks["nodule"] | image.masks["pleural_effusion"])
    # outside the removed finding only noise-level differences from blur at its edge remain
    assert np.median(np.abs(image.pixels - plain.pixels)[outside]) < 1e-6
    assert np.array_equal(image.masks["pleural_effusion"], plain.masks["pleural_effusion"])
    none = render_case(case, SIZE, SIZE, include_findings=False)
    assert np.array_equal(none.pixels, render_case(make_case(), SIZE, SIZE).pixels)


def test_every_vocabulary_finding_renders_with_a_mask():
    vocab = get_vocabulary()
    for fid, finding in vocab.findings.items():
        location = next(iter(dict(finding.default_location)), None)
        label = FindingLabel(fid, location, "moderate" if finding.severity else None)
        image = render_case(make_case(label), SIZE, SIZE)
        assert np.isfinite(image.pixels).all()
        if fid == "no_finding":
            assert image.masks == {} and image.measurements["cardiothoracic_ratio"] < 0.5
        else:
            assert image.masks[fid].any(), fid


@pytest.mark.parametrize("location", ["left_lower_lobe", "left_lower_zone", "left"])
@pytest.mark.parametrize("view, size", [("PA", 128), ("PA", 256), ("AP", 128)])
def test_a_mild_collapse_behind_the_heart_is_still_drawn(location, view, size):
    """A mild left lower collapse fell wholly behind the heart, where the lung field is not: labelled atelectasis,
    nothing drawn, an empty mask. It is grown until it shows."""
    for seed in range(3):
        image = render_case(make_case(FindingLabel("atelectasis", location, "mild"), seed=seed, view=view), size, size)
        assert image.masks["atelectasis"].sum() >= size * size // 1000, (location, view, size, seed)


def test_every_finding_at_every_location_and_severity_is_drawn():
    """No finding x location x severity the vocabulary allows gives an empty mask (64-pixel films: the smallest
    drawings)."""
    vocab = get_vocabulary()
    empty = []
    for fid, finding in vocab.findings.items():
        if fid == "no_finding":
            continue
        locations = sorted({vocab.project_location(loc, fid) for loc in vocab.locations
                            if vocab.project_location(loc, fid)}) if finding.location_kinds else [None]
        for location in locations:
            for severity in (list(vocab.severities) if finding.severity else [None]):
                image = render_case(make_case(FindingLabel(fid, location, severity)), 64, 64)
                if not image.masks[fid].any():
                    empty.append((fid, location, severity))
    assert not empty


@pytest.mark.parametrize("width, height", [(128, 128), (128, 256), (256, 128), (200, 312), (1024, 1024)])
def test_sizes_and_aspect(width, height):
    image = PhantomBackend(width, height).generate([make_case(FindingLabel("pleural_effusion", "bilateral", "mild"))], [None])[0]
    assert image.pixels.shape == (height, width)
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert image.masks["pleural_effusion"].shape == (height, width)
    assert image.measurements["cardiothoracic_ratio"] < 0.5


def test_backend_info_and_validation():
    backend = PhantomBackend(128, 136)
    assert backend.info.name == "phantom" and backend.info.model_id == "synthmed-phantom-v2"
    assert backend.info.model_hash == "phantom-v2"
    cases = [make_case(seed=s) for s in range(3)]
    images = backend.generate(cases, [None] * 3)
    assert len(images) == 3 and all(im.pixels.shape == (136, 128) for im in images)
    for bad in (100, 130, 2048):
        with pytest.raises(ValueError, match="width"):
            PhantomBackend(bad, 128)


def test_sex_and_view_change_the_anatomy():
    base = render_case(make_case(sex="M"), SIZE, SIZE).pixels
    assert np.abs(render_case(make_case(sex="F"), SIZE, SIZE).pixels - base).mean() > 0.005
    assert np.abs(render_case(make_case(view="AP"), SIZE, SIZE).pixels - base).mean() > 0.005
