"""load_spec: strict YAML -> JSON Schema -> meaning checks; one SpecError listing every problem."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from synthmed import DatasetSpec, SpecError, SpecProblem, load_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "dataset_specs" / "pneumonia.yaml"

# Line numbers in the table below refer to this text (line 7 is the first appended line).
BASE = textwrap.dedent("""\
    spec_version: 1
    name: demo
    count: 100
    findings:
      - finding: pneumonia
        weight: 1
    """)


def with_finding(finding: str, extra: str = "") -> str:
    return BASE.replace("finding: pneumonia", f"finding: {finding}") + extra


def spec_error(spec, **kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(spec, **kw)
    return info.value


# ----------------------------------------------------------------------------- hostile specs

def _big_file(tmp_path: Path) -> Path:
    p = tmp_path / "big.yaml"
    p.write_bytes(BASE.encode() + b"# " + b"x" * (1024 * 1024) + b"\n")
    return p


def _directory(tmp_path: Path) -> Path:
    p = tmp_path / "adir.yaml"
    p.mkdir()
    return p


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "does-not-exist.yaml"


HOSTILE = [
    # id, spec (text / bytes written to a file, or a function of tmp_path giving a path), json_path, line, phrase
    # -- wrong types
    ("count-is-text", BASE.replace("count: 100", 'count: "ten"'), "count", 3, "expected an integer, got text 'ten'"),
    ("weight-is-bool", BASE.replace("weight: 1", "weight: true"), "findings[0].weight", 6, "expected a number, got boolean"),
    ("splits-is-list", BASE + "splits: [a, b]\n", "splits", 7, "expected a mapping, got a list"),
    ("finding-is-int", with_finding("3"), "findings[0].finding", 5, "expected text or a list"),
    ("spec-version-2", BASE.replace("spec_version: 1", "spec_version: 2"), "spec_version", 1, "must be 1"),
    ("seed-negative", BASE + "seed: -1\n", "seed", 7, "at least 0"),
    # -- missing required fields
    ("missing-count", BASE.replace("count: 100\n", ""), "<root>", 1, "missing required key 'count'"),
    ("missing-name", BASE.replace("name: demo\n", ""), "<root>", 1, "missing required key 'name'"),
    ("missing-findings", "spec_version: 1\nname: demo\ncount: 100\n", "<root>", 1, "missing required key 'findings'"),
    ("missing-spec-version", BASE.replace("spec_version: 1\n", "# no version\n"), "<root>", 2,
     "missing required key 'spec_version'"),
    ("missing-weight", BASE.replace("    weight: 1\n", ""), "findings[0]", 5, "missing required key 'weight'"),
    # -- vocabulary
    ("unknown-finding", with_finding("pnuemonia"), "findings[0].finding", 5, "did you mean 'pneumonia'?"),
    ("unknown-finding-in-group", with_finding("[pleural_effusion, cardiomegally]"), "findings[0].finding[1]", 5,
     "unknown finding 'cardiomegally'; did you mean 'cardiomegaly'?"),
    ("unknown-location", BASE + "    location: right_lowr_lobe\n", "findings[0].location", 7,
     "unknown location 'right_lowr_lobe'; did you mean 'right_lower_lobe'?"),
    ("unknown-location-key", BASE + "    location: {rll: 1, lft: 1}\n", "findings[0].location.lft", 7,
     "unknown location 'lft'"),
    ("unknown-severity", BASE + "    severity: {mild: 1, sevre: 1}\n", "findings[0].severity.sevre", 7,
     "unknown severity 'sevre'; did you mean 'severe'?"),
    ("severity-far-from-any", BASE + "    severity: {grave: 1}\n", "findings[0].severity.grave", 7,
     "unknown severity 'grave' (known: mild, moderate, severe)"),
    ("unknown-view", BASE + "view: {PA: 1, LAT: 1}\n", "view.LAT", 7, "unknown view 'LAT'"),
    ("unknown-sex", BASE + "patient:\n  sex: {F: 1, X: 1}\n", "patient.sex.X", 8, "unknown sex 'X'"),
    ("same-location-twice", BASE + "    location: {rll: 1, right lower lobe: 1}\n",
     "findings[0].location.right lower lobe", 7, "already listed"),
    # -- impossible combinations
    ("cardiomegaly-location", with_finding("cardiomegaly", "    location: right\n"), "findings[0].location", 7,
     "cardiomegaly takes no location"),
    ("no-finding-severity", with_finding("no_finding", "    severity: mild\n"), "findings[0].severity", 7,
     "no_finding takes no severity"),
    ("no-finding-with-pneumonia", with_finding("[no_finding, pneumonia]"), "findings[0].finding", 5,
     "'no_finding' cannot occur together with other findings"),
    ("fracture-bilateral", with_finding("fracture", "    location: bilateral\n"), "findings[0].location", 7,
     "'fracture' cannot be at 'bilateral'"),
    ("fracture-bilateral-key", with_finding("fracture", "    location: {left: 1, bilateral: 1}\n"),
     "findings[0].location.bilateral", 7, "'fracture' cannot be at 'bilateral'"),
    ("nodule-with-its-parent", with_finding("[lung_lesion, nodule]"), "findings[0].finding", 5,
     "'nodule' is a kind of 'lung_lesion'"),
    # -- weights
    ("weight-zero", BASE.replace("weight: 1", "weight: 0"), "findings[0].weight", 6, "must be greater than 0"),
    ("weight-negative", BASE.replace("weight: 1", "weight: -2"), "findings[0].weight", 6, "must be greater than 0, got -2"),
    ("split-weight-zero", BASE + "splits: {train: 1, val: 0}\n", "splits.val", 7, "must be greater than 0"),
    ("weight-1e308", BASE.replace("weight: 1", "weight: 1e308"), "findings[0].weight", 6,
     "must be at most 1000000000000, got 1e+308 (weights only count relative to each other"),
    ("split-weight-1e308", BASE + "splits: {train: 1e308, val: 1}\n", "splits.train", 7, "at most 1000000000000"),
    ("sex-weight-1e308", BASE + "patient:\n  sex: {F: 1e308, M: 1}\n", "patient.sex.F", 8, "at most 1000000000000"),
    ("split-names-differ-by-case", BASE + "splits: {train: 1, Train: 1}\n", "splits.Train", 7,
     "split 'Train' differs from 'train' only by case"),
    # -- ranges
    ("size-100", BASE + "image: {size: 100}\n", "image.size", 7, "a multiple of 8"),
    ("size-2048", BASE + "image: {size: 2048}\n", "image.size", 7, "64..1024"),
    ("phantom-size-64", BASE + "image: {size: 64}\ngenerator: {backend: phantom}\n", "image.size", 7,
     "the phantom backend (generator.backend) draws 128..1024 pixels a side, not 64 x 64"),
    ("phantom-height-120", BASE + "image: {size: [256, 120]}\ngenerator: {backend: phantom}\n", "image.size[1]", 7,
     "128..1024 pixels a side, not 256 x 120"),
    ("count-0", BASE.replace("count: 100", "count: 0"), "count", 3, "at least 1, got 0"),
    ("count-10000001", BASE.replace("count: 100", "count: 10000001"), "count", 3, "at most 10000000"),
    ("age-min-over-max", BASE + "patient:\n  age: {distribution: uniform, min: 80, max: 20}\n", "patient.age.min", 8,
     "min (80) is greater than max (20)"),
    ("age-no-mass", BASE + "patient:\n  age: {distribution: truncated_normal, mean: 5, sd: 1, min: 80, max: 90}\n",
     "patient.age.mean", 8, "almost no mass"),
    ("age-sd-0", BASE + "patient:\n  age: {distribution: truncated_normal, mean: 50, sd: 0, min: 18, max: 90}\n",
     "patient.age.sd", 8, "greater than 0, got 0 (sd is the spread of the ages around mean; for one age for everyone "
     "write {distribution: fixed, value: N})"),
    ("age-fixed-with-min", BASE + "patient:\n  age: {distribution: fixed, value: 40, min: 10}\n", "patient.age.min", 8,
     "'min' is not used by distribution 'fixed', which takes value; remove it"),
    ("age-uniform-with-mean", BASE + "patient:\n  age: {distribution: uniform, min: 20, max: 30, mean: 25}\n",
     "patient.age.mean", 8, "'mean' is not used by distribution 'uniform', which takes min, max"),
    ("age-without-distribution", BASE + "patient:\n  age: {min: 20, max: 30}\n", "patient.age", 8,
     "missing required key 'distribution' (one of: truncated_normal, uniform, categorical, fixed)"),
    ("image-format-jpeg", BASE + "image:\n  formats: [dicom, jpeg]\n", "image.formats[1]", 8, "'jpeg' is not one of"),
    # -- names
    ("name-dotdot-slash", BASE.replace("name: demo", "name: ../evil"), "name", 2, "not safe as a file name"),
    ("name-space", BASE.replace("name: demo", "name: a b"), "name", 2, "not safe as a file name"),
    ("name-hidden", BASE.replace("name: demo", "name: .hidden"), "name", 2, "not safe as a file name"),
    # -- unknown keys, with suggestions
    ("unknown-top-key", BASE + "seeed: 3\n", "seeed", 7, "unknown key 'seeed'; did you mean 'seed'?"),
    ("top-level-severity", BASE + "severity: mild\n", "severity", 7,
     "'severity' is not a top-level key: it belongs inside an entry of findings"),
    ("top-level-location", BASE + "location: right\n", "location", 7, "it belongs inside an entry of findings"),
    ("top-level-size", BASE + "size: 512\n", "size", 7, "'size' is not a top-level key: it belongs under image"),
    ("unknown-generator-key", BASE + "generator:\n  backnd: phantom\n", "generator.backnd", 8,
     "unknown key 'backnd'; did you mean 'backend'?"),
    ("spacing-with-lcm", BASE + "generator: {scheduler: lcm, timestep_spacing: trailing}\n",
     "generator.timestep_spacing", 7, "the lcm scheduler places its own steps; leave timestep_spacing out"),
    ("spacing-ddim-linspace", BASE + "generator: {scheduler: ddim, timestep_spacing: linspace}\n",
     "generator.timestep_spacing", 7, "ddim steps by the fixed stride 1000 // 20"),
    ("spacing-pndm-trailing-30", BASE + "generator: {scheduler: pndm, steps: 30, timestep_spacing: trailing}\n",
     "generator.timestep_spacing", 7, "or a number of steps that divides 1000"),
    ("spacing-typo", BASE + "generator: {timestep_spacing: trailng}\n", "generator.timestep_spacing", 7,
     "did you mean 'trailing'?"),
    ("late-guidance-scale-only", BASE + "generator: {late_guidance: {scale: 2}}\n", "generator.late_guidance", 7,
     "missing required key 'below_timestep'"),
    ("late-guidance-number", BASE + "generator: {late_guidance: 2}\n", "generator.late_guidance", 7,
     "expected none or a mapping {scale: 2, below_timestep: 500}"),
    ("late-guidance-timestep-0", BASE + "generator: {late_guidance: {scale: 2, below_timestep: 0}}\n",
     "generator.late_guidance.below_timestep", 7, "must be at least 1, got 0"),
    ("late-guidance-timestep-float", BASE + "generator: {late_guidance: {scale: 2, below_timestep: 500.5}}\n",
     "generator.late_guidance.below_timestep", 7, "expected an integer, got number 500.5"),
    ("unknown-entry-key", BASE + "    severty: mild\n", "findings[0].severty", 7,
     "unknown key 'severty'; did you mean 'severity'?"),
    ("enum-typo", BASE + "allocation: exacct\n", "allocation", 7, "did you mean 'exact'?"),
    # -- prompt
    ("template-placeholder", BASE + "prompt:\n  template: '{view} of {agee}. {findings}'\n", "prompt.template", 8,
     "unknown placeholder '{agee}'; did you mean '{age}'?"),
    ("template-without-findings", BASE + "prompt:\n  template: '{view} chest'\n", "prompt.template", 8,
     "must contain {findings}"),
    ("template-misspelt-builtin", BASE + "prompt:\n  template: roentgen-v2\n", "prompt.template", 8,
     "unknown built-in template 'roentgen-v2'; did you mean 'roentgen-v1'?"),
    ("emphasis-role", BASE + "prompt:\n  emphasis: {findng: 1.2}\n", "prompt.emphasis.findng", 8,
     "unknown role 'findng'; did you mean 'finding'?"),
    # -- files
    ("binary-file", b"spec_version: 1\n\x00\x01\x02", "<root>", None, "binary file (it contains NUL bytes)"),
    ("latin-1-file", "spec_version: 1\nname: caf\xe9\n".encode("latin-1"), "<root>", 2, "not UTF-8"),
    ("empty-file", b"", "<root>", None, "the spec is empty"),
    ("comment-only-file", b"# nothing here\n\n   # at all\n", "<root>", None, "the spec is empty"),
    ("file-over-1-MiB", _big_file, "<root>", None, "limited to 1,048,576 bytes (1 MiB)"),
    ("directory", _directory, "<root>", None, "is a directory"),
    ("nonexistent-path", _missing, "<root>", None, "no such file"),
]


@pytest.mark.parametrize("spec, json_path, line, phrase", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_spec(tmp_path, spec, json_path, line, phrase):
    if callable(spec):
        path = spec(tmp_path)
    else:
        path = tmp_path / "spec.yaml"
        path.write_bytes(spec.encode("utf-8") if isinstance(spec, str) else spec)
    e = spec_error(path)
    assert len(e.problems) == 1, [p.format(e.source) for p in e.problems]
    (p,) = e.problems
    assert isinstance(p, SpecProblem)
    assert p.json_path == json_path
    assert p.line == line
    assert phrase in p.message
    assert e.source == str(path)
    assert str(path) in str(e)


def test_at_least_thirty_hostile_specs():
    assert len(HOSTILE) >= 30
    assert len({h[0] for h in HOSTILE}) == len(HOSTILE)


def test_three_problems_are_all_reported_in_one_error():
    text = (BASE.replace("count: 100", "count: 0").replace("finding: pneumonia", "finding: pnuemonia")
            + "image: {size: 100}\n")
    e = spec_error(text)
    assert len(e.problems) == 3
    assert [p.json_path for p in e.problems] == ["count", "findings[0].finding", "image.size"]
    assert [p.path for p in e.problems] == [("count",), ("findings", 0, "finding"), ("image", "size")]
    assert [(p.line, p.column) for p in e.problems] == [(3, 8), (5, 14), (7, 15)]
    assert "did you mean 'pneumonia'" in e.problems[1].message
    assert all(p.level == "error" for p in e.problems)


def test_problems_in_many_sections_are_collected_and_sorted_by_line():
    text = textwrap.dedent("""\
        spec_version: 1
        name: a b
        count: 100
        splits: {train: 0}
        view: {PA: 1, XY: 1}
        findings:
          - finding: cardiomegaly
            weight: 1
            location: right
          - finding: no_finding
            weight: 1
            severity: mild
        prompt:
          emphasis: {colour: 2}
        generator:
          stepz: 3
        """)
    e = spec_error(text)
    got = [(p.json_path, p.line) for p in e.problems]
    assert got == [("name", 2), ("splits.train", 4), ("view.XY", 5), ("findings[0].location", 9),
                   ("findings[1].severity", 12), ("prompt.emphasis.colour", 14), ("generator.stepz", 16)]


def test_str_of_spec_error_lists_file_line_col_path_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("count: 100", "count: 0") + "seeed: 1\n", encoding="utf-8")
    e = spec_error(path)
    lines = str(e).splitlines()
    assert lines[0] == f"{path}: 2 problems in this spec"
    assert lines[1] == f"  {path}:3:8: count: must be at least 1, got 0"
    assert lines[2] == f"  {path}:7:1: seeed: unknown key 'seeed'; did you mean 'seed'?"


def test_source_name_is_used_for_text():
    e = spec_error(BASE.replace("count: 100", "count: 0"), source="mine.yaml")
    assert e.source == "mine.yaml"
    assert "mine.yaml:3:8: count:" in str(e)


def test_yaml_problems_are_all_listed_together():
    text = BASE + "allocation: NO\ncount: 4\nsplits: &s {train: 1}\n"
    e = spec_error(text)
    assert [(p.json_path, p.line) for p in e.problems] == [("allocation", 7), ("count", 8), ("splits", 9)]


def test_json_path_formatting():
    assert SpecProblem(("findings", 1, "location"), "m").json_path == "findings[1].location"
    assert SpecProblem(("findings", 0, "finding", 2), "m").json_path == "findings[0].finding[2]"
    assert SpecProblem((), "m").json_path == "<root>"
    assert SpecProblem(("patient", "age", "min"), "m", 3, 4).format("s.yaml") == "s.yaml:3:4: patient.age.min: m"


def test_split_name_with_space_points_at_the_key():
    e = spec_error(BASE + "splits: {'a b': 1}\n")
    (p,) = e.problems
    assert (p.json_path, p.line) == ("splits.a b", 7)
    assert "'a b' is not allowed as a name" in p.message


def test_float_image_size_is_a_spec_error_not_a_crash():
    # 128.0 passes the JSON Schema 'integer' check; the loader must then not crash on it.
    try:
        spec = load_spec(BASE + "image: {size: 128.0}\n")
    except SpecError as e:
        assert [p.json_path for p in e.problems] == ["image.size"]
    else:
        assert (spec.image.width, spec.image.height) == (128, 128)


# ----------------------------------------------------------------------------- mapping input

def minimal_mapping() -> dict:
    return {"spec_version": 1, "name": "demo", "count": 100, "findings": [{"finding": "pneumonia", "weight": 1}]}


def test_mapping_input_loads_and_matches_yaml():
    d = minimal_mapping()
    spec = load_spec(d)
    assert isinstance(spec, DatasetSpec)
    assert spec.source == "<mapping>"
    assert spec.spec_hash == load_spec(BASE).spec_hash
    assert d == minimal_mapping()  # not mutated


def test_mapping_errors_have_paths_but_no_invented_line():
    d = minimal_mapping()
    d["count"] = 0
    d["findings"][0]["finding"] = "pnuemonia"
    e = spec_error(d)
    assert [p.json_path for p in e.problems] == ["count", "findings[0].finding"]
    assert "did you mean 'pneumonia'" in e.problems[1].message
    assert all(p.line is None and p.column is None for p in e.problems), \
        [(p.json_path, p.line, p.column) for p in e.problems]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_mapping_with_nan_or_inf_weight_is_refused(bad):
    d = minimal_mapping()
    d["findings"][0]["weight"] = bad
    e = spec_error(d)
    assert [p.json_path for p in e.problems] == ["findings[0].weight"]


def test_mapping_with_a_non_json_value_is_a_spec_error():
    d = minimal_mapping()
    d["description"] = {"a", "b"}
    e = spec_error(d)
    assert [p.json_path for p in e.problems] == ["description"]


@pytest.mark.parametrize("where, paths", [
    ({"splits": {"train": 1e308, "val": 1e308}}, ["splits.train", "splits.val"]),
    ({"patient": {"sex": {"F": 1e308, "M": 1e308}}}, ["patient.sex.F", "patient.sex.M"]),
    ({"view": {"PA": 1e308, "AP": 1e308}}, ["view.PA", "view.AP"]),
    ({"findings": [{"finding": "pneumonia", "weight": 1e308, "location": {"rll": 1e308, "lll": 1e308}},
                   {"finding": "edema", "weight": 1e308}]},
     ["findings[0].weight", "findings[0].location.rll", "findings[0].location.lll", "findings[1].weight"]),
    ({"patient": {"age": {"distribution": "categorical", "bins": {"18-39": 1e308, "40-59": 1e308}}}},
     ["patient.age.bins.18-39", "patient.age.bins.40-59"]),
], ids=["splits", "sex", "view", "findings", "age-bins"])
def test_huge_weights_are_a_spec_error_not_an_overflow(where, paths):
    e = spec_error({**minimal_mapping(), **where})  # their sum would overflow to infinity
    assert sorted(p.json_path for p in e.problems) == sorted(paths)
    assert all("at most 1000000000000" in p.message for p in e.problems)


def test_weights_up_to_1e12_are_accepted():
    spec = load_spec(BASE.replace("weight: 1", "weight: 1e12") + "  - {finding: edema, weight: 1e12}\n"
                     "splits: {train: 1e12, val: 1}\n")
    assert [c.weight for c in spec.findings] == [0.5, 0.5]
    assert spec.splits.as_dict()["val"] == pytest.approx(1e-12)


def test_yaml_float_overflow_is_not_accepted_as_weight():
    e = spec_error(BASE + "splits: {train: 1e400, val: 1}\n")
    assert [p.json_path for p in e.problems] == ["splits.train"]


# ----------------------------------------------------------------------------- valid specs

def test_design_example_loads():
    spec = load_spec(EXAMPLE)
    assert spec.name == "pneumonia-balanced"
    assert (spec.seed, spec.count, spec.allocation, spec.spec_version) == (20261121, 1000, "exact", 1)
    assert spec.splits.as_dict() == pytest.approx({"train": 0.8, "val": 0.1, "test": 0.1})
    assert (spec.image.width, spec.image.height, spec.image.formats) == (256, 256, ("dicom", "png"))
    assert spec.sex.as_dict() == {"F": 0.5, "M": 0.5}
    assert spec.view.as_dict() == pytest.approx({"PA": 0.7, "AP": 0.3})
    assert (spec.age.distribution, spec.age.mean, spec.age.sd, spec.age.min, spec.age.max) == (
        "truncated_normal", 58, 16, 18, 95)
    assert [c.findings for c in spec.findings] == [("no_finding",), ("pneumonia",), ("pleural_effusion", "cardiomegaly")]
    assert [c.weight for c in spec.findings] == pytest.approx([0.4, 0.4, 0.2])
    assert spec.findings[0].location is None and spec.findings[0].severity is None
    assert spec.findings[1].location.as_dict() == pytest.approx(
        {"right_lower_lobe": 0.5, "left_lower_lobe": 0.3, "right_upper_lobe": 0.2})
    assert spec.findings[1].severity.as_dict() == pytest.approx({"mild": 0.5, "moderate": 0.3, "severe": 0.2})
    assert spec.findings[1].remarks == "where the prevalence figure comes from"
    assert spec.findings[2].severity.as_dict() == pytest.approx({"mild": 0.6, "moderate": 0.4})
    assert spec.prompt.template == "{view} chest radiograph of a {age} year old {sex}. {findings}."
    assert spec.prompt.emphasis == (("finding", 1.3),)
    assert spec.prompt.negative == "text, letters, watermark"
    g = spec.generator
    assert (g.backend, g.model, g.steps, g.guidance_scale, g.scheduler, g.batch_size) == (
        "diffusion", "default", 20, 4.0, "dpm_solver", 8)
    assert spec.warnings == ()
    assert spec.source == str(EXAMPLE)
    assert len(spec.spec_hash) == 64 and int(spec.spec_hash, 16) >= 0


def test_example_loads_from_text_bytes_and_path_alike():
    text = EXAMPLE.read_text(encoding="utf-8")
    hashes = {load_spec(EXAMPLE).spec_hash, load_spec(str(EXAMPLE)).spec_hash, load_spec(text).spec_hash,
              load_spec(text.encode("utf-8")).spec_hash}
    assert len(hashes) == 1


def test_defaults_of_a_minimal_spec():
    spec = load_spec(BASE)
    assert (spec.seed, spec.allocation) == (0, "exact")
    assert spec.splits.as_dict() == {"train": 1.0}
    assert spec.view.as_dict() == {"PA": 1.0}
    assert spec.sex.as_dict() == {"F": 0.5, "M": 0.5}
    assert (spec.image.width, spec.image.height, spec.image.bit_depth, spec.image.dicom_iod) == (256, 256, 16, "dx")
    assert spec.image.png_bit_depth == 8  # #20: what CheXpert and MIMIC-CXR-JPG ship, and loaders read right
    assert spec.prompt.template_id == "synthmed-v1"
    assert spec.generator.allow_pickle is False
    assert spec.findings[0].weight == 1.0


def test_spec_is_frozen():
    spec = load_spec(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.count = 5  # type: ignore[misc]
    d = spec.to_dict()
    d["count"] = 5
    assert spec.to_dict()["count"] == 100


@pytest.mark.parametrize("word", ["RLL", "rll", "right lower lobe", "Right_Lower-Lobe", "lower lobe of right lung",
                                  "右下肺叶"])
def test_location_synonyms_normalise(word):
    spec = load_spec(BASE + f"    location: '{word}'\n")
    assert spec.findings[0].location.as_dict() == {"right_lower_lobe": 1.0}


@pytest.mark.parametrize("word", ["grade 2", "Grade II", "moderate", "2级", "中度"])
def test_severity_synonyms_normalise(word):
    spec = load_spec(BASE + f"    severity: '{word}'\n")
    assert spec.findings[0].severity.as_dict() == {"moderate": 1.0}


@pytest.mark.parametrize("word, canonical", [("effusion", ("pleural_effusion",)), ("Pneumonia", ("pneumonia",)),
                                             ("enlarged heart", ("cardiomegaly",)), ("肺炎", ("pneumonia",))])
def test_finding_synonyms_normalise(word, canonical):
    assert load_spec(with_finding(f"'{word}'")).findings[0].findings == canonical


def test_synonym_keys_in_weight_mappings_normalise():
    spec = load_spec(BASE + "    location: {RLL: 2, left lower lobe: 1}\n    severity: {grade 1: 1, grade 3: 3}\n"
                     "view: {posteroanterior: 1, AP: 1}\npatient:\n  sex: {female: 1, M: 3}\n")
    assert spec.findings[0].location.as_dict() == pytest.approx({"right_lower_lobe": 2 / 3, "left_lower_lobe": 1 / 3})
    assert spec.findings[0].severity.as_dict() == pytest.approx({"mild": 0.25, "severe": 0.75})
    assert spec.view.as_dict() == {"PA": 0.5, "AP": 0.5}
    assert spec.sex.as_dict() == {"F": 0.25, "M": 0.75}


def test_weights_are_divided_by_their_sum():
    text = BASE.replace("count: 100", "count: 300") + "  - finding: no_finding\n    weight: 2\n" + \
        "splits: {a: 2, b: 1}\n"
    spec = load_spec(text)
    assert spec.splits.as_dict() == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert [c.weight for c in spec.findings] == pytest.approx([1 / 3, 2 / 3])
    assert spec.warnings == ()


def test_severity_is_kept_in_vocabulary_order():
    spec = load_spec(BASE + "    severity: {severe: 1, mild: 1}\n")
    assert spec.findings[0].severity.keys == ("mild", "severe")


def test_single_string_location():
    spec = load_spec(with_finding("pleural_effusion", "    location: left\n"))
    assert spec.findings[0].location.items == (("left", 1.0),)


def test_group_location_applies_to_the_findings_that_take_one():
    spec = load_spec(with_finding("[pleural_effusion, cardiomegaly]", "    location: rll\n    severity: mild\n"))
    assert spec.findings[0].findings == ("pleural_effusion", "cardiomegaly")
    assert spec.findings[0].location.as_dict() == {"right_lower_lobe": 1.0}


def test_image_size_pair_and_bounds():
    spec = load_spec(BASE + "image: {size: [512, 64], formats: [png], bit_depth: 8}\n")
    assert (spec.image.width, spec.image.height, spec.image.formats, spec.image.bit_depth) == (512, 64, ("png",), 8)
    assert load_spec(BASE + "image: {size: 1024}\n").image.width == 1024


def test_png_bit_depth_16_on_request_needs_12_stored_bits():
    assert load_spec(BASE + "image: {png_bit_depth: 16}\n").image.png_bit_depth == 16
    assert load_spec(BASE + "image: {bit_depth: 8, png_bit_depth: 8}\n").image.png_bit_depth == 8
    error = spec_error(BASE + "image: {bit_depth: 8, png_bit_depth: 16}\n")
    assert [p.path for p in error.problems] == [("image", "png_bit_depth")]
    assert "needs image.bit_depth 16" in str(error)
    assert [p.path for p in spec_error(BASE + "image: {png_bit_depth: 12}\n").problems] == [("image", "png_bit_depth")]


@pytest.mark.parametrize("count", [1, 10_000_000])
def test_count_bounds_are_inclusive(count):
    assert load_spec(BASE.replace("count: 100", f"count: {count}")).count == count


@pytest.mark.parametrize("size", ["128", "1024", "[128, 1024]"])
def test_phantom_accepts_sizes_within_its_range(size):
    spec = load_spec(BASE + f"image: {{size: {size}}}\ngenerator: {{backend: phantom}}\n")
    assert spec.generator.backend == "phantom"


def test_phantom_size_range_is_what_the_phantom_draws():
    pytest.importorskip("numpy")
    from synthmed.backends.phantom import PhantomBackend
    from synthmed.spec import PHANTOM_SIZE_RANGE

    lo, hi = PHANTOM_SIZE_RANGE
    assert PhantomBackend(lo, hi).info.settings["width"] == lo
    for w, h in [(lo - 8, lo), (lo, hi + 8)]:
        with pytest.raises(ValueError):
            PhantomBackend(w, h)


def test_small_images_are_fine_for_the_other_backends():
    for backend in ("diffusion", "pattern"):
        spec = load_spec(BASE + f"image: {{size: 64}}\ngenerator: {{backend: {backend}}}\n")
        assert (spec.image.width, spec.generator.backend) == (64, backend)


def test_schema_accepts_every_backend_there_is():
    from synthmed.backends import BACKENDS

    schema = json.loads((ROOT / "schemas" / "dataset_spec.schema.json").read_text())
    assert schema["properties"]["generator"]["properties"]["backend"]["enum"] == list(BACKENDS)


def test_split_names_differing_only_by_case_are_all_reported():
    e = spec_error(BASE + "splits: {train: 1, Train: 1, TRAIN: 1, val: 1, Val: 1}\n")
    assert [p.json_path for p in e.problems] == ["splits.Train", "splits.TRAIN", "splits.Val"]
    assert "differs from 'val' only by case" in e.problems[2].message


@pytest.mark.parametrize("typo, meant", [("pnuemonia", "pneumonia"), ("efusion", "pleural_effusion"),
                                         ("cardiomegally", "cardiomegaly")])
def test_close_typos_still_get_a_suggestion(typo, meant):
    e = spec_error(with_finding(typo))
    assert f"did you mean '{meant}'?" in e.problems[0].message


@pytest.mark.parametrize("text, path", [
    (BASE + "    severity: {grave: 1}\n", "findings[0].severity.grave"),   # as close to 'grade 1' as to 'grade 3'
    (BASE + "    location: {lung: 1}\n", "findings[0].location.lung"),
    (with_finding("xyz"), "findings[0].finding"),
    (BASE + "colour: red\n", "colour"),
])
def test_far_typos_get_no_suggestion(text, path):
    (p,) = spec_error(text).problems
    assert p.json_path == path
    assert "did you mean" not in p.message


def test_custom_templates_still_work_next_to_misspelt_names():
    spec = load_spec(BASE + "prompt: {template: 'Findings: {findings}'}\n")
    assert spec.prompt.template_id.startswith("custom-")
    assert load_spec(BASE + "prompt: {template: roentgen-v1}\n").prompt.template == "{findings}"
    (p,) = spec_error(BASE + "prompt: {template: chest x-ray}\n").problems  # not like a name: a text without {findings}
    assert "did you mean" not in p.message and "must contain {findings}" in p.message


def test_age_kinds():
    fixed = load_spec(BASE + "patient:\n  age: {distribution: fixed, value: 40}\n").age
    assert (fixed.distribution, fixed.value) == ("fixed", 40)
    cat = load_spec(BASE + "patient:\n  age: {distribution: categorical, bins: {'40-59': 3, '18-39': 1}}\n").age
    assert cat.bins == ((18, 39, 0.25), (40, 59, 0.75))
    uni = load_spec(BASE + "patient:\n  age: {distribution: uniform, min: 30, max: 30}\n").age
    assert (uni.min, uni.max) == (30, 30)


# ----------------------------------------------------------------------------- hash

def test_spec_hash_ignores_comments_layout_quoting_and_key_order():
    a = load_spec(BASE).spec_hash
    reformatted = textwrap.dedent("""\
        # a comment
        findings: [{weight: 1, finding: "pneumonia"}]   # flow style, other order
        count:   100
        name: 'demo'

        spec_version: 1
        """)
    assert load_spec(reformatted).spec_hash == a


@pytest.mark.parametrize("old, new", [("count: 100", "count: 101"), ("weight: 1", "weight: 2"),
                                      ("name: demo", "name: demo2"), ("finding: pneumonia", "finding: edema")])
def test_spec_hash_changes_when_a_value_changes(old, new):
    assert load_spec(BASE.replace(old, new)).spec_hash != load_spec(BASE).spec_hash


EXAMPLE_SPEC_HASH = "cf08d2d744a462dee0657ac2bc8c122131786acd2a0a53ae15ebdd18bbe04161"


def test_spec_hash_of_example_is_pinned():
    """#17: the example's hash is a fixed value (every built folder records it; a change breaks their resume).

    Changing dataset_specs/pneumonia.yaml changes it on purpose: update the value then, and only then.
    """
    import hashlib

    import yaml

    assert load_spec(EXAMPLE).spec_hash == EXAMPLE_SPEC_HASH
    # the documented rule: sha256 of the document as canonical JSON (sorted keys, no spaces, UTF-8)
    doc = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    canonical = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == EXAMPLE_SPEC_HASH


# ----------------------------------------------------------------------------- warnings

def test_weights_summing_to_095_warn_but_load():
    spec = load_spec(BASE + "splits: {train: 0.8, val: 0.1, test: 0.05}\n")
    (w,) = spec.warnings
    assert (w.json_path, w.line, w.level) == ("splits", 7, "warning")
    assert "sum to 0.95" in w.message
    assert spec.splits.as_dict() == pytest.approx({"train": 0.8 / 0.95, "val": 0.1 / 0.95, "test": 0.05 / 0.95})
    assert w.format("s.yaml").startswith("s.yaml:7:9: warning: splits: weights sum to 0.95")


def test_too_few_cases_for_the_cells_warns():
    spec = load_spec(BASE.replace("count: 100", "count: 2"))
    (w,) = spec.warnings
    assert (w.json_path, w.line, w.level) == ("count", 3, "warning")
    assert "cannot cover all 18" in w.message


def test_an_entry_of_too_many_cells_is_refused_before_they_are_built():
    """Eight findings that each draw their own location and severity would be 11 billion cells: validate (and plan,
    generate) refused at once with the entry's path and what to do, instead of running out of memory."""
    import time

    started = time.monotonic()
    error = spec_error(with_finding("[pneumonia, atelectasis, consolidation, nodule, mass, edema, fracture, "
                                    "pleural_effusion]"))
    assert time.monotonic() - started < 30  # not a timing test: enumerating them would take hours
    (problem,) = error.problems
    assert problem.json_path == "findings[0]" and problem.line == 5
    assert "the limit is 200,000 per entry" in problem.message
    assert "give the entry a location and a severity" in problem.message
    shared = load_spec(with_finding("[pneumonia, atelectasis, consolidation, nodule, mass, edema]",
                                    "    location: right_lower_lobe\n    severity: mild\n"))
    assert len(shared.findings[0].findings) == 6  # the same findings sharing one location and severity: 1 cell
    four = load_spec(with_finding("[pneumonia, atelectasis, consolidation, nodule]"))  # 104,976 cells: allowed
    assert four.findings[0].findings == ("pneumonia", "atelectasis", "consolidation", "nodule")
    entry = "  - finding: [pneumonia, atelectasis, consolidation, nodule]\n    weight: 1\n"
    assert len(load_spec(BASE + entry * 2).findings) == 3  # two such entries: 210,000 cells, allowed
    error = spec_error(BASE + entry * 5)  # five: 524,880
    assert [p.json_path for p in error.problems] == ["findings[1]"]
    assert "the limit is 500,000 per spec" in error.problems[0].message


