"""The label-fidelity auditor: a small chest X-ray CNN that reads back what an image shows.

The auditor answers two QC questions about a generated set:

- label fidelity: does each image show the findings, location and severity it is labelled
  with? :meth:`Auditor.predict` reads them back; :func:`label_fidelity` scores the agreement.
- memorisation: is a generated image a near copy of a training image? :meth:`Auditor.embed`
  gives the features; :func:`memorisation_audit` finds each image's nearest training image in
  encoder space and in pixel space.

The shipped weights (``synthmed/models/auditor``) were trained on phantom radiographs with exact
labels (``scripts/train_auditor.py``); the model card there gives its held-out figures. Any
:class:`FeatureExtractor` may stand in for the encoder. torch and safetensors are imported only
by the functions that need them; :func:`label_fidelity` and :func:`memorisation_audit` are numpy.

Example:
    >>> import numpy as np
    >>> auditor = Auditor.from_config(seed=0)             # untrained; Auditor.load() for the shipped one
    >>> prediction = auditor.predict(np.zeros((2, 256, 256), np.float32))
    >>> prediction.finding_probs.shape, prediction.location_probs.shape, prediction.severity_probs.shape
    ((2, 19), (2, 16), (2, 4))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..vocabulary import get_vocabulary
from .metrics import nearest_neighbours

AUDITOR_VERSION = 2
MODEL_TYPE = "synthmed-auditor"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NO_LOCATION = "none"
NO_FINDING = "no_finding"
SEVERITY_NAMES = ("none", "mild", "moderate", "severe")
# The input (256 x 256) is first folded 2 x 2 into 4 channels at 128 x 128 (pixel unshuffle): the
# first conv sees every full-resolution pixel (a rib step or a small nodule is one or two pixels at
# 256) for about the cost of reading a 128 x 128 image. Then (out_channels, stride) of each 3x3
# conv + BN + ReLU block; five stride-2 blocks take 128 to 4.
DEFAULT_INPUT_SIZE = 256
DEFAULT_SPACE_TO_DEPTH = 2
DEFAULT_BLOCKS = ((32, 2), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 2))
MEMORISATION_PIXEL_SIZE = 64
INTENDED_USE = ("Quality control of synthetic chest radiographs made by synthmed: reads back findings, "
                "location and severity to score label fidelity, and embeds images for memorisation "
                "audits and set distances. Not for diagnosis; trained on phantom images only.")


# The shipped auditors, by the films each was trained on: phantom drawings, or DRRs of the labelled chest CT.
SHIPPED_AUDITORS = {"phantom": "auditor", "drr": "auditor-drr"}


def shipped_auditor_dir(films: str = "phantom") -> Path:
    """The folder of a shipped auditor: ``synthmed/models/auditor`` (phantom films) or ``auditor-drr`` (drr films).

    Example:
        >>> shipped_auditor_dir("drr").name
        'auditor-drr'
    """
    if films not in SHIPPED_AUDITORS:
        raise ValueError(f"films must be one of {', '.join(SHIPPED_AUDITORS)}; got {films!r}")
    return Path(__file__).resolve().parent.parent / "models" / SHIPPED_AUDITORS[films]


# ----------------------------------------------------------------------------- labels


def labels_of(item) -> tuple[tuple[str, str | None, str | None], ...]:
    """The ``(finding, location, severity)`` triples of a case, manifest row or findings string.

    Accepts a :class:`synthmed.sampler.Case`, a mapping with a ``findings`` entry (a manifest
    row's ``finding:location:severity|...`` string, or a list of dicts as in ``cases.jsonl``),
    the findings string itself, or a sequence of ``FindingLabel`` / triples.

    Example:
        >>> labels_of("pleural_effusion:left:moderate|cardiomegaly::moderate")
        (('pleural_effusion', 'left', 'moderate'), ('cardiomegaly', None, 'moderate'))
    """
    if hasattr(item, "findings") and not isinstance(item, Mapping):
        item = item.findings
    elif isinstance(item, Mapping):
        if "findings" not in item:
            raise ValueError(f"a label row needs a 'findings' entry; got keys {sorted(item)}")
        item = item["findings"]
    if isinstance(item, str):
        triples = []
        for part in item.split("|"):
            part = part.strip()
            if not part:
                continue
            finding, location, severity = (part.split(":") + ["", ""])[:3]
            triples.append((finding.strip(), location.strip() or None, severity.strip() or None))
        return tuple(triples)
    triples = []
    for label in item:
        if isinstance(label, Mapping):
            triples.append((label["finding"], label.get("location") or None, label.get("severity") or None))
        elif hasattr(label, "finding"):
            triples.append((label.finding, label.location or None, label.severity or None))
        else:
            finding, location, severity = (tuple(label) + (None, None))[:3]
            triples.append((finding, location or None, severity or None))
    return tuple(triples)


def label_targets(item, finding_names: Sequence[str], location_names: Sequence[str],
                  severity_names: Sequence[str] = SEVERITY_NAMES) -> tuple[np.ndarray, int, int]:
    """The auditor's training targets for one case.

    Findings are multi-hot with every parent of a labelled finding set too (a nodule is a lung
    lesion); findings the auditor does not know are ignored. Location and severity are those of
    the first finding that has one, else ``none``.

    Returns:
        (finding multi-hot float32 [len(finding_names)], location index, severity index).

    Example:
        >>> v = get_vocabulary()
        >>> hot, loc, sev = label_targets("nodule:right_upper_zone:mild", list(v.findings),
        ...                               list(v.locations) + ["none"])
        >>> [f for f, h in zip(v.findings, hot) if h], list(v.locations)[loc], SEVERITY_NAMES[sev]
        (['lung_lesion', 'nodule'], 'right_upper_zone', 'mild')
    """
    vocab = get_vocabulary()
    finding_index = {name: i for i, name in enumerate(finding_names)}
    hot = np.zeros(len(finding_names), np.float32)
    location = severity = None
    for finding, loc, sev in labels_of(item):
        current = finding
        while current is not None:
            if current in finding_index:
                hot[finding_index[current]] = 1.0
            current = vocab.findings[current].parent if current in vocab.findings else None
        if location is None and loc:
            location = loc
        if severity is None and sev:
            severity = sev
    location_names, severity_names = list(location_names), list(severity_names)
    for name, value, names in (("location", location, location_names), ("severity", severity, severity_names)):
        if value is not None and value not in names:
            raise ValueError(f"{name} {value!r} is not one the auditor knows ({', '.join(names)})")
    return (hot, location_names.index(location or NO_LOCATION),
            severity_names.index(severity or SEVERITY_NAMES[0]))


# ----------------------------------------------------------------------------- images


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights averaging each output bin's share of the input pixels."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def area_resize(images, size: int) -> np.ndarray:
    """Resize images to ``size x size`` by area averaging (exact 2x2 means when halving).

    Args:
        images: [N, H, W] or [H, W] array, or a sequence of [H, W] arrays of any sizes; integer
            dtypes are scaled to [0, 1] by their maximum value.

    Returns:
        float32 [N, size, size].

    Example:
        >>> area_resize(np.arange(16, dtype=np.float32).reshape(4, 4), 2)[0].tolist()
        [[2.5, 4.5], [10.5, 12.5]]
    """
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer; got {size!r}")
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = images[None]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        groups = [images]
    elif isinstance(images, np.ndarray):
        raise ValueError(f"images must be [N, H, W] or [H, W]; got shape {images.shape}")
    else:
        groups = [np.asarray(image)[None] for image in images]
    out = []
    for group in groups:
        if group.ndim != 3 or 0 in group.shape[1:]:
            raise ValueError(f"each image must be a non-empty 2-D array [H, W]; got shape {group.shape[1:]}")
        if np.issubdtype(group.dtype, np.integer):
            group = group.astype(np.float32) / float(np.iinfo(group.dtype).max)
        group = np.asarray(group, dtype=np.float32)
        if not np.isfinite(group).all():
            raise ValueError("images contain NaN or infinite values")
        h, w = group.shape[1:]
        if (h, w) == (size, size):
            out.append(group)
            continue
        rows, cols = _area_matrix(h, size).astype(np.float32), _area_matrix(w, size).astype(np.float32)
        out.append(np.einsum("ih,nhw,jw->nij", rows, group, cols, optimize=True))
    if not out:
        return np.zeros((0, size, size), np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


# ----------------------------------------------------------------------------- the model


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that turns images [N, H, W] (float in [0, 1]) into features [N, D].

    :class:`Auditor` is one (``Auditor.load()`` is the default); plug in your own, e.g. an
    Inception or TorchXRayVision wrapper, to compute FID or memorisation in its space.
    """

    name: str

    def __call__(self, images) -> np.ndarray: ...


@dataclass(frozen=True)
class AuditorPrediction:
    """What the auditor reads from N images, as probabilities.

    Attributes:
        finding_probs: float32 [N, F], independent sigmoid per finding.
        location_probs: float32 [N, L], softmax over the locations and ``none``.
        severity_probs: float32 [N, 4], softmax over none/mild/moderate/severe.
    """

    finding_probs: np.ndarray
    location_probs: np.ndarray
    severity_probs: np.ndarray
    finding_names: tuple[str, ...]
    location_names: tuple[str, ...]
    severity_names: tuple[str, ...] = SEVERITY_NAMES

    def __post_init__(self):
        n = len(self.finding_probs)
        for name, probs, names in (("finding_probs", self.finding_probs, self.finding_names),
                                   ("location_probs", self.location_probs, self.location_names),
                                   ("severity_probs", self.severity_probs, self.severity_names)):
            shape = np.shape(probs)
            if len(shape) != 2 or shape[0] != n or shape[1] != len(names):
                raise ValueError(f"{name} must have shape [{n}, {len(names)}]; got {shape}")

    def __len__(self) -> int:
        return len(self.finding_probs)

    @classmethod
    def concatenate(cls, parts: Sequence["AuditorPrediction"]) -> "AuditorPrediction":
        """One prediction from per-batch ones (same label names), in order."""
        if not parts:
            raise ValueError("concatenate needs at least one prediction")
        first = parts[0]
        for part in parts[1:]:
            if (part.finding_names, part.location_names, part.severity_names) != \
                    (first.finding_names, first.location_names, first.severity_names):
                raise ValueError("predictions with different label names cannot be concatenated")
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("finding_probs", "location_probs", "severity_probs")),
                   finding_names=first.finding_names, location_names=first.location_names,
                   severity_names=first.severity_names)

    def present(self, threshold: float = 0.5) -> np.ndarray:
        """bool [N, F]: each finding's probability >= ``threshold``; and ``no_finding`` also where
        nothing else is (an image with no finding read in it is read as normal, whatever the
        no_finding head said).

        Example:
            >>> names = ("no_finding", "cardiomegaly")
            >>> p = AuditorPrediction(np.array([[0.2, 0.1], [0.1, 0.9]], np.float32), np.ones((2, 1)),
            ...                       np.ones((2, 4)) / 4, names, ("none",))
            >>> p.present().tolist()
            [[True, False], [False, True]]
        """
        present = np.asarray(self.finding_probs) >= threshold
        if NO_FINDING in self.finding_names:
            j = self.finding_names.index(NO_FINDING)
            others = np.delete(present, j, axis=1)
            present[:, j] |= ~others.any(axis=1)
        return present

    def findings(self, threshold: float = 0.5) -> list[list[str]]:
        """Per image, the findings read as present (:meth:`present`), in vocabulary order."""
        return [[name for name, p in zip(self.finding_names, row) if p] for row in self.present(threshold)]

    def locations(self) -> list[str]:
        """Per image, the most probable location (or ``none``)."""
        return [self.location_names[i] for i in np.argmax(self.location_probs, axis=1)]

    def severities(self) -> list[str]:
        """Per image, the most probable severity (or ``none``)."""
        return [self.severity_names[i] for i in np.argmax(self.severity_probs, axis=1)]


