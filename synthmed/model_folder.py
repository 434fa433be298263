"""Reading a diffusers model folder safely: the checks, the component loading and the content hash.

A model folder is untrusted data. ``check_model_folder`` reads only bounded JSON (no torch, no weights) and
refuses, naming the file, anything that is not a Stable-Diffusion-shaped latent-diffusion text-to-image folder:
a custom pipeline or component class (code from the folder), a class of another kind in a slot (unet, vae,
text_encoder, tokenizer, scheduler), pickle files unless pickle is explicitly allowed, a UNet or scheduler that
synthmed's text-to-image sampling cannot take (conditioning beyond the text, flow matching), configs beyond the
limits below. ``load_component`` then loads one slot offline, safetensors unless pickle is allowed, never
with remote code, and refuses weights that do not fit. A folder may also hold a tiny decoder, ``tiny_vae/`` (a
TAESD-style diffusers ``AutoencoderTiny`` that ``synthmed distill`` trains; not in model_index.json), checked by
``check_tiny_decoder`` and loaded by ``load_component`` under the same rules. ``model_hash`` is the sha256 of the
files that make an image. The diffusion backend (``synthmed.backends.diffusion``) and ``synthmed.finetune`` read
model folders through here.

Example:
    >>> try:
    ...     check_model_folder("no/such/model")
    ... except ModelFolderError as e:
    ...     print(str(e).split(" (")[0])
    model folder no/such/model does not exist
    >>> index = check_model_folder("path/to/model", width=256, height=256)  # doctest: +SKIP
    >>> unet = load_component(Path("path/to/model"), index, "unet", dtype=torch.float32)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

# The slots of model_index.json that are read, those that hold weights, and the libraries a slot's class may name.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
# The optional tiny decoder's folder: a diffusers AutoencoderTiny beside the slots, not listed in model_index.json
# (diffusers' own loading ignores it), decoding the UNet's scaled latents (generator.decoder: tiny).
TINY_DECODER = "tiny_vae"
TINY_DECODER_CLASS = "AutoencoderTiny"
SAFE_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Limits on what a model folder may ask for, checked before anything is read whole or built (README, "Your own
# model"). They admit any Stable Diffusion 1.x/2.x fine-tune (UNet 0.86 G parameters, CLIP ViT-H 0.34 G) with room.
MAX_CONFIG_BYTES = 16 * 2**20  # model_index.json and every component's JSON config
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20  # each file of the tokenizer folder (vocabulary, merges, tokenizer.json)
MAX_COMPONENT_PARAMETERS = 3_000_000_000  # per component, as estimated from its config: 12 GB in float32
MAX_COMPONENT_LAYERS = 1000  # resnet / transformer / encoder layers per component
MAX_CONFIG_INTEGER = 2**20  # any whole number in a component config (vocabularies reach 256 K)
MAX_TRAIN_TIMESTEPS = 100_000  # and any whole number in the scheduler config (Stable Diffusion: 1000)
# What synthmed's text-to-image loop samples: a UNet predicting noise (or v, or the sample) for its own input, from
# the text alone, under a DDPM-family beta schedule that each of its samplers rebuilds from the folder's config.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # pndm and euler_ancestral all but sample
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # the ones all of synthmed's samplers know
# UNet config keys that add an input beyond the text (class labels; SDXL-style added text/time embeddings, image
# embeddings or a projection of the text states), which synthmed's sampling does not give
UNET_EXTRA_CONDITIONING = ("num_class_embeds", "class_embed_type", "addition_embed_type", "encoder_hid_dim_type",
                           "encoder_hid_dim")
# What each slot must hold: the library base class its class must derive from (a vae must also encode and decode).
SLOT_KINDS = {"unet": ("diffusers", "UNet2DConditionModel", "a diffusers UNet2DConditionModel"),
              "vae": ("diffusers", "ModelMixin", "a diffusers autoencoder such as AutoencoderKL or AutoencoderTiny"),
              "text_encoder": ("transformers", "PreTrainedModel", "a transformers model such as CLIPTextModel"),
              "tokenizer": ("transformers", "PreTrainedTokenizerBase",
                            "a transformers tokenizer such as CLIPTokenizer"),
              "scheduler": ("diffusers", "SchedulerMixin", "a diffusers scheduler such as DDIMScheduler")}


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the folder and the file."""


# ----------------------------------------------------------------------------- checks (no torch)

