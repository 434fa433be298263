"""What synthmed leaves as it found it in the caller's process: torch's thread count and the global random generators.

A notebook that seeded its own torch stream, or set one thread for its own training loop, keeps both across
``generate``, ``qc``, ``finetune`` and ``distill``. ``generate`` and ``qc`` draw nothing from the global generators
(the sampler's and each case's own; the auditor is built without initial weights) and set torch's threads only
while the backend computes (:func:`torch_threads`; torch's count is per thread). ``finetune`` and ``distill`` train
with torch's global generator, seeded, as accelerate's resume restores it, so they run inside :func:`kept_as_found`:
what another thread draws from the global generators meanwhile is drawn again after they return (run training in
one thread at a time).

Example:
    >>> import random
    >>> random.seed(1); before = random.random(); random.seed(1)
    >>> with kept_as_found():
    ...     random.seed(99)
    >>> random.random() == before
    True
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from typing import Iterator


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a container's cpuset, a Slurm allocation), not the
    machine's count, which oversubscribes a process given a few cores of a large node. A CPU quota (a Kubernetes
    limit) is not an affinity and is not seen: set ``generator.threads`` there.

    Example:
        >>> usable_cpus() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch computes with ``threads`` (None: as it is) inside the block; the caller's count is back after it.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def kept_as_found() -> Iterator[None]:
    """Python's, numpy's and torch's global random states and torch's thread count are as they were after the block
    (accelerate's ``load_state`` sets all three generators, and model construction draws from torch's); numpy and
    torch only where the caller had imported them (a library not yet imported has no state of the caller's)."""
    python = random.getstate()
    np = sys.modules.get("numpy")
    numpy_state = np.random.get_state() if np is not None else None
    torch = sys.modules.get("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    cuda = torch is not None and torch.cuda.is_initialized()  # never starts CUDA where the caller has not
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        random.setstate(python)
        if numpy_state is not None:
            np.random.set_state(numpy_state)
        if torch is not None:
            torch.random.set_rng_state(torch_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def keeps_caller_state(function):
    """A decorator: ``function`` runs inside :func:`kept_as_found` (synthmed's entry points).

    Example:
        >>> @keeps_caller_state
        ... def draw():
        ...     return random.random()
        >>> random.seed(3); first = random.random(); random.seed(3)
        >>> _ = draw(); random.random() == first
        True
    """
    import functools

    @functools.wraps(function)
    def kept(*args, **kwargs):
        for library in ("numpy", "torch"):  # imported first, so that their state before the call is there to keep
            try:
                __import__(library)
            except ImportError:
                pass
        with kept_as_found():
            return function(*args, **kwargs)

    return kept