def default_config() -> dict:
    """The architecture and label names of a fresh auditor, as written to ``config.json``."""
    vocab = get_vocabulary()
    return {
        "model_type": MODEL_TYPE,
        "version": AUDITOR_VERSION,
        "input_size": DEFAULT_INPUT_SIZE,
        "resize": "area",
        "space_to_depth": DEFAULT_SPACE_TO_DEPTH,
        "normalisation": "per-image standardisation (zero mean, unit variance)",
        "blocks": [list(block) for block in DEFAULT_BLOCKS],
        "embedding_dim": 192,
        "dropout": 0.2,
        "finding_names": list(vocab.findings),
        "location_names": list(vocab.locations) + [NO_LOCATION],
        "severity_names": list(SEVERITY_NAMES),
        "weights_dtype": "float16",
        "intended_use": INTENDED_USE,
        "training": None,
    }


def _check_config(config: Mapping) -> None:
    problems = []
    if config.get("model_type") != MODEL_TYPE:
        problems.append(f"model_type must be {MODEL_TYPE!r}; got {config.get('model_type')!r}")
    for key in ("input_size", "blocks", "embedding_dim", "finding_names", "location_names", "severity_names"):
        if key not in config:
            problems.append(f"missing key {key!r}")
    if not problems:
        downsampling = _total_stride(config)
        if config["input_size"] % downsampling:
            problems.append(f"input_size {config['input_size']} is not divisible by the total stride "
                            f"{downsampling} (space_to_depth x the blocks' strides)")
    if problems:
        raise ValueError("auditor config: " + "; ".join(problems))


