"""Prompts: template filling, emphasis spans, template versions, and the tag-prompt parser."""

from __future__ import annotations

import hashlib

import pytest

from synthmed import Case, FindingLabel, build_prompt, case_to_tags, get_vocabulary, load_spec, parse_tag_prompt, sample_cases
from synthmed.prompts import BUILTIN_TEMPLATES, PLACEHOLDERS, Emphasis, Prompt, check_template

VOCAB = get_vocabulary()
DESIGN_TEMPLATE = "{view} chest radiograph of a {age} year old {sex}. {findings}."


def spec_with_prompt(prompt: dict | None = None, findings=None, **kw):
    d = {"spec_version": 1, "name": "p", "count": 50, "seed": 3,
         "findings": findings or [{"finding": "pneumonia", "weight": 1}]}
    if prompt is not None:
        d["prompt"] = prompt
    d.update(kw)
    return load_spec(d)


def case(*findings, sex="F", age=58, view="PA", case_id="c", index=0, split="train", seed=1):
    return Case(case_id, index, split, seed, tuple(findings), sex, age, view)


RLL_PNEUMONIA = FindingLabel("pneumonia", "right_lower_lobe", "moderate")


# ----------------------------------------------------------------------------- build_prompt

def test_design_template_text():
    spec = spec_with_prompt({"template": DESIGN_TEMPLATE, "emphasis": {"finding": 1.3},
                             "negative": "text, letters, watermark"})
    p = build_prompt(case(RLL_PNEUMONIA), spec.prompt)
    assert p.text == "PA chest radiograph of a 58 year old female. Moderate right lower lobe pneumonia."
    assert p.negative == "text, letters, watermark"
    assert p.template_id == "synthmed-v1"  # the design template written out is the built-in one


def test_default_prompt_is_synthmed_v1():
    p = build_prompt(case(RLL_PNEUMONIA))
    assert p.text == "PA chest radiograph of a 58 year old female. Moderate right lower lobe pneumonia."
    assert p.template_id == "synthmed-v1" and p.weights == () and p.negative == ""


@pytest.mark.parametrize("findings, sex, age, view, expected", [
    ((FindingLabel("no_finding"),), "M", 30, "AP",
     "AP chest radiograph of a 30 year old male. No acute cardiopulmonary abnormality."),
    ((FindingLabel("pleural_effusion", "left", "moderate"), FindingLabel("cardiomegaly", None, "moderate")), "M", 44, "AP",
     "AP chest radiograph of a 44 year old male. Moderate left pleural effusion and moderate cardiomegaly."),
    ((RLL_PNEUMONIA, FindingLabel("pleural_effusion", "right"), FindingLabel("cardiomegaly", None, "mild")), "F", 58, "PA",
     "PA chest radiograph of a 58 year old female. Moderate right lower lobe pneumonia, right pleural effusion "
     "and mild cardiomegaly."),
    ((FindingLabel("edema", "bilateral", "severe"),), "F", 81, "PA",
     "PA chest radiograph of a 81 year old female. Severe bilateral pulmonary edema."),
    ((FindingLabel("support_devices"),), "M", 70, "AP",
     "AP chest radiograph of a 70 year old male. Support devices."),
])
def test_design_template_texts(findings, sex, age, view, expected):
    assert build_prompt(case(*findings, sex=sex, age=age, view=view)).text == expected


def test_roentgen_template_is_findings_only():
    spec = spec_with_prompt({"template": "roentgen-v1"})
    assert spec.prompt.template_id == "roentgen-v1"
    p = build_prompt(case(RLL_PNEUMONIA), spec.prompt)
    assert p.text == "Moderate right lower lobe pneumonia"
    assert p.template_id == "roentgen-v1"


def test_view_long_placeholder():
    spec = spec_with_prompt({"template": "{view_long} radiograph: {findings}"})
    p = build_prompt(case(RLL_PNEUMONIA, view="AP"), spec.prompt)
    assert p.text == "Antero-posterior radiograph: moderate right lower lobe pneumonia"


def test_missing_value_is_an_error():
    with pytest.raises(ValueError, match="age"):
        build_prompt(case(RLL_PNEUMONIA, age=None))


def test_builtin_template_names():
    assert set(BUILTIN_TEMPLATES) == {"synthmed-v1", "roentgen-v1"}
    assert BUILTIN_TEMPLATES["synthmed-v1"] == DESIGN_TEMPLATE
    for name, text in BUILTIN_TEMPLATES.items():
        assert check_template(text) == [], name
        spec = spec_with_prompt({"template": name})
        assert (spec.prompt.template_id, spec.prompt.template) == (name, text)
    assert spec_with_prompt().prompt.template_id == "synthmed-v1"


