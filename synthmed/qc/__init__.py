"""Quality checks: per-image checks, set-level metrics, label fidelity, memorisation, report.

``qc(out)`` checks an output folder and writes ``qc_report.json`` and ``report.html`` beside it;
the module itself is callable too, so ``synthmed.qc(out)`` works once ``synthmed.qc`` is imported.

Example:
    >>> from synthmed.qc import qc
    >>> result = qc("out/pneumonia")  # doctest: +SKIP
    >>> result.passed  # doctest: +SKIP
    True
"""

from .._callable import make_callable
from .run import FeatureExtractor, QCError, QCResult, qc

__all__ = ["FeatureExtractor", "QCError", "QCResult", "qc"]

# `synthmed.qc(...)` calls qc(); synthmed.qc.metrics and the rest stay modules (see synthmed/_callable.py)
make_callable(__name__, "synthmed.qc.run:qc")