def _total_stride(config: Mapping) -> int:
    """How many input pixels one cell of the last feature map spans per side."""
    # Configs written before version 2 have no space_to_depth key: 1 (no folding).
    return int(config.get("space_to_depth", 1)) * 2 ** sum(1 for _, stride in config["blocks"] if stride == 2)


def _build_network(config: Mapping):
    """The torch module a config describes (randomly initialised)."""
    import torch
    from torch import nn

    class AuditorNetwork(nn.Module):
        def __init__(self):
            super().__init__()
            fold = int(config.get("space_to_depth", 1))
            self.fold = nn.PixelUnshuffle(fold) if fold > 1 else nn.Identity()
            layers, channels = [], fold * fold
            for out_channels, stride in config["blocks"]:
                layers += [nn.Conv2d(channels, out_channels, 3, stride, 1, bias=False),
                           nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
                channels = out_channels
            self.features = nn.Sequential(*layers)
            side = config["input_size"] // _total_stride(config)
            # Flattened, not average-pooled: the location head needs to know where things are.
            self.embedding = nn.Linear(channels * side * side, config["embedding_dim"])
            self.dropout = nn.Dropout(config.get("dropout", 0.0))
            self.finding_head = nn.Linear(config["embedding_dim"], len(config["finding_names"]))
            self.location_head = nn.Linear(config["embedding_dim"], len(config["location_names"]))
            self.severity_head = nn.Linear(config["embedding_dim"], len(config["severity_names"]))

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            # Per-image standardisation: exposure and contrast differ between generators.
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / (std + 1e-3)
            return self.embedding(self.features(self.fold(x)).flatten(1))

        def forward(self, x: torch.Tensor):
            hidden = self.dropout(torch.relu(self.embed(x)))
            return self.finding_head(hidden), self.location_head(hidden), self.severity_head(hidden)

    return AuditorNetwork()


class Auditor:
    """The label-fidelity auditor and chest X-ray encoder.

    Build with :meth:`load` (shipped or saved weights) or :meth:`from_config` (random weights,
    for training and tests). Also a :class:`FeatureExtractor`: calling it embeds.

    Example:
        >>> auditor = Auditor.from_config(seed=0)
        >>> auditor.embed(np.zeros((3, 64, 64), np.float32)).shape
        (3, 192)
    """

    def __init__(self, network, config: Mapping):
        _check_config(config)
        self.network = network
        self.config = dict(config)
        self.network.eval()

    @property
    def name(self) -> str:
        return f"{MODEL_TYPE}-v{self.config.get('version', AUDITOR_VERSION)}"

    @property
    def finding_names(self) -> tuple[str, ...]:
        return tuple(self.config["finding_names"])

    @property
    def location_names(self) -> tuple[str, ...]:
        return tuple(self.config["location_names"])

    @property
    def severity_names(self) -> tuple[str, ...]:
        return tuple(self.config["severity_names"])

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])

    @classmethod
    def from_config(cls, config: Mapping | None = None, *, seed: int = 0) -> "Auditor":
        """A randomly initialised auditor (``default_config()`` unless given), seeded."""
        import torch

        config = dict(config or default_config())
        _check_config(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = _build_network(config)
        return cls(network, config)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Auditor":
        """Load an auditor from a folder holding ``config.json`` and ``model.safetensors``.

        Args:
            path: the folder; None loads the shipped ``synthmed/models/auditor``.

        Raises:
            FileNotFoundError: naming the folder and the missing files.

        Example:
            >>> auditor = Auditor.load()  # doctest: +SKIP
        """
        import torch
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else shipped_auditor_dir()
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
        if missing:
            shipped = {shipped_auditor_dir(f).resolve(): f for f in SHIPPED_AUDITORS}.get(folder.resolve())
            hint = ("" if shipped is None else "; build it with `make auditor`" if shipped == "phantom"
                    else f"; build it with `make auditor-{shipped}`")
            raise FileNotFoundError(f"auditor folder {folder} lacks {', '.join(missing)}{hint}")
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        _check_config(config)
        with torch.device("meta"):  # no random initial weights: nothing is drawn from the caller's torch stream
            network = _build_network(config)
        state = load_file(str(folder / WEIGHTS_NAME))
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        expected = network.state_dict()
        problems = sorted(set(expected) ^ set(state))
        problems += [k for k in expected if k in state and expected[k].shape != state[k].shape]
        if problems:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: "
                             f"tensors {', '.join(problems[:8])} are missing, extra or of another shape")
        with torch.no_grad():
            network.load_state_dict(state, assign=True)  # every tensor the file's (the checks above: all there)
        return cls(network, config)

    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and float16 ``model.safetensors`` into a folder; returns it.

        Example:
            >>> Auditor.from_config().save("out/my-auditor")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.detach().to("cpu").half() if v.is_floating_point() else v.detach().to("cpu")).contiguous()
                 for k, v in self.network.state_dict().items()}
        config = dict(self.config)
        config["weights_dtype"] = "float16"
        # one metadata key: safetensors writes the metadata from a hash map, so several keys come out in another
        # order at each save and the same weights would not give the same bytes (model_type and version are in
        # config.json)
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder

    def preprocess(self, images) -> np.ndarray:
        """Images [N, H, W] (float in [0, 1]) resized by area to float32 [N, S, S], S = input size."""
        return area_resize(images, self.input_size)

    def _run(self, images, batch_size: int, heads: bool):
        import torch

        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        pixels = self.preprocess(images)
        self.network.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(pixels), int(batch_size)):
                x = torch.from_numpy(pixels[start:start + int(batch_size)])[:, None]
                outputs.append(self.network(x) if heads else (self.network.embed(x),))
        return outputs

    def predict(self, images, batch_size: int = 64) -> AuditorPrediction:
        """Read findings, location and severity from images.

        Args:
            images: [N, H, W] float in [0, 1] (any size; resized by area), or a list of [H, W].

        Example:
            >>> p = Auditor.from_config().predict(np.zeros((1, 128, 128), np.float32))
            >>> len(p), len(p.finding_names), p.location_names[-1]
            (1, 19, 'none')
        """
        import torch

        outputs = self._run(images, batch_size, heads=True)
        if outputs:
            findings, locations, severities = (torch.cat(parts) for parts in zip(*outputs))
            probs = (torch.sigmoid(findings), torch.softmax(locations, 1), torch.softmax(severities, 1))
            probs = [p.numpy().astype(np.float32) for p in probs]
        else:
            probs = [np.zeros((0, len(names)), np.float32)
                     for names in (self.finding_names, self.location_names, self.severity_names)]
        return AuditorPrediction(*probs, finding_names=self.finding_names, location_names=self.location_names,
                                 severity_names=self.severity_names)

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """The penultimate-layer features, float32 [N, embedding_dim] (never all zero)."""
        outputs = self._run(images, batch_size, heads=False)
        if not outputs:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.concatenate([part[0].numpy() for part in outputs]).astype(np.float32)

    def __call__(self, images) -> np.ndarray:
        return self.embed(images)