def test_custom_template_id_is_stable_and_content_addressed():
    text = "{sex}, {age}: {findings}"
    a = spec_with_prompt({"template": text}).prompt
    b = spec_with_prompt({"template": text}, seed=99, count=7).prompt
    c = spec_with_prompt({"template": text + "!"}).prompt
    assert a.template_id == b.template_id == "custom-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    assert c.template_id != a.template_id and c.template_id.startswith("custom-")
    assert build_prompt(case(RLL_PNEUMONIA), a).template_id == a.template_id


# ----------------------------------------------------------------------------- emphasis

@pytest.fixture(scope="module")
def design_cases():
    spec = load_spec("dataset_specs/pneumonia.yaml")
    return spec, sample_cases(spec)


def test_emphasis_spans_cover_exactly_the_finding_words(design_cases):
    spec, cases = design_cases
    finding_texts = {f.text for f in VOCAB.findings.values()}
    seen = set()
    for c in cases:
        p = build_prompt(c, spec.prompt)
        assert len(p.weights) == len(c.findings)
        for e, f in zip(sorted(p.weights, key=lambda e: e.start), c.findings):
            assert e.role == "finding" and e.weight == 1.3
            word = p.text[e.start:e.end]
            assert word.lower() == VOCAB.findings[f.finding].text, (p.text, e)
            assert word.lower() in finding_texts
            seen.add(word)
    assert "pneumonia" in seen  # a graded pneumonia: the word itself, lower case


def test_emphasis_on_the_pneumonia_word():
    spec = spec_with_prompt({"template": DESIGN_TEMPLATE, "emphasis": {"finding": 1.3}})
    p = build_prompt(case(RLL_PNEUMONIA), spec.prompt)
    assert len(p.weights) == 1
    e = p.weights[0]
    assert p.text[e.start:e.end] == "pneumonia"
    assert (e.weight, e.role) == (1.3, "finding")


def test_emphasis_of_every_role():
    emphasis = {"finding": 1.3, "location": 1.2, "severity": 1.1, "view": 0.9, "sex": 1.05, "age": 1.5}
    spec = spec_with_prompt({"template": DESIGN_TEMPLATE, "emphasis": emphasis})
    p = build_prompt(case(RLL_PNEUMONIA, FindingLabel("pleural_effusion", "right", "mild")), spec.prompt)
    spans = {(e.role, p.text[e.start:e.end]) for e in p.weights}
    assert spans == {("view", "PA"), ("age", "58"), ("sex", "female"), ("severity", "Moderate"),
                     ("location", "right lower lobe"), ("finding", "pneumonia"), ("severity", "mild"),
                     ("location", "right"), ("finding", "pleural effusion")}
    for e in p.weights:
        assert e.weight == emphasis[e.role]


def test_other_roles_have_no_spans_unless_asked(design_cases):
    spec, cases = design_cases
    assert dict(spec.prompt.emphasis) == {"finding": 1.3}
    for c in cases[:200]:
        assert {e.role for e in build_prompt(c, spec.prompt).weights} <= {"finding"}


def test_weight_one_gives_no_span():
    spec = spec_with_prompt({"template": DESIGN_TEMPLATE, "emphasis": {"finding": 1.0, "location": 1}})
    assert build_prompt(case(RLL_PNEUMONIA), spec.prompt).weights == ()


def test_segments():
    spec = spec_with_prompt({"template": DESIGN_TEMPLATE, "emphasis": {"finding": 1.3, "age": 0.8}})
    p = build_prompt(case(RLL_PNEUMONIA), spec.prompt)
    segs = p.segments()
    assert "".join(s for s, _ in segs) == p.text
    assert segs == [("PA chest radiograph of a ", 1.0), ("58", 0.8), (" year old female. Moderate right lower lobe ", 1.0),
                    ("pneumonia", 1.3), (".", 1.0)]
    assert Prompt("plain").segments() == [("plain", 1.0)]
    assert Prompt("ab", weights=(Emphasis(0, 2, 2.0, "finding"),)).segments() == [("ab", 2.0)]


# ----------------------------------------------------------------------------- check_template

@pytest.mark.parametrize("template, fragment", [
    ("{vew} chest radiograph. {findings}.", "did you mean '{view}'"),
    ("{patient_age} {findings}", "unknown placeholder '{patient_age}'"),
    ("{view} chest radiograph", "must contain {findings}"),
    ("{age:>3} {findings}", "no format spec"),
    ("{sex!r} {findings}", "no format spec"),
    ("{findings", "not a valid format text"),
])
def test_check_template_rejects(template, fragment):
    problems = check_template(template)
    assert problems and any(fragment in p for p in problems), problems


