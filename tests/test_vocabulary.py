"""The vocabulary: CheXpert coverage, codes, parents, synonyms (English and Chinese), location projection."""

from __future__ import annotations

from collections import defaultdict

import pytest

from synthmed import CHEXPERT_COLUMNS, get_vocabulary
from synthmed.vocabulary import SECTIONS, normalise

VOCAB = get_vocabulary()


def test_chexpert_columns_are_the_14_observations_in_order():
    assert CHEXPERT_COLUMNS == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices",
    )


def test_every_chexpert_column_is_the_chexpert_value_of_some_finding():
    values = {f.chexpert for f in VOCAB.findings.values()}
    assert set(CHEXPERT_COLUMNS) <= values
    assert values <= set(CHEXPERT_COLUMNS), f"findings name non-CheXpert columns: {values - set(CHEXPERT_COLUMNS)}"


@pytest.mark.parametrize("column", CHEXPERT_COLUMNS)
def test_each_chexpert_column_has_a_top_level_finding(column):
    top = [f for f in VOCAB.findings.values() if f.chexpert == column and f.parent is None]
    assert top, f"no top-level finding for CheXpert column {column!r}"


@pytest.mark.parametrize("finding", list(VOCAB.findings))
def test_every_finding_has_a_code_in_a_declared_system(finding):
    f = VOCAB.findings[finding]
    assert f.code is not None, finding
    assert f.code.system in VOCAB.code_systems, (finding, f.code)
    assert f.code.code and f.code.display
    if f.code.system == "SCT":
        assert f.code.code.isdigit(), (finding, f.code)


@pytest.mark.parametrize("section", ["location", "severity", "view"])
def test_every_location_severity_and_view_has_a_code(section):
    for term in VOCAB.section(section).values():
        assert term.code is not None, (section, term.id)
        assert term.code.system in VOCAB.code_systems, (section, term.id, term.code)


@pytest.mark.parametrize("finding, code", [
    ("pleural_effusion", "60046008"),
    ("pneumothorax", "36118008"),
    ("edema", "19242006"),
    ("nodule", "27925004"),
    ("mass", "4147007"),
])
def test_specific_snomed_codes(finding, code):
    c = VOCAB.findings[finding].code
    assert (c.system, c.code) == ("SCT", code)
    assert str(c) == f"SCT:{code}"


def test_view_codes_are_not_swapped():
    assert VOCAB.views["PA"].code.code == "272479007"
    assert VOCAB.views["AP"].code.code == "399348003"


@pytest.mark.parametrize("child", ["nodule", "mass"])
def test_nodule_and_mass_are_lung_lesions(child):
    f = VOCAB.findings[child]
    assert f.parent == "lung_lesion"
    assert f.chexpert == "Lung Lesion"


def test_parents_exist_and_share_the_chexpert_column():
    for f in VOCAB.findings.values():
        if f.parent is not None:
            assert f.parent in VOCAB.findings, (f.id, f.parent)
            assert VOCAB.findings[f.parent].chexpert == f.chexpert, f.id


@pytest.mark.parametrize("section, word, expected", [
    ("finding", "气胸", "pneumothorax"),
    ("finding", "胸腔积液", "pleural_effusion"),
    ("finding", "肺炎", "pneumonia"),
    ("finding", "心脏增大", "cardiomegaly"),
    ("finding", "肺结节", "nodule"),
    ("finding", "肺水肿", "edema"),
    ("finding", "Pleural Effusions", "pleural_effusion"),
    ("finding", "PTX", "pneumothorax"),
    ("finding", "enlarged heart", "cardiomegaly"),
    ("finding", "pulmonary oedema", "edema"),
    ("finding", "pleural_effusion", "pleural_effusion"),
    ("finding", "pleural effusion", "pleural_effusion"),
    ("location", "右下肺叶", "right_lower_lobe"),
    ("location", "RLL", "right_lower_lobe"),
    ("location", "Right-Lower_Lobe", "right_lower_lobe"),
    ("location", "双侧", "bilateral"),
    ("location", "右", "right"),  # #17: bare sides, which a swapped synonym list would flip
    ("location", "左", "left"),
    ("location", "右侧", "right"),
    ("severity", "轻度", "mild"),
    ("severity", "2级", "moderate"),
    ("severity", "grade 2", "moderate"),
    ("severity", "Grade III", "severe"),
    ("view", "后前位", "PA"),
    ("view", "anteroposterior", "AP"),
    ("sex", "女", "F"),
    ("sex", "male", "M"),
])
def test_synonyms_resolve(section, word, expected):
    assert VOCAB.resolve(section, word) == expected


