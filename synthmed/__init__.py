"""synthmed: labelled synthetic chest X-ray training sets from a YAML spec.

Example:
    >>> import synthmed
    >>> spec = synthmed.load_spec("dataset_specs/pneumonia.yaml")  # doctest: +SKIP
    >>> cases = synthmed.sample_cases(spec)  # doctest: +SKIP
    >>> synthmed.build_prompt(cases[0], spec.prompt).text  # doctest: +SKIP

Importing synthmed is light: numpy, torch and diffusers load only when a function needs them.
"""

from .prompts import Prompt, build_prompt, case_to_tags, parse_tag_prompt
from .sampler import Case, CaseList, FindingLabel, sample_cases
from .spec import DatasetSpec, SpecError, SpecProblem, load_spec
from .vocabulary import CHEXPERT_COLUMNS, get_vocabulary

__version__ = "0.1.0"

__all__ = [
    "CHEXPERT_COLUMNS", "Case", "CaseList", "DatasetSpec", "FindingLabel", "Prompt", "SpecError", "SpecProblem",
    "build_prompt", "case_to_tags", "get_vocabulary", "load_spec", "parse_tag_prompt", "sample_cases",
]