def test_check_template_accepts_all_placeholders():
    assert check_template(" ".join("{" + p + "}" for p in PLACEHOLDERS)) == []
    assert check_template("{{literal}} {findings}") == []


def test_spec_with_bad_template_is_rejected():
    from synthmed import SpecError

    with pytest.raises(SpecError, match="did you mean '{view}'"):
        spec_with_prompt({"template": "{vew} chest radiograph. {findings}."})


# ----------------------------------------------------------------------------- tag prompts

def test_english_and_chinese_tags_parse_to_the_same_case():
    a = parse_tag_prompt("[finding: mild pneumonia][location: right lower lobe][severity: grade 2]")
    b = parse_tag_prompt("[重点:轻度肺炎][位置:右下肺叶][严重程度:2级]")
    assert a == b
    assert a.findings == (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),)
    assert (a.sex, a.age, a.view, a.split, a.seed) == (None, None, None, None, None)


@pytest.mark.parametrize("text", [
    "[finding: pneumonia][location: right lower lobe][severity: moderate]",
    "［finding：pneumonia］［location：right lower lobe］［severity：moderate］",
    "【重点：肺炎】【位置：右下肺叶】【严重程度：中度】",
    "[重点：肺炎][位置：右下肺叶][严重程度:二级]",
    "[Finding: Pneumonia] [Location: RLL] [Severity: 2]",
    "[finding: moderate right lower lobe pneumonia]",
    "[重点: 右下肺叶中度肺炎]",
    "[重点: 中度右下肺叶肺炎]",
    "[finding: right lower lobe pneumonia][severity: grade ii]",
])
def test_tag_variants(text):
    assert parse_tag_prompt(text).findings == (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),)


def test_multiple_findings_each_with_its_own_location():
    c = parse_tag_prompt("[finding: pneumonia][location: left lower lobe][severity: mild]"
                         "[finding: pleural effusion][location: right]"
                         "[finding: pneumothorax][location: left][severity: severe]"
                         "[finding: cardiomegaly]")
    assert c.findings == (FindingLabel("pneumonia", "left_lower_lobe", "mild"),
                          FindingLabel("pleural_effusion", "right", None),
                          FindingLabel("pneumothorax", "left", "severe"),
                          FindingLabel("cardiomegaly", None, None))


@pytest.mark.parametrize("text, location", [
    ("[重点:气胸][位置:右]", "right"),
    ("[重点:气胸][位置:左]", "left"),
    ("[重点:气胸][位置:右侧]", "right"),
    ("[重点:气胸][位置:左侧]", "left"),
    ("[重点:气胸][位置:右肺]", "right"),
    ("[重点:右侧气胸]", "right"),
    ("[重点:左气胸]", "left"),
    ("[重点:右气胸]", "right"),
])
def test_chinese_sides_parse_to_their_side(text, location):
    """#17: bare 右 / 左 and 右侧 are the patient's right and left (a swapped synonym passed every test)."""
    assert parse_tag_prompt(text).findings == (FindingLabel("pneumothorax", location, None),)


def test_location_is_projected_to_what_the_finding_admits():
    c = parse_tag_prompt("[finding: pleural effusion][location: right lower lobe]")
    assert c.findings == (FindingLabel("pleural_effusion", "right", None),)


def test_patient_and_case_tags():
    c = parse_tag_prompt("[finding: edema][view: 后前位][sex: 女性][age: 67岁][split: val][seed: 12][case: case-0000042]")
    assert (c.view, c.sex, c.age, c.split, c.seed, c.case_id, c.index) == ("PA", "F", 67, "val", 12, "case-0000042", 42)


def test_tag_case_id_is_deterministic():
    a = parse_tag_prompt("[finding: pneumonia]")
    assert a.case_id == parse_tag_prompt("[finding:pneumonia]").case_id
    assert a.case_id != parse_tag_prompt("[finding: edema]").case_id


