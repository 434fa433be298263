"""DICOM writer: one synthetic image -> one DICOM Part 10 file, marked synthetic, with deterministic bytes.

Two IODs:

- ``iod="dx"`` (default): Digital X-Ray Image Storage - For Presentation (1.2.840.10008.5.1.4.1.1.1.1),
  Modality ``DX``, with the DX Series, DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, VOI LUT and
  Acquisition Context modules: what imaging pipelines route on (Modality, View Position, pixel spacing).
- ``iod="sc"``: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7), Conversion Type ``SYN``
  (synthetic image), Modality ``OT`` -- the image was not acquired by any modality.

The findings go in a DICOM SR beside the image and the masks in a DICOM SEG (:mod:`synthmed.writers.sr`,
:mod:`synthmed.writers.seg`); both reference the dataset :func:`dicom_dataset` returns.

Geometry. Patient Orientation is the view's display convention from the vocabulary: frontal films
(PA, AP, or no view) ``L\\F`` (rows run to the patient's left, columns to the feet: the patient's right on
the viewer's left), the left lateral ``P\\F`` (the patient facing the viewer's left). A backend that
simulates its geometry (the drr backend) passes ``geometry`` (:class:`synthmed.backends.ImageGeometry`):
DX then states Imager Pixel Spacing at the detector, Pixel Spacing at the patient's isocentre (imager
spacing / magnification, calibration type GEOMETRY), Estimated Radiographic Magnification Factor,
Distance Source to Detector and Distance Source to Patient (to the isocentre, so that their ratio is the
magnification), and SC states the Pixel Spacing (with its calibration). Without geometry, DX states a
nominal spacing (see :data:`NOMINAL_FIELD_MM`) as Imager Pixel Spacing and as Pixel Spacing (a magnification
of 1 assumed, no calibration type; Detector Description says it is nominal) -- loaders that size things in mm
read Pixel Spacing -- and no distances; SC states nothing geometric.

Both are MONOCHROME2, one sample per pixel, unsigned, explicit VR little endian, uncompressed:
BitsAllocated/BitsStored/HighBit 16/12/11 (``bits_stored=12``, uint16 input) or 8/8/7 (uint8 input);
the window (centre 2**(b-1), width 2**b) covers the whole stored range.

How an object says it is synthetic (every IOD):
    Image Type DERIVED\\SECONDARY; Contributing Equipment Sequence, purpose (DCM, 109100, "Synthesizing
    Equipment"); Manufacturer ``synthmed``, Manufacturer's Model Name ``<backend>/<model id>``, Software
    Versions = synthmed version; Patient Identity Removed YES + De-identification Method text; Burned In
    Annotation NO; Patient's Name ``SYNTHETIC^<case id>``; Study/Series Description, Image Comments and
    Derivation Description all start with SYNTHETIC.

Determinism: no clock, host, user or path is read. Dates and times are fixed placeholders
(:data:`PLACEHOLDER_DATE`, :data:`PLACEHOLDER_TIME`); UIDs come from :func:`derive_uid`; the file meta
carries synthmed's own Implementation Class UID (not pydicom's, which changes with pydicom's version).

Findings. DICOM has no standard attribute of an *image* IOD that holds finding + location + severity
(findings belong in a Structured Report, TID 1500, which is a separate object), so they live in a
private block, described here (VRs are written explicitly, so any reader gets them without a
private dictionary)::

    (0009,0010) LO  private creator "SYNTHMED 1.0"          -> block elements (0009,10xx)
    (0009,1001) LO  dataset name
    (0009,1002) LT  spec hash
    (0009,1003) LO  backend
    (0009,1004) LT  model id
    (0009,1005) LT  model hash
    (0009,1006) LO  synthmed version
    (0009,1007) LO  case split (train/val/test; absent if None)
    (0009,1008) LO  case image seed, decimal (absent if None)
    (0009,1009) UT  prompt, in full
    (0009,1010) SQ  Finding Sequence, one item per FindingLabel, in the Case's order; each item:
        (0009,0010) LO  private creator "SYNTHMED 1.0" (private creators are per dataset)
        (0009,1011) LO  finding id (synthmed vocabulary, e.g. "pleural_effusion")
        (0009,1012) SQ  finding code sequence, 1 item
        (0009,1013) LO  location id, empty if none
        (0009,1014) SQ  location code sequence, 1 item or empty
        (0009,1015) LO  severity id, empty if none
        (0009,1016) SQ  severity code sequence, 1 item or empty

Each code item is a standard Code Sequence Macro item: Code Value (or Long Code Value when the code
is longer than 16 characters), Coding Scheme Designator (SCT, DCM or 99SYNTHMED -- the vocabulary's
systems map one to one), Code Meaning. 99SYNTHMED is described in the Coding Scheme Identification
Sequence when used. Image Comments repeats the findings as plain text, followed by the prompt.

Example:
    >>> from synthmed.sampler import Case, FindingLabel
    >>> import numpy as np
    >>> case = Case("case-0000001", 1, "train", 7, (FindingLabel("pleural_effusion", "right", "moderate"),),
    ...             sex="F", age=58, view="PA")
    >>> data = dicom_bytes(np.zeros((8, 8), np.uint16), case, dataset_name="demo", spec_hash="ab12",
    ...                    backend="toy", model_id="toy-1", model_hash="0", prompt="chest x-ray",
    ...                    synthmed_version="0.1.0")
    >>> data[128:132]
    b'DICM'
    >>> derive_uid("ab12", "case-0000001", "study")[:5]
    '2.25.'
"""

