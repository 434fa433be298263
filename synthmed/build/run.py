"""generate(): check the arguments, plan the chunks, run an executor, merge the parts, write the card, run the
cheap quality checks.

Example (a whole build: see :mod:`synthmed.build`):
    >>> EXECUTORS
    ('local', 'ray')
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..spec import DatasetSpec, load_spec
from .card import write_card
from .chunks import (CHUNK_SIZE, ChunkMaker, case_paths, check_same_model, check_same_settings, load_backend,
                     part_is_done)
from .errors import BuildArgumentError, BuildError, WriteFailed, os_error_message, write_failed_message
from .local import run_chunks
from .run_folder import RUN_FORMAT, STATE_DIR, RunFolder, file_sha256, part_path, row_files

if TYPE_CHECKING:  # pragma: no cover
    from ..backends import Backend

@dataclass(frozen=True)
class BuildResult:
    """What a call to :func:`generate` did."""

    out: Path           # the output folder, absolute
    total: int          # cases in the planned range
    written: int        # images written by this call
    reused: int         # images kept from an earlier run (verified by sha256)
    interrupted: bool
    seconds: float
    qc: Any = field(default=None, repr=False)  # the QCResult of the checks run at the end (None when qc is off)
    notes: tuple[str, ...] = ()  # what the user should know: files --overwrite left alone, a damaged run record

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    @property
    def qc_passed(self) -> bool:
        """False when a gating quality check failed; True when none did or none ran."""
        return self.qc is None or self.qc.passed


EXECUTORS = ("local", "ray")


def generate(spec: DatasetSpec | str | Path, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             limit: int | None = None, backend: "str | Backend | None" = None, model: str | None = None,
             batch_size: int | None = None, progress: bool = True, executor: str = "local",
             ray_address: str | None = None, workers: int | None = None, gpus_per_worker: float = 0,
             qc: bool | None = None) -> BuildResult:
    """Build the dataset a spec describes into ``out``.

    Args:
        spec: a DatasetSpec, or a path to a spec file.
        out: output folder; new, empty, or one this function wrote before (with ``resume``/``overwrite``).
        resume: finish an interrupted run; files already written are verified by sha256 and kept.
        overwrite: delete what an earlier run wrote in ``out`` and start again.
        limit: build only the first ``limit`` cases (the same ones a full run starts with).
        backend: a backend name (diffusion, phantom, pattern) or a Backend object; default: the spec's.
        model: a model override for the diffusion backend.
        batch_size: images per backend call; never changes any image. Default: the spec's.
        progress: show a progress bar with images/s and ETA.
        executor: ``"local"`` (this process) or ``"ray"`` (the chunks spread over Ray workers, each with its
            own backend; ``out`` must then be a folder every worker can write). Both write the same bytes.
        ray_address: the Ray cluster to join (``executor="ray"``); default: ``RAY_ADDRESS``, else a local Ray.
        workers: Ray workers, one backend each; default: the cluster's CPUs (or GPUs / ``gpus_per_worker``).
        gpus_per_worker: GPUs each Ray worker reserves (fractions share a GPU); 0 for CPU backends.
        qc: run the cheap quality checks at the end (qc_report.json, report.html, the manifest's qc columns);
            default: the spec's ``qc.enabled``. ``result.qc_passed`` says whether every gating check passed.

    Raises:
        BuildError: an expected failure (folder in use, disk full, changed spec, ...), with an exit code.

    Example:
        >>> generate("dataset_specs/pneumonia.yaml", "out/pneumonia", backend="pattern", limit=16)  # doctest: +SKIP
    """
    started = time.perf_counter()
    # 1. Check inputs
    _check_arguments(spec=spec, out=out, resume=resume, overwrite=overwrite, limit=limit, backend=backend,
                     model=model, batch_size=batch_size, progress=progress, qc=qc)
    limit, batch_size = (None if v is None else int(v) for v in (limit, batch_size))  # numpy's integers too
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    if resume and overwrite:
        raise BuildError("--resume and --overwrite exclude each other", 2)
    _check_executor(executor, backend, ray_address, workers, gpus_per_worker)
    out = Path(out)
    backend_name = backend if isinstance(backend, str) or backend is None else backend.info.name
    import dataclasses

    from ..sampler import SAMPLER_VERSION

    from ..backends import resolve_generator

    model = None if model is None else os.fspath(model)  # a Path from a notebook is fine
    used = backend_name or spec.generator.backend
    if model is not None and used != "diffusion":  # as the command line refuses --model: not kept in the records
        raise BuildError(f"model applies to the diffusion backend only; this run uses the {used} backend, which "
                         "draws without a model", 2)
    # the sampling settings the spec leaves out, as the model folder recommends them (a distilled student's)
    resolved = resolve_generator(spec, backend=backend_name, model=model)
    generator = {k: v for k, v in dataclasses.asdict(resolved).items() if k != "batch_size"}
    if generator["decoder"] != "tiny":  # recorded only when not the VAE: earlier runs' records stay as they were
        del generator["decoder"]
    if generator["timestep_spacing"] is None:  # likewise when it is the model folder's own (or no diffusion)
        del generator["timestep_spacing"]
    if generator["late_guidance"] is None:  # likewise when guidance stays the same to the last step
        del generator["late_guidance"]
    generator["anatomy"] = [a.id for a in spec.generator.anatomy]  # their files' sha256 are in the model hash
    generator.update(backend=backend_name or spec.generator.backend, model=model or spec.generator.model)
    run = {"format": RUN_FORMAT, "name": spec.name, "spec_hash": spec.spec_hash,
           "backend": generator["backend"], "model": generator["model"], "generator": generator,
           "synthmed_version": __version__, "sampler": SAMPLER_VERSION}
    from ..sampler import sample_cases

    cases = sample_cases(spec, limit=limit)
    folder = RunFolder(out)
    # the folders this run writes into: a split it has cases in, under each top it writes (no masks from diffusion)
    tops = [top for top, fmt in (("images", "png"), ("dicom", "dicom"), ("masks", None))
            if ((fmt in spec.image.formats) if fmt else generator["backend"] != "diffusion")]
    counts = cases.counts()
    splits = [s for s in spec.splits.keys if any(row[s] for row in counts)]
    try:
        folder.prepare(run, resume=resume, overwrite=overwrite, planned=_planned_paths(spec, cases),
                       folders=[f"{top}/{split}" for top in tops for split in splits])
    except OSError as e:  # a full disk while the run record or a claim is written
        raise BuildError(os_error_message(out, e)) from None
    try:
        # 2. Plan: the chunks still to do
        chunks, todo = _plan(spec, folder, cases, limit=limit, resume=resume)
        todo_set = set(todo)
        reused = sum(stop - start for k, (start, stop) in enumerate(chunks) if k not in todo_set)
        folder.claim("run", ["cases.jsonl"])
        _write_cases_jsonl(out, cases)
        folder.ledger.record_files("run", ["cases.jsonl"])
        made_with, made_in, made_how = _model_of_parts(folder, [k for k in range(len(chunks)) if k not in todo_set])
        # 3. Backend and chunks (the backend only now: loading a model is the slow part)
        written, interrupted, versions, checked = 0, False, None, {}
        run_qc = spec.qc.enabled if qc is None else qc
        if todo and executor == "ray":
            from .ray import run_chunks_on_ray

            written, versions, checked = run_chunks_on_ray(
                spec, folder, chunks, todo, limit=limit, backend=backend, model=model, batch_size=batch_size,
                progress=progress, address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                qc=run_qc, made_with=made_with, made_in=made_in, made_how=made_how)
        elif todo:
            engine = load_backend(spec, backend, model, cases)
            check_same_model(out, engine.info.model_hash, made_with, engine.info.settings.get("dtype"), made_in,
                             engine.info.hashed)
            check_same_settings(out, engine.info.settings, made_how)
            maker = ChunkMaker(spec, out, engine, batch_size)
            written, interrupted = run_chunks(maker, cases, chunks, todo, progress)
        # 4. Manifest, card
        qc_result = None
        if not interrupted:
            _finish(spec, folder, cases, chunks, run, versions)
            # 5. Quality checks: the cheap ones (the lock is ours already)
            if run_qc:
                qc_result = _run_qc(folder, progress, checked)
        # absolute: the result still names this folder after the caller changes its working folder (a notebook)
        return BuildResult(out=Path(os.path.abspath(out)), total=len(cases), written=written, reused=reused,
                           interrupted=interrupted, seconds=time.perf_counter() - started, qc=qc_result,
                           notes=tuple(folder.notes))
    except WriteFailed as e:
        raise BuildError(write_failed_message(out, e)) from None
    except OSError as e:
        raise BuildError(os_error_message(out, e)) from None
    except Exception:
        if not folder.has_output():  # nothing made (a model that cannot load): leave nothing that blocks a rerun
            folder.forget()
        raise
    finally:
        folder.release()


def _check_arguments(*, spec, out, resume, overwrite, limit, backend, model, batch_size, progress, qc) -> None:
    """Refuse wrong argument types and values at the door, naming the argument (the Python API's users)."""
    from ..backends import BACKENDS

    def name_of(value) -> str:
        return f"{type(value).__name__} {value!r}"[:120]

    if not isinstance(spec, (DatasetSpec, str, os.PathLike, bytes, Mapping)):  # what load_spec takes
        raise TypeError(f"spec must be a DatasetSpec, the path of a spec file, YAML text or a mapping, got "
                        f"{name_of(spec)}")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out):
        raise TypeError(f"out must be the path of the output folder, got {name_of(out)}")
    for flag, value in (("resume", resume), ("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {name_of(value)}")
    if qc is not None and not isinstance(qc, bool):
        raise TypeError(f"qc must be True, False or None (the spec's qc.enabled), got {name_of(qc)}")
    for arg, value in (("limit", limit), ("batch_size", batch_size)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{arg} must be a whole number, got {name_of(value)}")
        if value < 1:
            raise BuildArgumentError(f"{arg} must be at least 1, got {value}")
    if backend is not None and not isinstance(backend, str) and not (hasattr(backend, "generate")
                                                                    and hasattr(backend, "info")):
        raise TypeError(f"backend must be a backend name ({', '.join(BACKENDS)}) or a Backend object, "
                        f"got {name_of(backend)}")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be 'default' or the path of a model folder, got {name_of(model)}")


def _model_of_parts(folder: "RunFolder", kept: list[int]) -> tuple[str | None, str | None, dict | None]:
    """The model hash the kept chunks were made with, the dtype they ran in (the dtype only for a diffusion model)
    and the backend's settings (the manifest's ``generation``): their first row says all three; None if none is
    kept."""
    import json

    from ..writers.manifest import read_part

    for k in kept:
        rows = read_part(part_path(folder.parts, k))
        if rows:
            try:
                generation = json.loads(rows[0].get("generation") or "{}")
            except ValueError:
                generation = {}
            generation = generation if isinstance(generation, dict) else {}
            dtype = generation.get("dtype")
            return rows[0]["model_hash"], dtype if isinstance(dtype, str) else None, generation or None
    return None, None, None


def _run_qc(folder: RunFolder, progress: bool, checked: dict):
    from ..qc.run import QCError, qc

    try:  # qc claims what it writes in the folder's ledger itself
        return qc(folder.out, full=False, lock=False, progress=progress, precomputed=checked)
    except QCError as e:
        raise BuildError(f"the quality checks could not run: {e}", e.exit_code) from None


def _check_executor(executor, backend, ray_address, workers, gpus_per_worker) -> None:
    if executor not in EXECUTORS:
        raise BuildError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}", 2)
    if executor == "local":
        given = [f"{name}={value!r}" for name, value in
                 (("ray_address", ray_address), ("workers", workers), ("gpus_per_worker", gpus_per_worker or None))
                 if value is not None]
        if given:
            raise BuildError(f"{', '.join(given)} only apply to the Ray executor (executor='ray', --executor ray)", 2)
        return
    if backend is not None and not isinstance(backend, str):
        raise BuildError(f"executor='ray' needs a backend name (each worker builds its own), got a "
                         f"{type(backend).__name__} object", 2)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral)
                                or workers < 1):
        raise BuildError(f"workers must be a whole number of at least 1, got {workers!r}", 2)
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, numbers.Real) or gpus_per_worker < 0:
        raise BuildError(f"gpus_per_worker must be 0 or more, got {gpus_per_worker!r}", 2)
    from .ray import require_ray

    require_ray()


