"""The diffusion backend: any local diffusers latent-diffusion text-to-image model.

Loads a Stable-Diffusion-shaped folder (model_index.json naming a unet, vae, text_encoder,
tokenizer and scheduler) offline, component by component, from safetensors unless pickle is
explicitly allowed, never with remote code. Then runs its own denoising loop so that:

- every case has its own CPU ``torch.Generator`` seeded from the case seed: an image does
  not depend on its batch, the batch size or the shard;
- each distinct (prompt, emphasis) is encoded once per run, in a bounded LRU cache;
- emphasis weights scale the embeddings of the emphasised words only.

With no emphasis, the result equals ``StableDiffusionPipeline(..., generator=[g])`` for the
same settings (tests check this).

Example:
    >>> backend = DiffusionBackend("path/to/model", width=256, height=256, steps=20)  # doctest: +SKIP
    >>> images = backend.generate(cases, prompts)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from . import BackendInfo, GeneratedImage

# name -> (diffusers scheduler class, config overrides)
SCHEDULERS = {
    "dpm_solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
SAFE_LIBRARIES = ("diffusers", "transformers")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
DTYPES = ("float32", "bfloat16", "float16")
# Limits on what a model folder may ask for, checked before anything is read whole or built (README, "Your own
# model"). They admit any Stable Diffusion 1.x/2.x fine-tune (UNet 0.86 G parameters, CLIP ViT-H 0.34 G) with room.
MAX_CONFIG_BYTES = 16 * 2**20  # model_index.json and every component's JSON config
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20  # each file of the tokenizer folder (vocabulary, merges, tokenizer.json)
MAX_COMPONENT_PARAMETERS = 3_000_000_000  # per component, as estimated from its config: 12 GB in float32
MAX_COMPONENT_LAYERS = 1000  # resnet / transformer / encoder layers per component
MAX_CONFIG_INTEGER = 2**20  # any whole number in a component config (vocabularies reach 256 K)
MAX_TRAIN_TIMESTEPS = 100_000  # and any whole number in the scheduler config (Stable Diffusion: 1000)
# What each slot must hold: the library base class its class must derive from (a vae must also encode and decode).
SLOT_KINDS = {"unet": ("diffusers", "UNet2DConditionModel", "a diffusers UNet2DConditionModel"),
              "vae": ("diffusers", "ModelMixin", "a diffusers autoencoder such as AutoencoderKL or AutoencoderTiny"),
              "text_encoder": ("transformers", "PreTrainedModel", "a transformers model such as CLIPTextModel"),
              "tokenizer": ("transformers", "PreTrainedTokenizerBase",
                            "a transformers tokenizer such as CLIPTokenizer"),
              "scheduler": ("diffusers", "SchedulerMixin", "a diffusers scheduler such as DDIMScheduler")}
# The UNet and VAE always run on exactly this many cases (padded), because CPU convolution
# kernels pick their algorithm by batch size: the same case in a batch of 1 and of 4 differs
# in the last float bits. At a fixed batch size a case's result does not depend on its
# position or its neighbours, so fixed micro-batches make images independent of batch_size.
# Dynamic int8 quantisation scales activations over the whole batch, so with it each case runs alone.
MICRO_BATCH = 8


class ModelFolderError(ValueError):
    """A model folder that cannot be used; the message names the folder and the file."""


# ----------------------------------------------------------------------------- checks (no torch)

def check_model_folder(path: str | Path, *, allow_pickle: bool = False, width: int | None = None,
                       height: int | None = None) -> dict:
    """Check a diffusers folder before anything is loaded; returns its model_index.json.

    Raises:
        ModelFolderError: naming the folder and the file at fault.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ModelFolderError(f"model folder {root} is a file, not a folder (generator.model must be 'default' or a "
                               "local diffusers pipeline folder, as saved by pipeline.save_pretrained)")
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist (generator.model must be 'default' or a local "
                               f"diffusers pipeline folder; a relative path is taken from {Path.cwd()})")
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
    factor = 2 ** (len(vae_config.get("block_out_channels", [1])) - 1)
    factor *= 2 ** (len(unet_config.get("block_out_channels", [1])) - 1)
    for label, size in (("width", width), ("height", height)):
        if size is not None and size % factor:
            raise ModelFolderError(f"{label} {size} does not suit {root}: sizes must be multiples of {factor} "
                                   "(the VAE's scale factor times the UNet's downsampling)")
    return index


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


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size:,} bytes"


