from pathlib import Path

from synthmed.schema_docs import render_spec_reference

ROOT = Path(__file__).resolve().parents[1]


def test_spec_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "spec_reference.md").read_text(encoding="utf-8")
    assert committed == render_spec_reference(), "run: python -m synthmed.schema_docs > docs/spec_reference.md"


def test_spec_reference_lists_every_top_level_key_and_finding():
    import json

    schema = json.loads((ROOT / "schemas" / "dataset_spec.schema.json").read_text())
    text = render_spec_reference()
    for key in schema["properties"]:
        assert f"| `{key}` |" in text
    assert "| `pleural_effusion` |" in text
