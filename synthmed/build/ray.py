"""The Ray executor: the chunks still to do, made by Ray workers that each load the backend once.

The chunk list becomes a Ray Data dataset, one row per chunk (index, start, stop), and
``map_batches`` runs it through a pool of actors (:class:`ChunkWorker`). Each actor gets the
spec (the validated DatasetSpec, pickled), re-samples the cases (the sampler is deterministic),
builds its backend once and then makes whole chunks with the chunk maker every executor shares
(:class:`synthmed.build.chunks.ChunkMaker`): the
same files, written atomically under ``OUT`` by the worker itself, and the chunk's manifest
part written last. When the build ends with the quality checks, the worker also runs the per-image
checks on the files it has just written (:func:`synthmed.qc.run.check_rows`), so the driver does not
read every image back alone. Only (chunk, images written, those check results) comes back, so the
object store carries little; ``OUT`` must be a folder that every worker can write (a shared file system).

A worker that dies is restarted and its chunk retried by Ray Data (its default for actor pools);
a retried chunk rewrites the same bytes. If the run fails anyway, ``--resume`` redoes only the chunks without
a verified part. The driver merges the parts exactly as the local executor does.

The idea of a callable class in ``Dataset.map_batches`` with ``concurrency`` actors (one model per
actor) follows Ray Data's batch inference guide (docs.ray.io, "Transforming data", "Stateful transforms").

Example:
    >>> import tempfile
    >>> from synthmed.build import generate
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 3\\nimage: {size: 64}\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> generate(spec, tempfile.mkdtemp() + "/out", backend="pattern", executor="ray", workers=1)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..progress import progress_bar
from .card import software_versions
from .chunks import ChunkMaker, check_same_model, check_same_settings, load_backend
from .errors import BuildError, WriteFailed, os_error_message, write_failed_message
from .run_folder import STATE_DIR, WORKERS_LOCK, part_path

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import DatasetSpec
    from .run_folder import RunFolder

INSTALL_HINT = "pip install 'synthmed[ray]'"


def require_ray():
    """Import Ray (with Ray Data), or fail with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BuildError(f"the Ray executor needs Ray with Ray Data ({e.name or 'ray'} is missing): {INSTALL_HINT}",
                         2) from None
    return ray


def _hold_workers_lock(out: Path):
    """Hold OUT/.synthmed/workers.lock shared while this worker lives (the file closes when its process ends): a
    later run waits on it, so a killed driver's workers, which write on until Ray reaps them, finish first."""
    import fcntl

    try:
        fh = open(out / STATE_DIR / WORKERS_LOCK, "a+")
    except OSError:  # unwritable: the worker's writes fail anyway, named
        return None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # a file system without flock: the run lock still guards the driver
        fh.close()
        return None
    return fh


class ChunkWorker:
    """One Ray actor: loads the spec and the backend once, then makes whole chunks.

    An expected failure (a model that cannot load, a full disk) comes back as data, the message and
    exit code of the BuildError a local run would raise, because Ray re-wraps exceptions; after one,
    the worker makes nothing more.

    Args:
        job: what every worker needs: the spec, absolute paths, the build options (see :func:`_job`).
    """

    def __init__(self, job: dict):
        self.out = Path(job["out"])
        self.error: tuple[str, int] | None = None
        self.versions = ""
        self._alive = _hold_workers_lock(self.out)
        with self._failures_as_data():
            self._load(job)

    def _load(self, job: dict) -> None:
        from ..sampler import sample_cases

        if job["synthmed_version"] != __version__:
            raise BuildError(f"a Ray worker has synthmed {__version__}, the driver {job['synthmed_version']}; "
                             "install the same version on every node", 2)
        # the DatasetSpec object itself, not its canonical JSON: that sorts the keys of weight mappings,
        # whose order the sampler uses (and it lacks command-line generator overrides)
        spec = job["spec"]
        self.cases = sample_cases(spec, limit=job["limit"])
        engine = load_backend(spec, job["backend"], job["model"], self.cases)
        check_same_model(self.out, engine.info.model_hash, job.get("made_with"), engine.info.settings.get("dtype"),
                         job.get("made_in"), engine.info.hashed)
        check_same_settings(self.out, engine.info.settings, job.get("made_how"))
        self.maker = ChunkMaker(spec, self.out, engine, job["batch_size"])
        self.spec, self.check = spec, job["qc"]
        self.versions = json.dumps(software_versions(spec, engine.info.name), sort_keys=True)

    @contextlib.contextmanager
    def _failures_as_data(self):
        try:
            yield
        except BuildError as e:
            self.error = (str(e), e.exit_code)
        except WriteFailed as e:
            self.error = (write_failed_message(self.out, e), 1)
        except OSError as e:
            self.error = (os_error_message(self.out, e), 1)

    def _check(self, k: int) -> bytes:
        """The per-image checks of chunk ``k``'s rows (its part was just written), pickled for the driver."""
        from ..qc.run import check_rows
        from ..writers.manifest import read_part

        return pickle.dumps(check_rows(self.out, self.spec, read_part(part_path(self.maker.parts, k))))

    def __call__(self, batch: dict) -> dict:
        """Make the chunks of one batch of rows (chunk, start, stop); returns (chunk, written, error, ...)."""
        import numpy as np

        written, checked = [], []
        for k, start, stop in zip(batch["chunk"], batch["start"], batch["stop"]):
            made, results = 0, b""
            if self.error is None:
                with self._failures_as_data():
                    made = self.maker.make(int(k), [self.cases[i] for i in range(int(start), int(stop))])
                    if self.check and made == int(stop) - int(start):
                        results = self._check(int(k))
            written.append(made)
            checked.append(results)
        n = len(written)
        message, exit_code = self.error or ("", 0)
        return {"chunk": np.asarray(batch["chunk"]), "written": np.asarray(written, dtype=np.int64),
                "checked": np.asarray(checked, dtype=object),
                "versions": np.asarray([self.versions] * n, dtype=object),
                "error": np.asarray([message] * n, dtype=object), "exit_code": np.full(n, exit_code, dtype=np.int64)}


