"""The check registry is the one list of checks: the spec's schema, its defaults, the modules and the report agree."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap

import pytest

from synthmed.qc import registry
from synthmed.qc.registry import CHECK_NAMES, CHECKS, DEFAULT_GATE, FAMILIES, Check
from synthmed.spec import DEFAULT_QC_GATE, QCThresholds
from synthmed.vocabulary import schemas_dir


def qc_schema() -> dict:
    schema = json.loads((schemas_dir() / "dataset_spec.schema.json").read_text(encoding="utf-8"))
    return schema["properties"]["qc"]["properties"]


def test_the_spec_schema_names_every_check_in_registry_order():
    assert qc_schema()["gate"]["items"]["enum"] == list(CHECK_NAMES)


def test_the_spec_default_gate_is_the_registry_s():
    assert DEFAULT_QC_GATE == DEFAULT_GATE
    described = re.search(r"Default \[([^\]]*)\]", qc_schema()["gate"]["description"]).group(1)
    assert tuple(described.split(", ")) == DEFAULT_GATE


def test_every_threshold_a_check_names_is_a_spec_threshold():
    fields = {f.name for f in dataclasses.fields(QCThresholds)}
    in_schema = set(qc_schema()["thresholds"]["properties"])
    for check in CHECKS:
        if check.threshold is not None:
            assert check.threshold in fields and check.threshold in in_schema, check.name


def test_names_are_unique_and_families_consecutive():
    assert len(set(CHECK_NAMES)) == len(CHECK_NAMES)
    assert [c.name for f in FAMILIES for c in f.checks] == list(CHECK_NAMES)
    assert FAMILIES[0].section is None and {c.level for c in FAMILIES[0].checks} == {"image"}
    assert len({f.section for f in FAMILIES}) == len(FAMILIES)
    assert set(registry.REGENERABLE_CHECKS) <= set(registry.PER_IMAGE_CHECKS)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.section or "per-image")
def test_every_family_module_computes_its_checks(family):
    module = family.load()
    assert module.__name__ == family.module
    if family.section is not None:
        assert callable(module.section)
    else:
        assert callable(module.table_rows)  # the per-image checks: rows from the images' flags
    assert all(f"``{c.name}``" in module.__doc__ for c in family.checks)  # each check is found where it is made


def test_a_check_is_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="unknown need"):
        Check("x", "y", "synthmed.qc.diversity", section="x", needs=("pixels",))
    with pytest.raises(ValueError, match="has a section"):
        Check("x", "y", "synthmed.qc.checks", level="image", section="x")
    a = Check("a", "", "m.one", section="one")
    b = Check("b", "", "m.two", section="two")
    with pytest.raises(ValueError, match="must be consecutive"):
        registry.families_of([a, b, dataclasses.replace(a, name="c")])
    with pytest.raises(KeyError, match="no check 'nope'"):
        registry.get("nope")


def test_gate_helpers():
    assert registry.unknown_checks(["blank", "nope", "fid"]) == ["nope"]
    assert registry.regenerable_in(["saturated", "readable", "size"]) == ("size", "saturated")
    assert registry.needed("cases") and registry.needed("prediction")


def test_the_registry_and_the_package_import_without_numpy():
    """synthmed.spec reads the registry: importing it must stay as light as `import synthmed`."""
    code = textwrap.dedent("""
        import sys
        import synthmed.qc.registry
        import synthmed.qc
        assert callable(synthmed.qc)
        heavy = sorted(m for m in ("numpy", "torch", "synthmed.qc.run") if m in sys.modules)
        assert not heavy, heavy
        from synthmed.qc import QCError
        assert QCError.__module__ == "synthmed.qc.inputs"
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