def check_model_folder(path: str | Path, *, allow_pickle: bool = False, width: int | None = None,
                       height: int | None = None) -> dict:
    """Check a diffusers folder before anything is loaded; returns its model_index.json.

    Reads only JSON, each file bounded by MAX_CONFIG_BYTES; imports diffusers and transformers (when installed)
    to check each slot's class, but builds nothing and reads no weights.

    Args:
        path: the folder, as saved by ``pipeline.save_pretrained``.
        allow_pickle: accept .bin/.ckpt/.pt/.pth/.pkl files (they can run code when loaded).
        width, height: image size to check against the VAE x UNet downsampling factor, if given.

    Raises:
        ModelFolderError: naming the folder and the file at fault.

    Example:
        >>> index = check_model_folder("path/to/model", width=256, height=256)  # doctest: +SKIP
        >>> index["unet"]  # doctest: +SKIP
        ['diffusers', 'UNet2DConditionModel']
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ModelFolderError(f"model folder {root} is a file, not a folder (generator.model must be 'default', "
                               "'default-fast' or a local diffusers pipeline folder, as saved by "
                               "pipeline.save_pretrained)")
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist (generator.model must be 'default', "
                               f"'default-fast' or a local diffusers pipeline folder; a relative path is taken from "
                               f"{Path.cwd()})")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ModelFolderError(f"{index_file} is missing: {root} is not a diffusers pipeline folder "
                               "(save one with pipeline.save_pretrained)")
    index = _read_config(index_file)
    class_name = index.get("_class_name", "")
    if not isinstance(class_name, str):  # ["module", "Class"] is diffusers' form for a custom pipeline's code
        raise ModelFolderError(f"{index_file}: _class_name {class_name!r} names a custom pipeline, whose code would "
                               "run from the model folder; only diffusers pipeline classes are loaded")
    if "text_encoder_2" in index or "XL" in class_name:
        raise ModelFolderError(f"{index_file}: {class_name} has two text encoders (SDXL-style); synthmed runs "
                               "single-text-encoder latent-diffusion pipelines (Stable Diffusion 1.x/2.x style)")
    missing = [c for c in REQUIRED_COMPONENTS if not (isinstance(index.get(c), list) and index[c] and index[c][0])]
    if missing:
        raise ModelFolderError(f"{index_file}: {class_name or 'this pipeline'} is not a latent-diffusion text-to-image "
                               f"pipeline (no {', '.join(missing)})")
    for name in REQUIRED_COMPONENTS:
        entry = index[name]
        if len(entry) != 2 or not all(isinstance(part, str) for part in entry):
            raise ModelFolderError(f"{index_file}: component '{name}' must be [library, class], e.g. "
                                   f"[\"diffusers\", \"DDIMScheduler\"] (found {json.dumps(entry)[:200]})")
    _check_pipeline_class(class_name, index_file)
    for name in REQUIRED_COMPONENTS:
        library, cls = index[name]
        if library not in SAFE_LIBRARIES:
            raise ModelFolderError(f"{index_file}: component '{name}' comes from '{library}.{cls}', which would run code "
                                   f"from the model folder; only diffusers and transformers classes are loaded")
        _check_slot_class(name, library, cls, index_file)
        folder = root / name
        if not folder.is_dir():
            raise ModelFolderError(f"{folder} is missing (model_index.json lists '{name}')")
        config = "scheduler_config.json" if name == "scheduler" else None if name == "tokenizer" else "config.json"
        if config and not (folder / config).is_file():
            raise ModelFolderError(f"{folder / config} is missing")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        pickled = [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
        if name in WEIGHTED_COMPONENTS:
            for weights in _loaded_weights(folder, [p for p in files if p.parent == folder]):
                check_safetensors_file(weights)
            if not any(p.name.endswith(".safetensors") for p in files if p.parent == folder):
                weights = [p for p in pickled if p.parent == folder]  # from_pretrained reads the folder, not below
                if not weights:
                    raise ModelFolderError(f"{folder} has no weights (*.safetensors)")
                if not allow_pickle:
                    raise ModelFolderError(f"{weights[0]} is a pickle file, which can run code when loaded; "
                                           "convert it to safetensors, or allow it if you trust it (--allow-pickle, "
                                           "generator.allow_pickle: true)")
        elif pickled and not allow_pickle:  # a scheduler or tokenizer has no weights: a pickle here is never needed
            raise ModelFolderError(f"{pickled[0]} is a pickle file, which can run code when loaded, and a {name} has "
                                   "no weights; remove it, or allow it if you trust it (--allow-pickle, "
                                   "generator.allow_pickle: true)")
        if name == "tokenizer":
            for file in files:
                if file.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
                    raise ModelFolderError(f"{file} is {_mib(file.stat().st_size)}; the limit for a tokenizer file is "
                                           f"{_mib(MAX_TOKENIZER_FILE_BYTES)}")
    _check_sizes(root)
    vae_config, unet_config = (_read_config(root / name / "config.json") for name in ("vae", "unet"))
    if vae_config.get("latent_channels", 4) != unet_config.get("in_channels", 4):
        raise ModelFolderError(f"{root}: the VAE makes {vae_config.get('latent_channels', 4)} latent channels but the "
                               f"UNet takes {unet_config.get('in_channels', 4)} (vae/config.json latent_channels, "
                               "unet/config.json in_channels)")
    _check_unet_inputs(unet_config, root / "unet" / "config.json")
    _check_noise_schedule(root, index)
    factor = 2 ** (len(vae_config.get("block_out_channels", [1])) - 1)
    factor *= 2 ** (len(unet_config.get("block_out_channels", [1])) - 1)
    for label, size in (("width", width), ("height", height)):
        if size is not None and size % factor:
            raise ModelFolderError(f"{label} {size} does not suit {root}: sizes must be multiples of {factor} "
                                   "(the VAE's scale factor times the UNet's downsampling)")
    return index


def _check_unet_inputs(config: dict, path: Path) -> None:
    """A UNet that synthmed's loop can sample: its output is a prediction for its own input, conditioned on the
    text alone."""
    channels_in, channels_out = config.get("in_channels", 4), config.get("out_channels", 4)
    if channels_out != channels_in:
        raise ModelFolderError(f"{path}: in_channels {json.dumps(channels_in)[:40]} but out_channels "
                               f"{json.dumps(channels_out)[:40]}: synthmed samples UNets that predict noise for their "
                               "own latents (not a learned variance too, nor inpainting or depth UNets)")
    for key in UNET_EXTRA_CONDITIONING:
        if config.get(key) is not None:
            what = "class labels" if "class" in key else "inputs beyond the text (SDXL-style added text and time " \
                   "embeddings, image embeddings or a text projection)"
            raise ModelFolderError(f"{path}: {key} {json.dumps(config[key])[:60]}: the UNet is conditioned on {what}, "
                                   "which synthmed's text-to-image sampling does not give; such UNets are not "
                                   "supported")


def _check_noise_schedule(root: Path, index: dict) -> None:
    """A scheduler of the DDPM family (a beta schedule synthmed's samplers rebuild), with a prediction type and
    beta schedule they know; flow-matching and other schedulers would be sampled as the wrong process."""
    path = root / "scheduler" / "scheduler_config.json"
    config = _read_config(path)
    for where, cls_name in ((root / "model_index.json", index["scheduler"][1]), (path, config.get("_class_name"))):
        if isinstance(cls_name, str) and not _is_beta_schedule(cls_name, where):
            raise ModelFolderError(f"{where}: the scheduler is {cls_name}, not a DDPM-family (beta schedule) scheduler "
                                   "such as DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler; "
                                   "synthmed samples noise-prediction latent-diffusion models only (not flow-matching "
                                   "ones)")
    if config.get("use_flow_sigmas"):
        raise ModelFolderError(f"{path}: use_flow_sigmas is set: the model is flow-matching, which synthmed's "
                               "samplers do not sample")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        flow = "; the model is flow-matching" if prediction == "flow_prediction" else ""
        raise ModelFolderError(f"{path}: prediction_type {json.dumps(prediction)[:60]} is not one synthmed samples "
                               f"({', '.join(PREDICTION_TYPES)}){flow}")
    betas = config.get("trained_betas")
    schedule = config.get("beta_schedule", "linear")
    if not (isinstance(betas, list) and betas) and schedule not in BETA_SCHEDULES:
        raise ModelFolderError(f"{path}: beta_schedule {json.dumps(schedule)[:60]} is not one synthmed's samplers know "
                               f"({', '.join(BETA_SCHEDULES)}; or give trained_betas)")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ModelFolderError(f"{path}: num_train_timesteps {json.dumps(steps)[:60]} must be a whole number of at "
                               "least 1 (Stable Diffusion: 1000)")


def _is_beta_schedule(cls_name: str, where: Path | str = "scheduler_config.json") -> bool:
    """Whether diffusers' scheduler ``cls_name`` is of the DDPM family: it takes a beta schedule (beta_schedule,
    trained_betas), as DDPM, DDIM, PNDM, Euler, DPM-Solver, UniPC and LCM do and flow-matching or EDM ones do not."""
    try:
        with quiet_libraries():
            import diffusers

            cls = getattr(diffusers, cls_name, None) if cls_name.isidentifier() else None
    except ImportError:  # checked again when the backend loads
        return True
    if not isinstance(cls, type):
        return False
    _check_installed(cls, f"{where}: the scheduler is {cls_name}", "scheduler")
    params = inspect.signature(cls.__init__).parameters
    return "beta_schedule" in params and "trained_betas" in params


def _read_config(path: Path) -> dict:
    """A JSON object from ``path``, read only up to MAX_CONFIG_BYTES."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelFolderError(f"{path} is larger than {_mib(MAX_CONFIG_BYTES)}, the limit for a model config file")
    try:
        config = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelFolderError(f"{path} nests arrays or objects too deeply to be a model config") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path} must hold a JSON object (found {type(config).__name__})")
    return config