def default_feature_extractor() -> FeatureExtractor:
    """The shipped auditor's encoder, the default feature space of the QC report."""
    return Auditor.load()


# ----------------------------------------------------------------------------- label fidelity


def _side_of(location: str) -> str:
    """right / left / bilateral / none for any location id, via the vocabulary's parents."""
    vocab = get_vocabulary()
    current = location
    while current in vocab.locations:
        parent = vocab.locations[current].parent
        if parent is None:
            return current
        current = parent
    for side in ("right", "left", "bilateral"):
        if location.startswith(side):
            return side
    return location


def _view_of(item) -> str | None:
    """The view of a case or manifest row (None where it carries none)."""
    view = item.get("view") if isinstance(item, Mapping) else getattr(item, "view", None)
    return view if isinstance(view, str) and view in get_vocabulary().views else None


def _region_of(location: str, view: str | None):
    """Where a location shows on a film of ``view`` (``none`` stays ``none``)."""
    vocab = get_vocabulary()
    return vocab.view_region(location, view) if location in vocab.locations else location


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _categorical_agreement(labelled: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict:
    n = len(names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labelled, predicted), 1)
    return {"accuracy": _ratio(int(np.trace(confusion)), len(labelled)),
            "support": int(len(labelled)),
            "labels": list(names),
            "confusion": confusion.tolist()}


