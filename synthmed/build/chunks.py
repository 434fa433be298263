"""The chunk pipeline both executors share: cases -> prompts -> backend -> reject and regenerate -> writers ->
the chunk's manifest part, written last and atomically.

A chunk is ``CHUNK_SIZE`` consecutive cases (whatever the batch size), the unit of resume and of
scale-out: an executor (local, Ray, or a new one) loads a backend with :func:`load_backend`, makes a
:class:`ChunkMaker` and calls ``make(k, cases)`` for each chunk it is given. Making a chunk writes
only under the output folder, claims its files in the ledger before writing them, and gives the same
bytes on any executor, in any order.

Example:
    >>> derive_retry_seed(7, 1) != derive_retry_seed(7, 2)
    True
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..spec import DatasetSpec
from .errors import BuildError, WriteFailed
from .run_folder import STATE_DIR, RunFolder, file_sha256, inside_folder, part_path, row_files

if TYPE_CHECKING:  # pragma: no cover
    from ..backends import Backend, GeneratedImage
    from ..sampler import Case

CHUNK_SIZE = 64


def derive_retry_seed(seed: int | None, try_number: int, case_id: str = "") -> int:
    """The seed of a case's ``try_number``-th regeneration: 63 bits of sha256 over (seed, try number).

    A pure function of the case, so a rerun, a resume or another executor regenerates the same image.

    Example:
        >>> derive_retry_seed(12345, 1) == derive_retry_seed(12345, 1) != derive_retry_seed(12345, 2)
        True
    """
    key = f"synthmed-qc-retry\x00{case_id if seed is None else int(seed)}\x00{int(try_number)}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2 ** 63 - 1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _bbox(mask) -> list[int] | None:
    import numpy as np

    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


class CaseWriter:
    """Turns (case, prompt, image) into files and one manifest row. Pure apart from the writes."""

    def __init__(self, spec: DatasetSpec, out: Path, backend_info, generation: dict):
        from ..vocabulary import CHEXPERT_COLUMNS, get_vocabulary

        self.spec, self.out, self.info = spec, out, backend_info
        self.vocab = get_vocabulary()
        self.chexpert = CHEXPERT_COLUMNS
        self.generation = json.dumps(generation, sort_keys=True, separators=(",", ":"))
        self.made_dirs: set[Path] = set()
        self.claimed: set[str] = set()
        self.claim = None  # set by the chunk maker: claims a path no case predicted, before it is written
        self.note = None  # set by the chunk maker: notes a written file's sha256 in its claim's journal

    def _put(self, rel: str, data: bytes) -> str:
        from ..atomic import atomic_write_bytes

        if self.claim is not None and rel not in self.claimed:
            self.claim(rel)
            self.claimed.add(rel)
        path = self.out / rel
        if path.parent not in self.made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.made_dirs.add(path.parent)
        sha = _sha256(data)
        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise WriteFailed(rel, e) from e
        if self.note is not None:  # an error here is the journal's, named by its own path
            self.note(rel, sha)
        return sha

    def write(self, case: "Case", prompt, image: "GeneratedImage") -> dict:
        from ..writers.dicom import patient_orientation
        from ..writers.png import png_bytes, png_values, to_stored

        spec = self.spec
        h, w = image.pixels.shape
        if (w, h) != (spec.image.width, spec.image.height):
            raise BuildError(f"the backend made a {w}x{h} image for {case.case_id}, but the spec asks for "
                             f"{spec.image.width}x{spec.image.height}")
        stored = to_stored(image.pixels, spec.image.bit_depth)
        # masks in the order of the case's findings (a backend may draw devices last), so that mask_paths, the
        # SEG's segments and the findings column pair up by position; masks of no listed finding go last
        order = {label.finding: n for n, label in reversed(list(enumerate(case.findings)))}
        image_masks = dict(sorted(image.masks.items(), key=lambda item: order.get(item[0], len(order))))
        row: dict[str, Any] = {c: "" for c in _manifest_columns()}
        stem = f"{case.split}/{case.case_id}"
        if "png" in spec.image.formats:
            rel = f"images/{stem}.png"
            text = {"case_id": case.case_id, "spec_hash": spec.spec_hash, "synthetic": "yes",
                    "Description": f"SYNTHETIC image made by synthmed {__version__}; not a real patient",
                    "prompt": prompt.text}
            png = png_bytes(png_values(stored, spec.image.png_bit_depth), text)
            row["png_path"], row["png_sha256"] = rel, self._put(rel, png)
            row["png_bit_depth"] = spec.image.png_bit_depth
        if "dicom" in spec.image.formats:
            from ..writers.dicom import dicom_dataset, part10_bytes
            from ..writers.seg import seg_bytes
            from ..writers.sr import sr_bytes

            provenance = dict(spec_hash=spec.spec_hash, backend=self.info.name, model_id=self.info.model_id,
                              model_hash=self.info.model_hash, synthmed_version=__version__)
            dataset = dicom_dataset(stored, case, iod=spec.image.dicom_iod,
                                    bits_stored=12 if spec.image.bit_depth == 16 else 8, dataset_name=spec.name,
                                    prompt=prompt.text, geometry=getattr(image, "geometry", None), **provenance)
            rel = f"dicom/{stem}.dcm"
            row["dicom_path"], row["dicom_sha256"] = rel, self._put(rel, part10_bytes(dataset))
            # the labels and masks where imaging pipelines look for them, referencing the image
            rel = f"dicom/{stem}_sr.dcm"
            row["sr_path"], row["sr_sha256"] = rel, self._put(rel, sr_bytes(dataset, case, **provenance))
            if image_masks:
                rel = f"dicom/{stem}_seg.dcm"
                masks = {finding: mask.astype(bool) for finding, mask in image_masks.items()}
                row["seg_path"], row["seg_sha256"] = rel, self._put(rel, seg_bytes(dataset, case, masks, **provenance))
        mask_paths, mask_hashes, boxes = [], [], {}
        for finding, mask in image_masks.items():
            rel = f"masks/{stem}_mask_{finding}.png"
            mask_paths.append(rel)
            # 0/1, not 0/255: label-map readers (TorchIO LabelMap, MONAI, ITK) get the label values themselves
            label = (mask != 0).astype("uint8")
            mask_hashes.append(self._put(rel, png_bytes(label, {"case_id": case.case_id, "finding": finding,
                                                                "values": "0 outside, 1 inside", "synthetic": "yes"})))
            box = _bbox(mask)
            if box:
                boxes[finding] = box
        labels = case.chexpert_labels(self.vocab)
        row.update({
            "file_name": row["png_path"] or row["dicom_path"], "case_id": case.case_id, "index": case.index,
            "split": case.split, "seed": case.seed,
            "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
            "finding_codes": "|".join(str(self.vocab.findings[f.finding].code) for f in case.findings),
            "location": "|".join(f.location or "" for f in case.findings),
            "severity": "|".join(f.severity or "" for f in case.findings),
            **labels, "sex": case.sex, "age": case.age, "view": case.view,
            "patient_orientation": "\\".join(patient_orientation(case.view, getattr(image, "geometry", None))),
            "width": w, "height": h, "bit_depth": spec.image.bit_depth,
            "prompt": prompt.text, "negative_prompt": prompt.negative, "prompt_template": prompt.template_id,
            "mask_paths": "|".join(mask_paths), "mask_sha256": "|".join(mask_hashes),
            "bboxes": json.dumps(boxes, sort_keys=True, separators=(",", ":")) if boxes else "",
            "cardiothoracic_ratio": (f"{image.measurements['cardiothoracic_ratio']:.4f}"
                                     if "cardiothoracic_ratio" in image.measurements else ""),
            "anatomy_id": getattr(image, "anatomy_id", None) or "",
            "backend": self.info.name, "model_id": self.info.model_id, "model_hash": self.info.model_hash,
            "generation": self.generation, "spec_hash": spec.spec_hash, "synthmed_version": __version__,
        })
        return {k: ("" if v is None else str(v)) for k, v in row.items()}


def _manifest_columns():
    from ..writers.manifest import MANIFEST_COLUMNS

    return MANIFEST_COLUMNS


def part_is_done(out: Path, part: Path, cases: list, spec: DatasetSpec, vocab) -> bool:
    """True when the part lists these cases first, says of each what the plan says, and every file it names
    has its recorded sha256. A part from another spec, or with an edited label, is made again."""
    from ..writers.manifest import read_part

    try:
        rows = read_part(part)
    except (OSError, ValueError):
        return False
    if len(rows) < len(cases):
        return False
    for row, case in zip(rows, cases):
        if row != {**row, **_planned_labels(case, spec, vocab)}:
            return False
        for rel, digest in row_files(row):
            if not inside_folder(out, rel) or file_sha256(out / rel) != digest:
                return False
    return True


def _planned_labels(case: "Case", spec: DatasetSpec, vocab) -> dict[str, str]:
    """The manifest columns that say what a case is: a kept row must say exactly this."""
    expected = {
        "case_id": case.case_id, "index": case.index, "split": case.split,
        "seed": "" if case.seed is None else case.seed,
        "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
        "finding_codes": "|".join(str(vocab.findings[f.finding].code) for f in case.findings),
        "location": "|".join(f.location or "" for f in case.findings),
        "severity": "|".join(f.severity or "" for f in case.findings),
        **case.chexpert_labels(vocab), "sex": case.sex, "age": case.age, "view": case.view,
        "width": spec.image.width, "height": spec.image.height, "bit_depth": spec.image.bit_depth,
        "png_bit_depth": spec.image.png_bit_depth if "png" in spec.image.formats else "", "spec_hash": spec.spec_hash,
    }
    return {k: ("" if v is None else str(v)) for k, v in expected.items()}


def case_paths(spec: DatasetSpec, case: "Case") -> list[str]:
    """Every file a case may have (the masks of all its findings, a SEG), relative to OUT."""
    stem = f"{case.split}/{case.case_id}"
    paths = [f"images/{stem}.png"] if "png" in spec.image.formats else []
    if "dicom" in spec.image.formats:
        paths += [f"dicom/{stem}.dcm", f"dicom/{stem}_sr.dcm", f"dicom/{stem}_seg.dcm"]
    paths += [f"masks/{stem}_mask_{f.finding}.png" for f in case.findings]
    return paths


def load_backend(spec: DatasetSpec, backend: "str | Backend | None", model: str | None,
                 cases=None) -> "Backend":
    from ..backends import BackendUnavailable, create_backend

    if backend is not None and not isinstance(backend, str):
        return backend
    try:
        return create_backend(spec, backend=backend, model=model, cases=cases)
    except BackendUnavailable as e:
        raise BuildError(str(e), 2) from None


def check_same_model(out: Path, model_hash: str, made_with: str | None, dtype: str | None = None,
                     made_in: str | None = None, hashed: str = "the model") -> None:
    """A resume must not mix two models: the files of the model (or the phantom's version, or a drr run's CT files)
    must be the same, and so must the dtype it ran in (``dtype: auto`` picks per machine). ``hashed``: what
    ``model_hash`` is a digest of (:attr:`BackendInfo.hashed`), named in the refusal."""
    if made_with is not None and made_with != model_hash:
        raise BuildError(f"{out} was partly made with a model of hash {made_with[:12]}; this run's, {hashed}, has "
                         f"hash {model_hash[:12]} (another model, its files changed, or another synthmed version); "
                         "resume with the one that began the run, or rerun with --overwrite to start again", 2)
    if made_in is not None and dtype is not None and made_in != dtype:
        raise BuildError(f"{out} was partly made in {made_in}, but this run computes in {dtype} (generator.dtype auto "
                         f"picks per machine, and a run's films are all of one dtype); finish it on a machine where "
                         f"auto picks {made_in}, or rerun with --overwrite to start again (with generator.dtype set, "
                         "a run computes in it everywhere)", 2)


# How fast a backend makes images, not what they show: never held against the kept rows (a user's backend may report)
SPEED_SETTINGS = ("threads", "micro_batch", "device", "compile", "batch_size")
# The built-in backends' settings that change what an image shows
IMAGE_SETTINGS = ("steps", "guidance_scale", "scheduler", "width", "height", "timestep_spacing", "late_guidance",
                  "decoder", "coarse_to_fine", "quantize", "distilled")


def check_same_settings(out: Path, settings, made_how: dict | None) -> None:
    """A resume must not mix images made with other sampling settings: the kept rows' ``generation`` against this
    run's backend. The run record holds what a spec, the model folder's recommendations and the command line set;
    a Backend object passed to ``generate`` has settings of its own, and a run begun with one may be finished
    without it (or on Ray)."""
    import json

    from ..backends import BACKENDS

    if not made_how:
        return
    keys = IMAGE_SETTINGS
    if made_how.get("backend") not in BACKENDS:  # a user's backend: every setting it reports but how fast it runs
        keys = tuple(k for k in dict.fromkeys([*made_how, *settings]) if k != "backend" and k not in SPEED_SETTINGS)
    now = json.loads(json.dumps({k: settings.get(k) for k in keys}, default=str))  # as the rows hold it
    changed = [f"{key} {made_how.get(key)!r} -> {now.get(key)!r}" for key in keys
               if made_how.get(key) != now.get(key)]
    if changed:
        raise BuildError(f"{out} was partly made with other settings than this run's backend has "
                         f"({'; '.join(changed)}); resume with the settings that began the run, or rerun with "
                         "--overwrite (overwrite=True) to start again", 2)


class ChunkMaker:
    """Makes whole chunks: prompts -> backend -> files -> the chunk's manifest part, written last and atomically.

    Both executors use it: the local one in this process, the Ray one once per worker. Files are
    written by a background thread while the backend makes the next batch.
    """

    def __init__(self, spec: DatasetSpec, out: Path, engine: "Backend", batch_size: int | None):
        from ..prompts import build_prompt

        self.spec, self.engine, self._build_prompt = spec, engine, build_prompt
        self.folder = RunFolder(out)  # its ledger: each chunk's files are claimed before they are written
        generation = {"backend": engine.info.name, **dict(engine.info.settings)}
        self.writer = CaseWriter(spec, out, engine.info, generation)
        self.parts = out / STATE_DIR / "parts"
        batch = batch_size or spec.generator.batch_size
        multiple = getattr(engine, "micro_batch", 1)  # a backend that runs fixed micro-batches wastes no padding
        self.batch = -(-batch // multiple) * multiple
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthmed-writer")
        self.reject = _Rejecter(spec)

    def make(self, k: int, cases: list, *, stop: threading.Event | None = None, on_batch=None) -> int:
        """Write chunk ``k`` (its ``cases``); returns the images written. The part is written only if all were."""
        from ..writers.manifest import write_part

        key = f"chunk-{k:06d}"
        part = part_path(self.parts, k)
        planned = [p for c in cases for p in case_paths(self.spec, c)]
        # files an earlier plan of this chunk made (another split, other findings) are ours and stale
        stale = set(self.folder.ledger.read(key)["files"]) - set(planned) - {f"{STATE_DIR}/parts/{part.name}"}
        if stale:
            self.folder.ledger.remove(key, sorted(stale))
        # each file is noted as it is written, and a redone chunk writes the same bytes: what is recorded stays known
        self.folder.claim(key, planned + [f"{STATE_DIR}/parts/{part.name}"], keep_recorded=True)
        self.writer.claimed = set(planned)
        self.writer.claim = lambda rel: self.folder.claim(key, [rel], keep_recorded=True)  # a file no case predicted
        self.writer.note = lambda rel, sha: self.folder.ledger.note_written(key, rel, sha)
        pending: list[Future] = []
        for b0 in range(0, len(cases), self.batch):
            if stop is not None and stop.is_set():
                break
            batch_cases = cases[b0:b0 + self.batch]
            prompts = [self._build_prompt(c, self.spec.prompt, self.writer.vocab) for c in batch_cases]
            images = self.engine.generate(batch_cases, prompts)
            if len(images) != len(batch_cases):
                raise BuildError(f"the backend returned {len(images)} images for {len(batch_cases)} cases")
            made_from, tries = self.reject.apply(self.engine, batch_cases, prompts, images)
            pending += [self.pool.submit(self._write, c, used, p, im, t)
                        for c, used, p, im, t in zip(batch_cases, made_from, prompts, images, tries)]
            if on_batch is not None:
                on_batch(len(batch_cases))
        rows = [f.result() for f in pending]
        if len(rows) == len(cases):  # interrupted inside this chunk: no part, --resume redoes it
            digests = {rel: sha for row in rows for rel, sha in row_files(row)}
            # a planned file this run did not make (a SEG or mask of a finding the case no longer has, under a
            # re-planned chunk) is an earlier run's: the claim above checked it is ours and unchanged
            leftover = [rel for rel in planned if rel not in digests and (self.folder.out / rel).exists()]
            if leftover:
                self.folder.ledger.remove(key, leftover)
            write_part(part, rows)
            digests[f"{STATE_DIR}/parts/{part.name}"] = file_sha256(part)
            self.folder.ledger.record(key, digests)
        return len(rows)

    def _write(self, case: "Case", used: "Case", prompt, image: "GeneratedImage", tries: int) -> dict:
        """Write one image made from ``used`` (the case, or it with a regeneration's seed) as ``case``'s row."""
        import numpy as np

        if not np.isfinite(image.pixels).all():
            again = f" and on {tries} regeneration(s)" if tries else ""
            raise BuildError(f"the backend made an image with NaN or infinite pixels for {case.case_id}{again}; "
                             "set qc.reject.max_tries in the spec to regenerate such images")
        row = self.writer.write(used, prompt, image)
        row["seed"] = "" if case.seed is None else str(case.seed)
        row["qc_tries"] = str(tries)
        row["qc_seed"] = "" if used.seed is None else str(used.seed)
        return row

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _Rejecter:
    """Reject-and-regenerate: remake images failing a gating pixel check, each try from a derived seed."""

    def __init__(self, spec: DatasetSpec):
        from ..qc.checks import PixelLimits
        from ..qc.run import generated_checks

        qc = spec.qc
        self.checks = generated_checks(qc.gate) if qc.enabled and qc.reject.max_tries > 0 else ()
        self.max_tries = qc.reject.max_tries
        self.limits = PixelLimits(min_dynamic_range=qc.thresholds.min_dynamic_range,
                                  max_saturated_fraction=qc.thresholds.max_saturated_fraction,
                                  max_black_fraction=qc.thresholds.max_black_fraction)
        self.size = (spec.image.width, spec.image.height, spec.image.bit_depth)
        # qc judges a PNG's values where there is one (what loaders read), else the DICOM's stored values
        self.png_depth = spec.image.png_bit_depth if "png" in spec.image.formats else None

    def failing(self, image: "GeneratedImage") -> bool:
        from ..qc.checks import check_generated

        width, height, depth = self.size
        flags = check_generated(image.pixels, width=width, height=height, bit_depth=depth,
                                png_bit_depth=self.png_depth, limits=self.limits)
        return any(f in self.checks for f in flags)

    def apply(self, engine: "Backend", cases: list, prompts: list, images: list) -> tuple[list, list[int]]:
        """Regenerate in place the images that fail; returns the case each image was made from and its tries."""
        import dataclasses

        made_from, tries = list(cases), [0] * len(cases)
        if not self.checks:
            return made_from, tries
        todo = [i for i, image in enumerate(images) if self.failing(image)]
        for attempt in range(1, self.max_tries + 1):
            if not todo:
                break
            retry = [dataclasses.replace(cases[i], seed=derive_retry_seed(cases[i].seed, attempt, cases[i].case_id))
                     for i in todo]
            remade = engine.generate(retry, [prompts[i] for i in todo])
            if len(remade) != len(retry):
                raise BuildError(f"the backend returned {len(remade)} images for {len(retry)} cases")
            for i, case, image in zip(todo, retry, remade):
                images[i], made_from[i], tries[i] = image, case, attempt
            todo = [i for i in todo if self.failing(images[i])]
        return made_from, tries