def test_full_width_forms_resolve():
    # NFKC folding: full-width letters and digits are ordinary ones
    assert VOCAB.resolve("severity", "２级") == "moderate"
    assert VOCAB.resolve("finding", "ＰＴＸ") == "pneumothorax"


def test_unknown_words_do_not_resolve():
    assert VOCAB.resolve("finding", "unicorn") is None
    assert VOCAB.resolve("location", "pneumonia") is None
    assert "pneumothorax" in VOCAB.suggest("finding", "pneumotorax")


@pytest.mark.parametrize("section", SECTIONS)
def test_no_word_maps_to_two_ids(section):
    ids_of = defaultdict(set)
    for term in VOCAB.section(section).values():
        for word in (term.id, term.text, *term.synonyms):
            ids_of[normalise(word)].add(term.id)
    ambiguous = {w: sorted(ids) for w, ids in ids_of.items() if len(ids) > 1}
    assert not ambiguous


@pytest.mark.parametrize("section", SECTIONS)
def test_every_word_resolves_to_its_own_term(section):
    for term in VOCAB.section(section).values():
        for word in (term.id, term.text, *term.synonyms):
            assert VOCAB.resolve(section, word) == term.id, (section, word)


@pytest.mark.parametrize("finding", ["pneumonia", "pneumothorax", "pleural_effusion", "edema", "nodule", "cardiomegaly"])
def test_findings_have_english_and_chinese_synonyms(finding):
    syn = VOCAB.findings[finding].synonyms
    assert any(all(ord(ch) < 128 for ch in s) for s in syn)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in s) for s in syn)


@pytest.mark.parametrize("location, finding, expected", [
    ("right_lower_lobe", "pneumonia", "right_lower_lobe"),      # admits lobes: unchanged
    ("right_lower_lobe", "pleural_effusion", "right"),          # laterality only: lobe -> side
    ("lingula", "pneumothorax", "left"),
    ("lingula", "pneumonia", "lingula"),
    ("right_lower_zone", "pleural_effusion", "right"),
    ("left_upper_zone", "consolidation", "left_upper_zone"),
    ("right_middle_lobe", "edema", "right"),
    ("bilateral", "pleural_effusion", "bilateral"),
    ("bilateral", "fracture", None),                             # a rib fracture is not bilateral here
    ("right", "fracture", "right"),
    ("right_lower_lobe", "cardiomegaly", None),                  # no location at all
    ("left", "support_devices", None),
    ("right", "pneumonia", "right"),
])
def test_project_location(location, finding, expected):
    assert VOCAB.project_location(location, finding) == expected


def test_location_hierarchy_is_lobe_zone_side():
    for loc in VOCAB.locations.values():
        if loc.kind == "lobe":
            assert VOCAB.locations[loc.parent].kind == "zone", loc.id
        elif loc.kind == "zone":
            assert VOCAB.locations[loc.parent].kind == "side", loc.id
        else:
            assert loc.parent is None, loc.id


def test_admitted_locations():
    assert VOCAB.admitted_locations("cardiomegaly") == []
    assert set(VOCAB.admitted_locations("pleural_effusion")) == {"right", "left", "bilateral"}
    assert set(VOCAB.admitted_locations("fracture")) == {"right", "left"}
    assert "right_lower_lobe" in VOCAB.admitted_locations("pneumonia")


@pytest.mark.parametrize("finding", list(VOCAB.findings))
def test_default_locations_are_admitted(finding):
    f = VOCAB.findings[finding]
    for loc, weight in f.default_location:
        assert weight > 0
        assert VOCAB.project_location(loc, finding) == loc, (finding, loc)
    assert bool(f.default_location) == bool(f.location_kinds), finding


def test_severity_grades():
    assert {s.id: s.grade for s in VOCAB.severities.values()} == {"mild": 1, "moderate": 2, "severe": 3}


def test_no_finding_is_exclusive_and_plain():
    f = VOCAB.findings["no_finding"]
    assert f.exclusive and not f.severity and not f.location_kinds