def label_fidelity(prediction: AuditorPrediction, cases_or_label_rows: Sequence, *, threshold: float = 0.5) -> dict:
    """How well the auditor's reading of each image agrees with the image's labels.

    Labels are matched to the auditor's by :func:`label_targets` (parents of a labelled finding
    count as present; location and severity are those of the first finding that has one).

    Args:
        prediction: the auditor's output on N images.
        cases_or_label_rows: N Cases, manifest rows or findings strings, in the same order.
        threshold: finding probability at which a finding counts as present.

    Returns:
        A JSON-serialisable dict. A finding counts as read when :meth:`AuditorPrediction.present`
        says so (an image with nothing read in it counts as ``no_finding``).
        ``findings``: ``exact_set_agreement`` (fraction of images whose predicted set of leaf
        findings equals the labelled one; a parent labelled alone, e.g. ``support_devices``, is matched by
        any of its children read), ``mean_accuracy`` (over all findings), and per
        finding ``accuracy``, ``sensitivity``, ``specificity`` (None without positives /
        negatives), ``support`` (labelled positives) and ``confusion`` ``[[TN, FP], [FN, TP]]``
        (rows labelled absent/present, columns predicted);
        ``location``: ``accuracy`` (exact id), ``side_accuracy`` (right/left/bilateral/none),
        ``located_accuracy`` (exact, on images labelled with a location), ``region_accuracy`` (the
        predicted and labelled locations show in the same place on the image's view: height and side on a
        frontal film, height and depth on a lateral, where the side is not on the film) and ``confusion``
        (rows labelled, columns predicted, order ``labels``); ``severity``: the same without the
        side figures.

    Example:
        >>> p = AuditorPrediction(np.eye(19, dtype=np.float32)[[12, 0]], np.eye(16)[[13, 15]],
        ...                       np.eye(4)[[2, 0]], tuple(get_vocabulary().findings),
        ...                       tuple(get_vocabulary().locations) + ("none",))
        >>> report = label_fidelity(p, ["pleural_effusion:left:moderate", "pneumothorax:right:mild"])
        >>> report["findings"]["exact_set_agreement"], report["location"]["accuracy"]
        (0.5, 0.5)
    """
    if not isinstance(prediction, AuditorPrediction):
        raise TypeError(f"prediction must be an AuditorPrediction; got {type(prediction).__name__}")
    n = len(prediction)
    if len(cases_or_label_rows) != n:
        raise ValueError(f"cases_or_label_rows has {len(cases_or_label_rows)} entries for {n} predictions")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be within (0, 1); got {threshold!r}")
    finding_names, location_names = list(prediction.finding_names), list(prediction.location_names)
    severity_names = list(prediction.severity_names)
    targets = [label_targets(item, finding_names, location_names, severity_names) for item in cases_or_label_rows]
    views = [_view_of(item) for item in cases_or_label_rows]
    labelled = np.array([t[0] for t in targets], bool).reshape(n, len(finding_names))
    labelled_location = np.array([t[1] for t in targets], np.int64)
    labelled_severity = np.array([t[2] for t in targets], np.int64)
    predicted = prediction.present(threshold)

    per_finding = {}
    for j, name in enumerate(finding_names):
        tp = int((labelled[:, j] & predicted[:, j]).sum())
        fn = int((labelled[:, j] & ~predicted[:, j]).sum())
        fp = int((~labelled[:, j] & predicted[:, j]).sum())
        tn = n - tp - fn - fp
        per_finding[name] = {"accuracy": _ratio(tp + tn, n), "sensitivity": _ratio(tp, tp + fn),
                             "specificity": _ratio(tn, tn + fp), "support": tp + fn,
                             "confusion": [[tn, fp], [fn, tp]]}
    vocab = get_vocabulary()
    parents = {vocab.findings[name].parent for name in finding_names if name in vocab.findings}
    leaves = [j for j, name in enumerate(finding_names) if name not in parents]
    # a parent labelled alone (support_devices, lung_lesion: "some device", "some lesion") is matched by any of its
    # children that the auditor reads: those are not extra findings
    child_of = {j: finding_names.index(vocab.findings[name].parent) for j, name in enumerate(finding_names)
                if name in vocab.findings and vocab.findings[name].parent in finding_names}
    labelled_leaves = labelled[:, leaves].copy()
    for col, j in enumerate(leaves):
        if j in child_of:
            parent = child_of[j]
            siblings = [k for k, p in child_of.items() if p == parent]
            unspecified = labelled[:, parent] & ~labelled[:, siblings].any(axis=1)
            labelled_leaves[:, col] |= unspecified & predicted[:, j]
    exact = (labelled_leaves == predicted[:, leaves]).all(axis=1)
    accuracies = [v["accuracy"] for v in per_finding.values() if v["accuracy"] is not None]

    location = _categorical_agreement(labelled_location, np.argmax(prediction.location_probs, axis=1),
                                      location_names)
    sides = np.array([_side_of(name) for name in location_names])
    predicted_location = np.argmax(prediction.location_probs, axis=1)
    location["side_accuracy"] = _ratio(int((sides[labelled_location] == sides[predicted_location]).sum()), n)
    located = sides[labelled_location] != NO_LOCATION
    location["located_accuracy"] = _ratio(int((labelled_location == predicted_location)[located].sum()),
                                          int(located.sum()))
    location["located_support"] = int(located.sum())
    region = [_region_of(location_names[k], view) for k, view in zip(labelled_location, views)]
    read = [_region_of(location_names[k], view) for k, view in zip(predicted_location, views)]
    location["region_accuracy"] = _ratio(sum(a == b for a, b in zip(region, read)), n)
    location["region_is"] = ("where the film shows the location: height and side on a frontal film, height and "
                             "depth on a lateral one (the lungs superimpose there, so the side is not on the film)")
    severity = _categorical_agreement(labelled_severity, np.argmax(prediction.severity_probs, axis=1),
                                      severity_names)
    return {
        "n_images": n,
        "threshold": float(threshold),
        "findings": {"exact_set_agreement": _ratio(int(exact.sum()), n),
                     "mean_accuracy": float(np.mean(accuracies)) if accuracies else None,
                     "leaf_findings": [finding_names[j] for j in leaves],
                     "per_finding": per_finding},
        "location": location,
        "severity": severity,
    }