# The construction of the SC object (modules, Conversion Type, refusing bad dtypes up front) follows
# highdicom's src/highdicom/sc/sop.py; the code is our own (highdicom hard-codes Conversion Type DI).

from __future__ import annotations

import hashlib
import io
import re
from typing import TYPE_CHECKING

import numpy as np

from ..vocabulary import Code, Vocabulary, get_vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

    from ..backends import ImageGeometry
    from ..sampler import Case, FindingLabel

SOP_CLASS_UIDS = {
    "sc": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "dx": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
BITS_STORED = (8, 12)

# Fixed placeholders instead of real dates and times: a synthetic image has no acquisition time, and
# reading the clock would break byte-identical reruns. 2000-01-01 00:00:00 is obviously artificial,
# valid for every DA/TM consumer, and sorts all synthetic studies together.
PLACEHOLDER_DATE = "20000101"
PLACEHOLDER_TIME = "000000"

PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "SYNTHMED 1.0"

# Our own implementation identity in the file meta, a constant derived like any other synthmed UID.
IMPLEMENTATION_CLASS_UID = "2.25." + str(int.from_bytes(
    hashlib.sha256(b"synthmed\x00dicom-writer\x00implementation-class").digest()[:16], "big"))

# Vocabulary code system -> DICOM Coding Scheme Designator.
CODING_SCHEME_DESIGNATORS = {"SCT": "SCT", "DCM": "DCM", "99SYNTHMED": "99SYNTHMED"}

SYNTHESIZING_EQUIPMENT = Code("DCM", "109100", "Synthesizing Equipment")  # PS3.16 CID 7005
# Body Part Examined CHEST <-> SCT 816094009 "Chest" (PS3.16 Annex L and CID 4031 as tabulated in
# pydicom 3.0.2). The older 51185008 ("Thoracic structure") is in no current CID.
CHEST = Code("SCT", "816094009", "Chest")

# A synthetic image has no physical pixel size, but DX requires Imager Pixel Spacing (type 1): we state
# a nominal 430 mm (a 17-inch detector) across the longer side and say so in Detector Description.
NOMINAL_FIELD_MM = 430.0

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")


# ----------------------------------------------------------------------------- public API

def uid_root(spec_hash: str, pixel_data: bytes, rows: int, columns: int, bits_stored: int) -> str:
    """What a case's UIDs are derived from: the spec hash and the image's own stored pixels. Two images that
    differ (the same spec built with another model, backend, step count or software) never share a UID; the
    same image gets the same UIDs on every rerun.

    Example:
        >>> root = uid_root("ab12", bytes(8), 2, 2, 12)
        >>> root.startswith("ab12:pixels-"), root == uid_root("ab12", bytes(7) + b"\\1", 2, 2, 12)
        (True, False)
    """
    digest = hashlib.sha256(f"{rows}x{columns}x{bits_stored}\x00".encode("ascii"))
    digest.update(pixel_data)
    return f"{spec_hash}:pixels-{digest.hexdigest()[:32]}"


def image_uid_root(image: "Dataset", spec_hash: str) -> str:
    """:func:`uid_root` of an image dataset (:func:`dicom_dataset`): the root its SR and SEG derive their UIDs from."""
    try:
        return uid_root(spec_hash, bytes(image.PixelData), int(image.Rows), int(image.Columns), int(image.BitsStored))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError("`image` must be an image dataset with Rows, Columns, BitsStored and PixelData "
                         "(synthmed.writers.dicom.dicom_dataset)") from None


def patient_id(spec_hash: str, case_id: str) -> str:
    """The Patient ID of a case's objects: its case id with the set's spec hash, so that the patients of two sets
    (whose case ids both start at case-0000000) never share an ID in one PACS; the same spec gives the same ID.

    Example:
        >>> patient_id("f980e70110452032c52a9afe", "case-0000001")
        'case-0000001-f980e7011045'
    """
    value = f"{case_id}-{spec_hash[:12]}"
    return value if len(value) <= 64 else hashlib.sha256(value.encode("utf-8")).hexdigest()[:64]  # LO: 64 at most


def derive_uid(spec_hash: str, case_id: str, kind: str) -> str:
    """A deterministic UID: ``2.25.`` + the first 128 bits of sha256(spec_hash NUL case_id NUL kind), in decimal.

    Args:
        spec_hash: the dataset spec's hash.
        case_id: the case, e.g. ``case-0000001``.
        kind: which object: ``study``, ``series``, ``instance``, ``frame-of-reference``, ...

    (``pydicom.uid.generate_uid`` is not used: without a prefix it ignores its entropy inputs.)

    Example:
        >>> derive_uid("ab12", "case-0000001", "study") == derive_uid("ab12", "case-0000001", "study")
        True
        >>> derive_uid("ab12", "case-0000001", "study") != derive_uid("ab12", "case-0000001", "series")
        True
    """
    for name, value in (("spec_hash", spec_hash), ("case_id", case_id), ("kind", kind)):
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ValueError(f"`{name}` must be a non-empty string without NUL characters, got {value!r}")
    digest = hashlib.sha256("\x00".join((spec_hash, case_id, kind)).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def patient_orientation(view: str | None, geometry: "ImageGeometry | None" = None) -> tuple[str, str]:
    """DICOM Patient Orientation (row direction, column direction) of a film as displayed.

    The geometry's own when a backend gives one, else the view's convention in the vocabulary.

    Example:
        >>> patient_orientation("PA"), patient_orientation("LL"), patient_orientation(None)
        (('L', 'F'), ('P', 'F'), ('L', 'F'))
    """
    if geometry is not None:
        return tuple(geometry.patient_orientation)
    return tuple(get_vocabulary().views[view or "PA"].orientation)


def dicom_bytes(pixels: np.ndarray, case: "Case", *, iod: str = "dx", bits_stored: int = 12,
                dataset_name: str, spec_hash: str, backend: str, model_id: str, model_hash: str,
                prompt: str, synthmed_version: str, geometry: "ImageGeometry | None" = None) -> bytes:
    """A DICOM Part 10 file for one synthetic image: :func:`dicom_dataset`, encoded by :func:`part10_bytes`.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("case-0000002", 2, None, None, (FindingLabel("cardiomegaly", None, "mild"),))
        >>> data = dicom_bytes(np.zeros((4, 4), np.uint8), case, iod="dx", bits_stored=8, dataset_name="d",
        ...                    spec_hash="h", backend="b", model_id="m", model_hash="x", prompt="p",
        ...                    synthmed_version="0.1.0")
        >>> len(data) > 132
        True
    """
    return part10_bytes(dicom_dataset(pixels, case, iod=iod, bits_stored=bits_stored, dataset_name=dataset_name,
                                      spec_hash=spec_hash, backend=backend, model_id=model_id,
                                      model_hash=model_hash, prompt=prompt, synthmed_version=synthmed_version,
                                      geometry=geometry))


def dicom_dataset(pixels: np.ndarray, case: "Case", *, iod: str = "dx", bits_stored: int = 12,
                  dataset_name: str, spec_hash: str, backend: str, model_id: str, model_hash: str,
                  prompt: str, synthmed_version: str, geometry: "ImageGeometry | None" = None) -> "Dataset":
    """The DICOM dataset (with its file meta) of one synthetic image; the SR and SEG writers reference it.

    Args:
        pixels: 2-D (rows, columns) array; uint16 with every value < 4096 when ``bits_stored`` is 12,
            uint8 when it is 8.
        case: the Case the image shows (id, sex, age, view, findings).
        iod: ``"dx"`` (Digital X-Ray, For Presentation) or ``"sc"`` (Secondary Capture, Conversion Type SYN).
        bits_stored: 12 (16-bit container) or 8.
        dataset_name, spec_hash, backend, model_id, model_hash, prompt, synthmed_version: provenance,
            written into descriptions, Contributing Equipment and the private block.
        geometry: the simulated acquisition geometry (:class:`synthmed.backends.ImageGeometry`), where the
            backend knows it; its view must be the case's. None: nominal spacing (module docstring).

    Returns:
        A pydicom Dataset; :func:`part10_bytes` of the same inputs always gives the same bytes.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("case-0000002", 2, None, None, (FindingLabel("cardiomegaly", None, "mild"),))
        >>> ds = dicom_dataset(np.zeros((4, 4), np.uint8), case, iod="dx", bits_stored=8, dataset_name="d",
        ...                    spec_hash="h", backend="b", model_id="m", model_hash="x", prompt="p",
        ...                    synthmed_version="0.1.0")
        >>> ds.Modality, ds.SOPInstanceUID == derive_uid(image_uid_root(ds, "h"), "case-0000002", "instance")
        ('DX', True)
    """
    _import_pydicom()
    from pydicom.dataset import Dataset

    # 1. Check inputs
    if iod not in SOP_CLASS_UIDS:
        raise ValueError(f"`iod` must be one of {sorted(SOP_CLASS_UIDS)}, got {iod!r}")
    pixel_bytes = _check_pixels(pixels, bits_stored)
    provenance = {"dataset_name": dataset_name, "spec_hash": spec_hash, "backend": backend, "model_id": model_id,
                  "model_hash": model_hash, "prompt": prompt, "synthmed_version": synthmed_version}
    for name, value in provenance.items():
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r}")
    for name in ("dataset_name", "spec_hash", "backend", "model_id", "synthmed_version"):
        if not provenance[name].strip():
            raise ValueError(f"`{name}` must not be empty, got {provenance[name]!r}")
    vocab = get_vocabulary()
    case_id = _check_case(case, vocab)
    _check_geometry(geometry, case)
    rows, columns = pixels.shape
    root = uid_root(spec_hash, pixel_bytes, rows, columns, bits_stored)
    uid = {kind: derive_uid(root, case_id, kind) for kind in ("study", "series", "instance")}
    model = f"{backend}/{model_id}"

    ds = Dataset()
    # 2. Patient and study: who (nobody) and when (placeholders)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts and dataset names may be any language
    ds.PatientName = f"SYNTHETIC^{case_id}"
    ds.PatientID = patient_id(spec_hash, case_id)
    ds.PatientBirthDate = ""
    ds.PatientSex = {None: "", "F": "F", "M": "M"}[case.sex]
    if case.age is not None:
        ds.PatientAge = f"{int(case.age):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "SYNTHETIC image, no real patient (synthmed)"
    ds.StudyInstanceUID = uid["study"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = PLACEHOLDER_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = PLACEHOLDER_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = case_id if len(case_id) <= 16 else hashlib.sha256(case_id.encode()).hexdigest()[:16]
    ds.AccessionNumber = ""
    ds.StudyDescription = _lo(f"SYNTHETIC chest X-ray - {dataset_name}")

    # 3. Series and equipment: marked synthetic
    ds.Modality = "DX" if iod == "dx" else "OT"
    ds.SeriesInstanceUID = uid["series"]
    ds.SeriesNumber = 1
    ds.SeriesDescription = _lo(f"SYNTHETIC {dataset_name}")
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "synthmed"
    ds.ManufacturerModelName = _lo(model)
    ds.SoftwareVersions = _lo(synthmed_version)
    ds.ContributingEquipmentSequence = [synthesizing_equipment(
        backend=backend, model_id=model_id, model_hash=model_hash, synthmed_version=synthmed_version,
        spec_hash=spec_hash)]
    if iod == "sc":
        ds.ConversionType = "SYN"
        ds.SecondaryCaptureDeviceManufacturer = "synthmed"
        ds.SecondaryCaptureDeviceManufacturerModelName = _lo(model)
        ds.SecondaryCaptureDeviceSoftwareVersions = _lo(synthmed_version)

    # 4. Image: what it is and what it shows
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = 1
    # Conventional radiograph display: frontal rows run to the patient's left, columns to the feet
    ds.PatientOrientation = list(patient_orientation(case.view, geometry))
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.DerivationDescription = _text(f"SYNTHETIC: generated by {model}, not acquired from a patient", 1024)
    ds.ImageComments = _text(_comments(case, dataset_name, prompt, vocab), 10240)
    ds.AnatomicRegionSequence = [_code_item(CHEST)]
    if iod == "dx":
        _add_dx_modules(ds, case, rows, columns, vocab, geometry)
    elif geometry is not None:
        _add_pixel_spacing(ds, geometry)

    # 5. Pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16 if bits_stored == 12 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2 ** (bits_stored - 1)
    ds.WindowWidth = 2 ** bits_stored
    ds.WindowCenterWidthExplanation = "FULL STORED RANGE"
    ds.add_new(0x7FE00010, "OW" if bits_stored == 12 else "OB", pixel_bytes)

    # 6. Findings and provenance, private block (layout in the module docstring)
    _add_private_block(ds, case, provenance, vocab)
    add_coding_schemes(ds, vocab)

    # 7. SOP common and file meta
    ds.SOPClassUID = SOP_CLASS_UIDS[iod]
    ds.SOPInstanceUID = uid["instance"]
    set_file_meta(ds, synthmed_version)
    return ds


def set_file_meta(ds: "Dataset", synthmed_version: str) -> None:
    """Give ``ds`` the file meta synthmed writes: explicit VR little endian and synthmed's own implementation UID
    (not pydicom's or highdicom's, which change with their versions)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _implementation_version(synthmed_version)
    ds.file_meta = meta


def part10_bytes(ds: "Dataset") -> bytes:
    """Encode a dataset with its file meta (:func:`set_file_meta`) as a DICOM Part 10 file.

    Example:
        >>> from synthmed.sampler import Case, FindingLabel
        >>> case = Case("case-0000003", 3, None, None, (FindingLabel("edema", None, None),))
        >>> ds = dicom_dataset(np.zeros((2, 2), np.uint8), case, bits_stored=8, dataset_name="d", spec_hash="h",
        ...                    backend="b", model_id="m", model_hash="x", prompt="p", synthmed_version="0.1.0")
        >>> part10_bytes(ds)[128:132]
        b'DICM'
    """
    pydicom = _import_pydicom()

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def synthesizing_equipment(*, backend: str, model_id: str, model_hash: str, synthmed_version: str,
                           spec_hash: str, made: str = "image") -> "Dataset":
    """A Contributing Equipment item, purpose (DCM, 109100, "Synthesizing Equipment"): what made the object.

    Example:
        >>> item = synthesizing_equipment(backend="b", model_id="m", model_hash="x", synthmed_version="0.1.0",
        ...                               spec_hash="h")
        >>> item.PurposeOfReferenceCodeSequence[0].CodeValue, item.ContributionDescription[:9]
        ('109100', 'SYNTHETIC')
    """
    from pydicom.dataset import Dataset

    model = f"{backend}/{model_id}"
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [_code_item(SYNTHESIZING_EQUIPMENT)]
    item.Manufacturer = "synthmed"
    item.ManufacturerModelName = _lo(model)
    item.SoftwareVersions = _lo(synthmed_version)
    item.ContributionDescription = _text(
        f"SYNTHETIC {made} generated by backend {backend}, model {model_id} (hash {model_hash}), "
        f"synthmed {synthmed_version}, spec hash {spec_hash}; no real patient", 1024)
    return item


def finish_derived_object(ds: "Dataset", image: "Dataset", *, made: str, spec_hash: str, backend: str,
                          model_id: str, model_hash: str, synthmed_version: str) -> None:
    """Make an object highdicom built on ``image`` (an SR, a SEG) deterministic and marked synthetic as the image is.

    Removes what highdicom takes from the clock (Instance Creation Date/Time, the Contribution DateTime of its
    own Contributing Equipment item); puts synthmed's Synthesizing Equipment item first in place of highdicom's
    copy of the image's equipment; copies the image's de-identification attributes; describes 99SYNTHMED when
    used; sets synthmed's file meta.
    """
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in ds:
            delattr(ds, keyword)
    kept = []
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == "synthmed":  # highdicom's copy of the image's equipment
            continue
        if "ContributionDateTime" in item:  # highdicom's own entry, stamped with the clock
            del item.ContributionDateTime
        kept.append(item)
    ds.ContributingEquipmentSequence = [
        synthesizing_equipment(backend=backend, model_id=model_id, model_hash=model_hash,
                               synthmed_version=synthmed_version, spec_hash=spec_hash, made=made), *kept]
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "PatientAge", "StudyDescription"):
        if keyword in image:
            setattr(ds, keyword, image[keyword].value)
    add_coding_schemes(ds)
    set_file_meta(ds, synthmed_version)


def add_coding_schemes(ds: "Dataset", vocab: Vocabulary | None = None) -> None:
    """Describe synthmed's local coding scheme (99SYNTHMED) in the Coding Scheme Identification Sequence when
    any code item of ``ds``, at any depth, uses it."""
    from pydicom.dataset import Dataset

    vocab = vocab or get_vocabulary()
    if not any(item.CodingSchemeDesignator == "99SYNTHMED" for item in _all_code_items(ds)):
        return
    scheme = Dataset()
    scheme.CodingSchemeDesignator = "99SYNTHMED"
    scheme.CodingSchemeName = _lo(vocab.code_systems.get("99SYNTHMED", {}).get("name", "synthmed local codes"))
    scheme.CodingSchemeVersion = str(vocab.version)
    scheme.CodingSchemeResponsibleOrganization = "synthmed"
    ds.CodingSchemeIdentificationSequence = [scheme]


# ----------------------------------------------------------------------------- checks

def _check_pixels(pixels: np.ndarray, bits_stored: int) -> bytes:
    """Refuse anything but a 2-D uint16 (< 2**12) or uint8 array; return its little-endian bytes, even length."""
    if bits_stored not in BITS_STORED:
        raise ValueError(f"`bits_stored` must be one of {BITS_STORED}, got {bits_stored!r}")
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"`pixels` must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim != 2:
        raise ValueError(f"`pixels` must be 2-D (rows, columns), got shape {pixels.shape}")
    if not (0 < pixels.shape[0] <= 0xFFFF and 0 < pixels.shape[1] <= 0xFFFF):
        raise ValueError(f"`pixels` must have 1 to 65535 rows and columns, got shape {pixels.shape}")
    want = np.dtype(np.uint16) if bits_stored == 12 else np.dtype(np.uint8)
    if pixels.dtype.kind != "u" or pixels.dtype.itemsize != want.itemsize:
        raise ValueError(f"`pixels` must be {want.name} when bits_stored is {bits_stored}, got dtype {pixels.dtype}")
    top = int(pixels.max())
    if top >= 2 ** bits_stored:
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(pixels)), pixels.shape))
        raise ValueError(f"`pixels` must be < 2**{bits_stored} = {2 ** bits_stored} when bits_stored is "
                         f"{bits_stored}, got max {top} at {where}")
    data = np.ascontiguousarray(pixels, dtype=want.newbyteorder("<")).tobytes()
    return data + b"\x00" if len(data) % 2 else data  # DICOM values have even length


def _check_case(case: "Case", vocab: Vocabulary) -> str:
    case_id = getattr(case, "case_id", None)
    if not isinstance(case_id, str) or not case_id or len(case_id) > 64 or _CONTROL.search(case_id) \
            or any(c in case_id for c in "\\^="):
        raise ValueError(f"`case.case_id` must be 1-64 characters without control characters, '\\', '^' or '=', "
                         f"got {case_id!r}")
    if case.sex not in (None, "F", "M"):
        raise ValueError(f"`case.sex` must be 'F', 'M' or None, got {case.sex!r}")
    if case.age is not None and not (isinstance(case.age, (int, np.integer)) and 0 <= case.age <= 999):
        raise ValueError(f"`case.age` must be an integer from 0 to 999 or None, got {case.age!r}")
    if case.view is not None and case.view not in vocab.views:
        raise ValueError(f"`case.view` must be one of {sorted(vocab.views)} or None, got {case.view!r}")
    for i, label in enumerate(case.findings):
        for field, known in (("finding", vocab.findings), ("location", vocab.locations),
                             ("severity", vocab.severities)):
            value = getattr(label, field)
            if (value is not None or field == "finding") and value not in known:
                raise ValueError(f"`case.findings[{i}].{field}` is not in the vocabulary, got {value!r}")
    return case_id


def _check_geometry(geometry, case: "Case") -> None:
    if geometry is None:
        return
    from ..backends import ImageGeometry

    if not isinstance(geometry, ImageGeometry):
        raise ValueError(f"`geometry` must be a synthmed.backends.ImageGeometry or None, got {type(geometry).__name__}")
    if geometry.view != (case.view or "PA"):
        raise ValueError(f"`geometry.view` must be the case's view {case.view or 'PA'!r}, got {geometry.view!r}")


def _import_pydicom():
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Writing DICOM needs pydicom: pip install 'pydicom>=3.0'") from err
    return pydicom


# ----------------------------------------------------------------------------- parts

def _add_dx_modules(ds: "Dataset", case: "Case", rows: int, columns: int, vocab: Vocabulary,
                    geometry: "ImageGeometry | None" = None) -> None:
    """DX Series, DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, Acquisition Context."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    # Image Laterality is type 1 here; the thorax is an unpaired body part, hence U.
    ds.ImageLaterality = "U"
    # A displayed radiograph: brighter (higher) values mean less X-ray beam intensity.
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.DetectorType = ""
    if geometry is None:
        ds.DetectorDescription = "SYNTHETIC - no physical detector; nominal pixel spacing"
        spacing = NOMINAL_FIELD_MM / max(rows, columns)
        ds.ImagerPixelSpacing = ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    else:
        ds.DetectorDescription = "SYNTHETIC - simulated flat detector; spacing from the simulated geometry"
        ds.ImagerPixelSpacing = [_ds(s) for s in geometry.imager_pixel_spacing]
        _add_pixel_spacing(ds, geometry)
        ds.EstimatedRadiographicMagnificationFactor = _ds(geometry.magnification)
        ds.DistanceSourceToDetector = _ds(geometry.source_to_detector_mm)
        ds.DistanceSourceToPatient = _ds(geometry.source_to_patient_mm)
    ds.AcquisitionContextSequence = []
    ds.PositionerType = ""  # type 2 in DX Positioning: there is no positioner to name
    if case.view is not None:
        ds.ViewPosition = case.view
        ds.ViewCodeSequence = [_code_item(vocab.views[case.view].code)]
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    else:
        ds.ViewPosition = ""


def _add_pixel_spacing(ds: "Dataset", geometry: "ImageGeometry") -> None:
    """Pixel Spacing at the patient's isocentre, calibrated from the simulated geometry."""
    ds.PixelSpacing = [_ds(s) for s in geometry.pixel_spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "SYNTHETIC: simulated geometry; spacing at the isocentre"


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters, the same for the same value."""
    return f"{float(value):.10g}"


def _add_private_block(ds: "Dataset", case: "Case", provenance: dict[str, str], vocab: Vocabulary) -> None:
    from pydicom.dataset import Dataset

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", _lo(provenance["dataset_name"]))
    block.add_new(0x02, "LT", _text(provenance["spec_hash"], 10240))
    block.add_new(0x03, "LO", _lo(provenance["backend"]))
    block.add_new(0x04, "LT", _text(provenance["model_id"], 10240))
    block.add_new(0x05, "LT", _text(provenance["model_hash"], 10240))
    block.add_new(0x06, "LO", _lo(provenance["synthmed_version"]))
    if case.split is not None:
        block.add_new(0x07, "LO", _lo(str(case.split)))
    if case.seed is not None:
        block.add_new(0x08, "LO", str(int(case.seed)))
    block.add_new(0x09, "UT", _text(provenance["prompt"], 2 ** 32 - 2))
    items = []
    for label in case.findings:
        item = Dataset()
        item_block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        finding, location, severity = _label_codes(label, vocab)
        item_block.add_new(0x11, "LO", label.finding)
        item_block.add_new(0x12, "SQ", [_code_item(finding)])
        item_block.add_new(0x13, "LO", label.location or "")
        item_block.add_new(0x14, "SQ", [_code_item(location)] if location else [])
        item_block.add_new(0x15, "LO", label.severity or "")
        item_block.add_new(0x16, "SQ", [_code_item(severity)] if severity else [])
        items.append(item)
    block.add_new(0x10, "SQ", items)


def _label_codes(label: "FindingLabel", vocab: Vocabulary) -> tuple[Code, Code | None, Code | None]:
    return (vocab.findings[label.finding].code,
            vocab.locations[label.location].code if label.location else None,
            vocab.severities[label.severity].code if label.severity else None)


def _code_item(code: Code) -> "Dataset":
    """A Code Sequence Macro item; codes over 16 characters go in Long Code Value."""
    from pydicom.dataset import Dataset

    if code.system not in CODING_SCHEME_DESIGNATORS:
        raise ValueError(f"code system must be one of {sorted(CODING_SCHEME_DESIGNATORS)}, got {code.system!r}")
    item = Dataset()
    if len(code.code) <= 16:
        item.CodeValue = code.code
    else:
        item.LongCodeValue = code.code
    item.CodingSchemeDesignator = CODING_SCHEME_DESIGNATORS[code.system]
    item.CodeMeaning = _lo(code.display)
    return item


def _all_code_items(ds: "Dataset"):
    """Every dataset (at any depth) that carries a Coding Scheme Designator."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                if "CodingSchemeDesignator" in item:
                    yield item


def _comments(case: "Case", dataset_name: str, prompt: str, vocab: Vocabulary) -> str:
    """Plain-text summary for Image Comments: SYNTHETIC, dataset, case, view, findings, prompt."""
    findings = []
    for label in case.findings:
        details = [vocab.locations[label.location].text if label.location else None, label.severity]
        details = [d for d in details if d]
        findings.append(vocab.findings[label.finding].text + (f" ({', '.join(details)})" if details else ""))
    return (f"SYNTHETIC image - no real patient. Dataset: {dataset_name}. Case: {case.case_id}. "
            f"View: {case.view or 'unspecified'}. Findings: {'; '.join(findings) or 'none'}. Prompt: {prompt}")


def long_string(text: str) -> str:
    """``text`` made fit for a DICOM LO value: no backslash or control characters, at most 64 characters.

    Example:
        >>> long_string("a/b " + "x" * 80) == "a/b " + "x" * 60
        True
    """
    return _lo(text)


def _lo(text: str) -> str:
    """A value fit for LO/SH-like strings: no backslash (the value separator), no control characters, <= 64."""
    return re.sub(r"[\t\n\r]", " ", _CONTROL.sub(" ", str(text))).replace("\\", "/").strip()[:64]


def _text(text: str, limit: int) -> str:
    """A value fit for ST/LT/UT: no control characters but CR/LF, at most ``limit`` characters."""
    return _CONTROL.sub(" ", str(text)).rstrip()[:limit]


def _implementation_version(synthmed_version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"SYNTHMED_{synthmed_version}")[:16]