def test_repeated_entry_warns():
    spec = load_spec(BASE + "  - finding: pneumonia\n    weight: 1\n")
    (w,) = spec.warnings
    assert (w.json_path, w.line) == ("findings[1]", 7)
    assert "same findings, locations and severities as findings[0]" in w.message
    assert [c.weight for c in spec.findings] == [0.5, 0.5]


def test_warnings_do_not_hide_errors():
    e = spec_error(BASE.replace("count: 100", "count: 0") + "splits: {train: 0.8, val: 0.15}\n")
    assert [(p.json_path, p.level) for p in e.problems] == [("count", "error")]


# ----------------------------------------------------------------------------- the lateral view (#18)

@pytest.mark.parametrize("backend", ["phantom", "pattern"])
@pytest.mark.parametrize("view, path, column", [
    ("{PA: 1, LL: 1}", "view.LL", 15),
    ("{PA: 1, lateral: 1}", "view.lateral", 15),   # a synonym: the error is at the key as written
    ("{侧位: 1}", "view.侧位", 8),
])
def test_a_lateral_with_a_backend_that_draws_frontal_films_only_is_refused(backend, view, path, column):
    """#18: the phantom (and the test pattern) draw PA and AP only; LL is an error at the view, not a PA film."""
    e = spec_error(BASE + f"view: {view}\ngenerator: {{backend: {backend}}}\n")
    (p,) = e.problems
    assert (p.json_path, p.line, p.column) == (path, 7, column)
    assert f"the {backend} backend" in p.message and "not LL (left lateral)" in p.message


