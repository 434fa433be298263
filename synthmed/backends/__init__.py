"""Image backends behind one small protocol: cases and prompts in, images (and masks) out.

A backend is a pure function of each case: the same case gives the same image whatever
batch it is generated in. Backends are looked up by name with :func:`create_backend`;
the heavy ones import their libraries only when created.

Example:
    >>> from synthmed.spec import load_spec
    >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 2\\nfindings: [{finding: cardiomegaly, weight: 1}]")
    >>> backend = create_backend(spec, backend="pattern")
    >>> backend.info.name
    'pattern'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..spec import SHIPPED_MODELS  # the names a spec may use for the shipped models: the spec language owns them
from .base import Backend, BackendInfo, BackendUnavailable, GeneratedImage, ImageGeometry

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import DatasetSpec

__all__ = ["BACKENDS", "Backend", "BackendInfo", "BackendUnavailable", "GeneratedImage", "ImageGeometry",
           "SHIPPED_MODELS", "create_backend", "default_model_dir", "resolve_generator"]

BACKENDS = ("diffusion", "phantom", "pattern", "drr")
# draw a mask of every finding a case lists (no_finding aside), in its order: qc holds their rows to that
MASK_BACKENDS = ("phantom", "pattern", "drr")


def create_backend(spec: "DatasetSpec", *, backend: str | None = None, model: str | None = None,
                   cases=None) -> Backend:
    """Build the backend a spec asks for (``backend``/``model`` override the spec's generator); a diffusion model
    must take the prompt of each case the run makes (``cases``, else every case of the spec) whole."""
    name = backend or spec.generator.backend
    from ..spec import BACKEND_VIEWS

    undrawn = [v for v in spec.view.keys if name in BACKEND_VIEWS and v not in BACKEND_VIEWS[name]]
    if undrawn:
        raise BackendUnavailable(f"the {name} backend draws {' and '.join(BACKEND_VIEWS[name])} films, not "
                                 f"{', '.join(undrawn)} (view in the spec); use --backend drr or diffusion")
    if name == "pattern":
        from .pattern import PatternBackend

        return PatternBackend(spec.image.width, spec.image.height)
    if name == "phantom":
        try:
            from .phantom import PhantomBackend
        except ImportError:  # pragma: no cover - until the phantom lands
            raise BackendUnavailable("the phantom backend is not part of this installation") from None
        from ..spec import PHANTOM_SIZE_RANGE

        lo, hi = PHANTOM_SIZE_RANGE
        if not (lo <= spec.image.width <= hi and lo <= spec.image.height <= hi):
            raise BackendUnavailable(f"the phantom backend draws {lo}..{hi} pixels a side, not "
                                     f"{spec.image.width} x {spec.image.height} (image.size in the spec)")
        return PhantomBackend(spec.image.width, spec.image.height)
    if name == "diffusion":
        return _diffusion_backend(spec, model, cases)
    if name == "drr":
        return _drr_backend(spec)
    raise BackendUnavailable(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")


def default_model_dir(name: str = "default"):
    """Where a shipped model (``default`` or ``default-fast``) lives inside the package.

    Example:
        >>> default_model_dir("default-fast").name
        'default-fast'
    """
    from pathlib import Path

    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model is called {name!r} (shipped: {', '.join(SHIPPED_MODELS)})")
    return Path(__file__).resolve().parent.parent / "models" / name


def resolve_generator(spec: "DatasetSpec", *, backend: str | None = None, model: str | None = None):
    """The spec's generator with ``steps``, ``guidance_scale``, ``scheduler``, ``decoder``, ``dtype`` and (diffusion
    only) ``timestep_spacing`` and ``late_guidance`` as the build runs them (``dtype`` may be ``auto``: the backend
    picks float32 or bfloat16 for the machine; ``timestep_spacing`` is None where it is the model folder's own, and
    ``late_guidance`` None where it is off, as every run before those keys existed sampled, so that their records
    stay the same).

    Where the spec sets them, its values; else, for the diffusion backend, what the model folder recommends
    (a distilled student's ``distillation.json``: lcm, 4 steps, and its decoder;
    read from JSON, nothing loaded), else 20 steps, guidance 4.0, dpm_solver and the full decoder (the VAE).
    ``backend`` and ``model`` override the spec's, as in :func:`create_backend`.

    Example:
        >>> from synthmed.spec import load_spec
        >>> spec = load_spec("spec_version: 1\\nname: d\\ncount: 2\\nfindings: [{finding: cardiomegaly, weight: 1}]")
        >>> g = resolve_generator(spec, backend="pattern")
        >>> g.steps, g.guidance_scale, g.scheduler, g.decoder, g.timestep_spacing, g.late_guidance
        (20, 4.0, 'dpm_solver', 'full', None, None)
    """
    import dataclasses

    from ..spec import parse_late_guidance
    from .diffusion import PLAIN_SAMPLING, recommended_sampling

    g = spec.generator
    unset = [k for k in ("steps", "guidance_scale", "scheduler", "decoder", "dtype") if getattr(g, k) is None]
    diffusion = (backend or g.backend) == "diffusion"
    if not diffusion:  # only a diffusion model is guided late
        g = dataclasses.replace(g, late_guidance=None)
    elif g.late_guidance is None:
        unset.append("late_guidance")
    if not unset and not diffusion:
        return g
    settings = {**PLAIN_SAMPLING, "decoder": "full", "dtype": "float32", "late_guidance": None}
    folder = None
    if diffusion:
        model = model or g.model
        folder = default_model_dir(model) if model in SHIPPED_MODELS else model
        from ..model_folder import ModelFolderError

        try:  # a folder that cannot be read is refused, with its reason, when the backend loads it
            settings = recommended_sampling(folder)
        except ModelFolderError:
            pass
    g = dataclasses.replace(g, **{k: settings[k] for k in unset})
    if diffusion:
        from .diffusion import SCHEDULERS, folder_spacing, resolve_timestep_spacing, scheduler_config

        config = scheduler_config(folder)
        try:
            spacing = resolve_timestep_spacing(g.scheduler, g.timestep_spacing, config, g.steps)
        except ValueError:  # refused, with its reason, when the backend loads
            spacing = g.timestep_spacing
        # None where it is the folder's own: what every synthmed before timestep_spacing sampled and recorded
        try:
            own = folder_spacing(g.scheduler, config) if g.scheduler in SCHEDULERS else None
        except (ValueError, TypeError, NotImplementedError):  # a config no sampler builds: refused when it loads
            own = None
        g = dataclasses.replace(g, timestep_spacing=None if spacing == own else spacing,
                                late_guidance=parse_late_guidance(g.late_guidance))
    return g


def _diffusion_backend(spec: "DatasetSpec", model: str | None, cases=None):
    g = spec.generator
    model = model or g.model
    if model in SHIPPED_MODELS:
        path = default_model_dir(model)
        if not (path / "model_index.json").is_file():
            raise BackendUnavailable(
                f"the shipped {model} model is not in this installation; set generator.model (or --model) to a local "
                "diffusers pipeline folder, or use --backend drr or phantom")
        model_id = SHIPPED_MODELS[model]
    else:
        path, model_id = model, None
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"the diffusion backend needs torch, diffusers and transformers ({e.name} is missing): "
                                 "pip install 'synthmed[diffusion]'") from None
    from ..model_folder import ModelFolderError
    from .diffusion import DiffusionBackend

    try:
        engine = DiffusionBackend(path, width=spec.image.width, height=spec.image.height, steps=g.steps,
                                  guidance_scale=g.guidance_scale, scheduler=g.scheduler, dtype=g.dtype,
                                  device=g.device, allow_pickle=g.allow_pickle, compile=g.compile, quantize=g.quantize,
                                  coarse_to_fine=g.coarse_to_fine, decoder=g.decoder, threads=g.threads,
                                  model_id=model_id, timestep_spacing=g.timestep_spacing,
                                  late_guidance=g.late_guidance)
    except (ModelFolderError, ValueError) as e:  # ValueError: settings the machine cannot run (device)
        raise BackendUnavailable(str(e)) from None
    _check_prompt_lengths(spec, engine, cases)
    return engine


def _check_prompt_lengths(spec: "DatasetSpec", engine, cases=None) -> None:
    """Refuse a spec any of whose prompts is longer than the model's text encoder takes, before any image is made:
    the words past the limit (a case's findings, at the end of the template) would be cut, and its image would not
    show what its labels say."""
    from ..prompts import Prompt, build_prompt
    from ..sampler import sample_cases
    from ..vocabulary import get_vocabulary

    vocab = get_vocabulary()
    if cases is None:  # every case of the spec (a run passes its own, which it has sampled already)
        cases = sample_cases(spec)
    # one entry per distinct prompt (a few thousand for a million cases): its first case and how many share it
    distinct: dict = {}
    for case in cases:
        prompt = build_prompt(case, spec.prompt, vocab)
        key = (prompt.text, prompt.weights)
        if key in distinct:
            distinct[key][2] += 1
        else:
            distinct[key] = [case, prompt, 1]
    entries = list(distinct.values())
    lengths = engine.prompt_lengths([prompt for _, prompt, _ in entries])
    limit = engine.max_length
    too_long = [(case, prompt, n, count) for (case, prompt, count), n in zip(entries, lengths) if n > limit]
    if too_long:
        too_long.sort(key=lambda e: e[0].index)
        case, prompt, n, _ = too_long[0]
        others = ", ".join(f"{c.case_id} ({k})" for c, _, k, _ in too_long[1:4])
        worst = max(k for _, _, k, _ in too_long)
        raise BackendUnavailable(
            f"the prompts of {sum(e[3] for e in too_long)} of {len(cases)} cases are longer than the {limit} tokens "
            f"the model's text encoder takes, so their words past the limit (with most templates, the findings) "
            f"would be cut: {case.case_id}'s is {n} tokens, {prompt.text!r}"
            + (f"; also {others}{', ...' if len(too_long) > 4 else ''}" if others else "")
            + f". Shorten prompt.template by at least {worst - limit} tokens, or give those cases fewer findings")
    negative = spec.prompt.negative if spec.prompt is not None and engine.classifier_free else ""
    if negative:
        (n,) = engine.prompt_lengths([Prompt(negative)])
        if n > limit:
            raise BackendUnavailable(f"prompt.negative is {n} tokens long, but the model's text encoder takes at most "
                                     f"{limit}; shorten it by at least {n - limit} tokens")


def _drr_backend(spec: "DatasetSpec"):
    """The CT-derived backend, refused up front for findings or views it does not draw, or missing data."""
    from .drr import VIEWS, AnatomyMissing, DrrBackend, FindingNotDrawable, check_drawable

    try:
        check_drawable(f for c in spec.findings for f in c.findings)
    except FindingNotDrawable as e:
        raise BackendUnavailable(f"{e} (findings in the spec)") from None
    bad_views = [v for v in spec.view.keys if v not in VIEWS]
    if bad_views:
        raise BackendUnavailable(f"the drr backend draws views {', '.join(VIEWS)}, not {', '.join(bad_views)} "
                                 "(view in the spec)")
    from .drr.volumes import VolumeError

    try:
        backend = DrrBackend(spec.image.width, spec.image.height, volumes=spec.generator.anatomy)
    except (AnatomyMissing, VolumeError) as e:
        raise BackendUnavailable(str(e)) from None
    except ValueError as e:
        raise BackendUnavailable(f"{e} (image.size in the spec)") from None
    _check_structures_drawn(spec)
    return backend


MIN_STRUCTURE_ML = 0.5  # a floor far below any real one (a rib is 10-20 ml, the trachea 30, the heart 600)


def _check_structures_drawn(spec) -> None:
    """Each structure the spec's findings need has voxels in each user label map (validation reads the structures
    file only: a structure it lists may have been left out of the map), so that no case stops the run."""
    import numpy as np

    from ..vocabulary import get_vocabulary
    from .drr.structures import BASE, spec_needs
    from .drr.volumes import load_volume

    needs = {need: "every film" for need in BASE} | spec_needs(spec.findings, get_vocabulary())
    for entry in spec.generator.anatomy:
        if entry.ct is None:
            continue
        anatomy = load_volume(entry)  # cached: the backend has just loaded it
        voxels = np.bincount(anatomy.labels.ravel(), minlength=256)
        ml = {name: float(voxels[value]) * float(np.prod(anatomy.spacing)) / 1000 for name, value in
              anatomy.names.items()}
        present = {name for name, size in ml.items() if size >= MIN_STRUCTURE_ML}
        for need, what in needs.items():
            if not need.met_by(present):
                largest = max(need.any_of, key=lambda n: ml.get(n, 0.0))
                held = (f"only {ml[largest]:.2f} ml of {largest} (a structure the films use is at least "
                        f"{MIN_STRUCTURE_ML:g} ml)" if ml.get(largest) else f"no voxel of {need.text}")
                raise BackendUnavailable(f"anatomy '{entry.id}': the label map {entry.labels} has {held}, needed for "
                                         f"{what}, though {entry.structures or 'it'} names it; label it"
                                         + ("" if what == "every film" else ", or leave that finding out of the spec"))