def _check_slot_class(name: str, library: str, cls_name: str, index_file: Path) -> None:
    """The class model_index.json puts in a slot must be of that slot's kind (a model class in the scheduler slot
    would load pickled weights from a folder that should hold none)."""
    base_library, base_name, kind = SLOT_KINDS[name]
    try:
        with _quiet_libraries():
            import diffusers
            import transformers

            module = diffusers if library == "diffusers" else transformers
            cls = getattr(module, cls_name, None) if cls_name.isidentifier() else None
    except ImportError:  # checked again when the backend loads
        return
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
        config = _read_config(path)
        _check_integers(config, path, MAX_CONFIG_INTEGER)
        params, layers = estimate_size(name, config, path)
        if layers > MAX_COMPONENT_LAYERS:
            raise ModelFolderError(f"{path}: a {name} of {layers:,} layers ({_sizes_text(name, config, _LAYER_KEYS)}); "
                                   f"the limit is {MAX_COMPONENT_LAYERS:,} layers per component")
        if params > MAX_COMPONENT_PARAMETERS:
            raise ModelFolderError(f"{path}: a {name} of about {params / 1e9:,.1f} G parameters, "
                                   f"{params * 4 / 1e9:,.0f} GB in float32 ({_sizes_text(name, config, _SIZE_KEYS)}); "
                                   f"the limit is {MAX_COMPONENT_PARAMETERS / 1e9:g} G parameters per component")
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
        with _quiet_libraries():
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
def _quiet_libraries():
    """transformers' and diffusers' own progress bars and log lines stay off while synthmed imports and loads:
    it reports every loading problem itself, and its progress bar is the only one (``-q`` turns that off)."""
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


