"""Quality checks: per-image checks, set-level metrics, label fidelity, memorisation, report.

``qc(out)`` checks an output folder and writes ``qc_report.json`` and ``report.html`` beside it;
the module itself is callable too, so ``synthmed.qc(out)`` works once ``synthmed.qc`` is imported.
Importing the package is light (``synthmed.spec`` reads :mod:`synthmed.qc.registry`): ``qc``, ``QCResult``,
``QCError`` and ``FeatureExtractor`` load :mod:`synthmed.qc.run` on first use.

Where things are:

- :mod:`~synthmed.qc.registry`: every check, in report order (name, what it tests, module, default gate,
  threshold field, what it needs); the spec's default ``qc.gate``, the report and the run read it.
- :mod:`~synthmed.qc.run`: ``qc()`` itself: reads the folder, runs the per-image pass, then each family's
  section in the registry's order, gives the verdict, writes.
- :mod:`~synthmed.qc.inputs` (manifest, spec, cases.jsonl, other image sets, features, the auditor) and
  :mod:`~synthmed.qc.outputs` (qc_report.json, report.html, the manifest's qc columns, under the run lock).
- one module per family of checks: :mod:`~synthmed.qc.checks` (the per-image checks, decoding, pixel figures),
  :mod:`~synthmed.qc.intensity`, :mod:`~synthmed.qc.dciodvfy`, :mod:`~synthmed.qc.manifest_consistency`,
  :mod:`~synthmed.qc.spec_fidelity`, :mod:`~synthmed.qc.duplicates`, :mod:`~synthmed.qc.diversity`,
  :mod:`~synthmed.qc.reference_metrics` (fid, kid, precision, recall, coverage),
  :mod:`~synthmed.qc.label_fidelity`, :mod:`~synthmed.qc.memorisation`.
- :mod:`~synthmed.qc.check_table` (the rows of the report's check table), :mod:`~synthmed.qc.report`
  (report.html and the terminal's words), :mod:`~synthmed.qc.metrics` (FID, KID, PRDC, MS-SSIM, hashes),
  :mod:`~synthmed.qc.auditor` (the auditor model, label fidelity, the memorisation audit),
  :mod:`~synthmed.qc.feature_folder` (``--features FOLDER``: a torchvision or timm model in safetensors as the
  feature space).

To add a set-level check: copy ``synthmed/qc/diversity.py`` (the smallest family) to a module of its own,
write its ``section(inputs) -> dict`` (``inputs``: :class:`~synthmed.qc.inputs.CheckInputs`; give the section a
``status``, and a ``value`` and ``threshold`` for the check table's row, or write ``table_rows`` too), then
register it in ``synthmed/qc/registry.py``: one ``Check(...)`` in ``CHECKS`` at the place its row should take,
naming the module, what it ``needs`` and its ``qc.thresholds`` field. Add its name to the ``qc.gate`` enum of
``schemas/dataset_spec.schema.json`` and its threshold to ``QCThresholds`` (``synthmed/spec.py``) with the
schema's ``qc.thresholds``; ``tests/qc/test_registry.py`` checks they agree. A per-image check goes into
:func:`synthmed.qc.checks.check_row` (one read of each file) and a ``_image(...)`` entry of the registry.

Example:
    >>> from synthmed.qc import qc
    >>> result = qc("out/pneumonia")  # doctest: +SKIP
    >>> result.passed  # doctest: +SKIP
    True
"""

from .._callable import make_callable

__all__ = ["FeatureExtractor", "QCError", "QCResult", "qc"]


def __getattr__(name: str):
    """``qc``, ``QCResult``, ``QCError``, ``FeatureExtractor``: from :mod:`synthmed.qc.run`, imported on first use."""
    if name in __all__:
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# `synthmed.qc(...)` calls qc(); synthmed.qc.metrics and the rest stay modules (see synthmed/_callable.py)
make_callable(__name__, "synthmed.qc.run:qc")