@pytest.mark.parametrize("text, fragment", [
    ("[findng: pneumonia]", "did you mean [finding"),
    ("[colour: red][finding: pneumonia]", "unknown tag [colour"),
    ("hello [finding: pneumonia]", "outside"),
    ("[finding: pneumonia] and more", "outside"),
    ("[location: right][finding: pneumonia]", "before any [finding"),
    ("[severity: mild][finding: pneumonia]", "before any [finding"),
    ("[finding: support devices][severity: mild]", "support_devices takes no severity"),
    ("[finding: fracture][severity: grade 2]", "fracture takes no severity"),
    ("[finding: cardiomegaly][location: right]", "cannot be at"),
    ("[finding: pneumonia][location: nowhere]", "unknown location"),
    ("[finding: pneumonia][severity: grade 7]", "unknown severity"),
    ("[finding: pneumonai]", "did you mean 'pneumonia'"),
    ("[finding: pneumonia][age: old]", "whole number"),
    ("[finding: pneumonia][sex: F][sex: M]", "twice"),
    ("", "no [key: value] tags"),
    # what a spec's entry refuses, a tag prompt refuses too
    ("[finding: no finding][finding: pneumonia]", "no_finding cannot occur together"),
    ("[finding: pneumonia][finding: pneumonia]", "[finding: pneumonia] is given twice"),
    ("[finding: nodule][finding: lung lesion]", "nodule is a kind of lung_lesion"),
    ("[finding: pneumonia][location: left lower lobe][location: right upper lobe]", "second location tag"),
    ("[finding: pneumonia][severity: mild][severity: severe]", "second severity tag"),
    ("[finding: pneumonia][age: 200]", "outside 0..120"),
    ("".join(f"[finding: {f}]" for f in ("pneumonia", "edema", "atelectasis", "fracture", "pneumothorax",
                                          "pacemaker", "cardiomegaly", "nodule", "pleural effusion")), "at most 8"),
])
def test_tag_errors(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_tag_prompt(text)
    assert fragment in str(info.value)


def _many_findings_spec(allocation):
    components = []
    for fid, f in VOCAB.findings.items():
        comp = {"finding": fid, "weight": 1}
        if f.location_kinds:
            comp["location"] = {loc: 1 for loc in VOCAB.admitted_locations(fid)}
        components.append(comp)
    components += [
        {"finding": ["pneumonia", "pleural_effusion", "cardiomegaly"], "weight": 2,
         "location": {"lingula": 1, "right_middle_lobe": 1, "left_lower_zone": 1}},
        {"finding": ["nodule", "pneumothorax", "fracture"], "weight": 1},
        {"finding": ["mass", "endotracheal_tube", "pacemaker"], "weight": 1, "severity": "severe"},
    ]
    return load_spec({"spec_version": 1, "name": "many", "seed": 2**63 + 11, "count": 1500, "allocation": allocation,
                      "splits": {"train": 3, "val": 1, "test": 1}, "view": {"PA": 1, "AP": 1},
                      "patient": {"sex": {"F": 1, "M": 1}, "age": {"distribution": "uniform", "min": 0, "max": 120}},
                      "findings": components})


@pytest.mark.parametrize("allocation", ["exact", "random"])
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_round_trip_every_sampled_case(lang, allocation):
    cases = sample_cases(_many_findings_spec(allocation))
    seen_findings, seen_locations = set(), set()
    for c in cases:
        tags = case_to_tags(c, lang)
        assert parse_tag_prompt(tags) == c, tags
        seen_findings |= {f.finding for f in c.findings}
        seen_locations |= {f.location for f in c.findings}
    assert seen_findings == set(VOCAB.findings)
    assert seen_locations - {None} == set(VOCAB.locations)


def test_chinese_tags_use_chinese_words():
    c = case(FindingLabel("pleural_effusion", "left", "mild"), FindingLabel("cardiomegaly", None, "mild"),
             case_id="case-0000000", index=0)
    tags = case_to_tags(c, "zh")
    for word in ("重点", "胸腔积液", "位置", "左", "严重程度", "轻度", "心脏增大"):
        assert word in tags, tags
    assert parse_tag_prompt(tags) == c


def test_api_arguments_of_the_wrong_kind_are_named():
    """A notebook's slips give a clear error, not an AttributeError from deep inside."""
    with pytest.raises(TypeError, match="parse_tag_prompt takes the prompt's text"):
        parse_tag_prompt(None)
    with pytest.raises(ValueError, match="lang must be 'en' or 'zh'"):
        case_to_tags(Case("c", 0, None, None, (FindingLabel("no_finding"),)), lang="fr")
    spec = load_spec("dataset_specs/pneumonia.yaml")
    case = sample_cases(spec, limit=1)[0]
    assert build_prompt(case, spec) == build_prompt(case, spec.prompt)  # the whole spec: its prompt section
    with pytest.raises(TypeError, match=r"spec's prompt section \(spec.prompt\), not dict"):
        build_prompt(case, {"template": "x"})
    with pytest.raises(TypeError, match="build_prompt takes one Case"):
        build_prompt([case])
    # a [severity] tag still wins over the finding's own words, as documented
    assert parse_tag_prompt("[finding: mild pneumonia][severity: severe]").findings[0].severity == "severe"
