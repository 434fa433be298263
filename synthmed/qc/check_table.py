"""The rows of the report's check table: what a check tests, whether it gates, its status, figures and limit.

Each family's module builds its checks' rows from these (:mod:`synthmed.qc.registry`); :func:`synthmed.qc.run.qc`
puts them in the registry's order and gives the verdict from their ``gating`` and ``status``.

Example:
    >>> from synthmed.qc.registry import get
    >>> row = set_row(get("diversity"), {"status": "skipped", "reason": "a fast run"}, None, None, "skipped",
    ...               gate={"readable"})
    >>> row["gating"], row["status"], row["reason"]
    (False, 'skipped', 'a fast run')
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

from .registry import Check


def verdict(value, threshold, higher_is_better: bool) -> str:
    """``skipped`` without a value, ``info`` without a limit, else ``pass`` or ``fail``."""
    if value is None:
        return "skipped"
    if threshold is None:
        return "info"
    return "pass" if (value >= threshold if higher_is_better else value <= threshold) else "fail"


def flag_row(check: Check, results: Sequence, gate: Collection[str]) -> dict:
    """The row of a check that flags images: how many of the checked images it flagged.

    Args:
        results: every image's :class:`synthmed.qc.checks.ImageResult`.
    """
    failed = sum(check.name in r.flags for r in results)
    return {"description": check.description, "gating": check.name in gate, "failed": failed,
            "checked": len(results), "status": "fail" if failed else "pass"}


def set_row(check: Check, section: Mapping, value: Any, threshold: Any, status: str,
            gate: Collection[str]) -> dict:
    """The row of a set-level check: its figure, its limit and its status; a skipped one says why."""
    entry = {"description": check.description, "gating": check.name in gate, "status": status, "value": value,
             "threshold": threshold}
    if status == "skipped":
        entry["reason"] = section.get("reason")
    return entry


def section_rows(checks: Sequence[Check], section: Mapping, gate: Collection[str]) -> dict[str, dict]:
    """The rows of checks whose section holds their ``status``, ``value`` and ``threshold`` (the usual case)."""
    return {c.name: set_row(c, section, section.get("value"), section.get("threshold"), section["status"], gate)
            for c in checks}
