"""A feature extractor from a local model folder: a torchvision or timm image model, its weights in safetensors.

``synthmed qc OUT --features FOLDER`` puts FID, KID, precision / recall and the embedding checks in a standard
feature space (an ImageNet DenseNet-121, torchxrayvision's chest X-ray DenseNet-121, a RadDINO-style ViT) instead of
the shipped auditor's embedding. The folder holds two files:

- ``config.json``: ``{"library": "torchvision", "architecture": "densenet121", ...}``, or timm's own config (as
  ``timm.models.save_for_hf`` writes it and timm's Hugging Face folders hold it: ``architecture``, ``num_classes``,
  ``model_args``, ``pretrained_cfg`` with ``input_size``, ``mean``, ``std``); a config without ``library`` is
  timm's. Preprocessing keys are read at the top level, then in ``pretrained_cfg``: ``input_size`` (``[C, H, W]``
  or one side; C is 1 or 3, a grey film is repeated over 3), ``mean``, ``std`` (per channel, on pixels in
  [0, 1]), ``interpolation`` (``bilinear`` or ``bicubic``). ``num_classes`` and ``model_args`` are passed to the
  library's constructor.
- ``model.safetensors``: the model's ``state_dict``. Nothing else is loaded: no pickle file, no code from the
  folder, no download (``pretrained=False`` / ``weights=None``).

The architecture is built by the library (``torchvision.models.get_model(name, weights=None)``,
``timm.create_model(name, pretrained=False)``), the weights must fit it (the classifier's own weights may be
missing or of another class count: the features are taken before it), and the features are the penultimate,
pooled ones: timm's ``forward_head(..., pre_logits=True)``; torchvision's output with the last ``Linear`` of the
classifier (``fc``, ``classifier``, ``heads`` or ``head``) replaced by an identity (DenseNet-121: 1024 features,
ResNet-50: 2048). Every problem is a :class:`synthmed.qc.inputs.QCError` (exit 2) naming the file and what is
wrong, raised before any image is read. docs/datasets.md gives the recipes that make such a folder.

Example:
    >>> extractor = load_feature_folder("features/densenet121")  # doctest: +SKIP
    >>> extractor.name  # doctest: +SKIP
    'torchvision:densenet121@sha256:3f1c0a9b2e4d'
    >>> extractor(np.zeros((2, 256, 256), np.float32)).shape  # doctest: +SKIP
    (2, 1024)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .inputs import QCError

LIBRARIES = ("torchvision", "timm")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "model.pth", "model.pt", "model.ckpt", "model.bin")
MAX_CONFIG_BYTES = 1 << 20          # a timm config with its label names is a few kB
MAX_WEIGHTS_BYTES = 8 << 30         # ViT-g/14 is 4.5 GB in float32
MAX_SIDE = 4096                     # input_size H and W
MAX_ARG_INTEGER = 1 << 16           # any whole number in model_args / num_classes (embed_dim, img_size, depth)
INTERPOLATIONS = ("bilinear", "bicubic")
# constructor arguments a config may not set: each loads weights (pickle, a download) or changes what is returned
REFUSED_ARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                "features_only", "weights", "weights_backbone", "progress"}
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")  # where torchvision models keep their classifier
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INSTALL = {"torchvision": "pip install 'synthmed[features]' (torchvision from the index your torch came from, e.g. "
                          "pip install --index-url https://download.pytorch.org/whl/cpu torchvision)",
           "timm": "pip install 'synthmed[features]' (timm needs torchvision: install it from the index your torch "
                   "came from, e.g. pip install --index-url https://download.pytorch.org/whl/cpu torchvision)",
           "torch": "pip install torch (a CPU build: pip install --index-url https://download.pytorch.org/whl/cpu torch)",
           "safetensors": "pip install safetensors"}


@dataclass(frozen=True)
class FolderConfig:
    """What ``config.json`` asks for, checked: the library, the architecture, its arguments, the preprocessing."""

    library: str
    architecture: str
    num_classes: int | None
    model_args: dict
    input_size: tuple[int, int, int]   # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    given: frozenset = frozenset()     # which of input_size, mean, std the config gave (the rest: defaults)


def looks_like_folder(text: str) -> bool:
    """Whether ``--features TEXT`` names a folder rather than ``module:attribute``: it exists as a folder, or
    it is written as a path (a slash, a leading dot or tilde) and is not ``module:attribute``.

    Example:
        >>> looks_like_folder("features/densenet121"), looks_like_folder("mypkg.features:Extractor")
        (True, False)
    """
    if Path(text).expanduser().is_dir():
        return True
    module, sep, attribute = text.partition(":")
    if sep and module.replace(".", "").replace("_", "").isalnum() and attribute.replace("_", "").isalnum():
        return False
    return "/" in text or "\\" in text or text.startswith((".", "~")) or not sep


def read_folder_config(folder: Path) -> FolderConfig:
    """Check the folder and its config.json (no torch, no weights read); QCError naming the file and the fault."""
    # 1. The folder and its files
    if not folder.exists():
        raise QCError(f"the feature extractor folder {folder} does not exist (--features takes a model folder "
                      f"with {CONFIG_FILE} and {WEIGHTS_FILE}, or module:attribute)")
    if not folder.is_dir():
        raise QCError(f"--features {folder} is a file; give the model folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise QCError(f"{config_path} is missing: a feature extractor folder names its model in {CONFIG_FILE} "
                      '(e.g. {"library": "torchvision", "architecture": "densenet121"}; docs/datasets.md)')
    if not weights.is_file():
        pickled = [name for name in PICKLE_FILES if (folder / name).is_file()]
        hint = (f"; it holds {', '.join(pickled)}, a pickle file synthmed does not load (it can run code): "
                f"save the state_dict with safetensors.torch.save_file (docs/datasets.md)" if pickled else "")
        raise QCError(f"{weights} is missing: the weights must be in safetensors{hint}")
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise QCError(f"{weights} is {size / 2**30:.1f} GiB, more than the {MAX_WEIGHTS_BYTES / 2**30:.0f} GiB "
                      "a feature extractor may be")
    # 2. config.json, bounded
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise QCError(f"{config_path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; it is not a model config")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise QCError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise QCError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return check_config(config, config_path)


def check_config(config: Mapping[str, Any], where: Path | str = CONFIG_FILE) -> FolderConfig:
    """The meaning of a config.json: every problem at once, each with its key; QCError naming the file.

    Example:
        >>> check_config({"library": "torchvision", "architecture": "densenet121"}).input_size
        (3, 224, 224)
        >>> try:
        ...     check_config({"library": "keras", "architecture": ""})
        ... except QCError as e:
        ...     print(e)
        config.json: library: 'keras' is not one synthmed builds (torchvision, timm); architecture: missing or empty
    """
    problems: list[str] = []
    pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), Mapping) else {}

    def value(key: str):
        return config[key] if key in config else pretrained_cfg.get(key)

    library = config.get("library", "timm")  # timm's own config.json has no library key
    if library not in LIBRARIES:
        problems.append(f"library: {library!r} is not one synthmed builds ({', '.join(LIBRARIES)})")
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture.strip():
        problems.append("architecture: missing or empty")
    elif ":" in architecture or "/" in architecture or "\\" in architecture:
        problems.append(f"architecture: {architecture!r} names a hub or a file; give the library's own model name "
                        "(e.g. densenet121, vit_base_patch14_dinov2)")
    num_classes = value("num_classes")
    if num_classes is not None and not _whole(num_classes, 0, MAX_ARG_INTEGER):
        problems.append(f"num_classes: {num_classes!r} is not a whole number from 0 to {MAX_ARG_INTEGER}")
    model_args = config.get("model_args", {})
    if not isinstance(model_args, Mapping):
        problems.append(f"model_args: must be an object of constructor arguments, got {type(model_args).__name__}")
        model_args = {}
    for key, arg in model_args.items():
        if key in REFUSED_ARGS:
            problems.append(f"model_args.{key}: not allowed (it loads weights or changes what the model returns; "
                            f"the weights come from {WEIGHTS_FILE} only)")
        elif not _plain(arg):
            problems.append(f"model_args.{key}: {arg!r} holds something other than numbers, strings, booleans and "
                            f"lists of them, or a number beyond {MAX_ARG_INTEGER}")
    given = {key: value(key) for key in ("input_size", "mean", "std")}
    channels, side = 3, (224, 224)
    input_size = given["input_size"]
    if input_size is not None:
        if _whole(input_size, 1, MAX_SIDE):
            side = (int(input_size), int(input_size))
        elif (isinstance(input_size, (list, tuple)) and len(input_size) == 3 and input_size[0] in (1, 3)
              and all(_whole(v, 1, MAX_SIDE) for v in input_size[1:])):
            channels, side = int(input_size[0]), (int(input_size[1]), int(input_size[2]))
        else:
            problems.append(f"input_size: {input_size!r} is neither [C, H, W] with C 1 or 3 and sides from 1 to "
                            f"{MAX_SIDE}, nor one side")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    stats = {}
    for key, default in (("mean", default_mean), ("std", default_std)):
        figures = given[key]
        if figures is None:
            stats[key] = default
            continue
        figures = [figures] if isinstance(figures, (int, float)) and not isinstance(figures, bool) else figures
        ok = (isinstance(figures, (list, tuple)) and len(figures) in (1, channels)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in figures)
              and (key == "mean" or all(v > 0 for v in figures)))
        if not ok:
            problems.append(f"{key}: {figures!r} must be {channels} finite number(s), one per channel"
                            + (", each above 0" if key == "std" else ""))
            stats[key] = default
        else:
            stats[key] = tuple(float(v) for v in figures) * (channels if len(figures) == 1 else 1)
    interpolation = value("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"  # timm's other choices (bicubic's kin, random) are training-time ones
    if problems:
        raise QCError(f"{where}: " + "; ".join(problems))
    return FolderConfig(library=str(library), architecture=architecture.strip(),
                        num_classes=None if num_classes is None else int(num_classes),
                        model_args=dict(model_args), input_size=(channels, *side), mean=stats["mean"],
                        std=stats["std"], interpolation=str(interpolation),
                        given=frozenset(k for k, v in given.items() if v is not None))


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _plain(value) -> bool:
    """JSON numbers (bounded), strings, booleans, null, and lists of them: what a constructor argument may be."""
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_ARG_INTEGER
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_plain(v) for v in value)
    return False


def _import(library: str, folder: Path):
    """The library's module, or QCError saying what to pip install (a torchvision that does not load beside this
    torch, as a CUDA build beside a CPU torch, says so)."""
    import importlib

    try:
        return importlib.import_module("torchvision.models" if library == "torchvision" else library)
    except ImportError as e:
        missing = getattr(e, "name", None) or library
        missing = missing.split(".")[0]
        raise QCError(f"the feature extractor folder {folder} needs {missing}, which is not installed: "
                      f"{INSTALL.get(missing, f'pip install {missing}')}") from None
    except Exception as e:  # torchvision built for another torch fails at import with a RuntimeError
        raise QCError(f"the feature extractor folder {folder} needs {library}, which is installed but does not load "
                      f"({type(e).__name__}: {e}); install the build that matches your torch: "
                      f"{INSTALL['torchvision']}") from None


def _weights_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header (nothing loaded)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise QCError(f"reading {weights} needs safetensors, which is not installed: {INSTALL['safetensors']}") from None
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as e:  # a truncated or foreign file
        raise QCError(f"{weights} is not a safetensors file ({type(e).__name__}: {e})") from None


def _build(config: FolderConfig, folder: Path):
    """(the model, with random weights, the names of its classifier's parameters)."""
    module = _import(config.library, folder)
    kwargs = dict(config.model_args)
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    where = folder / CONFIG_FILE
    if config.library == "timm":
        if not module.is_model(config.architecture):
            close = module.list_models(f"*{config.architecture.split('.')[0][:12]}*")[:8]
            raise QCError(f"{where}: architecture {config.architecture!r} is not a timm model (timm "
                          f"{getattr(module, '__version__', '?')})" + (f"; close: {', '.join(close)}" if close else ""))
        try:
            model = module.create_model(config.architecture, pretrained=False, **kwargs)
        except Exception as e:
            raise QCError(f"{where}: timm cannot build {config.architecture!r} with {kwargs} "
                          f"({type(e).__name__}: {e})") from None
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        head = _parameter_names(model, classifier)
        return model, head
    known = module.list_models(module=module)
    if config.architecture not in known:
        close = [name for name in known if config.architecture[:5].lower() in name][:8]
        raise QCError(f"{where}: architecture {config.architecture!r} is not a torchvision classification model"
                      + (f"; close: {', '.join(close)}" if close else f" (known: {', '.join(known[:12])}, ...)"))
    try:
        model = module.get_model(config.architecture, weights=None, **kwargs)
    except Exception as e:
        raise QCError(f"{where}: torchvision cannot build {config.architecture!r} with {kwargs} "
                      f"({type(e).__name__}: {e})") from None
    last = _last_linear(model)
    if last is None:
        raise QCError(f"{where}: {config.architecture!r} has no Linear classifier ({', '.join(HEAD_ATTRIBUTES)}) to "
                      "take the features before")
    return model, {f"{last}.weight", f"{last}.bias"}


def _parameter_names(model, part) -> set[str]:
    if part is None:
        return set()
    mine = {id(p) for p in part.parameters()} | {id(b) for b in part.buffers()}
    return {name for name, tensor in list(model.named_parameters()) + list(model.named_buffers()) if id(tensor) in mine}


def _last_linear(model) -> str | None:
    """The qualified name of the last Linear layer of a torchvision model's classifier, or None."""
    import torch

    for attribute in HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if not isinstance(head, torch.nn.Module):
            continue
        if isinstance(head, torch.nn.Linear):
            return attribute
        linears = [name for name, m in head.named_modules() if isinstance(m, torch.nn.Linear)]
        if linears:
            return f"{attribute}.{linears[-1]}"
    return None


def _check_fit(model_shapes: Mapping[str, tuple], file_shapes: Mapping[str, tuple], head: set[str], weights: Path,
               config: FolderConfig) -> None:
    """Every tensor of the model (but its classifier's) in the file, of the same shape, and nothing else there."""
    # BatchNorm's num_batches_tracked counts training steps: eval mode never reads it
    missing = [k for k in model_shapes if k not in file_shapes and k not in head
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in file_shapes if k not in model_shapes]
    wrong = [f"{k} {list(file_shapes[k])} (the model's: {list(model_shapes[k])})" for k in model_shapes
             if k in file_shapes and k not in head and tuple(file_shapes[k]) != tuple(model_shapes[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for what, names in (("missing", missing), ("not in the model", unexpected), ("of another shape", wrong)):
        if names:
            parts.append(f"{len(names)} {what}: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else ""))
    raise QCError(f"{weights} does not fit {config.library} {config.architecture!r} as {CONFIG_FILE} builds it "
                  f"({'; '.join(parts)}); check architecture, num_classes and model_args")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderFeatures:
    """A FeatureExtractor: float32 images [N, H, W] in [0, 1] -> the model's penultimate pooled features [N, D].

    Each image is resized whole to the config's H x W (no crop: a film's edges are part of it), repeated over the
    channels, normalised by mean and std, and run through the model in eval mode without gradients.
    """

    def __init__(self, model, config: FolderConfig, name: str):
        self.model, self.config, self.name = model, config, name
        self.preprocessing = {"input_size": list(config.input_size), "mean": list(config.mean),
                              "std": list(config.std), "interpolation": config.interpolation}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if x.ndim != 3:
            raise ValueError(f"images must be [N, H, W], got shape {tuple(x.shape)}")
        channels, height, width = self.config.input_size
        x = x[:, None]
        if x.shape[-2:] != (height, width):
            x = torch.nn.functional.interpolate(x, size=(height, width), mode=self.config.interpolation,
                                                antialias=True, align_corners=False)
        x = x.expand(-1, channels, -1, -1)
        mean = torch.tensor(self.config.mean, dtype=torch.float32).view(1, channels, 1, 1)
        std = torch.tensor(self.config.std, dtype=torch.float32).view(1, channels, 1, 1)
        x = (x - mean) / std
        with torch.inference_mode():
            if self.config.library == "timm":
                out = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            else:
                out = self.model(x)
        out = out.reshape(out.shape[0], -1)
        return out.double().numpy()


def load_feature_folder(folder: str | Path) -> FolderFeatures:
    """Build the folder's model and load its weights; QCError (exit 2) naming the file and the fault.

    Example:
        >>> load_feature_folder("features/xrv-densenet121").name  # doctest: +SKIP
        'torchvision:densenet121@sha256:9b1e0c4d7f2a'
    """
    # 1. Check inputs: the folder, config.json, the safetensors header
    folder = Path(folder).expanduser()
    config = read_folder_config(folder)
    weights = folder / WEIGHTS_FILE
    file_shapes = _weights_shapes(weights)
    try:
        import torch
    except ImportError:
        raise QCError(f"the feature extractor folder {folder} needs torch: {INSTALL['torch']}") from None
    # 2. Build the architecture (random weights) and check the file fits it
    model, head = _build(config, folder)
    state = model.state_dict()
    _check_fit({k: tuple(v.shape) for k, v in state.items()}, file_shapes, head, weights, config)
    # 3. Load the weights (safetensors only), then cut the classifier off
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(weights), device="cpu").items() if k not in head}
    model.load_state_dict(tensors, strict=False)  # what is left out is the classifier's, checked above
    if config.library == "torchvision":
        parent, _, leaf = _last_linear(model).rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    model = model.float().eval()
    if config.library == "timm" and len(config.given) < 3:
        config = _timm_defaults(model, config)
    name = f"{config.library}:{config.architecture}@sha256:{_sha256(weights)[:12]}"
    return FolderFeatures(model, config, name)


def _timm_defaults(model, config: FolderConfig) -> FolderConfig:
    """The model's own pretrained_cfg preprocessing where config.json gave none (timm knows each model's)."""
    import dataclasses

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mine = {"input_size": list(config.input_size), "mean": list(config.mean), "std": list(config.std)}
    merged_keys = {k: mine[k] if k in config.given else cfg.get(k) for k in mine}
    try:
        merged = check_config({"library": "timm", "architecture": config.architecture,
                               **{k: v for k, v in merged_keys.items() if v is not None}})
    except QCError:  # a model whose own defaults do not read: keep the config's (ImageNet's) figures
        return config
    return dataclasses.replace(config, input_size=merged.input_size, mean=merged.mean, std=merged.std)
