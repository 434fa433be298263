"""The diffusion backend: any local diffusers latent-diffusion text-to-image model.

Loads a Stable-Diffusion-shaped folder (model_index.json naming a unet, vae, text_encoder,
tokenizer and scheduler) offline, component by component, from safetensors unless pickle is
explicitly allowed, never with remote code (``synthmed.model_folder`` checks and loads it).
Then runs its own denoising loop so that:

- every case has its own CPU ``torch.Generator`` seeded from the case seed: an image does
  not depend on its batch, the batch size or the shard;
- each distinct (prompt, emphasis) is encoded once per run, in a bounded LRU cache;
- emphasis weights scale the embeddings of the emphasised words only.

With no emphasis, the result equals ``StableDiffusionPipeline(..., generator=[g])`` for the
same settings (tests check this).

A distilled few-step student (``synthmed distill``) is a folder like any other: when its UNet takes the
guidance scale as an input (``time_cond_proj_dim``), the guidance embedding is passed as ``timestep_cond``
and no classifier-free guidance pass runs (one UNet evaluation per step), as diffusers' pipelines do. Sampling
settings left unset (None) come from the folder: a student's ``distillation.json`` recommends its scheduler,
steps and guidance (:func:`recommended_sampling`); any other folder gets 20 DPM-Solver++ steps at guidance 4.

A folder may hold a tiny decoder beside its components, ``tiny_vae/`` (a TAESD-style ``AutoencoderTiny`` that
``synthmed distill`` trains, not in model_index.json): ``decoder="tiny"`` decodes the latents with it instead of the
VAE (the VAE still encodes coarse_to_fine's image); ``decoder=None`` takes the folder's recommendation (tiny when its
``distillation.json`` recommends it, else the full VAE).

Example:
    >>> backend = DiffusionBackend("path/to/model", width=256, height=256, steps=20)  # doctest: +SKIP
    >>> images = backend.generate(cases, prompts)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Sequence

from .base import BackendInfo, GeneratedImage
from ..process_state import torch_threads, usable_cpus
from ..spec import TIMESTEP_SPACINGS, TRAILING_BY_DEFAULT, parse_late_guidance, resolve_timestep_spacing  # noqa: F401
from ..model_folder import (
    MAX_COMPONENT_LAYERS, MAX_COMPONENT_PARAMETERS, MAX_CONFIG_BYTES, MAX_CONFIG_INTEGER, MAX_TOKENIZER_FILE_BYTES,
    MAX_TRAIN_TIMESTEPS, PICKLE_SUFFIXES, REQUIRED_COMPONENTS, SAFE_LIBRARIES, SLOT_KINDS, TINY_DECODER,
    TINY_DECODER_CLASS, WEIGHTED_COMPONENTS, ModelFolderError, check_model_folder, check_tiny_decoder, estimate_size,
    load_component, model_hash)

# The model-folder rules live in synthmed.model_folder; they lived here before, so they stay importable from here.
__all__ = ["DECODERS", "DISTILLATION_FILE", "DTYPE_CHOICES", "DTYPES", "MICRO_BATCH", "PLAIN_SAMPLING", "SCHEDULERS",
           "RECOMMENDABLE", "SAMPLING_FILE",
           "TIMESTEP_SPACINGS", "TRAILING_BY_DEFAULT", "DiffusionBackend", "guidance_embedding", "read_distillation",
           "folder_spacing", "recommended_sampling", "resolve_timestep_spacing",
           "MAX_COMPONENT_LAYERS", "MAX_COMPONENT_PARAMETERS", "MAX_CONFIG_BYTES", "MAX_CONFIG_INTEGER",
           "MAX_TOKENIZER_FILE_BYTES", "MAX_TRAIN_TIMESTEPS", "PICKLE_SUFFIXES", "REQUIRED_COMPONENTS",
           "SAFE_LIBRARIES", "SLOT_KINDS", "TINY_DECODER", "WEIGHTED_COMPONENTS", "ModelFolderError",
           "check_model_folder", "check_tiny_decoder", "estimate_size", "load_component", "model_hash"]

# name -> (diffusers scheduler class, config overrides)
SCHEDULERS = {
    "dpm_solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),  # a latent consistency student's sampler (synthmed distill)
}
# The sampling settings of a folder that recommends none (every model before synthmed distill).
PLAIN_SAMPLING = {"scheduler": "dpm_solver", "steps": 20, "guidance_scale": 4.0}
DISTILLATION_FILE = "distillation.json"  # what synthmed distill writes beside a student's components
# Sampling settings any model folder may recommend (its "recommended" object); a student's distillation.json wins.
SAMPLING_FILE = "sampling.json"
RECOMMENDABLE = ("scheduler", "steps", "guidance_scale", "late_guidance", "decoder", "dtype")
# What decodes the latents: the folder's VAE, or its tiny decoder (tiny_vae/, a TAESD-style AutoencoderTiny).
DECODERS = ("full", "tiny")
DTYPES = ("float32", "bfloat16", "float16")
# generator.dtype also takes "auto": bfloat16 where the device computes it natively (native_dtype), else float32
DTYPE_CHOICES = (*DTYPES, "auto")
# The UNet and VAE always run on exactly this many cases (padded), because CPU convolution
# kernels pick their algorithm by batch size: the same case in a batch of 1 and of 4 differs
# in the last float bits. At a fixed batch size a case's result does not depend on its
# position or its neighbours, so fixed micro-batches make images independent of batch_size.
# Dynamic int8 quantisation scales activations over the whole batch, so with it each case runs alone.
MICRO_BATCH = 8


# ----------------------------------------------------------------------------- the backend

def weights_sha256(*modules) -> str:
    """One sha256 of the modules' weights (their state dicts: names, dtypes, shapes and bytes), in order.

    Example:
        >>> import torch
        >>> weights_sha256(torch.nn.Linear(2, 2)) != weights_sha256(torch.nn.Linear(2, 2))  # other initial weights
        True
    """
    import torch

    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode("utf-8"))
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class DiffusionBackend:
    """Generate images from a local diffusers latent-diffusion folder (see the module docstring).

    Args:
        model: path of the diffusers folder.
        width, height: image size; multiples of the model's VAE x UNet factor.
        steps, guidance_scale, scheduler: sampling settings (scheduler: a key of ``SCHEDULERS``); None: the
            folder's recommended ones (:func:`recommended_sampling`). A student whose UNet takes the guidance
            scale as an input samples with ``lcm`` only.
        timestep_spacing: leading, linspace or trailing; None: trailing with dpm_solver, euler, euler_ancestral
            and unipc, the folder's own with ddim, pndm and lcm (:func:`resolve_timestep_spacing`).
        late_guidance: ``{"scale": s, "below_timestep": t}``: guidance s instead of ``guidance_scale`` at the
            steps whose timestep is below t (1..50; 1: no guidance pass there); ``"none"``: the same
            guidance throughout; None: the folder's recommendation (:func:`recommended_sampling`).
        dtype: float32, bfloat16, float16, or auto (:func:`native_dtype`: bfloat16 where the device computes it
            natively, else float32); None: the folder's recommendation (:func:`recommended_sampling`), else float32.
            The dtype used is recorded in the settings (``dtype``; ``dtype_choice: auto`` where auto chose it).
        device: auto, cpu, cuda or mps.
        allow_pickle: allow .bin/.ckpt weights (they can run code when loaded).
        compile: wrap the UNet in ``torch.compile``.
        quantize: ``"int8"`` for dynamic int8 quantisation of the UNet's Linear layers (CPU).
        coarse_to_fine: ``{"scale": 0.5, "strength": 0.6}``: generate at scale x size, upscale, refine.
        decoder: ``"full"`` (the folder's VAE) or ``"tiny"`` (its ``tiny_vae/`` AutoencoderTiny); None: the
            folder's recommendation (:func:`recommended_sampling`).
        threads: torch CPU threads while images are made (default: the CPUs this process may use).
        cache_size: prompt embeddings kept.
    """

    def __init__(self, model: str | Path, *, width: int = 256, height: int = 256, steps: int | None = None,
                 guidance_scale: float | None = None, scheduler: str | None = None, dtype: str | None = None,
                 device: str = "auto", allow_pickle: bool = False, compile: bool = False,
                 quantize: str | None = None, coarse_to_fine: dict | None = None, decoder: str | None = None,
                 threads: int | None = None, cache_size: int = 1024, model_id: str | None = None,
                 timestep_spacing: str | None = None, late_guidance: dict | str | None = None):
        # 1. Check inputs (before torch or any weight is touched)
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        if dtype is not None and dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} or None, got {dtype!r}")
        if device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}")
        if decoder is not None and decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)} or None, got {decoder!r}")
        if quantize not in (None, "none", "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if steps is not None and steps < 1:
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
        recommended = None
        if None in (steps, guidance_scale, scheduler, decoder, dtype, late_guidance):  # what the spec leaves unset,
            recommended = recommended_sampling(self.root)  # the folder recommends
            steps = recommended["steps"] if steps is None else steps
            guidance_scale = recommended["guidance_scale"] if guidance_scale is None else guidance_scale
            scheduler = recommended["scheduler"] if scheduler is None else scheduler
            dtype = recommended["dtype"] if dtype is None else dtype
            late_guidance = recommended["late_guidance"] if late_guidance is None else late_guidance
        _check_student_settings(self.root, scheduler, int(steps), self.coarse_to_fine)
        self.timestep_spacing = resolve_timestep_spacing(
            scheduler, timestep_spacing, scheduler_config(self.root), int(steps))
        _check_schedule(self.root, self.index, scheduler, int(steps), self.timestep_spacing)
        if decoder is None:
            decoder = recommended["decoder"]
            if decoder == "tiny" and not (self.root / TINY_DECODER).is_dir():
                source = DISTILLATION_FILE if (self.root / DISTILLATION_FILE).is_file() else SAMPLING_FILE
                raise ModelFolderError(f"{self.root / source} recommends the tiny decoder, but "
                                       f"{self.root} has no tiny decoder ({TINY_DECODER}/ is missing); set "
                                       "generator.decoder to full (--decoder full) to decode with its VAE")
        if decoder == "tiny":
            check_tiny_decoder(self.root, allow_pickle=allow_pickle)
        self.decoder = decoder
        self.distilled = read_distillation(self.root)
        self.truncate_prompts = False  # a prompt too long for the text encoder is an error, not silently cut
        self.width, self.height, self.steps = int(width), int(height), int(steps)
        self.guidance_scale, self.scheduler_name = float(guidance_scale), scheduler
        self.late_guidance = parse_late_guidance(late_guidance)  # None: off
        self.allow_pickle = allow_pickle
        self.quantize = None if quantize in (None, "none") else quantize
        self.micro_batch = 1 if self.quantize else MICRO_BATCH

        import torch

        # 2. Threads (set only while generating: the caller's count is theirs) and device
        self.threads = int(threads or usable_cpus())
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for, but this torch has no MPS (Apple GPU) support")
        if self.quantize and device != "cpu":
            raise ValueError("quantize: int8 (dynamic quantisation) runs on the CPU only")
        self.device = torch.device(device)
        self.dtype_choice = dtype
        if dtype == "auto":  # int8's dynamic quantisation computes in float32
            dtype = "float32" if self.quantize else native_dtype(self.device)
        if self.quantize and dtype != "float32":
            raise ValueError(f"quantize: int8 computes in float32; dtype {dtype} does not combine with it (set "
                             "generator.dtype to float32 or auto, or leave quantize out)")
        self.dtype = getattr(torch, dtype)

        # 3. Load components (offline, safetensors first, no remote code)
        self.unet = self._load("unet").to(self.device).eval()
        self.vae = self._load("vae").to(self.device).eval()
        self.tiny_vae = None
        if self.decoder == "tiny":
            self.tiny_vae = load_component(self.root, {TINY_DECODER: ["diffusers", TINY_DECODER_CLASS]}, TINY_DECODER,
                                           dtype=self.dtype, allow_pickle=allow_pickle).to(self.device).eval()
        self.text_encoder = self._load("text_encoder").to(self.device).eval()
        self.tokenizer = self._load("tokenizer")
        if self.device.type in ("cpu", "cuda"):
            # oneDNN's (and cuDNN's) convolutions run faster on NHWC: on a 2-core CPU the UNet 1.25x, the VAE
            # decode 1.7x, the tiny decoder 1.6x (benchmarks/bench_diffusion.py). Not for components in training
            # (from_components): their layout stays the trainer's.
            for module in (self.unet, self.vae, self.tiny_vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self._setup(self._load("scheduler"), scheduler, dtype, compile, cache_size, model_id or self.root.name,
                    model_hash(self.root))

    @classmethod
    def from_components(cls, *, unet, vae, text_encoder, tokenizer, scheduler, width: int = 256, height: int = 256,
                        steps: int = 20, guidance_scale: float = 4.0, scheduler_name: str = "dpm_solver",
                        threads: int | None = None, model_id: str = "in-memory",
                        timestep_spacing: str | None = None,
                        late_guidance: dict | str | None = None,
                        model_hash: str | None = None) -> "DiffusionBackend":
        """A backend over components already in memory (e.g. a model being trained); float32 on their device.

        Prompt embeddings are not cached (the weights may change between calls), and ``info.model_hash`` is a
        sha256 of the UNet's, VAE's and text encoder's weights as they are now (:func:`weights_sha256`), so that a
        resumed build refuses another model; ``model_hash`` gives one instead (saves hashing a large model).

        Example:
            >>> backend = DiffusionBackend.from_components(unet=u, vae=v, text_encoder=t, tokenizer=tok,
            ...                                            scheduler=s, width=256, height=256)  # doctest: +SKIP
        """
        import torch

        self = cls.__new__(cls)
        self.root, self.index, self.allow_pickle = Path(model_id), {}, False
        self.width, self.height, self.steps = int(width), int(height), int(steps)
        self.guidance_scale, self.scheduler_name = float(guidance_scale), scheduler_name
        self.late_guidance = parse_late_guidance(late_guidance)
        self.quantize, self.micro_batch, self.coarse_to_fine, self.distilled = None, MICRO_BATCH, None, None
        self.decoder, self.tiny_vae = "full", None
        # a model in training sees its captions cut at the tokenizer's limit, as its training cut them
        self.truncate_prompts = True
        self.threads = int(threads or torch.get_num_threads())
        self.device, self.dtype, self.dtype_choice = next(unet.parameters()).device, torch.float32, "float32"
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.timestep_spacing = resolve_timestep_spacing(scheduler_name, timestep_spacing, dict(scheduler.config),
                                                         self.steps)
        weights = model_hash or weights_sha256(unet, vae, text_encoder)
        self._setup(scheduler, scheduler_name, "float32", False, 0, model_id, weights)
        self.info = dataclasses.replace(self.info, hashed=f"the in-memory model {model_id}")
        if model_hash is None:  # the hash follows the weights: trained further between two builds, it is another
            self._weights_key = self._weights_now()
        return self

    # the in-memory components' (id, version) of every tensor when info.model_hash was taken; None: a folder's
    _weights_key: tuple | None = None

    @property
    def info(self) -> BackendInfo:
        """What makes the images (recorded in the manifest); for in-memory components, of their weights now."""
        if self._weights_key is not None:
            now = self._weights_now()
            if now != self._weights_key:
                self._info = dataclasses.replace(self._info, model_hash=weights_sha256(self.unet, self.vae,
                                                                                       self.text_encoder))
                self._weights_key = now
        return self._info

    @info.setter
    def info(self, value: BackendInfo) -> None:
        self._info = value

    def _weights_now(self) -> tuple:
        """Each tensor's identity and in-place version: an optimiser step or load_state_dict changes them."""
        return tuple((id(t), t._version) for m in (self.unet, self.vae, self.text_encoder)
                     for t in m.state_dict(keep_vars=True).values())

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

        # a student that takes the guidance scale as an input: no classifier-free guidance pass (read before
        # int8 or compile wrap the UNet)
        self.time_cond_proj_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        late = self.late_guidance["scale"] if self.late_guidance else self.guidance_scale
        self.classifier_free = max(self.guidance_scale, late) > 1.0 and self.time_cond_proj_dim is None
        cls_name, overrides = SCHEDULERS[scheduler]
        self._scheduler_cls = getattr(diffusers, cls_name)
        self.scheduler_config = self._scheduler_cls.from_config(
            base_scheduler.config, **{**overrides, "timestep_spacing": self.timestep_spacing}).config
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
        if self.distilled is not None:  # a student: which teacher, how (only then: other manifests keep their bytes)
            settings["distilled"] = self.distilled
        if self.timestep_spacing != folder_spacing(scheduler, dict(base_scheduler.config)):  # likewise: not as before
            settings["timestep_spacing"] = self.timestep_spacing
        if self.late_guidance is not None:  # likewise only when guidance changes at the last steps
            settings["late_guidance"] = dict(self.late_guidance)
        if self.decoder == "tiny":  # likewise only when it is not the VAE
            settings["decoder"] = "tiny"
        if self.dtype_choice == "auto":  # and which dtype was asked for where the machine chose it
            settings["dtype_choice"] = "auto"
        self.info = BackendInfo(name="diffusion", model_id=model_id, model_hash=weights_hash, settings=settings,
                                hashed=f"the model folder {self.root}")

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

    def prompt_lengths(self, prompts: Sequence) -> list[int]:
        """How many tokens each prompt gives the text encoder, special tokens included, counted as ``embed``
        tokenizes it (an emphasised prompt piece by piece); more than ``max_length`` cannot be embedded whole.

        Example:
            >>> backend.prompt_lengths([Prompt("PA chest radiograph. Pneumonia.")])  # doctest: +SKIP
            [8]
        """
        tok, counts = self.tokenizer, {}
        plain = sorted({p.text for p in prompts if not p.weights})
        if plain:
            counts.update(zip(plain, map(len, tok(plain, verbose=False).input_ids)))
        pieces = sorted({piece for p in prompts if p.weights for piece, _ in p.segments()})
        specials = sum(map(len, self._special_tokens())) if pieces else 0
        if pieces:
            counts.update(zip(pieces, map(len, tok(pieces, add_special_tokens=False, verbose=False).input_ids)))
        return [sum(counts[piece] for piece, _ in p.segments()) + specials if p.weights else counts[p.text]
                for p in prompts]

    def _too_long(self, tokens: int, text: str) -> ValueError:
        return ValueError(f"the prompt {text[:100]!r}{'...' if len(text) > 100 else ''} is {tokens} tokens long, but "
                          f"{self.root}'s text encoder takes at most {self.max_length}; its last words would be cut "
                          "(shorten prompt.template, or give a case fewer findings)")

    def _encode(self, text: str, spans: tuple):
        import torch

        tok = self.tokenizer
        if not spans:
            ids = tok(text, padding="max_length", max_length=self.max_length, truncation=self.truncate_prompts,
                      verbose=False, return_tensors="pt").input_ids
            if ids.shape[1] > self.max_length:
                raise self._too_long(ids.shape[1], text)
            token_weights = None
        else:
            from ..prompts import Emphasis, Prompt

            pieces = Prompt(text, weights=tuple(Emphasis(s, e, w, "") for s, e, w in spans)).segments()
            body, body_w = [], []
            for piece, weight in pieces:
                piece_ids = tok(piece, add_special_tokens=False, verbose=False).input_ids
                body += piece_ids
                body_w += [weight] * len(piece_ids)
            prefix, suffix = self._special_tokens()
            keep = max(self.max_length - len(prefix) - len(suffix), 0)
            if len(body) > keep and not self.truncate_prompts:
                raise self._too_long(len(prefix) + len(body) + len(suffix), text)
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
        with torch_threads(self.threads):
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
            if self.classifier_free:
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
        guided = self.classifier_free
        import torch

        conditioned = {}  # a guidance-conditioned student's guidance embedding, by scale
        for t in timesteps:
            scale = self.guidance_at(t)
            extra_unet = {}
            if self.time_cond_proj_dim is not None:  # as diffusers' pipelines: w = guidance_scale - 1, embedded
                if scale not in conditioned:
                    w = torch.full((latents.shape[0],), scale - 1.0)
                    conditioned[scale] = guidance_embedding(w, self.time_cond_proj_dim).to(self.device, latents.dtype)
                extra_unet["timestep_cond"] = conditioned[scale]
            # a step at guidance 1 or less runs the prompt's half only (as diffusers' SDCFGCutoffCallback)
            step_guided = guided and scale > 1.0
            model_input = torch.cat([latents] * 2) if step_guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            context = embeddings if step_guided or not guided else embeddings[latents.shape[0]:]
            noise = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False, **extra_unet)[0]
            if step_guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + scale * (cond - uncond)
            extra = {"generator": generators} if accepts_generator else {}
            latents = scheduler.step(noise, t, latents, return_dict=False, **extra)[0]
        return latents

    def guidance_at(self, timestep) -> float:
        """The guidance scale of the step at ``timestep``: ``late_guidance``'s below its timestep, else
        ``guidance_scale``.

        Example:
            >>> backend.guidance_at(999), backend.guidance_at(499)  # doctest: +SKIP
            (4.0, 2.0)
        """
        late = self.late_guidance
        return late["scale"] if late is not None and float(timestep) < late["below_timestep"] else self.guidance_scale

    def _refine(self, images, embeddings, generators):
        """Image-to-image at the target size: encode, noise to the strength's step, denoise the rest."""
        import torch

        scheduler = self._scheduler()
        init_steps = min(int(self.steps * self.coarse_to_fine["strength"]), self.steps)
        t_start = max(self.steps - init_steps, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        channels = self.vae.config.in_channels
        if images.shape[1] != channels:  # e.g. a grayscale tiny decoder's image before an RGB VAE's encoder
            images = images.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        latents = posterior.mode() * self.vae.config.scaling_factor  # the mode: no randomness outside the generators
        noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g, dtype=torch.float32) for g in generators])
        latents = scheduler.add_noise(latents, noise.to(self.device, self.dtype), timesteps[:1].repeat(len(generators)))
        return self._denoise(latents, embeddings, generators, scheduler=scheduler, timesteps=timesteps)

    def _decode(self, latents):
        """Latents to images in [-1, 1]: with the tiny decoder when it was chosen, else the VAE."""
        decoder = self.vae if self.tiny_vae is None else self.tiny_vae
        shift = getattr(decoder.config, "shift_factor", None) or 0.0
        return decoder.decode(latents / decoder.config.scaling_factor + shift, return_dict=False)[0]