# ----------------------------------------------------------------------------- views and where locations show (#18)

def test_the_lateral_is_left_lateral_coded_as_in_dicom_cid_4010():
    """#18: LL is SCT 399173006 'left lateral', a member of PS3.16 CID 4010 (as pydicom tabulates it)."""
    from pydicom.sr._concepts_dict import concepts

    ll = VOCAB.views["LL"]
    assert (ll.code.system, ll.code.code, ll.code.display) == ("SCT", "399173006", "left lateral")
    assert concepts["SCT"]["LeftLateral"]["399173006"] == ("left lateral", [501, 3466, 4010])
    for view in VOCAB.views.values():  # every view's code is in CID 4010 with the same meaning
        [(name, cids)] = [m for k, v in concepts["SCT"].items() for c, m in v.items()
                          if c == view.code.code and 4010 in m[1]]
        assert name == view.code.display
    assert VOCAB.resolve("view", "lateral") == VOCAB.resolve("view", "侧位") == "LL"


def test_views_say_their_projection_and_display_orientation():
    assert {v: (t.projection, t.orientation) for v, t in VOCAB.views.items()} == {
        "PA": ("frontal", ("L", "F")), "AP": ("frontal", ("L", "F")), "LL": ("lateral", ("P", "F"))}


def test_every_location_has_a_frontal_and_a_lateral_region():
    for loc in VOCAB.locations.values():
        assert [p for p, _ in loc.regions] == ["frontal", "lateral"], loc.id


def test_a_lateral_shows_height_and_depth_but_no_side():
    """On LL the lungs superimpose: right and left counterparts show at the same place; a frontal keeps the side."""
    pairs = [("right_upper_lobe", "left_upper_lobe"), ("right_middle_lobe", "lingula"),
             ("right_lower_lobe", "left_lower_lobe"), ("right", "left"), ("right", "bilateral")] + [
        (f"right_{z}_zone", f"left_{z}_zone") for z in ("upper", "middle", "lower")]
    for right, left in pairs:
        assert VOCAB.view_region(right, "LL") == VOCAB.view_region(left, "LL"), (right, left)
        assert VOCAB.view_region(right, "PA").across != VOCAB.view_region(left, "PA").across
    assert VOCAB.view_region("right_lower_lobe", "LL") == VOCAB.view_region("left_lower_lobe", "LL")
    assert {VOCAB.view_region(lobe, "LL").across for lobe in ("right_upper_lobe", "right_middle_lobe", "lingula")} \
        == {"anterior"}
    assert VOCAB.view_region("left_lower_lobe", "LL").across == "posterior"
    assert VOCAB.view_region("right_middle_lobe", "LL").height == "lower"


def test_frontal_regions_agree_with_the_location_hierarchy():
    """A frontal region is the location's zone height and side: the hierarchy and the regions cannot drift apart."""
    for loc in VOCAB.locations.values():
        region = VOCAB.view_region(loc.id, "AP")
        assert VOCAB.view_region(loc.id, None) == VOCAB.view_region(loc.id, "PA") == region
        side = loc.id if loc.kind == "side" else loc.parent if loc.kind == "zone" else VOCAB.locations[loc.parent].parent
        assert region.across == side, loc.id
        zone = loc.id if loc.kind == "zone" else loc.parent if loc.kind == "lobe" else None
        assert region.height == (zone.split("_")[1] if zone else "whole"), loc.id


def test_the_shipped_tokenizer_holds_every_prompt_word_in_order_lateral_included():
    """#18/#19: 'LL' was appended to the word list (earlier ids unchanged); the shipped model, trained on lateral drr
    films since, has a token for it, so no prompt word of the vocabulary is [UNK] to it."""
    import json

    from synthmed.backends import default_model_dir
    from synthmed.finetune import SPECIAL_TOKENS, vocabulary_words

    shipped = default_model_dir() / "tokenizer" / "tokenizer.json"
    if not shipped.is_file():
        pytest.skip("the shipped default model is not in this installation")
    ids = json.loads(shipped.read_text(encoding="utf-8"))["model"]["vocab"]
    words = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")] + vocabulary_words()
    assert {w: i for i, w in enumerate(words)} == ids
    assert ids["ll"] == len(words) - 1  # appended last: every earlier word kept its id