def _planned_paths(spec: DatasetSpec, cases):
    """A test of whether this run writes a path (relative to OUT), without listing every path of a large plan."""
    import re

    ours = {"manifest.csv", "cases.jsonl", "dataset_card.json", "README.md", "qc_report.json", "report.html"}
    ours |= {f"images/{split}/metadata.csv" for split in spec.splits.keys}
    case_file = re.compile(r"(images|dicom|masks)/[^/]+/(case-(\d+))[^/]*$")

    def planned(rel: str) -> bool:
        match = case_file.match(rel)
        if not match:
            return rel in ours
        index = int(match.group(3))
        return index < len(cases) and cases[index].case_id == match.group(2) and \
            rel in case_paths(spec, cases[index])

    return planned


def _plan(spec: DatasetSpec, folder: RunFolder, cases, *, limit: int | None, resume: bool):
    """The chunks of ``cases`` as (start, stop), and the indices of the chunks still to do."""
    from ..vocabulary import get_vocabulary

    total = len(cases)
    chunks = [(start, min(start + CHUNK_SIZE, total)) for start in range(0, total, CHUNK_SIZE)]
    if resume:
        _refuse_shrinking(spec, folder, cases, chunks, limit)
    vocab = get_vocabulary()
    todo = []
    for k, (start, stop) in enumerate(chunks):
        part = part_path(folder.parts, k)
        if not (resume and part.exists() and part_is_done(folder.out, part, [cases[i] for i in range(start, stop)],
                                                           spec, vocab)):
            todo.append(k)
        elif not folder.ledger.read(f"chunk-{k:06d}")["files"]:  # a kept chunk whose claim was lost: its part says
            _record_part(folder, k, part)
    return chunks, todo