def model_hash(path: str | Path) -> str:
    """sha256 over the relative path and bytes of model_index.json and every file of the components that make
    an image (unet, vae, text_encoder, tokenizer, scheduler); a model card or notes beside them do not count."""
    root = Path(path)
    digest = hashlib.sha256()
    files = [root / "model_index.json"] + [p for c in REQUIRED_COMPONENTS for p in (root / c).rglob("*")]
    for file in sorted(p for p in files if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"):
        digest.update(str(file.relative_to(root)).encode("utf-8") + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_component(root: Path, index: dict, name: str, *, dtype, allow_pickle: bool = False):
    """One component of a checked folder (see check_model_folder): offline, safetensors first, no remote code."""
    with _quiet_libraries():
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
    if name in WEIGHTED_COMPONENTS:
        has_safetensors = any(p.suffix == ".safetensors" for p in folder.iterdir())
        kwargs["use_safetensors"] = True if has_safetensors or not allow_pickle else False
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    if name in WEIGHTED_COMPONENTS:
        kwargs["output_loading_info"] = True
    try:
        with _quiet_libraries():
            loaded = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # a broken folder fails in many ways inside diffusers / transformers / safetensors
        raise ModelFolderError(f"could not load {folder} as {library}.{cls_name}: {type(e).__name__}: {e}") from None
    if name not in WEIGHTED_COMPONENTS:
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


# ----------------------------------------------------------------------------- the backend

class DiffusionBackend:
    """Generate images from a local diffusers latent-diffusion folder (see the module docstring).

    Args:
        model: path of the diffusers folder.
        width, height: image size; multiples of the model's VAE x UNet factor.
        steps, guidance_scale, scheduler: sampling settings (scheduler: a key of ``SCHEDULERS``).
        dtype: float32, bfloat16 or float16.
        device: auto, cpu, cuda or mps.
        allow_pickle: allow .bin/.ckpt weights (they can run code when loaded).
        compile: wrap the UNet in ``torch.compile``.
        quantize: ``"int8"`` for dynamic int8 quantisation of the UNet's Linear layers (CPU).
        coarse_to_fine: ``{"scale": 0.5, "strength": 0.6}``: generate at scale x size, upscale, refine.
        threads: torch CPU threads (default: all cores).
        cache_size: prompt embeddings kept.
    """

    def __init__(self, model: str | Path, *, width: int = 256, height: int = 256, steps: int = 20,
                 guidance_scale: float = 4.0, scheduler: str = "dpm_solver", dtype: str = "float32",
                 device: str = "auto", allow_pickle: bool = False, compile: bool = False,
                 quantize: str | None = None, coarse_to_fine: dict | None = None, threads: int | None = None,
                 cache_size: int = 1024, model_id: str | None = None):
        # 1. Check inputs (before torch or any weight is touched)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}")
        if quantize not in (None, "none", "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if coarse_to_fine:
            scale, strength = coarse_to_fine.get("scale", 0.5), coarse_to_fine.get("strength", 0.6)
            if not (0.1 <= scale < 1 and 0 < strength <= 1):
                raise ValueError(f"coarse_to_fine needs 0.1 <= scale < 1 and 0 < strength <= 1, got {coarse_to_fine}")
            self.coarse_to_fine = {"scale": float(scale), "strength": float(strength)}
        else:
            self.coarse_to_fine = None
        self.root = Path(model)
        self.index = check_model_folder(self.root, allow_pickle=allow_pickle, width=width, height=height)
        self.width, self.height, self.steps = int(width), int(height), int(steps)
        self.guidance_scale, self.scheduler_name = float(guidance_scale), scheduler
        self.allow_pickle = allow_pickle
        self.quantize = None if quantize in (None, "none") else quantize
        self.micro_batch = 1 if self.quantize else MICRO_BATCH

        import torch

        # 2. Threads and device
        self.threads = int(threads or os.cpu_count() or 1)
        torch.set_num_threads(self.threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for, but this torch has no MPS (Apple GPU) support")
        if self.quantize and device != "cpu":
            raise ValueError("quantize: int8 (dynamic quantisation) runs on the CPU only")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)

        # 3. Load components (offline, safetensors first, no remote code)
        self.unet = self._load("unet").to(self.device).eval()
        self.vae = self._load("vae").to(self.device).eval()
        self.text_encoder = self._load("text_encoder").to(self.device).eval()
        self.tokenizer = self._load("tokenizer")
        self._setup(self._load("scheduler"), scheduler, dtype, compile, cache_size, model_id or self.root.name,
                    model_hash(self.root))

    @classmethod
    def from_components(cls, *, unet, vae, text_encoder, tokenizer, scheduler, width: int = 256, height: int = 256,
                        steps: int = 20, guidance_scale: float = 4.0, scheduler_name: str = "dpm_solver",
                        threads: int | None = None, model_id: str = "in-memory") -> "DiffusionBackend":
        """A backend over components already in memory (e.g. a model being trained); float32 on their device.

        Example:
            >>> backend = DiffusionBackend.from_components(unet=u, vae=v, text_encoder=t, tokenizer=tok,
            ...                                            scheduler=s, width=256, height=256)  # doctest: +SKIP
        """
        import torch

        self = cls.__new__(cls)
        self.root, self.index, self.allow_pickle = Path(model_id), {}, False
        self.width, self.height, self.steps = int(width), int(height), int(steps)
        self.guidance_scale, self.scheduler_name = float(guidance_scale), scheduler_name
        self.quantize, self.micro_batch, self.coarse_to_fine = None, MICRO_BATCH, None
        self.threads = int(threads or torch.get_num_threads())
        self.device, self.dtype = next(unet.parameters()).device, torch.float32
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self._setup(scheduler, scheduler_name, "float32", False, 64, model_id, "in-memory")
        return self

    def _setup(self, base_scheduler, scheduler: str, dtype: str, compile: bool, cache_size: int, model_id: str,
               weights_hash: str) -> None:
        """Everything after the components are in place: checks, the scheduler, int8, compile, the cache."""
        import torch

        words, embedded = len(self.tokenizer), getattr(self.text_encoder.config, "vocab_size", None)
        if words < 3:  # an empty tokenizer folder loads as a tokenizer of its special tokens only
            raise ModelFolderError(f"{self.root / 'tokenizer'}: the tokenizer has {words} tokens; its vocabulary files "
                                   "are missing")
        if embedded is not None and words > embedded:
            raise ModelFolderError(f"{self.root}: the tokenizer has {words} tokens but the text encoder embeds only "
                                   f"{embedded} (text_encoder/config.json vocab_size)")
        hidden = getattr(self.text_encoder.config, "hidden_size", None) or getattr(self.text_encoder.config, "d_model", None)
        if hidden != self.unet.config.cross_attention_dim:
            raise ModelFolderError(f"{self.root}: the text encoder's width ({hidden}) does not match the UNet's "
                                   f"cross_attention_dim ({self.unet.config.cross_attention_dim})")
        import diffusers

        cls_name, overrides = SCHEDULERS[scheduler]
        self.scheduler_config = getattr(diffusers, cls_name).from_config(base_scheduler.config, **overrides).config
        self._scheduler_cls = getattr(diffusers, cls_name)
        if self.quantize == "int8":
            from torch.ao.quantization import quantize_dynamic

            self.unet = quantize_dynamic(self.unet, {torch.nn.Linear}, dtype=torch.qint8)
        if compile:
            self.unet = torch.compile(self.unet)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_length = self._max_length()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.cache_size = int(cache_size)
        self.cache_stats = {"hits": 0, "misses": 0, "size": 0}
        settings = {"micro_batch": self.micro_batch, "steps": self.steps, "guidance_scale": self.guidance_scale,
                    "scheduler": scheduler, "dtype": dtype, "device": str(self.device), "threads": self.threads,
                    "compile": bool(compile), "quantize": self.quantize or "none", "coarse_to_fine": self.coarse_to_fine,
                    "width": self.width, "height": self.height, "torch": torch.__version__,
                    "diffusers": diffusers.__version__}
        self.info = BackendInfo(name="diffusion", model_id=model_id, model_hash=weights_hash, settings=settings)

    def _load(self, name: str):
        return load_component(self.root, self.index, name, dtype=self.dtype, allow_pickle=self.allow_pickle)

    def _max_length(self) -> int:
        length = getattr(self.tokenizer, "model_max_length", None)
        positions = getattr(self.text_encoder.config, "max_position_embeddings", None)
        if length is not None and (not isinstance(length, (int, float)) or length < 1):  # e.g. set in code, not config
            raise ModelFolderError(f"{self.root / 'tokenizer'}: the tokenizer's model_max_length is {length!r}; it must "
                                   "be a whole number of at least 1 (the longest prompt in tokens)")
        if not length or length > 100_000:
            length = positions or 77
        return int(min(length, positions or length))

    # -- prompts
    def embed(self, text: str, weights: Sequence = ()):
        """The text encoder's output for a prompt, [1, L, D], with emphasis applied; cached."""
        key = (text, tuple((e.start, e.end, float(e.weight)) for e in weights if e.weight != 1.0))
        if key in self._cache:
            self._cache.move_to_end(key)
            self.cache_stats["hits"] += 1
            return self._cache[key]
        self.cache_stats["misses"] += 1
        value = self._encode(text, key[1])
        self._cache[key] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self.cache_stats["size"] = len(self._cache)
        return value

    def _encode(self, text: str, spans: tuple):
        import torch

        tok = self.tokenizer
        if not spans:
            ids = tok(text, padding="max_length", max_length=self.max_length, truncation=True,
                      return_tensors="pt").input_ids
            token_weights = None
        else:
            from ..prompts import Emphasis, Prompt

            pieces = Prompt(text, weights=tuple(Emphasis(s, e, w, "") for s, e, w in spans)).segments()
            body, body_w = [], []
            for piece, weight in pieces:
                piece_ids = tok(piece, add_special_tokens=False).input_ids
                body += piece_ids
                body_w += [weight] * len(piece_ids)
            prefix, suffix = self._special_tokens()
            keep = max(self.max_length - len(prefix) - len(suffix), 0)
            body, body_w = body[:keep], body_w[:keep]
            full = prefix + body + suffix
            weights = [1.0] * len(prefix) + body_w + [1.0] * len(suffix)
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            full += [pad] * (self.max_length - len(full))
            weights += [1.0] * (self.max_length - len(weights))
            ids = torch.tensor([full])
            token_weights = torch.tensor(weights)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):  # as diffusers' encode_prompt does
            pad = tok.pad_token_id
            kwargs["attention_mask"] = (ids != pad).long().to(self.device) if pad is not None else None
        with torch.inference_mode():
            hidden = self.text_encoder(ids.to(self.device), **kwargs)[0]
        if token_weights is not None:
            hidden = hidden * token_weights.to(hidden.device, hidden.dtype)[None, :, None]
        return hidden

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids a tokenizer puts before and after a text (e.g. CLIP's BOS/EOS, BERT's CLS/SEP)."""
        tok = self.tokenizer
        plain = tok("a", add_special_tokens=False).input_ids
        full = tok("a").input_ids
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return [], []

    # -- generation
    def generate(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        """One image per case; each depends only on its case (seed) and its prompt."""
        images: list[GeneratedImage] = []
        m = self.micro_batch
        for i in range(0, len(cases), m):
            images += self._generate_micro_batch(cases[i:i + m], prompts[i:i + m])
        return images

    def _generate_micro_batch(self, cases: Sequence, prompts: Sequence) -> list[GeneratedImage]:
        import torch

        n, pad = len(cases), self.micro_batch - len(cases)
        with torch.inference_mode():
            # 1. Prompt embeddings, [negative..., prompt...] as diffusers orders them; padding rows are zeros
            cond = [self.embed(p.text, p.weights) for p in prompts]
            cond = torch.cat(cond + [torch.zeros_like(cond[0])] * pad)
            guided = self.guidance_scale > 1.0
            if guided:
                uncond = [self.embed(p.negative) for p in prompts]
                embeddings = torch.cat(uncond + [torch.zeros_like(uncond[0])] * pad + [cond])
            else:
                embeddings = cond
            # 2. One CPU generator per case (padding rows get throwaway ones)
            generators = [torch.Generator("cpu").manual_seed(int(c.seed)) for c in cases]
            generators += [torch.Generator("cpu").manual_seed(0) for _ in range(pad)]
            if self.coarse_to_fine:
                f = self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)
                scale = self.coarse_to_fine["scale"]
                h0 = max(f, int(round(self.height * scale / f)) * f)
                w0 = max(f, int(round(self.width * scale / f)) * f)
                latents = self._denoise(self._initial_latents(generators, h0, w0), embeddings, generators)
                coarse = self._decode(latents)
                fine = torch.nn.functional.interpolate(coarse.float(), size=(self.height, self.width), mode="bicubic",
                                                       align_corners=False).clamp(-1, 1)
                latents = self._refine(fine, embeddings, generators)
            else:
                latents = self._denoise(self._initial_latents(generators, self.height, self.width),
                                        embeddings, generators)
            decoded = self._decode(latents)[:n]
            gray = (decoded.float() / 2 + 0.5).clamp(0, 1).mean(dim=1).cpu().numpy()
        return [GeneratedImage(pixels=g.astype("float32")) for g in gray]

    def _initial_latents(self, generators, height, width):
        import torch

        shape = (1, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        noise = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        return noise.to(self.device, self.dtype)

    def _scheduler(self):
        scheduler = self._scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.steps, device=self.device)
        return scheduler

    def _denoise(self, latents, embeddings, generators, scheduler=None, timesteps=None):
        scheduler = scheduler or self._scheduler()
        if timesteps is None:
            timesteps = scheduler.timesteps
            latents = latents * scheduler.init_noise_sigma
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        guided = self.guidance_scale > 1.0
        import torch

        for t in timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + self.guidance_scale * (cond - uncond)
            extra = {"generator": generators} if accepts_generator else {}
            latents = scheduler.step(noise, t, latents, return_dict=False, **extra)[0]
        return latents

    def _refine(self, images, embeddings, generators):
        """Image-to-image at the target size: encode, noise to the strength's step, denoise the rest."""
        import torch

        scheduler = self._scheduler()
        init_steps = min(int(self.steps * self.coarse_to_fine["strength"]), self.steps)
        t_start = max(self.steps - init_steps, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        latents = posterior.mode() * self.vae.config.scaling_factor  # the mode: no randomness outside the generators
        noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g, dtype=torch.float32) for g in generators])
        latents = scheduler.add_noise(latents, noise.to(self.device, self.dtype), timesteps[:1].repeat(len(generators)))
        return self._denoise(latents, embeddings, generators, scheduler=scheduler, timesteps=timesteps)

    def _decode(self, latents):
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift, return_dict=False)[0]