@pytest.mark.parametrize("backend", ["drr", "diffusion"])
def test_a_lateral_is_a_view_of_the_drr_and_diffusion_backends(backend):
    spec = load_spec(BASE + f"view: {{PA: 2, left lateral: 1}}\ngenerator: {{backend: {backend}}}\n")
    assert spec.view.as_dict() == pytest.approx({"PA": 2 / 3, "LL": 1 / 3})


def test_frontal_views_with_the_phantom_still_load():
    spec = load_spec(BASE + "view: {PA: 1, AP: 1}\ngenerator: {backend: phantom}\n")
    assert spec.view.keys == ("PA", "AP")


def test_a_lateral_for_the_shipped_models_loads_without_a_warning(tmp_path):
    """#19: the shipped default model (and its fast student) learned PA, AP and lateral drr films."""
    (tmp_path / "my-model").mkdir()
    for model in ("default", "default-fast", tmp_path / "my-model"):
        spec = load_spec(BASE + f"view: {{PA: 1, LL: 1}}\ngenerator: {{model: {model}}}\n")
        assert not spec.warnings and spec.view.keys == ("PA", "LL")


def test_a_model_path_is_relative_to_the_spec_file_wherever_it_is_run(tmp_path, monkeypatch):
    """generator.model resolves as every path in a spec does: against the spec's folder, not the current one."""
    (tmp_path / "specs" / "models" / "mine").mkdir(parents=True)
    spec = tmp_path / "specs" / "s.yaml"
    spec.write_text("spec_version: 1\nname: rel\ncount: 2\nfindings: [{finding: cardiomegaly, weight: 1}]\n"
                    "generator: {model: models/mine}\n", encoding="utf-8")
    for cwd in (tmp_path, tmp_path / "specs"):
        monkeypatch.chdir(cwd)
        assert load_spec(spec).generator.model == str((tmp_path / "specs" / "models" / "mine").resolve())
    assert load_spec(spec.read_text(encoding="utf-8").replace("models/mine", "default")).generator.model == "default"
    spec.write_text(spec.read_text(encoding="utf-8").replace("models/mine", "models/gone"), encoding="utf-8")
    warned = [w for w in load_spec(spec).warnings if w.path == ("generator", "model")]  # a dry run may not need it
    assert len(warned) == 1 and "no such model folder" in warned[0].message and warned[0].line == 5
    # a path only the current folder has (what it meant before) is still found, with a warning
    (tmp_path / "specs" / "models" / "mine").rename(tmp_path / "models")
    (tmp_path / "specs" / "models").rmdir()
    monkeypatch.chdir(tmp_path)
    spec.write_text(spec.read_text(encoding="utf-8").replace("models/gone", "models"), encoding="utf-8")
    legacy = load_spec(spec)
    assert legacy.generator.model == str((tmp_path / "models").resolve())
    assert any("taken from the current folder" in w.message for w in legacy.warnings)
    for odd in ('"a\\0b"', "x" * 300):  # a NUL, a name too long: a warning, never a traceback
        load_spec(f"spec_version: 1\nname: o\ncount: 2\nfindings: [{{finding: cardiomegaly, weight: 1}}]\n"
                  f"generator: {{model: {odd}}}\n")