def _record_part(folder: RunFolder, k: int, part: Path) -> None:
    """Record a verified part's files (each checked by sha256) as the chunk's claim."""
    from ..writers.manifest import read_part

    digests = {rel: sha for row in read_part(part) for rel, sha in row_files(row)}
    digests[f"{STATE_DIR}/parts/{part.name}"] = file_sha256(part)
    folder.ledger.record(f"chunk-{k:06d}", digests)


def _refuse_shrinking(spec: DatasetSpec, folder: RunFolder, cases, chunks, limit: int | None) -> None:
    """A resume with a smaller --limit would leave images on disk that the manifest does not list."""
    planned = {cases[i].case_id for start, stop in chunks[-1:] for i in range(start, stop)}
    beyond: set[str] = set()
    for key in folder.ledger.keys():
        if not key.startswith("chunk-") or not key[6:].isdigit() or int(key[6:]) < len(chunks) - 1:
            continue
        for rel in folder.ledger.read(key)["files"]:
            if rel.split("/")[0] in ("images", "dicom", "masks") and (folder.out / rel).exists():
                case_id = _case_id_of(rel)
                if case_id not in planned:
                    beyond.add(case_id)
    if beyond:
        raise BuildError(f"{folder.out} holds the images of {len(beyond)} case(s) beyond the {len(cases)} now planned"
                         f"{f' (--limit {limit})' if limit else ''}, made by an earlier run; a resume would leave them "
                         "outside the manifest. Rerun with a larger --limit (or none) to finish them, or with "
                         "--overwrite to build only these cases", 2)