def _loaded_weights(folder: Path, files: Sequence[Path]) -> list[Path]:
    """The safetensors files of a component folder that loading reads: the plain weights where they are there
    (a spare ``*.fp16.safetensors`` beside them is not read), else every variant's."""
    weights = [p for p in files if p.name.endswith(".safetensors")]
    plain = [p for p in weights if any(p.name == f"{stem}.safetensors" or
                                       re.fullmatch(rf"{stem}-\d+-of-\d+\.safetensors", p.name)
                                       for stem in WEIGHTS_STEMS)]
    return plain or weights


def check_safetensors_file(path: Path) -> None:
    """A safetensors file whole: its header readable JSON, and as many bytes after it as the header's tensors
    span. A copy or download cut short fails here by name, not later inside the loader with "Unable to load
    weights". Reads the header only (bounded by MAX_CONFIG_BYTES).

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> _ = file.write_bytes(b"not weights")
        >>> try:
        ...     check_safetensors_file(file)
        ... except ModelFolderError as e:
        ...     print(str(e).split(": ", 1)[1][:40])
        not a safetensors file (its header is no
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            start = fh.read(8)
            length = int.from_bytes(start, "little") if len(start) == 8 else -1
            raw = fh.read(length) if 0 < length <= min(MAX_CONFIG_BYTES, size - 8) else b""
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8")) if raw else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        if start.startswith(b"version ") or start == b"version":  # "version https://git-lfs.github.com/spec/v1"
            raise ModelFolderError(f"{path} is a Git LFS pointer, not the weights: fetch them (git lfs pull) "
                                   "in the folder's repository")
        cut = " or cut short" if size < 8 or length > size - 8 else ""
        raise ModelFolderError(f"{path}: not a safetensors file (its header is not readable{cut}); copy or convert "
                               "the weights again")
    try:
        end = max([int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelFolderError(f"{path}: not a safetensors file (its header lists tensors without data_offsets); "
                               "copy or convert the weights again") from None
    expected = 8 + length + end
    if size < expected:
        raise ModelFolderError(f"{path} is cut short: {size:,} bytes of the {expected:,} its header lists (an "
                               "interrupted copy or download?); copy the weights again")


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size:,} bytes"


def _check_installed(cls: Any, what: str, slot: str) -> None:
    """diffusers and transformers export a stand-in (a ``DummyObject``) for each class whose optional library is
    not installed; name that library rather than call the class unknown or of the wrong kind."""
    if type(cls).__name__ != "DummyObject":
        return
    needed = [b for b in getattr(cls, "_backends", None) or () if b not in ("torch", "transformers")]
    missing = [b for b in needed if importlib.util.find_spec(b) is None] or needed  # (an import name may differ)
    other = (", or name DPMSolverMultistepScheduler there: synthmed samples with generator.scheduler whatever "
             "the folder names") if slot == "scheduler" else ""
    raise ModelFolderError(f"{what}, which needs the optional librar{'y' if len(missing) == 1 else 'ies'} "
                           f"{', '.join(missing) or 'its library names'}; that is not installed here (or does not "
                           f"import): install it (pip install {' '.join(missing)}){other}")


def _check_slot_class(name: str, library: str, cls_name: str, index_file: Path) -> None:
    """The class model_index.json puts in a slot must be of that slot's kind (a model class in the scheduler slot
    would load pickled weights from a folder that should hold none)."""
    base_library, base_name, kind = SLOT_KINDS[name]
    try:
        with quiet_libraries():
            import diffusers
            import transformers

            module = diffusers if library == "diffusers" else transformers
            cls = getattr(module, cls_name, None) if cls_name.isidentifier() else None
    except ImportError:  # checked again when the backend loads
        return
    _check_installed(cls, f"{index_file}: component '{name}' is {library}.{cls_name}", name)
    base = getattr(diffusers if base_library == "diffusers" else transformers, base_name)
    fits = isinstance(cls, type) and issubclass(cls, base)
    if fits and name == "vae":
        fits = callable(getattr(cls, "encode", None)) and callable(getattr(cls, "decode", None))
    if not fits:
        what = f"{library} has no such class" if cls is None else "a class of another kind"
        raise ModelFolderError(f"{index_file}: component '{name}' is {library}.{cls_name}, {what}; the {name} slot "
                               f"takes {kind}")


def _check_sizes(root: Path) -> None:
    """Refuse configs that ask for more than the limits (layers, parameters, timesteps) before anything is built."""
    for name in WEIGHTED_COMPONENTS:
        path = root / name / "config.json"
        _check_component_size(name, _read_config(path), path)
    path = root / "scheduler" / "scheduler_config.json"
    config = _read_config(path)
    _check_integers(config, path, MAX_TRAIN_TIMESTEPS)
    betas = config.get("trained_betas")
    if isinstance(betas, list) and len(betas) > MAX_TRAIN_TIMESTEPS:
        raise ModelFolderError(f"{path}: trained_betas has {len(betas):,} values; the limit is {MAX_TRAIN_TIMESTEPS:,}")
    path = root / "tokenizer" / "tokenizer_config.json"
    if path.is_file():
        length = _read_config(path).get("model_max_length")
        if length is not None and (isinstance(length, bool) or not isinstance(length, (int, float)) or length < 1):
            raise ModelFolderError(f"{path}: model_max_length {json.dumps(length)[:100]} must be a whole number of at "
                                   "least 1 (the longest prompt in tokens; CLIP's is 77)")


def _check_component_size(name: str, config: dict, path: Path) -> None:
    """A unet, vae or text_encoder config within the limits: whole numbers, layers, parameters."""
    _check_integers(config, path, MAX_CONFIG_INTEGER)
    params, layers = estimate_size(name, config, path)
    if layers > MAX_COMPONENT_LAYERS:
        raise ModelFolderError(f"{path}: a {name} of {layers:,} layers ({_sizes_text(name, config, _LAYER_KEYS)}); "
                               f"the limit is {MAX_COMPONENT_LAYERS:,} layers per component")
    if params > MAX_COMPONENT_PARAMETERS:
        raise ModelFolderError(f"{path}: a {name} of about {params / 1e9:,.1f} G parameters, "
                               f"{params * 4 / 1e9:,.0f} GB in float32 ({_sizes_text(name, config, _SIZE_KEYS)}); "
                               f"the limit is {MAX_COMPONENT_PARAMETERS / 1e9:g} G parameters per component")


def check_tiny_decoder(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """Check a model folder's tiny decoder (``tiny_vae/``) before it is loaded; returns its config.json.

    Reads only JSON (each file bounded by MAX_CONFIG_BYTES) and file names: the folder must hold a diffusers
    ``AutoencoderTiny`` within the limits, with safetensors weights (pickle ones only with ``allow_pickle``), that
    decodes the latents of the folder's VAE (its latent channels) at the VAE's scale factor.

    Raises:
        ModelFolderError: naming the folder (it has no tiny decoder) or the file at fault.

    Example:
        >>> try:
        ...     check_tiny_decoder("no/such/model")
        ... except ModelFolderError as e:
        ...     print(str(e).split(" (")[0])
        no/such/model has no tiny decoder
    """
    root = Path(path)
    folder = root / TINY_DECODER
    if not folder.is_dir():
        raise ModelFolderError(f"{root} has no tiny decoder ({folder} is missing): generator.decoder tiny (--decoder "
                               f"tiny) decodes with a diffusers {TINY_DECODER_CLASS} saved there, as synthmed distill "
                               "can train one; use generator.decoder full (--decoder full), the folder's own VAE")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFolderError(f"{config_file} is missing")
    config = _read_config(config_file)
    class_name = config.get("_class_name")
    if class_name != TINY_DECODER_CLASS:
        raise ModelFolderError(f"{config_file}: _class_name {json.dumps(class_name)[:100]} is not "
                               f"{TINY_DECODER_CLASS}; the tiny decoder ({TINY_DECODER}/) must be a diffusers "
                               f"{TINY_DECODER_CLASS} (TAESD-style); no other class is loaded from there")
    _check_component_size("vae", config, config_file)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for weights in _loaded_weights(folder, files):
        check_safetensors_file(weights)
    if not any(p.name.endswith(".safetensors") for p in files):
        weights = [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
        if not weights:
            raise ModelFolderError(f"{folder} has no weights (*.safetensors)")
        if not allow_pickle:
            raise ModelFolderError(f"{weights[0]} is a pickle file, which can run code when loaded; convert it to "
                                   "safetensors, or allow it if you trust it (--allow-pickle, generator.allow_pickle: "
                                   "true)")
    vae_config = _read_config(root / "vae" / "config.json")
    latents, tiny_latents = vae_config.get("latent_channels", 4), config.get("latent_channels", 4)
    if tiny_latents != latents:
        raise ModelFolderError(f"{config_file}: the tiny decoder takes {json.dumps(tiny_latents)[:40]} latent channels "
                               f"but the VAE makes {latents} (vae/config.json latent_channels)")
    stages = _ints(config, "decoder_block_out_channels", [64] * 4, config_file)
    factor = _int(config, "upsampling_scaling_factor", 2, config_file) ** (len(stages) - 1)
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", [1])) - 1)
    if factor != vae_factor:
        raise ModelFolderError(f"{config_file}: the tiny decoder upsamples {factor}x but the VAE's scale factor is "
                               f"{vae_factor} (decoder_block_out_channels and upsampling_scaling_factor; "
                               "vae/config.json block_out_channels)")
    return config


def _check_integers(config: dict, path: Path, limit: int) -> None:
    """Every whole number in a config, at any depth, within ±limit."""
    todo = [("", config)]
    while todo:
        where, node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else key
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
                raise ModelFolderError(f"{path}: {here} {value} is beyond the limit of {limit:,}")
            if isinstance(value, (dict, list)):
                todo.append((here, value))


# the config keys that estimate_size reads, named in its refusals
_LAYER_KEYS = ("block_out_channels", "encoder_block_out_channels", "decoder_block_out_channels", "layers_per_block",
               "num_encoder_blocks", "num_decoder_blocks", "transformer_layers_per_block", "num_hidden_layers",
               "num_layers", "num_decoder_layers", "n_layer", "n_layers")
_SIZE_KEYS = _LAYER_KEYS + ("cross_attention_dim", "time_embedding_dim", "num_class_embeds", "encoder_hid_dim",
                            "projection_class_embeddings_input_dim", "hidden_size", "d_model", "n_embd", "dim",
                            "intermediate_size", "d_ff", "n_inner", "hidden_dim", "num_heads", "d_kv", "vocab_size",
                            "max_position_embeddings", "n_positions", "projection_dim")


def _sizes_text(name: str, config: dict, keys: Sequence[str]) -> str:
    configs = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    found = [f"{k} {json.dumps(c[k])}" for c in configs for k in keys if c.get(k) is not None]
    return ", ".join(found) or f"the {name} sizes"


def estimate_size(name: str, config: dict, path: Path | str = "config.json") -> tuple[int, int]:
    """An upper estimate of (parameters, layers) of a unet, vae or text_encoder from its config, building nothing.

    Within 1.5x of the real count for Stable Diffusion's UNet, VAE and CLIP text encoders (a test checks this);
    sizes that are missing take diffusers' and transformers' defaults.

    Example:
        >>> estimate_size("text_encoder", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        ...                                "vocab_size": 49408, "max_position_embeddings": 77})[1]
        12
    """
    if name == "text_encoder":
        nested = [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
        sizes = [_text_model_size(c, path) for c in [config] + nested]
        return sum(p for p, _ in sizes), sum(n for _, n in sizes)
    channels = _ints(config, "block_out_channels", [320, 640, 1280, 1280] if name == "unet" else [64], path)
    if name == "vae" and "encoder_block_out_channels" in config:  # AutoencoderTiny
        channels = _ints(config, "encoder_block_out_channels", [64], path) + \
            _ints(config, "decoder_block_out_channels", [64], path)
        counts = _ints(config, "num_encoder_blocks", [1, 3, 3, 3], path) + \
            _ints(config, "num_decoder_blocks", [3, 3, 3, 1], path)
        counts = (counts + [counts[-1]] * len(channels))[:len(channels)]
        return sum(n * 27 * c * c + 9 * c * c for n, c in zip(counts, channels)), sum(counts)
    per_level = _per_level(config, "layers_per_block", 2 if name == "unet" else 1, len(channels), path)
    if name == "vae":
        # encoder: n resnets and a downsampler per level; decoder: n + 1 resnets and an upsampler; a mid block each
        c_last = channels[-1]
        params = sum((2 * n + 1) * 22 * c * c + 18 * c * c for n, c in zip(per_level, channels))
        params += 2 * (2 * 22 + 4) * c_last * c_last
        return params, sum(2 * n + 1 for n in per_level) + 6
    # unet: per level n down and n + 1 up resnets (time-conditioned), as many transformer blocks where it attends
    transformers_per = _per_level(config, "transformer_layers_per_block", 1, len(channels), path)
    cross = _per_level(config, "cross_attention_dim", 1280, len(channels), path)
    time_dim = _int(config, "time_embedding_dim", 4 * channels[0], path)
    down, up = (list(config.get(k) or []) if isinstance(config.get(k), list) else [] for k in ("down_block_types",
                                                                                             "up_block_types"))
    up = up[::-1]  # the up blocks run from the deepest level back
    attends = [not (down or up) or any("Attn" in str(t) for t in (down[i:i + 1] + up[i:i + 1]))
               for i in range(len(channels))]
    in_ch, out_ch = _int(config, "in_channels", 4, path), _int(config, "out_channels", 4, path)
    params = 9 * (in_ch + out_ch) * channels[0] + channels[0] * time_dim + time_dim * time_dim
    for key in ("num_class_embeds", "projection_class_embeddings_input_dim", "time_cond_proj_dim"):
        params += (_int(config, key, 0, path) + time_dim) * time_dim
    params += _int(config, "encoder_hid_dim", 0, path) * max(cross)
    layers = 0
    for c, n, t, d, attn in zip(channels, per_level, transformers_per, cross, attends):
        blocks = 2 * n + 1
        params += blocks * (27 * c * c + time_dim * c) + 18 * c * c
        layers += blocks
        if attn:
            params += blocks * (t * (18 * c * c + 2 * c * d) + 2 * c * c)
            layers += blocks * t
    c, t, d = channels[-1], transformers_per[-1], cross[-1]
    params += 2 * (27 * c * c + time_dim * c) + t * (18 * c * c + 2 * c * d) + 2 * c * c
    return params, layers + 2 + t


def _text_model_size(config: dict, path) -> tuple[int, int]:
    """A transformer encoder: embeddings, then per layer attention (4 h x inner) and a (possibly gated) MLP."""
    width = next((_int(config, k, 0, path) for k in ("hidden_size", "d_model", "n_embd", "dim") if config.get(k)), 0)
    if not width:
        return 0, 0
    mlp = next((_int(config, k, 0, path) for k in ("intermediate_size", "d_ff", "n_inner", "hidden_dim")
                if config.get(k)), 4 * width)
    inner = _int(config, "num_heads", 0, path) * _int(config, "d_kv", 0, path) or width
    layers = sum(_int(config, k, 0, path) for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers",
                                                    "num_decoder_layers"))
    embeddings = sum(_int(config, k, 0, path) for k in ("vocab_size", "max_position_embeddings", "n_positions",
                                                        "type_vocab_size", "projection_dim"))
    return embeddings * width + width * width + layers * (4 * width * inner + 3 * width * mlp + 12 * width), layers


def _int(config: dict, key: str, default: int, path) -> int:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFolderError(f"{path}: {key} must be a whole number of at least 0, got {json.dumps(value)[:100]}")
    return value


def _ints(config: dict, key: str, default: list[int], path) -> list[int]:
    value = config.get(key)
    if value is None:
        return list(default)
    if not isinstance(value, list) or not value:
        value = [value]
    return [_int({key: v}, key, 0, path) for v in value]


def _per_level(config: dict, key: str, default: int, levels: int, path) -> list[int]:
    """A size given once or per level (``[1, 2, 10]``, or per layer as ``[[1, 1], [2, 2]]``), one value per level."""
    value = config.get(key)
    if isinstance(value, list):
        values = [max(_ints({key: v}, key, [default], path)) if isinstance(v, list)
                  else _int({key: v}, key, default, path) for v in value] or [default]
        return (values + [values[-1]] * levels)[:levels] if len(values) < levels else values
    return [_int(config, key, default, path)] * levels


def _check_pipeline_class(class_name: str, index_file: Path) -> None:
    """The folder's pipeline class must be a diffusers text-to-image latent-diffusion pipeline."""
    try:
        with quiet_libraries():
            import diffusers

            cls = getattr(diffusers, class_name, None) if class_name.isidentifier() else None
    except ImportError:  # checked again when the backend loads
        return
    if cls is None:
        raise ModelFolderError(f"{index_file}: _class_name {class_name!r} is not a diffusers pipeline class")
    params = inspect.signature(cls.__init__).parameters
    if not all(c in params for c in REQUIRED_COMPONENTS):
        raise ModelFolderError(f"{index_file}: {class_name} is not a latent-diffusion text-to-image pipeline "
                               f"(it does not take {', '.join(c for c in REQUIRED_COMPONENTS if c not in params)})")