# ----------------------------------------------------------------------------- distilled students

def guidance_embedding(w, embedding_dim: int):
    """The sinusoidal embedding of guidance weights ``w`` [B] -> [B, embedding_dim] (float32) that a
    guidance-conditioned UNet takes as ``timestep_cond``; w is the guidance scale minus 1.

    The formula of diffusers' ``StableDiffusionPipeline.get_guidance_scale_embedding`` (after VDM's timestep
    embedding), here so that distillation and generation share one definition.

    Example:
        >>> import torch
        >>> guidance_embedding(torch.tensor([3.0]), 8).shape
        torch.Size([1, 8])
    """
    import math

    import torch

    w = w.float() * 1000.0
    half = embedding_dim // 2
    scale = math.log(10000.0) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -torch.tensor(scale))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def _json_object(path: Path) -> dict:
    """A JSON object from a small file of a model folder, or ModelFolderError naming the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES // 2 ** 20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def read_distillation(model: str | Path) -> dict | None:
    """What a student's ``distillation.json`` says of its making, for the run record: its mode, teacher and
    teacher hash (None for a folder without one).

    Example:
        >>> read_distillation("models/student")  # doctest: +SKIP
        {'method': 'latent consistency distillation', 'mode': 'full', 'teacher_hash': 'f4806b...'}
    """
    path = Path(model) / DISTILLATION_FILE
    if not path.is_file():
        return None
    record = _json_object(path)
    teacher = record.get("teacher") if isinstance(record.get("teacher"), dict) else {}
    return {"method": str(record.get("method", "")), "mode": str(record.get("mode", "")),
            "teacher_hash": str(teacher.get("model_hash", ""))}


def recommended_sampling(model: str | Path) -> dict:
    """The scheduler, steps, guidance scale, late guidance, decoder and dtype a model folder recommends, reading
    only JSON.

    A student made by ``synthmed distill`` recommends its own (``distillation.json``, key ``recommended``; its
    ``decoder``, absent or ``full`` as distill writes it, may say ``tiny``);
    a folder whose scheduler is diffusers' ``LCMScheduler`` without that file gets lcm, 4 steps and guidance 4.0
    when its UNet takes the guidance scale as an input, else 1.0 (the guidance is distilled into its weights);
    any other folder gets :data:`PLAIN_SAMPLING` (20 DPM-Solver++ steps, guidance 4.0). Any folder may carry a
    ``sampling.json`` (:data:`SAMPLING_FILE`) whose ``recommended`` object names some of these settings (the
    shipped default's says its late guidance); a student's distillation.json is read instead of it. A folder
    that cannot be read gets PLAIN_SAMPLING too: loading it says what is wrong. ``decoder`` is ``full`` and
    ``dtype`` float32, and ``late_guidance`` None (off), unless a file recommends otherwise (dtype ``auto`` for
    the shipped default-fast, whose card was checked in bfloat16).

    Raises:
        ModelFolderError: a distillation.json or sampling.json that is not JSON, or whose recommendation is not one
            synthmed runs.

    Example:
        >>> recommended_sampling("synthmed/models/default")  # doctest: +SKIP
        {'scheduler': 'dpm_solver', 'steps': 20, 'guidance_scale': 4.0, 'decoder': 'full', 'dtype': 'float32',
         'late_guidance': {'scale': 2.0, 'below_timestep': 500}}
    """
    root = Path(model)
    out = {**PLAIN_SAMPLING, "decoder": "full", "dtype": "float32", "late_guidance": None}
    path = root / DISTILLATION_FILE
    if path.is_file():
        recommended = _recommended_object(path, "with scheduler, steps and guidance_scale")
        for key in ("scheduler", "steps", "guidance_scale"):  # a student names all three
            if key not in recommended:
                raise ModelFolderError(f"{path}: recommended.{key} is missing")
        return {**out, **_checked_recommendation(path, recommended)}
    try:
        scheduler = _json_object(root / "scheduler" / "scheduler_config.json").get("_class_name")
        conditioned = _json_object(root / "unet" / "config.json").get("time_cond_proj_dim") is not None
    except ModelFolderError:
        return out
    if scheduler == "LCMScheduler":
        out.update(scheduler="lcm", steps=4, guidance_scale=4.0 if conditioned else 1.0)
    path = root / SAMPLING_FILE
    if path.is_file():
        recommended = _recommended_object(path, f"naming some of {', '.join(RECOMMENDABLE)}")
        unknown = sorted(set(recommended) - set(RECOMMENDABLE))
        if unknown:
            raise ModelFolderError(f"{path}: recommended.{unknown[0]} is not a sampling setting synthmed takes "
                                   f"({', '.join(RECOMMENDABLE)})")
        out.update(_checked_recommendation(path, recommended))
    return out


def _recommended_object(path: Path, what: str) -> dict:
    """The ``recommended`` object of a folder's distillation.json or sampling.json (ModelFolderError otherwise)."""
    recommended = _json_object(path).get("recommended")
    if not isinstance(recommended, dict):
        raise ModelFolderError(f"{path}: 'recommended' must be an object {what}, got {json.dumps(recommended)[:100]}")
    return recommended


def _checked_recommendation(path: Path, recommended: dict) -> dict:
    """The settings of a ``recommended`` object that it names, each checked (ModelFolderError naming the key)."""
    out = {}

    def bad(key: str, wanted: str):
        raise ModelFolderError(f"{path}: recommended.{key} {json.dumps(recommended[key])[:60]} is not {wanted}")

    if "scheduler" in recommended:
        if recommended["scheduler"] not in SCHEDULERS:
            bad("scheduler", f"one of {', '.join(SCHEDULERS)}")
        out["scheduler"] = recommended["scheduler"]
    if "steps" in recommended:
        steps = recommended["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
            bad("steps", "a whole number from 1 to 1000")
        out["steps"] = steps
    if "guidance_scale" in recommended:
        guidance = recommended["guidance_scale"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 50:
            bad("guidance_scale", "a number from 0 to 50")
        out["guidance_scale"] = float(guidance)
    if "decoder" in recommended:
        if recommended["decoder"] not in DECODERS:
            bad("decoder", f"one of {', '.join(DECODERS)}")
        out["decoder"] = recommended["decoder"]
    if "dtype" in recommended:
        if recommended["dtype"] not in DTYPE_CHOICES:
            bad("dtype", f"one of {', '.join(DTYPE_CHOICES)}")
        out["dtype"] = recommended["dtype"]
    if "late_guidance" in recommended:
        try:
            out["late_guidance"] = parse_late_guidance(recommended["late_guidance"])
        except ValueError:
            bad("late_guidance", "'none' or {scale: 1..50, below_timestep: 1..1000}")
    return out


def native_dtype(device) -> str:
    """``bfloat16`` where ``device`` computes it natively, else ``float32``: what ``dtype: auto`` runs in.

    Native means a CUDA GPU that torch says supports bfloat16, or a CPU with AMX tiles or AVX-512 BF16 (oneDNN then
    runs bfloat16 convolutions and matmuls in hardware; elsewhere bfloat16 is emulated and slower than float32).

    Example:
        >>> import torch
        >>> native_dtype(torch.device("cpu")) in ("bfloat16", "float32")
        True
    """
    import torch

    kind = getattr(device, "type", str(device))
    if kind == "cuda":  # not where torch emulates it (GPUs before Ampere): slower than float32 there
        if not torch.cuda.is_available():
            return "float32"
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch before 2.3 has no such argument and answers for native support
            native = torch.cuda.is_bf16_supported()
        return "bfloat16" if native else "float32"
    if kind == "cpu":
        cpu = getattr(torch, "cpu", None)  # torch.cpu's probes are private: absent in some builds, then float32
        probes = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        try:
            return "bfloat16" if any(probe() for probe in probes if callable(probe)) else "float32"
        except RuntimeError:
            return "float32"
    return "float32"


def scheduler_config(model: str | Path) -> dict:
    """A model folder's scheduler/scheduler_config.json, or {} where it cannot be read (loading the folder says
    why)."""
    try:
        return _json_object(Path(model) / "scheduler" / "scheduler_config.json")
    except ModelFolderError:
        return {}


def folder_spacing(scheduler: str, config: dict) -> str:
    """The timestep spacing ``scheduler`` takes from a folder's scheduler config as diffusers builds it (the
    config's value, else the class's default): what synthmed sampled before ``timestep_spacing`` existed.

    Example:
        >>> folder_spacing("dpm_solver", {"timestep_spacing": "leading"})
        'leading'
    """
    import diffusers

    cls_name, overrides = SCHEDULERS[scheduler]
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config(config, **overrides).config.timestep_spacing


def _check_schedule(root: Path, index: dict, scheduler: str, steps: int, spacing: str) -> None:
    """Refuse, before any weight is loaded, sampling settings the folder's noise schedule cannot take: a prediction
    type the sampler lacks, or steps whose timesteps run past the trained ones (more steps than the folder's
    num_train_timesteps; a sampler stepping past its schedule's end makes NaN images or fails mid-run)."""
    import diffusers

    path = root / "scheduler" / "scheduler_config.json"
    raw = _json_object(path)
    if scheduler in ("pndm", "euler_ancestral") and raw.get("prediction_type") == "sample":
        raise ModelFolderError(f"{path}: prediction_type \"sample\" is not one the {scheduler} scheduler "
                               "(generator.scheduler) samples (epsilon or v_prediction); choose another scheduler")
    trained = raw.get("num_train_timesteps", 1000)
    cls_name, overrides = SCHEDULERS[scheduler]
    # as the backend builds it: the folder's scheduler class from its config, then the sampler from that
    base = getattr(diffusers, index["scheduler"][1]).from_config({k: v for k, v in raw.items() if k[:1] != "_"})
    sampler = getattr(diffusers, cls_name).from_config(base.config, **{**overrides, "timestep_spacing": spacing})

    def fits(n: int) -> bool:
        try:
            sampler.set_timesteps(n)
        except (ValueError, IndexError):
            return False
        timesteps = sampler.timesteps
        return n <= trained and len(timesteps) > 0 and 0 <= float(timesteps.min()) <= float(timesteps.max()) < trained

    if not fits(steps):
        most = next((n for n in range(min(steps, trained), 0, -1) if fits(n)), 0)
        raise ModelFolderError(f"{path}: num_train_timesteps {trained} is too few for {steps} {scheduler} steps "
                               f"(generator.steps) with {spacing} timestep spacing: they run past the trained "
                               f"timesteps; " + (f"sample at most {most} steps" if most else
                                                 "this schedule cannot be sampled"))


def _check_student_settings(root: Path, scheduler: str, steps: int, coarse_to_fine: dict | None) -> None:
    """Refuse sampling settings a student (or the lcm scheduler) cannot take, before any weight is loaded."""
    conditioned = _json_object(root / "unet" / "config.json").get("time_cond_proj_dim")
    if conditioned is not None and scheduler != "lcm":
        raise ValueError(f"scheduler {scheduler!r} (generator.scheduler) cannot sample {root}: its UNet takes the "
                         f"guidance scale as an input (unet/config.json time_cond_proj_dim {conditioned}), a "
                         "latent consistency student made for the lcm scheduler; set generator.scheduler to lcm "
                         "or leave it out (the folder's recommended settings are used)")
    if scheduler == "lcm":
        config = _json_object(root / "scheduler" / "scheduler_config.json")
        solver = config.get("original_inference_steps", 50) if config.get("_class_name") == "LCMScheduler" else 50
        if isinstance(solver, int) and steps > solver:
            raise ValueError(f"steps {steps} (generator.steps): the lcm scheduler samples at most the "
                             f"{solver} steps of the solver its student was distilled with (scheduler/"
                             "scheduler_config.json original_inference_steps); a student needs 1 to 8")
    if coarse_to_fine and scheduler == "lcm":
        raise ValueError(f"coarse_to_fine (generator.coarse_to_fine) does not combine with the lcm scheduler of "
                         f"a few-step student such as {root}: a 4-step student's refine pass would keep "
                         "int(4 x strength) steps of a schedule made for 4; leave coarse_to_fine out (the student "
                         "is the fast path)")