def _case_id_of(rel: str) -> str:
    """The case a file of ours belongs to: ``dicom/train/case-0000001_sr.dcm`` -> ``case-0000001``."""
    name = Path(rel).stem
    for infix in ("_mask_", "_sr", "_seg"):
        name = name.split(infix)[0]
    return name


def _finish(spec: DatasetSpec, folder: RunFolder, cases, chunks, run: dict, versions: dict | None) -> None:
    """Merge the parts into manifest.csv, then the split metadata and the card (the same for every executor)."""
    from ..writers.manifest import merge_parts, write_split_metadata

    out = folder.out
    ours = ["manifest.csv", "dataset_card.json", "README.md"]
    if "png" in spec.image.formats:
        ours += [f"images/{split}/metadata.csv" for split in spec.splits.keys]
    stale = [rel for key in ("run", "qc") for rel in folder.ledger.read(key)["files"]
             if rel.startswith("images/") and rel.endswith("/metadata.csv") and rel not in ours]
    for key in ("run", "qc"):  # a split the spec no longer has: its metadata would list images that are gone
        folder.ledger.remove(key, stale)
    folder.claim("run", ours)
    merge_parts([(part_path(folder.parts, k), stop - start) for k, (start, stop) in enumerate(chunks)],
                out / "manifest.csv")
    write_split_metadata(out / "manifest.csv", out)
    write_card(spec, out, cases, run, versions)
    folder.ledger.record_files("run", ours)


def _write_cases_jsonl(out: Path, cases) -> None:
    from ..atomic import atomic_write_text_lines

    atomic_write_text_lines(out / "cases.jsonl", cases.iter_jsonl())
