"""Quality checks: per-image checks, set-level metrics, label fidelity, memorisation, report.

``qc(out)`` checks an output folder and writes ``qc_report.json`` and ``report.html`` beside it;
the module itself is callable too, so ``synthmed.qc(out)`` works once ``synthmed.qc`` is imported.

Example:
    >>> from synthmed.qc import qc
    >>> result = qc("out/pneumonia")  # doctest: +SKIP
    >>> result.passed  # doctest: +SKIP
    True
"""

import sys
import types

from .run import FeatureExtractor, QCError, QCResult, qc

__all__ = ["FeatureExtractor", "QCError", "QCResult", "qc"]


class _CallableModule(types.ModuleType):
    """``synthmed.qc(...)`` calls :func:`qc`; ``synthmed.qc.metrics`` and the rest stay modules."""

    def __call__(self, *args, **kwargs):
        return qc(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