def run_chunks_on_ray(spec: "DatasetSpec", folder: "RunFolder", chunks: list[tuple[int, int]], todo: list[int], *,
                      limit: int | None, backend: str | None, model: str | None, batch_size: int | None,
                      progress: bool, address: str | None, workers: int | None,
                      gpus_per_worker: float, qc: bool = False, made_with: str | None = None,
                      made_in: str | None = None, made_how: dict | None = None) -> tuple[int, dict, dict]:
    """Make the chunks in ``todo`` on Ray workers.

    Returns (images written, the workers' software versions, per-image check results by case id:
    empty unless ``qc``, the quality checks that end the build, is set).
    """
    ray = require_ray()
    gpus_per_worker = float(gpus_per_worker)  # numpy's numbers too
    # 1. Connect (or start a local Ray); a Ray the caller started is left running
    started_here = not ray.is_initialized()
    if started_here:
        _check_reachable(address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise BuildError(f"could not start or join Ray ({where}): {e}") from None
    try:
        # 2. The job every worker gets, and the pool size
        job = _job(spec, folder.out, limit=limit, backend=backend, model=model, batch_size=batch_size, qc=qc)
        job["made_with"], job["made_in"], job["made_how"] = made_with, made_in, made_how
        workers = min(workers or _default_workers(ray, gpus_per_worker), len(todo))
        # 3. One row per chunk, one block per row, two chunks in flight per actor: the next chunk is already on the
        #    actor when one ends (with one in flight, an actor idled 0.15-0.2 s per 1.9 s chunk while a busy
        #    driver scheduled the next); at the end at most one chunk waits behind another on a busy actor
        rows = [{"chunk": k, "start": chunks[k][0], "stop": chunks[k][1]} for k in todo]
        from ray.data import DataContext

        context = DataContext.get_current()
        bars, context.enable_progress_bars = context.enable_progress_bars, False  # ours counts images
        try:
            # an actor pool restarts a dead actor and retries its task (Ray Data's default for actors)
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                ChunkWorker, fn_constructor_args=(job,), batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2), num_cpus=1,
                num_gpus=gpus_per_worker or None)
            # 4. Stream the results: one row per finished chunk (its part is on disk by then)
            bar = progress_bar(sum(chunks[k][1] - chunks[k][0] for k in todo), progress)
            written, versions, checked = 0, {}, {}
            try:
                for row in dataset.iter_rows():
                    if row["error"]:
                        raise BuildError(row["error"], int(row["exit_code"]))
                    written += int(row["written"])
                    if row["checked"]:
                        checked.update(pickle.loads(row["checked"]))  # from our own workers
                    versions = versions or json.loads(row["versions"])
                    bar.update(int(row["written"]))
            except BuildError:
                raise
            except Exception as e:  # a worker's bug, or Ray itself failed
                raise _ray_failure(e) from None
            finally:
                bar.close()
        finally:
            context.enable_progress_bars = bars
        # a killed worker can leave a temp file behind (never under a final name); no worker runs now
        folder.ledger.remove_temp_files()
        return written, versions, checked
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """A cluster address (host:port, or ray://host:port) must answer before ray.init, which retries an address with
    nothing behind it for minutes, printing Ray's warnings only."""
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray reads that is not host:port: Ray says what is wrong with it
    hint = "(is a Ray cluster running there? `ray start --head` starts one; leave --address out to start a local one)"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0") in ("0", ""):  # Ray's GCS and client server speak gRPC (HTTP/2)
                conn.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
                reply = conn.recv(9)
                if len(reply) < 9 or reply[3] != 0x04:  # an HTTP/2 server answers with its SETTINGS frame
                    raise BuildError(f"{address} answers, but not as a Ray cluster (no gRPC server there: another "
                                     f"service, or the wrong port?) {hint}", 2)
    except OSError as e:
        raise BuildError(f"could not reach Ray at {address}: {e.strerror or e} {hint}", 2) from None


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0


def _job(spec: "DatasetSpec", out: Path, *, limit, backend, model, batch_size, qc=False) -> dict:
    # workers have their own working folder: every path they get is absolute
    model = model or spec.generator.model
    from ..backends import SHIPPED_MODELS

    if model and model not in SHIPPED_MODELS and Path(model).exists():
        model = os.path.abspath(model)
    return {"spec": spec, "out": os.path.abspath(out), "limit": limit, "backend": backend, "model": model,
            "batch_size": batch_size, "qc": bool(qc), "synthmed_version": __version__}


def _default_workers(ray, gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_worker:
        gpus = resources.get("GPU", 0)
        if gpus < gpus_per_worker:
            raise BuildError(f"gpus_per_worker={gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs; "
                             "set workers (--workers) if the cluster adds GPU nodes on demand", 2)
        return int(gpus // gpus_per_worker)
    return max(1, int(resources.get("CPU", 1)))


def _ray_failure(error: Exception) -> BuildError:
    text = str(error).strip()
    last = text.splitlines()[-1] if text else type(error).__name__
    return BuildError(f"the Ray run failed ({type(error).__name__}: {last}). Chunks already finished are kept; "
                      "rerun with --resume to finish")
