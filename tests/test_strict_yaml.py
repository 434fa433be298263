"""Strict YAML: the YAML subset a spec may use, with line and column of every value.

Checked both directly (``load_strict_yaml``) and through ``load_spec`` (so the JSON path
of each refusal is the one a user sees).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synthmed import SpecError, load_spec
from synthmed.strict_yaml import MAX_BYTES, MAX_DEPTH, StrictYamlError, load_strict_yaml

BASE = textwrap.dedent("""\
    spec_version: 1
    name: demo
    count: 100
    findings:
      - finding: pneumonia
        weight: 1
    """)


def problems_of(text):
    with pytest.raises(StrictYamlError) as info:
        load_strict_yaml(text)
    return info.value.problems


# ----------------------------------------------------------------------------- what is accepted

def test_yaml_12_core_scalars_and_positions():
    doc = load_strict_yaml('a: 1\nb: [x, "NO", 2.5, true, null, ~, -3, "017"]\n50: q\nc: {d: e}\n')
    assert doc.data == {"a": 1, "b": ["x", "NO", 2.5, True, None, None, -3, "017"], "50": "q", "c": {"d": "e"}}
    assert type(doc.data["a"]) is int and type(doc.data["b"][2]) is float
    assert doc.position(("a",)) == (1, 4)
    assert doc.position(("b", 1)) == (2, 8)  # the opening quote
    assert doc.position(("c", "d")) == (4, 8)
    assert doc.position(("c", "d"), key=True) == (4, 5)
    assert doc.position(("c", "missing")) == (4, 4)  # nearest parent
    assert doc.position(()) == (1, 1)


def test_quoted_yaml11_words_are_plain_strings():
    doc = load_strict_yaml("a: 'NO'\nb: \"yes\"\nc: '017'\nd: '1:20'\ne: '2026-11-21'\nf: '.nan'\n")
    assert doc.data == {"a": "NO", "b": "yes", "c": "017", "d": "1:20", "e": "2026-11-21", "f": ".nan"}


def test_bom_and_crlf_are_accepted():
    doc = load_strict_yaml(b"\xef\xbb\xbfa: 1\r\nb: two\r\n")
    assert doc.data == {"a": 1, "b": "two"}
    assert doc.position(("b",)) == (2, 4)


def test_nesting_exactly_at_the_limit_is_accepted():
    doc = load_strict_yaml("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    node = doc.data["a"]
    depth = 1
    while node:
        node, depth = node[0], depth + 1
    assert depth == MAX_DEPTH


# ----------------------------------------------------------------------------- what is refused

REFUSED = [
    # id, text, expected problem path, line, column, phrase
    ("duplicate-key", "a: 1\nb: 2\na: 3\n", ("a",), 3, 1, "duplicate key 'a' (first at line 1)"),
    ("duplicate-nested-key", "a: 1\nb:\n  c: 1\n  c: 2\n", ("b", "c"), 4, 3, "duplicate key 'c'"),
    ("anchor", "a: &x 1\nb: 2\n", ("a",), 1, 4, "anchors ('&x') are not allowed"),
    ("alias", "a: 1\nb: *x\n", ("b",), 2, 4, "aliases ('*x') are not allowed"),
    ("tag-python-object", "a: !!python/object:os.system {}\n", ("a",), 1, 4, "explicit tags"),
    ("tag-int", "a: !!int 3\n", ("a",), 1, 4, "explicit tags"),
    ("local-tag", "a: !thing 3\n", ("a",), 1, 4, "explicit tags"),
    ("merge-key", "a:\n  <<: {b: 1}\n", ("a", "<<"), 2, 3, "merge keys"),
    ("bool-NO", "a: NO\n", ("a",), 1, 4, "boolean in YAML 1.1"),
    ("bool-yes", "a: x\nb: yes\n", ("b",), 2, 4, "boolean in YAML 1.1"),
    ("bool-on", "a: on\n", ("a",), 1, 4, "boolean in YAML 1.1"),
    ("bool-Off-in-list", "a: [1, Off]\n", ("a", 1), 1, 8, "boolean in YAML 1.1"),
    ("bool-key", "yes: 1\n", ("yes",), 1, 1, "boolean in YAML 1.1"),
    ("octal", "a: 017\n", ("a",), 1, 4, "ambiguous (octal"),
    ("octal-0o", "a: 0o17\n", ("a",), 1, 4, "ambiguous (octal"),
    ("hex", "a: 0x1F\n", ("a",), 1, 4, "ambiguous (octal, hex"),
    ("underscore", "a: 1_000\n", ("a",), 1, 4, "without '_'"),
    ("sexagesimal", "a: 1:20\n", ("a",), 1, 4, "base-60"),
    ("date", "a: 2026-11-21\n", ("a",), 1, 4, "a date in YAML 1.1"),
    ("timestamp", "a: 2026-11-21 10:00:00\n", ("a",), 1, 4, "a date in YAML 1.1"),
    ("nan", "a: .nan\n", ("a",), 1, 4, "NaN and infinity are not allowed"),
    ("inf", "a: .inf\n", ("a",), 1, 4, "NaN and infinity are not allowed"),
    ("minus-inf", "a: -.Inf\n", ("a",), 1, 4, "NaN and infinity are not allowed"),
    ("null-key", "~: 1\n", (), 1, 1, "must be text; quote it"),
    ("float-key", "1.5: 1\n", (), 1, 1, "must be text; quote it"),
    ("list-key", "? [a]\n: 1\n", (), 1, 3, "mapping keys must be plain text"),
    ("list-root", "- a\n- b\n", (), 1, 1, "must be a mapping"),
    ("text-root", "hello\n", (), 1, 1, "must be a mapping"),
    ("null-root", "~\n", (), 1, 1, "must be a mapping"),
    ("two-documents", "a: 1\n---\nb: 2\n", (), 2, 1, "several YAML documents"),
    ("deep-nesting", "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n",
     ("a",) + (0,) * MAX_DEPTH, 1, 4 + MAX_DEPTH, f"nesting deeper than {MAX_DEPTH} levels"),
    ("control-char", "a: \"x\x07y\"\n", None, 1, 6, "control character U+0007"),
    ("syntax-error", "a: [1, 2\nb: 3\n", None, 2, None, "YAML syntax error"),
    ("tab-indent", "a:\n\tb: 1\n", None, 2, 1, "YAML syntax error"),
    ("empty", "", None, None, None, "the spec is empty"),
    ("only-comments", "# hi\n\n   # there\n", None, None, None, "the spec is empty"),
]


@pytest.mark.parametrize("text, path, line, column, phrase", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused(text, path, line, column, phrase):
    problems = problems_of(text)
    assert len(problems) >= 1
    p = problems[0]
    if path is not None:
        assert p.path == path
    if line is not None:
        assert p.line == line
    elif phrase is not None:
        assert p.line is None
    if column is not None:
        assert p.column == column
    if phrase is not None:
        assert phrase in p.message


def test_anchor_and_alias_both_reported():
    problems = problems_of("a: &x {b: 1}\nc: *x\n")
    assert [(p.path, p.line) for p in problems] == [(("a",), 1), (("c",), 2)]
    assert "anchors ('&x')" in problems[0].message and "aliases ('*x')" in problems[1].message


def test_billion_laughs_is_refused_without_expanding():
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    problems = problems_of(text)
    assert any("aliases" in p.message for p in problems)
    assert any("anchors" in p.message for p in problems)


def test_every_yaml_problem_is_listed_at_once():
    problems = problems_of("a: NO\nb: 017\nc: 1\nc: 2\nd: .nan\n")
    assert [(p.line, p.path) for p in problems] == [(1, ("a",)), (2, ("b",)), (4, ("c",)), (5, ("d",))]


def test_error_message_has_source_line_and_column():
    with pytest.raises(StrictYamlError) as info:
        load_strict_yaml("a: 1\nb: NO\n", source="my.yaml")
    assert str(info.value).startswith("my.yaml:2:4: 'NO' is a boolean in YAML 1.1")
    assert info.value.source == "my.yaml"


def test_text_over_one_mib_is_refused():
    text = "a: 1\n" + "#" * MAX_BYTES + "\n"
    problems = problems_of(text)
    assert "1 MiB" in problems[0].message and problems[0].line is None


@pytest.mark.skipif(not Path("/dev/zero").exists() or sys.platform == "win32", reason="needs /dev/zero")
def test_endless_file_is_refused_after_reading_just_over_the_limit():
    # /dev/zero has no size to check first: reading it whole would fill the memory.
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from synthmed.strict_yaml import load_strict_yaml, StrictYamlError\n"
            "try:\n    load_strict_yaml('/dev/zero')\n"
            "except StrictYamlError as e:\n    print(e.problems[0].message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    expected = f"file is over {MAX_BYTES:,} bytes; specs are limited to {MAX_BYTES:,} bytes (1 MiB)"
    assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_file_of_exactly_the_limit_is_read(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_bytes(b"a: 1\n" + b"#" * (MAX_BYTES - 6) + b"\n")
    assert load_strict_yaml(path).data == {"a": 1}
    path.write_bytes(b"a: 1\n" + b"#" * (MAX_BYTES - 5) + b"\n")
    assert "1 MiB" in problems_of(path)[0].message


def test_bytes_with_nul_and_latin1_are_refused():
    assert "binary" in problems_of(b"a: 1\n\x00")[0].message
    p = problems_of("a: 1\nb: caf\xe9\n".encode("latin-1"))[0]
    assert "not UTF-8" in p.message and "0xe9" in p.message
    assert (p.line, p.column) == (2, 7)


def test_long_one_line_text_is_parsed_not_taken_for_a_path():
    # A single-line flow/JSON spec longer than a file name may be: must be read as YAML text.
    text = "{a: 1, b: '" + "x" * 400 + "'}"
    doc = load_strict_yaml(text)
    assert doc.data == {"a": 1, "b": "x" * 400}


def test_pathological_nesting_is_refused_quickly():
    # ~400 KB of '[' (under the 1 MiB limit): must be refused for depth, not hang the parser.
    code = ("from synthmed.strict_yaml import load_strict_yaml, StrictYamlError\n"
            "n = 200000\n"
            "try:\n    load_strict_yaml('a: ' + '[' * n + ']' * n + '\\n')\n"
            "except StrictYamlError as e:\n    print(e.problems[0].message)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("a 200,000-deep flow sequence was not refused within 8 s (the nesting limit is checked "
                    "only after the whole event stream has been parsed)")
    assert "nesting deeper than" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- through load_spec

YAML11_IN_SPEC = [
    ("allocation-NO", BASE + "allocation: NO\n", "allocation", 7, "boolean in YAML 1.1"),
    ("allow_pickle-yes", BASE + "generator: {allow_pickle: yes}\n", "generator.allow_pickle", 7, "boolean in YAML 1.1"),
    ("split-key-on", BASE + "splits: {on: 1}\n", "splits.on", 7, "boolean in YAML 1.1"),
    ("count-octal", BASE.replace("count: 100", "count: 017"), "count", 3, "octal"),
    ("count-sexagesimal", BASE.replace("count: 100", "count: 1:20"), "count", 3, "base-60"),
    ("name-date", BASE.replace("name: demo", "name: 2026-11-21"), "name", 2, "date"),
    ("weight-nan", BASE.replace("weight: 1", "weight: .nan"), "findings[0].weight", 6, "NaN"),
    ("weight-inf", BASE.replace("weight: 1", "weight: .inf"), "findings[0].weight", 6, "infinity"),
    ("description-tag", BASE + "description: !!python/object:os.system {}\n", "description", 7, "explicit tags"),
    ("image-merge", BASE + "image:\n  <<: {size: 128}\n", "image.<<", 8, "merge keys"),
    ("count-duplicate", BASE + "count: 5\n", "count", 7, "duplicate key 'count' (first at line 3)"),
    ("splits-anchor", BASE + "splits: &s {train: 1}\nview: {PA: 1}\n", "splits", 7, "anchors"),
]


@pytest.mark.parametrize("text, json_path, line, phrase", [r[1:] for r in YAML11_IN_SPEC],
                         ids=[r[0] for r in YAML11_IN_SPEC])
def test_yaml_refusals_through_load_spec(text, json_path, line, phrase):
    with pytest.raises(SpecError) as info:
        load_spec(text)
    (p,) = info.value.problems
    assert (p.json_path, p.line) == (json_path, line)
    assert phrase in p.message


def test_yaml_overflow_float_is_not_an_infinity():
    # 1e400 is a YAML 1.2 float that overflows to inf: infinities must be refused like '.inf'.
    with pytest.raises(SpecError) as info:
        load_spec(BASE.replace("weight: 1", "weight: 1e400"))
    (p,) = info.value.problems
    assert (p.json_path, p.line) == ("findings[0].weight", 6)


# ----------------------------------------------------------------------------- after a duplicate key

def test_duplicate_key_keeps_the_first_value_and_parsing_goes_on():
    with pytest.raises(StrictYamlError) as info:
        load_strict_yaml("a: 1\nb: {c: 2, c: 3, d: 4}\na: 5\ne: 6\n")
    e = info.value
    assert [(p.path, p.line, p.column) for p in e.problems] == [(("b", "c"), 2, 11), (("a",), 3, 1)]
    assert e.document.data == {"a": 1, "b": {"c": 2, "d": 4}, "e": 6}
    assert e.document.position(("e",)) == (4, 4)


def test_duplicate_key_with_another_yaml_problem_gives_no_document():
    with pytest.raises(StrictYamlError) as info:
        load_strict_yaml("a: 1\na: 2\nb: NO\n")
    assert len(info.value.problems) == 2 and info.value.document is None


def test_duplicate_key_does_not_hide_the_other_problems_of_a_spec():
    text = BASE.replace("finding: pneumonia", "finding: pnuemonia") + "spec_version: 1\nseeed: 3\nsplits: {train: 0}\n"
    with pytest.raises(SpecError) as info:
        load_spec(text)
    got = [(p.json_path, p.line, p.message) for p in info.value.problems]
    assert got == [
        ("findings[0].finding", 5, "unknown finding 'pnuemonia'; did you mean 'pneumonia'?"),
        ("spec_version", 7, "duplicate key 'spec_version' (first at line 1)"),
        ("seeed", 8, "unknown key 'seeed'; did you mean 'seed'?"),
        ("splits.train", 9,
         "must be greater than 0, got 0 (weights must be positive; remove an entry instead of giving it 0)"),
    ]


def test_duplicate_key_is_checked_with_its_first_value():
    # the first count (0) is what the spec would use: it is reported; the second (5) is not looked at
    with pytest.raises(SpecError) as info:
        load_spec(BASE.replace("count: 100", "count: 0") + "count: 5\n")
    assert [(p.json_path, p.line) for p in info.value.problems] == [("count", 3), ("count", 7)]
    assert "at least 1, got 0" in info.value.problems[0].message
