"""synthmed leaves the caller's process as it found it: torch's thread count and the global random generators
(a notebook's own seeded streams), and it computes with the CPUs the process may use, not the machine's."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synthmed.build import generate  # noqa: E402
from synthmed.process_state import kept_as_found, usable_cpus  # noqa: E402

SPEC = """\
spec_version: 1
name: process-state
seed: 5
count: 4
image: {size: 128, formats: [png]}
findings:
  - {finding: no_finding, weight: 1}
  - {finding: pneumothorax, weight: 1, location: {left: 1}, severity: {moderate: 1}}
"""


def _streams() -> tuple:
    return random.random(), float(np.random.random()), torch.rand(2).tolist()


def _seeded(seed: int = 7) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_usable_cpus_are_the_processs_affinity_not_the_machines(monkeypatch):
    """Under taskset, a container's cpuset or a Slurm allocation a process may use fewer CPUs than the machine has;
    threads past them only contend."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert usable_cpus() == 1


def test_kept_as_found_restores_every_generator_and_the_thread_count():
    before_threads = torch.get_num_threads()
    _seeded()
    expected = _streams()
    _seeded()
    with kept_as_found():
        _seeded(99)
        torch.set_num_threads(1 if before_threads != 1 else 2)
        _streams()
    assert _streams() == expected and torch.get_num_threads() == before_threads


def test_qc_with_its_auditor_leaves_the_callers_torch_stream(tmp_path):
    """The auditor's network is built (random initial weights, then its own) inside qc: the caller's seeded stream
    is where it was."""
    from synthmed.qc import qc

    out = tmp_path / "out"
    generate(SPEC, out, backend="phantom", progress=False, qc=False)
    _seeded()
    expected = _streams()
    _seeded()
    result = qc(out, write=False)
    assert result.report["sections"]["auditor"]["status"] != "skipped"  # the auditor ran
    assert _streams() == expected