@contextlib.contextmanager
def quiet_libraries():
    """transformers' and diffusers' own progress bars and log lines stay off while synthmed imports and loads:
    it reports every loading problem itself, and its progress bar is the only one (``-q`` turns that off).

    Example:
        >>> with quiet_libraries():
        ...     import diffusers  # its "requires torchvision" lines do not reach the user
    """
    saved = []
    for library in ("transformers", "diffusers"):
        try:
            logging = importlib.import_module(f"{library}.utils.logging")
        except ImportError:
            continue
        saved.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
        logging.set_verbosity(logging.ERROR)
        if saved[-1][2]:
            logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in reversed(saved):
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


# ----------------------------------------------------------------------------- hash and loading

def model_hash(path: str | Path) -> str:
    """sha256 over the relative path and bytes of model_index.json and every file of the components that make
    an image (unet, vae, text_encoder, tokenizer, scheduler, and the tiny decoder ``tiny_vae/`` where there is
    one); a model card or notes beside them do not count.

    Example:
        >>> model_hash("path/to/model")[:12]  # doctest: +SKIP
        'f4806b4f8e90'
    """
    root = Path(path)
    digest = hashlib.sha256()
    files = [root / "model_index.json"] + [p for c in REQUIRED_COMPONENTS + (TINY_DECODER,)
                                           for p in (root / c).rglob("*")]
    for file in sorted(p for p in files if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"):
        digest.update(str(file.relative_to(root)).encode("utf-8") + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


WEIGHTS_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weights file names


def weights_variant(folder: Path, dtype=None) -> str | None:
    """The variant to load from a folder that holds only variant weights (``diffusion_pytorch_model.fp16.safetensors``,
    as ``save_pretrained(variant="fp16")`` and many hub folders save them); None where plain weights are there.
    Of several variants, the one of ``dtype`` (fp16, bf16) is taken; otherwise the folder is refused.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
        >>> weights_variant(folder)
        'fp16'
    """
    names = {p.name for p in folder.iterdir() if p.is_file()}
    if any(f"{stem}.safetensors" in names or f"{stem}.safetensors.index.json" in names for stem in WEIGHTS_STEMS):
        return None
    stems = "|".join(WEIGHTS_STEMS)
    pattern = re.compile(rf"(?:{stems})\.(\w+)\.safetensors|(?:{stems})\.safetensors\.index\.(\w+)\.json")
    variants = sorted({m.group(1) or m.group(2) for m in map(pattern.fullmatch, names) if m})
    if len(variants) <= 1:
        return variants[0] if variants else None
    wanted = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype))
    if wanted in variants:
        return wanted
    raise ModelFolderError(f"{folder} holds weights of several variants ({', '.join(variants)}) and no plain "
                           "ones; keep one of them, or save the plain weights (save_pretrained without variant)")


