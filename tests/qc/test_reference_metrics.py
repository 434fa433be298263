"""reference_metrics.per_finding_report: the set-level figures between the images of one finding on either side."""

from __future__ import annotations

import numpy as np
import pytest

from synthmed.qc.reference_metrics import per_finding_report, set_figures, with_ancestors


def test_each_finding_compares_its_own_images():
    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(60, 4)), rng.normal(size=(50, 4)) + 0.5
    gen_findings = [["pneumonia"]] * 25 + [["pleural_effusion", "cardiomegaly"]] * 25 + [["nodule"]] * 10
    ref_findings = [["pneumonia"]] * 20 + [["cardiomegaly"]] * 20 + [["lung_lesion"]] * 10
    parents = {"nodule": "lung_lesion", "mass": "lung_lesion"}
    report = per_finding_report(gen, gen_findings, ref, ref_findings, labels="test", parents=parents,
                                order=["lung_lesion", "nodule", "cardiomegaly", "pneumonia", "pleural_effusion"],
                                min_images=10)
    assert list(report["findings"]) == ["lung_lesion", "cardiomegaly", "pneumonia"]  # the order given
    cardiomegaly = report["findings"]["cardiomegaly"]  # an image with two findings counts under both
    assert (cardiomegaly["n_generated"], cardiomegaly["n_reference"]) == (25, 20)
    expected = set_figures(gen[25:50], ref[20:40])
    assert cardiomegaly["fid"] == pytest.approx(expected["fid"]) and cardiomegaly["kid"] == pytest.approx(expected["kid"])
    assert cardiomegaly["coverage"] == expected["coverage"]
    # the generated nodules are compared with the reference's lung lesions (CheXpert's word) under lung_lesion
    assert report["findings"]["lung_lesion"]["n_generated"] == 10
    assert report["skipped"] == {"nodule": "10 generated and 0 reference images; at least 10 of each are needed",
                                 "pleural_effusion": "25 generated and 0 reference images; at least 10 of each are "
                                                     "needed"}
    assert report["reference_only"] == [] and report["labels"] == "test" and report["min_images"] == 10


def test_small_groups_get_fid_and_kid_but_no_prdc():
    rng = np.random.default_rng(1)
    report = per_finding_report(rng.normal(size=(4, 3)), [["a"]] * 4, rng.normal(size=(5, 3)), [["a"]] * 5,
                                min_images=2)
    figures = report["findings"]["a"]
    assert "fid" in figures and "kid" in figures and "precision" not in figures
    assert figures["prdc_reason"] == "precision/recall/density/coverage need more than 5 images per set, got 4 and 5"


def test_a_parent_loop_in_a_vocabulary_ends():
    assert with_ancestors(["a"], {"a": "b", "b": "a"}) == ("a", "b")
