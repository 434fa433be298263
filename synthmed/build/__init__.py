"""Building a dataset: generate() and the parts it is made of, resumable and deterministic.

    run.py         generate(): check, plan the chunks, run an executor, merge the parts, card, quality checks
    chunks.py      the chunk pipeline every executor shares: prompts -> backend -> reject/regenerate ->
                   writers -> the chunk's manifest part (ChunkMaker, load_backend)
    local.py       the local executor (this process)          ray.py   the Ray executor (one backend per actor)
    run_folder.py  the output folder: lock, run record, parts, the ledger (the only place that deletes)
    card.py        dataset_card.json and README.md            errors.py  BuildError and the write-failure messages

The case list is cut into fixed chunks of ``CHUNK_SIZE`` cases (independent of the batch
size). A chunk is done when its manifest part exists and every file it lists still has
the sha256 the part recorded; ``--resume`` redoes every chunk that is not done. Every file
is written under a temp name and renamed, so a final name never holds a partial file.

Output folder:

    OUT/images/<split>/<case_id>.png        OUT/dicom/<split>/<case_id>.dcm
    OUT/dicom/<split>/<case_id>_sr.dcm     the image's findings, a DICOM SR (TID 1500)
    OUT/dicom/<split>/<case_id>_seg.dcm    its masks, a DICOM SEG (where the backend gives masks)
    OUT/masks/<split>/<case_id>_mask_<finding>.png
    OUT/images/<split>/metadata.csv        the split's manifest rows, for Hugging Face imagefolder
    OUT/manifest.csv
    OUT/cases.jsonl   OUT/dataset_card.json   OUT/README.md
    OUT/qc_report.json   OUT/report.html       the quality checks (the spec's ``qc:``; see synthmed.qc)
    OUT/.synthmed/    run state: run.json, lock, parts/

Quality checks: when the spec's ``qc.enabled`` (the default), the cheap checks run at the end (per
image, spec fidelity, duplicates) and fill the manifest's ``qc_status`` / ``qc_flags``. With
``qc.reject.max_tries`` > 0, an image failing a gating pixel check (size, nan, blank, saturated) is
made again from :func:`derive_retry_seed` before it is written; ``qc_tries`` and ``qc_seed`` say how.

Example:
    >>> import tempfile
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 3\\nimage: {size: 64}\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> result = generate(spec, tempfile.mkdtemp() + "/out", backend="pattern", progress=False)
    >>> result.written, result.manifest.name
    (3, 'manifest.csv')
"""

from .card import INTENDED_USE
from .chunks import CHUNK_SIZE, derive_retry_seed
from .errors import BuildArgumentError, BuildError
from .run import EXECUTORS, BuildResult, generate
from .run_folder import FORMAT_CHANGES, OUR_NAMES, RUN_FORMAT, STATE_DIR

__all__ = ["BuildArgumentError", "BuildError", "BuildResult", "CHUNK_SIZE", "EXECUTORS", "FORMAT_CHANGES", "INTENDED_USE",
           "OUR_NAMES", "RUN_FORMAT", "STATE_DIR", "derive_retry_seed", "generate"]