def load_component(root: Path, index: dict, name: str, *, dtype, allow_pickle: bool = False):
    """One component of a checked folder (see check_model_folder): offline, safetensors first, no remote code.

    Args:
        root: the folder; index: its model_index.json, as check_model_folder returned it.
        name: a slot of REQUIRED_COMPONENTS, or TINY_DECODER (checked by check_tiny_decoder; its index entry is
            ``["diffusers", "AutoencoderTiny"]``). dtype: a torch dtype for the weighted slots.
        allow_pickle: load pickle weights when a slot has no safetensors.

    Raises:
        ModelFolderError: when the class is missing, loading fails, or weights are missing or of another shape
        (weights the class does not use only warn).

    Example:
        >>> index = check_model_folder(root)  # doctest: +SKIP
        >>> unet = load_component(root, index, "unet", dtype=torch.float32)  # doctest: +SKIP
    """
    with quiet_libraries():
        import diffusers
        import transformers

        library, cls_name = index[name]
        module = diffusers if library == "diffusers" else transformers
        cls = getattr(module, cls_name, None)
    if cls is None:
        raise ModelFolderError(f"{root / 'model_index.json'}: {library} has no class {cls_name} "
                               f"(component '{name}'); is {library} too old?")
    folder = root / name
    kwargs: dict[str, Any] = {"local_files_only": True}
    weighted = name in WEIGHTED_COMPONENTS or name == TINY_DECODER
    if weighted:
        has_safetensors = any(p.suffix == ".safetensors" for p in folder.iterdir())
        kwargs["use_safetensors"] = True if has_safetensors or not allow_pickle else False
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
        variant = weights_variant(folder, dtype) if has_safetensors else None
        if variant:
            kwargs["variant"] = variant
    if weighted:
        kwargs["output_loading_info"] = True
    try:
        with quiet_libraries():
            loaded = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # a broken folder fails in many ways inside diffusers / transformers / safetensors
        raise ModelFolderError(f"could not load {folder} as {library}.{cls_name}: {type(e).__name__}: {e}") from None
    if not weighted:
        return loaded
    component, info = loaded
    # from_pretrained fills missing weights with random values, silently: refuse that. Weights it does not
    # use (a text encoder saved with its projection head) change nothing, so they only get a warning.
    listed = {kind: sorted(str(k) for k in info.get(key) or ()) for kind, key in (
        ("missing", "missing_keys"), ("of another shape", "mismatched_keys"), ("not used", "unexpected_keys"))}
    text = {kind: f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for kind, keys in listed.items() if keys}
    if "missing" in text or "of another shape" in text:
        raise ModelFolderError(f"the weights in {folder} do not fit {library}.{cls_name} as configured: "
                               f"{'; '.join(text.values())}")
    if text:
        warnings.warn(f"{folder}: weights {text['not used']} are not part of {library}.{cls_name}; they are ignored",
                      stacklevel=2)
    return component
