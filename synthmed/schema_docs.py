"""Render the spec reference (docs/spec_reference.md) from the JSON Schema, so the two cannot drift.

Example:
    >>> text = render_spec_reference()
    >>> "| `count` |" in text
    True

Run ``python -m synthmed.schema_docs > docs/spec_reference.md`` after changing the schema;
a test fails while the committed file differs.
"""

from __future__ import annotations

import json

from .vocabulary import get_vocabulary, schemas_dir


def _type_of(node: dict, defs: dict) -> str:
    if "$ref" in node:
        name = node["$ref"].split("/")[-1]
        return {"weights": "weights", "weight": "number > 0 (at most 1e12)", "choice": "value or weights",
                "pixels": "integer"}.get(name, name)
    if "enum" in node:
        return " \\| ".join(f"`{'null' if v is None else v}`" for v in node["enum"])
    if "const" in node:  # as the spec writes it (YAML): null, false
        value = node["const"]
        return f"`{'null' if value is None else str(value).lower() if isinstance(value, bool) else value}`"
    if "anyOf" in node:
        return " or ".join(_type_of(n, defs) for n in node["anyOf"])
    t = node.get("type", "")
    return " or ".join(t) if isinstance(t, list) else t


def _rows(node: dict, defs: dict, prefix: str, required: set) -> list[str]:
    rows = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        target = defs.get(sub["$ref"].split("/")[-1], {}) if "$ref" in sub and "properties" not in sub else sub
        desc = sub.get("description") or target.get("description", "")
        limits = [f"{k} {sub[k]}" for k in ("minimum", "maximum", "multipleOf", "minItems", "maxItems") if k in sub]
        req = "yes" if key in required else ""
        rows.append(f"| `{path}` | {_type_of(sub, defs)} | {req} | {desc}{' (' + ', '.join(limits) + ')' if limits else ''} |")
        if target.get("type") == "object" and "properties" in target and key != "age":
            rows += _rows(target, defs, path + ".", set(target.get("required", [])))
        if key == "findings":
            comp = defs["component"]
            rows += _rows(comp, defs, "findings[].", set(comp.get("required", [])))
        if key == "age":
            age = defs["age"]
            rows += _rows(age, defs, path + ".", set())
    return rows


def render_spec_reference() -> str:
    """The Markdown reference of every spec key, plus the vocabulary's ids."""
    schema = json.loads((schemas_dir() / "dataset_spec.schema.json").read_text(encoding="utf-8"))
    defs = schema["$defs"]
    lines = ["# Spec reference", "",
             "Generated from `schemas/dataset_spec.schema.json` and `schemas/vocabulary.yaml` by "
             "`python -m synthmed.schema_docs`; do not edit by hand.", "",
             schema["description"], "",
             "| key | type | required | meaning |", "|---|---|---|---|"]
    lines += _rows(schema, defs, "", set(schema["required"]))
    vocab = get_vocabulary()
    lines += ["", "## Findings", "", "| id | CheXpert column | locations | severity | code |", "|---|---|---|---|---|"]
    for f in vocab.findings.values():
        kinds = ", ".join(f.location_kinds) + (" (incl. bilateral)" if f.bilateral and f.location_kinds else "")
        parent = f" (a kind of `{f.parent}`)" if f.parent else ""
        lines.append(f"| `{f.id}`{parent} | {f.chexpert} | {kinds or '-'} | {'yes' if f.severity else '-'} | "
                     f"{f.code.system} {f.code.code} {f.code.display} |")
    lines += ["", "## Locations", "", "| id | kind | within | code |", "|---|---|---|---|"]
    for loc in vocab.locations.values():
        lines.append(f"| `{loc.id}` | {loc.kind} | {loc.parent or '-'} | {loc.code.system} {loc.code.code} {loc.code.display} |")
    lines += ["", "## Severities", "", "| id | grade | code |", "|---|---|---|"]
    for s in vocab.severities.values():
        lines.append(f"| `{s.id}` | {s.grade} | {s.code.system} {s.code.code} |")
    lines += ["", "Views: " + ", ".join(f"`{v}`" for v in vocab.views) + ". Sexes: "
              + ", ".join(f"`{s}`" for s in vocab.sexes) + ".",
              "Every id also accepts the synonyms listed in `schemas/vocabulary.yaml` (English and Chinese).", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(render_spec_reference(), end="")
