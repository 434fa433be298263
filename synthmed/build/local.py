"""The local executor: the chunks still to do, made one after another in this process.

A new executor (Dask, Spark, a job queue) is a file like this one or :mod:`synthmed.build.ray`: it hands
chunk indices to :class:`~synthmed.build.chunks.ChunkMaker` objects, one per worker, and reports the images
written; :func:`synthmed.build.run.generate` plans before and merges the parts after.

Example:
    >>> callable(run_chunks)
    True
"""

from __future__ import annotations

import signal
import sys
import threading

from ..progress import progress_bar
from .chunks import ChunkMaker

def run_chunks(maker: ChunkMaker, cases, chunks, todo, progress) -> tuple[int, bool]:
    """The local executor: make the chunks in ``todo`` in this process; Ctrl-C stops after the current batch."""
    stop_requested = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if stop_requested.is_set():
                raise KeyboardInterrupt
            stop_requested.set()
            print("\nstopping after the current batch (Ctrl-C again to stop now)...", file=sys.stderr)

        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    bar = progress_bar(sum(chunks[k][1] - chunks[k][0] for k in todo), progress)
    written = 0
    try:
        for k in todo:
            start, stop = chunks[k]
            made = maker.make(k, [cases[i] for i in range(start, stop)], stop=stop_requested, on_batch=bar.update)
            written += made
            if made < stop - start:
                return written, True
            if stop_requested.is_set():
                return written, k != todo[-1]
        return written, False
    finally:
        maker.close()
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
