"""scripts/sweep_guidance.py: one row per guidance scale, read on cases that are not the card's held-out ones."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
from script_helpers import load_script  # noqa: E402

from synthmed.backends.drr import AnatomyMissing  # noqa: E402
from synthmed.backends.drr import anatomy as anat  # noqa: E402


@pytest.mark.slow
def test_each_scale_is_made_and_read_beside_the_films(tmp_path):
    try:
        anat.load_anatomy()
    except AnatomyMissing as e:
        pytest.skip(f"anatomy data not set up ({e})")
    script = load_script("sweep_guidance")
    out = tmp_path / "figures.json"

    model = script.ROOT / "synthmed/models/default"
    assert script.main(["--model", str(model), "--guidance", "1,4", "--count", "4", "--work", str(tmp_path / "work"),
                        "--json", str(out)]) == 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert set(figures["scales"]) == {"1", "4"} and figures["seed"] != 777001  # not the card's cases
    for name in ("1", "4"):
        made = figures["scales"][name]
        assert 0 <= made["finding_set"] <= 1 and made["fid_to_films"] > 0 and made["images_per_s"] > 0
        assert made["lowest_sensitivity"] == min(made["sensitivity"].values())  # each finding's, not just the worst
        assert sum(v["cases"] for v in made["by_view"].values()) == 4  # every case read in its view's row
        with open(tmp_path / "work" / f"guidance-{name}" / "manifest.csv", newline="", encoding="utf-8") as fh:
            used = {json.loads(row["generation"])["guidance_scale"] for row in csv.DictReader(fh)}
        assert used == {float(name)}  # the scale each row claims is the one the images were made with
    assert figures["films"]["finding_set"] >= 0


def test_a_guidance_list_that_is_not_numbers_is_a_usage_error():
    script = load_script("sweep_guidance")
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", "m", "--guidance", "four"])
    assert e.value.code == 2