# ----------------------------------------------------------------------------- memorisation


def _leave_one_out_nearest(points: np.ndarray, metric: str, chunk: int = 1024) -> np.ndarray:
    """Each row's distance to its nearest *other* row (same metric as nearest_neighbours)."""
    if metric == "cosine":
        points = points / np.linalg.norm(points, axis=1, keepdims=True)
    sq = (points * points).sum(axis=1)
    nearest = np.zeros(len(points), np.int64)
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        if metric == "cosine":
            score = 1.0 - block @ points.T
        else:
            score = sq[start:start + chunk, None] + sq[None, :] - 2.0 * (block @ points.T)
        rows = np.arange(len(block))
        score[rows, rows + start] = np.inf
        nearest[start:start + chunk] = np.argmin(score, axis=1)
    if metric == "cosine":
        return np.clip(1.0 - (points * points[nearest]).sum(axis=1), 0.0, 2.0)
    return np.sqrt(((points - points[nearest]) ** 2).sum(axis=1))


def _summary(distances: np.ndarray) -> dict:
    return {"min": float(distances.min()), "p1": float(np.percentile(distances, 1)),
            "p5": float(np.percentile(distances, 5)), "p25": float(np.percentile(distances, 25)),
            "median": float(np.median(distances)), "mean": float(distances.mean()),
            "max": float(distances.max())}


