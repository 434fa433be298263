"""Case -> Prompt, and tag prompts <-> Case. Pure functions; no randomness.

A prompt is text plus emphasis spans kept as data (``Prompt.weights``), so a backend can
weight the embeddings of the finding words without parsing the text again. Templates are
versioned: a built-in name (``synthmed-v1``) or a custom text whose id is its hash.

Tag prompts describe a case in brackets, in English or Chinese:

    >>> a = parse_tag_prompt("[finding: mild pneumonia][location: right lower lobe][severity: grade 2]")
    >>> b = parse_tag_prompt("[重点:轻度肺炎][位置:右下肺叶][严重程度:2级]")
    >>> a == b, a.findings[0]
    (True, FindingLabel(finding='pneumonia', location='right_lower_lobe', severity='moderate'))
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

# the template language is the spec's (re-exported: these names were first defined here)
from .spec import BUILTIN_TEMPLATES as BUILTIN_TEMPLATES, EMPHASIS_ROLES as EMPHASIS_ROLES  # noqa: F401
from .spec import PLACEHOLDERS as PLACEHOLDERS, check_template as check_template  # noqa: F401
from .vocabulary import Vocabulary, get_vocabulary, normalise

if TYPE_CHECKING:  # pragma: no cover
    from .sampler import Case
    from .spec import PromptSpec

_PLACEHOLDER_ROLE = {"view": "view", "view_long": "view", "age": "age", "sex": "sex"}


@dataclass(frozen=True)
class Emphasis:
    """Characters ``text[start:end]`` (words of one role) get embedding weight ``weight``."""

    start: int
    end: int
    weight: float
    role: str


@dataclass(frozen=True)
class Prompt:
    """The text given to a model, its negative prompt, and emphasis spans over the text."""

    text: str
    negative: str = ""
    weights: tuple[Emphasis, ...] = ()
    template_id: str = "synthmed-v1"

    def segments(self) -> list[tuple[str, float]]:
        """The text cut into (piece, weight) runs, weight 1.0 outside emphasised spans.

        Example:
            >>> Prompt("a big b", weights=(Emphasis(2, 5, 1.3, "finding"),)).segments()
            [('a ', 1.0), ('big', 1.3), (' b', 1.0)]
        """
        out, pos = [], 0
        for e in sorted(self.weights, key=lambda e: e.start):
            if e.start > pos:
                out.append((self.text[pos:e.start], 1.0))
            out.append((self.text[e.start:e.end], e.weight))
            pos = e.end
        if pos < len(self.text):
            out.append((self.text[pos:], 1.0))
        return out


def finding_segments(case: "Case", vocab: Vocabulary | None = None) -> list[tuple[str, str | None]]:
    """The findings phrase as (text, role) pieces, e.g. 'moderate right lower lobe pneumonia'."""
    vocab = vocab or get_vocabulary()
    pieces: list[tuple[str, str | None]] = []
    n = len(case.findings)
    for i, f in enumerate(case.findings):
        if i:
            pieces.append((" and " if i == n - 1 else ", ", None))
        if f.severity:
            pieces += [(f.severity, "severity"), (" ", None)]
        if f.location:
            pieces += [(vocab.locations[f.location].text, "location"), (" ", None)]
        pieces.append((vocab.findings[f.finding].text, "finding"))
    return pieces


def build_prompt(case: "Case", prompt_spec: "PromptSpec | None" = None, vocab: Vocabulary | None = None) -> Prompt:
    """Fill a case into the spec's template.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("c", 0, "train", 1, (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),), "F", 58, "PA")
        >>> build_prompt(case).text
        'PA chest radiograph of a 58 year old female. Moderate right lower lobe pneumonia.'
    """
    from .sampler import Case
    from .spec import DatasetSpec, PromptSpec

    if not isinstance(case, Case):
        raise TypeError(f"build_prompt takes one Case (cases[i] of synthmed.sample_cases), not {type(case).__name__}")
    if isinstance(prompt_spec, DatasetSpec):  # the whole spec given: its prompt section is meant
        prompt_spec = prompt_spec.prompt
    if prompt_spec is not None and not isinstance(prompt_spec, PromptSpec):
        raise TypeError(f"build_prompt takes the spec's prompt section (spec.prompt), not {type(prompt_spec).__name__}")
    vocab = vocab or get_vocabulary()
    if prompt_spec is None:
        template, template_id, emphasis, negative = BUILTIN_TEMPLATES["synthmed-v1"], "synthmed-v1", {}, ""
    else:
        template, template_id = prompt_spec.template, prompt_spec.template_id
        emphasis, negative = dict(prompt_spec.emphasis), prompt_spec.negative
    values = {
        "view": case.view, "view_long": vocab.views[case.view].code.display if case.view else None,
        "age": None if case.age is None else str(case.age),
        "sex": vocab.sexes[case.sex].text if case.sex else None,
    }
    pieces: list[tuple[str, str | None]] = []
    for literal, name, _, _ in string.Formatter().parse(template):
        if literal:
            pieces.append((literal, None))
        if name is None:
            continue
        if name == "findings":
            segs = finding_segments(case, vocab)
        else:
            if values.get(name) is None:
                raise ValueError(f"case {case.case_id} has no {name}, which the template {template_id!r} needs")
            segs = [(values[name], _PLACEHOLDER_ROLE[name])]
        if _starts_sentence(pieces) and segs:
            first, role = segs[0]
            segs[0] = (first[:1].upper() + first[1:], role)
        pieces += segs
    text, weights, pos = "", [], 0
    for piece, role in pieces:
        if role and emphasis.get(role, 1.0) != 1.0:
            weights.append(Emphasis(pos, pos + len(piece), float(emphasis[role]), role))
        text += piece
        pos += len(piece)
    return Prompt(text=text, negative=negative, weights=tuple(weights), template_id=template_id)


def _starts_sentence(pieces: list[tuple[str, str | None]]) -> bool:
    before = "".join(p for p, _ in pieces).rstrip()
    return not before or before.endswith((".", "!", "?"))


# ----------------------------------------------------------------------------- tag prompts

_TAG = re.compile(r"[\[［【]\s*([^\]］】:：]+?)\s*[:：]\s*([^\]］】]*?)\s*[\]］】]")
TAG_KEYS = {
    "finding": ["finding", "findings", "重点", "发现", "所见", "病变", "诊断"],
    "location": ["location", "loc", "site", "位置", "部位"],
    "severity": ["severity", "grade", "严重程度", "程度", "分级", "等级"],
    "view": ["view", "projection", "体位", "视图", "投照"],
    "sex": ["sex", "gender", "性别"],
    "age": ["age", "年龄"],
    "split": ["split", "划分", "数据集"],
    "seed": ["seed", "种子"],
    "case": ["case", "case id", "id", "病例", "编号"],
}
_KEY_INDEX = {normalise(word): key for key, words in TAG_KEYS.items() for word in words}


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _prefixes(value: str, words: dict[str, str]):
    """Every (id, rest) where a known word stands at the start of ``value``, longest first."""
    for word in sorted(words, key=len, reverse=True):
        if word and value.startswith(word) and len(value) > len(word):
            rest = value[len(word):]
            if rest[0] == " " or _is_cjk(word[-1]) or _is_cjk(rest[0]):
                yield words[word], rest.strip()


def _parse_finding_value(value: str, vocab: Vocabulary) -> tuple[str, str | None, str | None]:
    """'mild right lower lobe pneumonia', '右下肺叶轻度肺炎' -> (finding, location, severity)."""

    def search(text: str, location, severity):
        finding = vocab.resolve("finding", text)
        if finding:
            return finding, location, severity
        if severity is None:
            for sev, rest in _prefixes(text, vocab.words("severity")):
                if found := search(rest, location, sev):
                    return found
        if location is None:
            for loc, rest in _prefixes(text, vocab.words("location")):
                if found := search(rest, loc, severity):
                    return found
        return None

    found = search(normalise(value), None, None)
    if found is None:
        hints = vocab.suggest("finding", value)
        raise ValueError(f"unknown finding {value!r}" + (f"; did you mean '{hints[0]}'?" if hints else ""))
    return found


def parse_tag_prompt(text: str, vocab: Vocabulary | None = None) -> "Case":
    """Parse ``[key: value]`` tags (English or Chinese keys and values) into a Case.

    ``[location: …]`` and ``[severity: …]`` apply to the finding before them and take
    precedence over words inside the finding's own value (``[finding: mild pneumonia]
    [severity: grade 2]`` is a moderate pneumonia). Patient, view, split, seed and case id
    tags are optional; what is absent is None.

    Raises:
        ValueError: naming the tag that is unknown, misplaced or not allowed for its finding.
    """
    from .sampler import Case, FindingLabel

    if not isinstance(text, str):
        raise TypeError(f"parse_tag_prompt takes the prompt's text, not {type(text).__name__}")
    vocab = vocab or get_vocabulary()
    leftover = _TAG.sub("", text).strip()
    if leftover:
        raise ValueError(f"text outside [key: value] tags: {leftover[:60]!r}")
    tags = _TAG.findall(text)
    if not tags:
        raise ValueError("no [key: value] tags found")
    findings: list[list] = []  # [finding, location, severity, explicit location?, explicit severity?]
    other: dict[str, str] = {}
    for raw_key, value in tags:
        key = _KEY_INDEX.get(normalise(raw_key))
        if key is None:
            import difflib

            close = difflib.get_close_matches(normalise(raw_key), list(_KEY_INDEX), n=1)
            raise ValueError(f"unknown tag [{raw_key}: …]" + (f"; did you mean [{close[0]}: …]?" if close else ""))
        if key == "finding":
            findings.append([*_parse_finding_value(value, vocab), False, False])
        elif key in ("location", "severity"):
            if not findings:
                raise ValueError(f"[{raw_key}: {value}] comes before any [finding: …] tag")
            if key == "location":
                loc = vocab.resolve("location", value)
                if loc is None:
                    hints = vocab.suggest("location", value)
                    raise ValueError(f"unknown location {value!r}" + (f"; did you mean '{hints[0]}'?" if hints else ""))
                if findings[-1][3]:  # a second [location] for one finding: which one is meant?
                    raise ValueError(f"[{raw_key}: {value}] is the second location tag of its finding; give one")
                findings[-1][1], findings[-1][3] = loc, True
            else:
                sev = vocab.resolve("severity", value)
                if sev is None and value.strip().isdigit():
                    sev = next((s.id for s in vocab.severities.values() if s.grade == int(value)), None)
                if sev is None:
                    raise ValueError(f"unknown severity {value!r} (mild/moderate/severe or grade 1/2/3)")
                if findings[-1][4]:
                    raise ValueError(f"[{raw_key}: {value}] is the second severity tag of its finding; give one")
                findings[-1][2], findings[-1][4] = sev, True
        else:
            if key in other:
                raise ValueError(f"[{raw_key}: …] is given twice")
            other[key] = value
    labels = []
    for finding, location, severity, *_ in findings:
        f = vocab.findings[finding]
        if location is not None:
            projected = vocab.project_location(location, finding)
            if projected is None:
                raise ValueError(f"{finding} cannot be at {location}")
            location = projected
        if severity is not None and not f.severity:
            raise ValueError(f"{finding} takes no severity")
        labels.append(FindingLabel(finding, location, severity))
    _check_together([label.finding for label in labels], vocab)
    sex = vocab.resolve("sex", other["sex"]) if "sex" in other else None
    view = vocab.resolve("view", other["view"]) if "view" in other else None
    for key, resolved in (("sex", sex), ("view", view)):
        if key in other and resolved is None:
            raise ValueError(f"unknown {key} {other[key]!r}")
    age = _int_tag(other, "age")
    if age is not None and not 0 <= age <= MAX_AGE:
        raise ValueError(f"[age: {other['age']}] is outside 0..{MAX_AGE}, the ages a spec takes")
    seed = _int_tag(other, "seed")
    case_id = other.get("case") or "tag-" + hashlib.sha256(
        repr((labels, sex, age, view, other.get("split"), seed)).encode()).hexdigest()[:12]
    m = re.fullmatch(r"case-(\d+)", case_id)
    return Case(case_id=case_id, index=int(m.group(1)) if m else -1, split=other.get("split"), seed=seed,
                findings=tuple(labels), sex=sex, age=age, view=view)


MAX_FINDINGS_PER_CASE = 8  # the schema's maxItems of findings[].finding
MAX_AGE = 120  # the schema's largest age


def _check_together(findings: list[str], vocab: Vocabulary) -> None:
    """The findings of one case as a spec's entry may hold them: each once, an exclusive one (no finding) alone,
    not a finding with its parent (nodule with lung lesion), at most MAX_FINDINGS_PER_CASE."""
    if len(findings) > MAX_FINDINGS_PER_CASE:
        raise ValueError(f"{len(findings)} [finding: …] tags; a case holds at most {MAX_FINDINGS_PER_CASE}, as a "
                         "spec's entry does")
    for n, finding in enumerate(findings):
        entry = vocab.findings[finding]
        if finding in findings[:n]:
            raise ValueError(f"[finding: {finding}] is given twice")
        if entry.exclusive and len(findings) > 1:
            raise ValueError(f"{finding} cannot occur together with other findings")
        if entry.parent and entry.parent in findings:
            raise ValueError(f"{finding} is a kind of {entry.parent}; give only one of them")


def _int_tag(tags: dict, key: str) -> int | None:
    if key not in tags:
        return None
    value = tags[key].strip().rstrip("岁").strip()
    if not value.isdigit():
        raise ValueError(f"[{key}: {tags[key]}] must be a whole number")
    return int(value)


def case_to_tags(case: "Case", lang: str = "en", vocab: Vocabulary | None = None) -> str:
    """Write a case as tags that :func:`parse_tag_prompt` reads back to the same Case.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("case-0000007", 7, "train", 42, (FindingLabel("pleural_effusion", "left", "mild"),), "M", 70, "AP")
        >>> case_to_tags(case)
        '[finding: pleural effusion][location: left][severity: mild][view: AP][sex: M][age: 70][split: train][seed: 42][case: case-0000007]'
        >>> parse_tag_prompt(case_to_tags(case, "zh")) == case
        True
    """
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    vocab = vocab or get_vocabulary()
    zh = lang == "zh"
    keys = {k: words[0] for k, words in TAG_KEYS.items()}
    if zh:
        keys = dict(finding="重点", location="位置", severity="严重程度", view="体位", sex="性别", age="年龄",
                    split="划分", seed="种子", case="病例")

    def word(section: str, term_id: str) -> str:
        if not zh:
            return term_id.replace("_", " ") if section in ("finding", "location") else term_id
        term = vocab.section(section)[term_id]
        for syn in term.synonyms:
            if any(_is_cjk(ch) for ch in syn) and vocab.resolve(section, syn) == term_id:
                return syn
        return term_id

    parts = []
    for f in case.findings:
        parts.append(f"[{keys['finding']}: {word('finding', f.finding)}]")
        if f.location:
            parts.append(f"[{keys['location']}: {word('location', f.location)}]")
        if f.severity:
            parts.append(f"[{keys['severity']}: {word('severity', f.severity)}]")
    for key, value in (("view", case.view), ("sex", case.sex), ("age", case.age), ("split", case.split),
                       ("seed", case.seed), ("case", case.case_id)):
        if value is not None:
            parts.append(f"[{keys[key]}: {value}]")
    return "".join(parts)
