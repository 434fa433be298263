"""Strict YAML: the subset of YAML a spec may use, with the line and column of every value.

PyYAML's event parser is used, but its YAML 1.1 scalar resolution is not: plain scalars are
resolved by the YAML 1.2 core schema, and a plain scalar that YAML 1.1 would read differently
(``NO`` as false, ``017`` as octal, ``1:20`` as sexagesimal, ``2026-11-21`` as a date) is
refused with a hint to quote it. Anchors, aliases, tags, merge keys, duplicate keys, several
documents, NaN, infinities, deep nesting and oversized input are refused too. After a
duplicate key parsing goes on (the first value is kept), so a caller can check the rest too.

Example:
    >>> doc = load_strict_yaml("a: {b: [1, 2.5, x]}")
    >>> doc.data
    {'a': {'b': [1, 2.5, 'x']}}
    >>> doc.position(("a", "b", 2))
    (1, 17)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64

Path_ = tuple  # a JSON path: keys (str) and list indices (int)


@dataclass(frozen=True)
class YamlProblem:
    """One reason a YAML text was refused, with a 1-based line and column."""

    message: str
    line: int | None = None
    column: int | None = None
    path: tuple = ()


class StrictYamlError(ValueError):
    """Raised with every problem found in a YAML text (``.problems``).

    When every problem is a duplicate key, ``.document`` is the document parsed with the
    first value of each such key, so that a caller can report the document's other
    problems along with them; otherwise it is None.
    """

    def __init__(self, problems: list[YamlProblem], source: str = "<text>", document: "YamlDocument | None" = None):
        self.problems = problems
        self.source = source
        self.document = document
        super().__init__("\n".join(_format(p, source) for p in problems))


def _format(p: YamlProblem, source: str) -> str:
    where = source if p.line is None else f"{source}:{p.line}:{p.column}"
    return f"{where}: {p.message}"


@dataclass
class YamlDocument:
    """Parsed data plus where each value (and each mapping key) stands in the text."""

    data: Any
    source: str
    value_marks: dict = field(default_factory=dict)
    key_marks: dict = field(default_factory=dict)

    def position(self, path: tuple, *, key: bool = False) -> tuple[int, int] | None:
        """(line, column) of the value at ``path``, or of its key when ``key``; nearest parent if absent."""
        path = tuple(path)
        if key and path in self.key_marks:
            return self.key_marks[path]
        while path:
            if path in self.value_marks:
                return self.value_marks[path]
            path = path[:-1]
        return self.value_marks.get(())  # None for data that came without text (a mapping)


# YAML 1.2 core schema
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_SPECIAL_FLOAT = re.compile(r"^[-+]?\.(?:inf|Inf|INF|nan|NaN|NAN)$")
# YAML 1.1 readings that differ from 1.2
_BOOL_11 = re.compile(r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$")
_PREFIXED_INT = re.compile(r"^[-+]?0(?:[0-7]+|o[0-7]+|x[0-9a-fA-F]+|b[01]+)$")
_UNDERSCORE_NUM = re.compile(r"^[-+]?(?:0[xob])?[0-9a-fA-F_]*_[0-9a-fA-F_.]*$")
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_TIMESTAMP = re.compile(r"^[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}.*)?$")


def _resolve_plain(value: str) -> tuple[Any, str | None]:
    """Resolve a plain (unquoted) scalar; returns (value, problem or None)."""
    if _NULL.match(value):
        return None, None
    if value in _BOOL:
        return _BOOL[value], None
    if _BOOL_11.match(value):
        return value, (f"'{value}' is a boolean in YAML 1.1 but a string in YAML 1.2; "
                       f"write true/false, or quote it ('{value}') if you mean the text")
    if _SPECIAL_FLOAT.match(value):
        return value, f"'{value}': NaN and infinity are not allowed"
    if _PREFIXED_INT.match(value) and value.lstrip("+-") not in ("0",):
        return value, (f"'{value}' is ambiguous (octal, hex or binary in some YAML versions); "
                       f"write a plain decimal number, or quote it if you mean the text")
    if _INT.match(value):
        return int(value), None
    if _FLOAT.match(value):
        number = float(value)
        if number in (float("inf"), float("-inf")):
            return value, f"'{value}' is too large a number (it overflows to infinity)"
        return number, None
    if _UNDERSCORE_NUM.match(value) and any(c.isdigit() for c in value):
        return value, f"'{value}' is a number in YAML 1.1 but a string in YAML 1.2; write it without '_', or quote it"
    if _SEXAGESIMAL.match(value):
        return value, f"'{value}' is a base-60 number in YAML 1.1; quote it if you mean the text"
    if _TIMESTAMP.match(value):
        return value, f"'{value}' is a date in YAML 1.1; quote it if you mean the text"
    if value == "<<":
        return value, "merge keys ('<<') are not allowed"
    return value, None


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long or not a valid path: it is text
        return False


def read_text(path_or_text: str | Path | bytes, source: str | None = None) -> tuple[str, str]:
    """Return (text, source name) from a path, bytes or text; refuse binary, non-UTF-8 and >1 MiB input."""
    raw: bytes
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text and (
            path_or_text.strip().endswith((".yaml", ".yml", ".json")) or _is_file(path_or_text)
            or (path_or_text.strip() and not any(c in path_or_text for c in ":{[")))):
        p = Path(path_or_text)
        source = source or str(path_or_text)
        if not p.exists():
            raise StrictYamlError([YamlProblem(f"no such file: {p}")], source)
        if p.is_dir():
            raise StrictYamlError([YamlProblem(f"{p} is a directory, not a spec file")], source)
        try:
            with p.open("rb") as f:  # at most one byte over the limit: /dev/zero or a pipe has no size to check first
                raw = f.read(MAX_BYTES + 1)
        except OSError as e:
            raise StrictYamlError([YamlProblem(f"cannot read {p}: {e.strerror or e}")], source) from None
        if len(raw) > MAX_BYTES:
            raise StrictYamlError([YamlProblem(f"file is over {MAX_BYTES:,} bytes; "
                                               f"specs are limited to {MAX_BYTES:,} bytes (1 MiB)")], source)
    elif isinstance(path_or_text, bytes):
        raw, source = path_or_text, source or "<bytes>"
    else:
        raw, source = path_or_text.encode("utf-8", "surrogatepass"), source or "<text>"
    if len(raw) > MAX_BYTES:
        raise StrictYamlError([YamlProblem(f"text is {len(raw):,} bytes; specs are limited to {MAX_BYTES:,} bytes (1 MiB)")], source)
    if b"\x00" in raw:
        raise StrictYamlError([YamlProblem("this is a binary file (it contains NUL bytes), not a YAML spec")], source)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise StrictYamlError([YamlProblem(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the spec as UTF-8",
                                           line, col)], source) from None
    bad = re.search(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]", text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        col = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        raise StrictYamlError([YamlProblem(f"control character U+{ord(bad.group()):04X} is not allowed in a spec", line, col)], source)
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise StrictYamlError([YamlProblem("the spec is empty")], source)
    return text, source


def load_strict_yaml(path_or_text: str | Path | bytes, source: str | None = None) -> YamlDocument:
    """Parse one strict-YAML document whose root is a mapping.

    Args:
        path_or_text: a path to a ``.yaml``/``.yml``/``.json`` file, YAML text, or bytes.
        source: the name used in messages (defaults to the path).

    Raises:
        StrictYamlError: with every problem found, each with line and column.
    """
    import yaml  # deferred: keeps `import synthmed` light

    text, source = read_text(path_or_text, source)
    doc = YamlDocument(data=None, source=source)
    problems: list[YamlProblem] = []
    duplicates: list[YamlProblem] = []  # problems that parsing went on after (the first value kept)

    def mark(ev) -> tuple[int, int]:
        return ev.start_mark.line + 1, ev.start_mark.column + 1

    stream = yaml.parse(text, Loader=yaml.SafeLoader)
    lookahead: list = []

    def peek():
        """The next event, parsed lazily so that excessive nesting stops the parse early."""
        if not lookahead:
            try:
                lookahead.append(next(stream))
            except yaml.MarkedYAMLError as e:
                m = e.problem_mark or e.context_mark
                msg = " ".join(s for s in (e.context, e.problem) if s)
                raise StrictYamlError([YamlProblem(f"YAML syntax error: {msg}", m.line + 1 if m else None,
                                                   m.column + 1 if m else None)], source) from None
            except yaml.YAMLError as e:
                raise StrictYamlError([YamlProblem(f"YAML syntax error: {e}")], source) from None
        return lookahead[0]

    def take():
        ev = peek()
        lookahead.pop()
        return ev

    def check_node_event(ev, path):
        if getattr(ev, "anchor", None):
            problems.append(YamlProblem(f"anchors ('&{ev.anchor}') are not allowed; write the value out", *mark(ev), path))
        tag = getattr(ev, "tag", None)
        if tag and tag != "!":
            problems.append(YamlProblem(f"explicit tags ('{tag}') are not allowed", *mark(ev), path))

    def build(path: tuple, depth: int):
        ev = take()
        if depth > MAX_DEPTH:
            raise StrictYamlError([YamlProblem(f"nesting deeper than {MAX_DEPTH} levels", *mark(ev), path)], source)
        doc.value_marks[path] = mark(ev)
        if isinstance(ev, yaml.AliasEvent):
            problems.append(YamlProblem(f"aliases ('*{ev.anchor}') are not allowed; write the value out", *mark(ev), path))
            return None
        check_node_event(ev, path)
        if isinstance(ev, yaml.ScalarEvent):
            if ev.style is None and ev.implicit[0]:
                value, problem = _resolve_plain(ev.value)
                if problem:
                    problems.append(YamlProblem(problem, *mark(ev), path))
                return value
            return ev.value
        if isinstance(ev, yaml.SequenceStartEvent):
            items = []
            while not isinstance(peek(), yaml.SequenceEndEvent):
                items.append(build(path + (len(items),), depth + 1))
            take()
            return items
        if isinstance(ev, yaml.MappingStartEvent):
            result: dict = {}
            while not isinstance(peek(), yaml.MappingEndEvent):
                kev = peek()
                if not isinstance(kev, yaml.ScalarEvent):
                    problems.append(YamlProblem("mapping keys must be plain text, not lists, mappings or aliases",
                                                *mark(kev), path))
                    build(path + ("?",), depth + 1)  # skip the key
                    build(path + ("?",), depth + 1)  # and its value
                    continue
                take()
                check_node_event(kev, path)
                key: Any = kev.value
                if kev.style is None and kev.implicit[0]:
                    key, problem = _resolve_plain(kev.value)
                    if problem:
                        problems.append(YamlProblem(problem, *mark(kev), path + (str(kev.value),)))
                        key = kev.value
                if isinstance(key, bool) or key is None or isinstance(key, float):
                    problems.append(YamlProblem(f"mapping key {kev.value!r} must be text; quote it", *mark(kev), path))
                    key = kev.value
                key = str(key)  # JSON keys are text; an unquoted `50:` means "50"
                kpath = path + (key,)
                if key in result:
                    first = doc.key_marks.get(kpath, (None, None))
                    duplicates.append(YamlProblem(f"duplicate key '{key}' (first at line {first[0]})",
                                                  *mark(kev), kpath))
                    problems.append(duplicates[-1])
                    build(path + ("?dup",), depth + 1)
                    continue
                doc.key_marks[kpath] = mark(kev)
                result[key] = build(kpath, depth + 1)
            take()
            return result
        raise StrictYamlError([YamlProblem(f"unexpected YAML event {type(ev).__name__}", *mark(ev), path)], source)

    # StreamStart, DocumentStart, node, DocumentEnd, [DocumentStart ...], StreamEnd
    take()
    if isinstance(peek(), yaml.StreamEndEvent):
        raise StrictYamlError([YamlProblem("the spec is empty")], source)
    take()  # DocumentStart
    root_ev = peek()
    doc.data = build((), 0)
    take()  # DocumentEnd
    if not isinstance(peek(), yaml.StreamEndEvent):
        problems.append(YamlProblem("several YAML documents ('---') in one file; a spec is one document", *mark(peek())))
    if not problems and not isinstance(doc.data, dict):
        kind = "empty" if doc.data is None else type(doc.data).__name__.replace("str", "text").replace("list", "a list")
        problems.append(YamlProblem(f"the spec must be a mapping of keys to values (found {kind})", *mark(root_ev)))
    if problems:
        recoverable = len(problems) == len(duplicates) and isinstance(doc.data, dict)
        raise StrictYamlError(problems, source, doc if recoverable else None)
    return doc
