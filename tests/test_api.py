"""The public API: every exported name resolves, `import synthmed` stays light, and a notebook-style chain runs.

``generate``, ``qc``, ``finetune``, ``ManifestDataset`` and ``manifest_records`` load on first use.
``synthmed.qc`` and ``synthmed.finetune`` are modules made callable (each swaps its own class at its end),
so they stay callable whichever of ``import synthmed.qc.metrics`` or ``synthmed.qc`` comes first.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import types

import pytest

import synthmed
from synthmed._callable import make_callable


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def _missing_module(name: str) -> str | None:
    """The module behind a lazy name, if it is not part of this checkout yet (it is being written)."""
    lazy = synthmed._LAZY.get(name)
    if lazy and importlib.util.find_spec(lazy[0]) is None:
        return lazy[0]
    return None


@pytest.mark.parametrize("name", synthmed.__all__)
def test_every_exported_name_resolves(name):
    missing = _missing_module(name)
    if missing:
        pytest.skip(f"{missing} is not in this checkout yet, so synthmed.{name} cannot resolve")
    value = getattr(synthmed, name)
    assert value is not None
    assert name in dir(synthmed)
    if name in ("qc", "finetune"):
        assert isinstance(value, types.ModuleType) and callable(value)
    elif name != "CHEXPERT_COLUMNS":
        assert callable(value), f"synthmed.{name} is {value!r}"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'generat'"):
        synthmed.generat  # noqa: B018


def test_import_synthmed_loads_neither_torch_nor_numpy():
    proc = _run("""
        import sys
        import synthmed
        synthmed.load_spec, synthmed.sample_cases, synthmed.parse_tag_prompt, synthmed.DatasetSpec
        heavy = sorted(m for m in ("torch", "numpy", "diffusers", "monai", "pandas") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("first", ["package attribute", "submodule import"])
def test_qc_and_finetune_stay_callable_whatever_is_imported_first(first):
    for name, submodule in (("qc", "synthmed.qc.metrics"), ("finetune", "synthmed.finetune")):
        if importlib.util.find_spec(f"synthmed.{name}") is None:  # pragma: no cover - while it is being written
            continue
        steps = (f"import synthmed; synthmed.{name}\nimport {submodule}" if first == "package attribute"
                 else f"import {submodule}\nimport synthmed")
        proc = _run(f"""
            import sys
            {steps.splitlines()[0]}
            {steps.splitlines()[1]}
            import synthmed
            assert callable(synthmed.{name}), synthmed.{name}
            from synthmed import {name}
            assert {name} is synthmed.{name} is sys.modules["synthmed.{name}"]
            assert {submodule} is sys.modules["{submodule}"]  # the module's own attributes are untouched
        """)
        assert proc.returncode == 0, proc.stderr


def test_calling_a_module_whose_function_is_missing_says_so(monkeypatch):
    module = types.ModuleType("synthmed._probe")
    monkeypatch.setitem(sys.modules, "synthmed._probe", module)
    make_callable("synthmed._probe", "synthmed._no_such_module:run")
    with pytest.raises(ImportError, match=r"synthmed._probe\(...\) needs synthmed._no_such_module"):
        module()
    make_callable("synthmed._probe", "synthmed._callable:no_such_function")
    with pytest.raises(ImportError, match=r"needs synthmed._callable.no_such_function\(\)"):
        module()
    make_callable("synthmed._probe", "synthmed._callable:make_callable")
    assert module is sys.modules["synthmed._probe"]


# ----------------------------------------------------------------------------- a notebook's chain

SPEC = """\
spec_version: 1
name: api-chain
seed: 5
count: 8
splits: {train: 0.5, test: 0.5}
image: {size: 128}
findings:
  - {finding: no_finding, weight: 1}
  - {finding: pneumothorax, weight: 1, location: {right: 1}, severity: {severe: 1}}
generator: {backend: phantom}
"""


@pytest.mark.slow
def test_notebook_chain_with_the_phantom(tmp_path):
    pd = pytest.importorskip("pandas")
    torch = pytest.importorskip("torch")

    spec = synthmed.load_spec(SPEC)
    assert isinstance(spec, synthmed.DatasetSpec)
    cases = synthmed.sample_cases(spec)
    assert isinstance(cases, synthmed.CaseList) and isinstance(cases[0], synthmed.Case)
    plan = cases.to_frame()
    assert isinstance(plan, pd.DataFrame) and len(plan) == 8
    assert plan["Pneumothorax"].sum() == 4
    prompt = synthmed.build_prompt(cases[0], spec.prompt)
    assert isinstance(prompt, synthmed.Prompt) and prompt.text
    tags = synthmed.case_to_tags(cases[0])
    assert synthmed.parse_tag_prompt(tags).findings == cases[0].findings

    result = synthmed.generate(spec, tmp_path / "out", progress=False)
    assert isinstance(result, synthmed.BuildResult) and result.written == 8

    train = synthmed.ManifestDataset(result.out, split="train", masks=["pneumothorax"])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch["image"].shape == (4, 1, 128, 128)
    pneumothorax = batch["label"][:, synthmed.CHEXPERT_COLUMNS.index("Pneumothorax")]
    assert batch["masks"]["pneumothorax"].flatten(1).any(1).tolist() == (pneumothorax == 1).tolist()
    records = synthmed.manifest_records(result.out, split="test")
    assert len(records) == 4 and {r["case_id"] for r in records}.isdisjoint(train.case_ids)

    if _missing_module("qc") or importlib.util.find_spec("synthmed.qc.run") is None:
        pytest.skip("synthmed.qc.run is not in this checkout yet: the chain stops before qc")
    report = synthmed.qc(result.out)
    assert report.report_path.is_file()


def test_notebook_slips_get_clear_errors(tmp_path):
    """Arguments of the wrong kind or out of range are named, instead of a wrong result (limit=-1 gave every case
    but one) or an AttributeError from inside."""
    spec = synthmed.load_spec("dataset_specs/pneumonia.yaml")
    for limit in (-1, True, 2.5):
        with pytest.raises(ValueError, match="limit must be a whole number of cases, 0 or more"):
            synthmed.sample_cases(spec, limit=limit)
    assert list(synthmed.sample_cases("dataset_specs/pneumonia.yaml", limit=3)) == \
        list(synthmed.sample_cases(spec, limit=3))  # a path, as generate() takes
    with pytest.raises(TypeError, match="cases are indexed by position"):
        synthmed.sample_cases(spec, limit=3)["case-0000001"]
    with pytest.raises(TypeError, match="sample_cases takes a spec"):
        synthmed.sample_cases(42)
    for value in (42, None, [1]):
        with pytest.raises(TypeError, match="load_spec takes a spec file's path, YAML text, bytes or a mapping"):
            synthmed.load_spec(value)
    assert synthmed.load_spec(spec) is spec
    loop: dict = {"spec_version": 1}
    loop["name"] = loop  # a mapping that holds itself
    with pytest.raises(synthmed.SpecError, match="nesting deeper than 64 levels"):
        synthmed.load_spec(loop)
    with pytest.raises(ValueError, match="'pneumonai' is not a finding that has masks; did you mean 'pneumonia'"):
        synthmed.ManifestDataset(tmp_path, masks=["pneumonai"])
    document = dict(spec.to_dict(), count=4)  # a mapping, as load_spec takes it
    assert synthmed.generate(document, tmp_path / "out", backend="pattern", progress=False, qc=False).written == 4


def test_generate_takes_numpy_integers_for_limit_and_batch_size(tmp_path):
    """A notebook's counts are often numpy integers: limit=np.int64(3) builds 3 cases, as sample_cases takes it."""
    import numpy as np

    from synthmed.build import generate

    spec = ("spec_version: 1\nname: np\ncount: 5\nimage: {size: 64}\nqc: {enabled: false}\n"
            "findings: [{finding: nodule, weight: 1}]\n")
    result = generate(spec, tmp_path / "out", backend="pattern", limit=np.int64(3), batch_size=np.int32(2),
                      progress=False)
    assert (result.total, result.written) == (3, 3)
    with pytest.raises(TypeError, match="limit must be a whole number"):
        generate(spec, tmp_path / "other", backend="pattern", limit=np.float64(3), progress=False)


def test_a_build_result_names_its_folder_after_a_chdir_and_qc_takes_it(tmp_path, monkeypatch):
    """generate(spec, "out/set") in one folder, then os.chdir elsewhere (a notebook): the result still names the
    folder it built (ManifestDataset and qc once took the other folder's set of the same name)."""
    from synthmed.build import generate

    spec = ("spec_version: 1\nname: cd\ncount: 3\nimage: {size: 64}\nqc: {enabled: false}\n"
            "findings: [{finding: nodule, weight: 1}]\n")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    result = generate(spec, "out/set", backend="pattern", progress=False)
    assert result.out == tmp_path / "a" / "out" / "set" and result.out.is_absolute()
    monkeypatch.chdir(tmp_path / "b")
    assert synthmed.ManifestDataset(result).root.resolve() == (tmp_path / "a" / "out" / "set").resolve()
    report = synthmed.qc(result, write=False)
    assert report.passed and not (tmp_path / "b" / "out").exists()


def test_a_spec_mapping_takes_numpy_numbers_and_any_path_object(tmp_path):
    """count=len(frame) and weights from a Series are numpy scalars; a path may be any os.PathLike."""
    import numpy as np

    document = {"spec_version": 1, "name": np.str_("np"), "count": np.int64(4), "image": {"size": np.int32(64)},
                "findings": [{"finding": "nodule", "weight": np.float32(0.5)},
                             {"finding": "no_finding", "weight": np.float64(0.5)}]}
    spec = synthmed.load_spec(document)
    assert (spec.count, spec.image.width) == (4, 64)
    assert spec.spec_hash == synthmed.load_spec({**document, "count": 4, "image": {"size": 64}, "name": "np",
                                                 "findings": [{"finding": "nodule", "weight": 0.5},
                                                              {"finding": "no_finding", "weight": 0.5}]}).spec_hash
    with pytest.raises(synthmed.SpecError, match="NaN and infinity are not allowed"):
        synthmed.load_spec({**document, "count": np.float64("nan")})

    class MyPath:  # as py.path.local: a path object that is not a pathlib.Path
        def __init__(self, path):
            self.path = path

        def __fspath__(self):
            return str(self.path)

    path = tmp_path / "spec.yaml"
    path.write_text("spec_version: 1\nname: p\ncount: 2\nfindings: [{finding: nodule, weight: 1}]\n", encoding="utf-8")
    assert synthmed.load_spec(MyPath(path)).spec_hash == synthmed.load_spec(path).spec_hash


def test_a_spec_whose_batch_size_was_lowered_says_how_to_resume(tmp_path):
    """Out of memory, a user lowers generator.batch_size in the spec: every value is in the spec hash, so the resume
    is refused; the refusal says to keep the spec and pass batch_size, which resumes."""
    from synthmed.build import BuildError, generate

    spec = ("spec_version: 1\nname: bs\ncount: 70\nimage: {size: 64}\nqc: {enabled: false}\n"
            "generator: {batch_size: 8}\nfindings: [{finding: nodule, weight: 1}]\n")
    generate(spec, tmp_path / "out", backend="pattern", progress=False, limit=64)
    with pytest.raises(BuildError, match="keep the spec as it was and pass --batch-size"):
        generate(spec.replace("batch_size: 8", "batch_size: 2"), tmp_path / "out", backend="pattern", progress=False,
                 resume=True)
    result = generate(spec, tmp_path / "out", backend="pattern", progress=False, resume=True, batch_size=2)
    assert (result.reused, result.written) == (64, 6)


def test_a_model_given_to_a_backend_that_draws_without_one_is_refused_as_the_command_line_does(tmp_path):
    """It was dropped silently, yet recorded in the run and the card, so that a resume without it was refused."""
    from synthmed.build import BuildError, generate

    spec = ("spec_version: 1\nname: m\ncount: 2\nimage: {size: 64}\nqc: {enabled: false}\n"
            "findings: [{finding: nodule, weight: 1}]\n")
    with pytest.raises(BuildError, match="model applies to the diffusion backend only; this run uses the pattern") \
            as refused:
        generate(spec, tmp_path / "out", backend="pattern", model=tmp_path / "no-such-model", progress=False)
    assert refused.value.exit_code == 2 and not (tmp_path / "out").exists()
    assert generate(spec, tmp_path / "plain", backend="pattern", progress=False).written == 2


def test_a_users_backend_resumes_only_with_the_settings_it_began_with(tmp_path):
    """A Backend object of the user's own: every setting its info reports (but how fast it runs) must be the kept
    rows', or the set would mix images drawn otherwise."""
    from synthmed.backends.base import BackendInfo
    from synthmed.backends.pattern import PatternBackend
    from synthmed.build import BuildError, generate

    class Mine(PatternBackend):
        def __init__(self, level: float, threads: int = 1):
            super().__init__(64, 64)
            self.info = BackendInfo(name="mine", model_id="mine-1", model_hash="mine-1",
                                    settings={"level": level, "threads": threads})

    spec = ("spec_version: 1\nname: u\ncount: 70\nimage: {size: 64}\nqc: {enabled: false}\n"
            "findings: [{finding: nodule, weight: 1}]\n")
    generate(spec, tmp_path / "out", backend=Mine(0.3), progress=False, limit=64)
    with pytest.raises(BuildError, match=r"other settings .*level 0.3 -> 0.8"):
        generate(spec, tmp_path / "out", backend=Mine(0.8), progress=False, resume=True)
    result = generate(spec, tmp_path / "out", backend=Mine(0.3, threads=2), progress=False, resume=True)
    assert (result.reused, result.written) == (64, 6)
