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


def test_finetune_in_a_process_that_never_imported_torch_leaves_its_defaults(tmp_path):
    """Before the caller imports torch itself: its thread count is torch's default and its stream unseeded after
    finetune (it once stayed seeded with finetune's seed, every process drawing the same numbers)."""
    import subprocess
    import sys

    generate(SPEC, tmp_path / "set", backend="phantom", progress=False, qc=False)
    code = (f"import sys, synthmed\nassert 'torch' not in sys.modules\n"
            f"synthmed.finetune({str(tmp_path / 'set')!r}, 'scratch', {str(tmp_path / 'model')!r}, steps=1, "
            "vae_steps=1, batch_size=2, vae_batch_size=2, vae_crop=32, threads=1, progress=False, seed=0, "
            "validation_prompts=[])\n"
            "import torch\nprint(torch.get_num_threads(), torch.rand(2).tolist())\n")
    control = "import torch\nprint(torch.get_num_threads())\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    threads, drawn = done.stdout.strip().splitlines()[-1].split(" ", 1)
    default = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, timeout=120)
    assert int(threads) == int(default.stdout.strip())
    torch.manual_seed(0)
    assert drawn != str(torch.rand(2).tolist())  # not finetune's seed-0 stream