def _plain(identifier):
    return identifier.item() if isinstance(identifier, np.generic) else identifier


def _space_audit(gen: np.ndarray, gen_ids: Sequence, train: np.ndarray, train_ids: Sequence,
                 metric: str, threshold: float | None) -> dict:
    indices, distances = nearest_neighbours(gen, train, metric=metric)
    training = _leave_one_out_nearest(train, metric) if len(train) > 1 else None
    if threshold is None:
        if training is None:
            raise ValueError("the default threshold needs at least 2 training images; give threshold=")
        threshold, source = float(np.percentile(training, 1)), "1st percentile of training-to-training " \
                                                               "nearest-neighbour distances"
    else:
        threshold, source = float(threshold), "given"
    nearest = [{"generated_id": _plain(g), "training_id": _plain(train_ids[i]), "distance": float(d)}
               for g, i, d in zip(gen_ids, indices, distances)]
    flagged = [row for row in nearest if row["distance"] <= threshold]
    return {"metric": metric, "threshold": threshold, "threshold_source": source,
            "distances": _summary(distances) if len(distances) else None,
            "training_distances": _summary(training) if training is not None else None,
            "flagged": flagged, "flagged_fraction": _ratio(len(flagged), len(nearest)), "nearest": nearest}


def memorisation_audit(gen_features, gen_ids: Sequence[Hashable], train_features, train_ids: Sequence[Hashable], *,
                       gen_pixels=None, train_pixels=None,
                       threshold: float | Mapping[str, float] | None = None) -> dict:
    """For each generated image, its nearest training image, and which are suspiciously close.

    Nearness is cosine distance in encoder space and, when pixels are given, L2 distance between
    the images area-resized to 64x64 (values in [0, 1], so at most 64). A generated image is
    flagged when its distance is at most the threshold; by default the 1st percentile of the
    training images' distances to their own nearest other training image, i.e. closer than real
    images are to each other.

    Args:
        gen_features, train_features: float [N_g, D] and [N_t, D] from the same extractor.
        gen_ids, train_ids: one id per row (strings or ints).
        gen_pixels, train_pixels: optional images [N, H, W] in [0, 1], both or neither.
        threshold: a float for encoder space, or ``{"encoder": ..., "pixel": ...}``; None for
            the defaults.

    Returns:
        JSON-serialisable ``{"n_generated", "n_training", "encoder": {...}, "pixel": {...} or None}``;
        each space holds ``threshold``, ``distances`` and ``training_distances`` summaries
        (min, p1, p5, p25, median, mean, max), ``flagged`` and ``nearest``, lists of
        ``{"generated_id", "training_id", "distance"}``, and ``flagged_fraction``.

    Example:
        >>> train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        >>> audit = memorisation_audit([[0.0, 2.0], [-1.0, 0.2]], ["g0", "g1"], train, ["t0", "t1", "t2"])
        >>> [row["training_id"] for row in audit["encoder"]["flagged"]]
        ['t1']
    """
    gen = np.asarray(gen_features, dtype=np.float64)
    train = np.asarray(train_features, dtype=np.float64)
    for name, features, ids in (("gen_features", gen, gen_ids), ("train_features", train, train_ids)):
        if features.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {features.shape}")
        if len(ids) != len(features):
            raise ValueError(f"{name} has {len(features)} rows but its ids list has {len(ids)}")
    if len(train) == 0:
        raise ValueError("train_features has no rows")
    if (gen_pixels is None) != (train_pixels is None):
        raise ValueError("give both gen_pixels and train_pixels, or neither")
    thresholds = dict(threshold) if isinstance(threshold, Mapping) else {"encoder": threshold}
    unknown = set(thresholds) - {"encoder", "pixel"}
    if unknown:
        raise ValueError(f"threshold keys must be 'encoder' and/or 'pixel'; got {sorted(unknown)}")
    result = {"n_generated": len(gen), "n_training": len(train),
              "encoder": _space_audit(gen, gen_ids, train, train_ids, "cosine", thresholds.get("encoder")),
              "pixel": None}
    if gen_pixels is not None:
        gen_small = area_resize(gen_pixels, MEMORISATION_PIXEL_SIZE).reshape(-1, MEMORISATION_PIXEL_SIZE ** 2)
        train_small = area_resize(train_pixels, MEMORISATION_PIXEL_SIZE).reshape(-1, MEMORISATION_PIXEL_SIZE ** 2)
        for name, small, ids in (("gen_pixels", gen_small, gen_ids), ("train_pixels", train_small, train_ids)):
            if len(small) != len(ids):
                raise ValueError(f"{name} has {len(small)} images but its ids list has {len(ids)}")
        result["pixel"] = _space_audit(gen_small.astype(np.float64), gen_ids, train_small.astype(np.float64),
                                       train_ids, "euclidean", thresholds.get("pixel"))
    return result
