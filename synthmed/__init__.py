"""synthmed: labelled synthetic chest X-ray training sets from a YAML spec.

Example:
    >>> import synthmed
    >>> spec = synthmed.load_spec("dataset_specs/pneumonia.yaml")  # doctest: +SKIP
    >>> cases = synthmed.sample_cases(spec)  # doctest: +SKIP
    >>> synthmed.build_prompt(cases[0], spec.prompt).text  # doctest: +SKIP
    >>> result = synthmed.generate(spec, "out/pneumonia", backend="phantom", limit=64)  # doctest: +SKIP
    >>> report = synthmed.qc(result.out)  # doctest: +SKIP
    >>> train = synthmed.ManifestDataset(result.out, split="train")  # doctest: +SKIP

Importing synthmed is light: numpy, torch and diffusers load only when a function needs them.
``generate``, ``qc``, ``finetune``, ``distill``, ``ManifestDataset`` and ``manifest_records`` are imported on
first use. ``synthmed.qc``, ``synthmed.finetune`` and ``synthmed.distill`` are modules that can be called
(``synthmed.qc(out)`` runs ``synthmed.qc.qc(out)``; see ``synthmed/_callable.py``).
"""

from typing import TYPE_CHECKING

from .prompts import Prompt, build_prompt, case_to_tags, parse_tag_prompt
from .sampler import Case, CaseList, FindingLabel, sample_cases
from .spec import DatasetSpec, SpecError, SpecProblem, load_spec
from .vocabulary import CHEXPERT_COLUMNS, get_vocabulary

__version__ = "0.1.0"

# name -> (module, attribute); attribute None: the module itself, made callable with the function given
_LAZY = {
    "generate": ("synthmed.build", "generate"),
    "BuildResult": ("synthmed.build", "BuildResult"),
    "BuildError": ("synthmed.build", "BuildError"),
    "qc": ("synthmed.qc", None),
    "finetune": ("synthmed.finetune", None),
    "distill": ("synthmed.distill", None),
    "QCResult": ("synthmed.qc.run", "QCResult"),
    "FinetuneResult": ("synthmed.finetune", "FinetuneResult"),
    "DistillResult": ("synthmed.distill", "DistillResult"),
    "ManifestDataset": ("synthmed.data", "ManifestDataset"),
    "manifest_records": ("synthmed.data", "manifest_records"),
}
_CALLABLE_MODULES = {"synthmed.qc": "synthmed.qc.run:qc", "synthmed.finetune": "synthmed.finetune:finetune",
                     "synthmed.distill": "synthmed.distill:distill"}

__all__ = [
    "CHEXPERT_COLUMNS", "BuildError", "BuildResult", "Case", "CaseList", "DatasetSpec", "DistillResult",
    "FindingLabel", "FinetuneResult", "ManifestDataset", "Prompt", "QCResult", "SpecError", "SpecProblem",
    "build_prompt", "case_to_tags", "distill", "finetune", "generate", "get_vocabulary", "load_spec",
    "manifest_records", "parse_tag_prompt", "qc", "sample_cases",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'synthmed' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    if attribute is None:
        value = module
        if not callable(module):  # the module makes itself callable when it ends; this covers one that does not
            from ._callable import make_callable

            value = make_callable(module_name, _CALLABLE_MODULES[module_name])
    else:
        value = getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from . import distill, finetune, qc
    from .build import BuildError, BuildResult, generate
    from .data import ManifestDataset, manifest_records
    from .distill import DistillResult
    from .finetune import FinetuneResult
    from .qc.run import QCResult
