"""images/s of `synthmed generate` against a bare diffusers pipeline batched as synthmed batches, side by side.

Issue 5 item 7; issue 22 item 3 (the batched baseline). Three models, one after the other:

- fast: ``synthmed/models/default-fast``, the shipped few-step student, at its own recommendation (LCMScheduler,
  8 steps, the guidance scale as a UNet input: no guidance pass, the full VAE decoder); where a recommendation names
  the tiny decoder, the bare side swaps in the same one (``pipe.vae = AutoencoderTiny.from_pretrained(...)``);
- shipped: ``synthmed/models/default``, as ``generator.model: default`` loads it;
- random: random weights (torch seed 0) in the shipped design's shape, built from
  ``synthmed.finetune.default_components`` (its ``*_CONFIG`` constants) and its word tokenizer,
  so it follows the design when the design changes (it may then differ from the shipped folder).

On each model both sides run the same settings: size, steps, guidance, DPM-Solver++ made from
the folder's scheduler config, the first N cases of dataset_specs/pneumonia.yaml with their
prompts, negative prompts and seeds, in micro-batches of synthmed's size (8):

- bare: ``StableDiffusionPipeline.from_pretrained(model, torch_dtype=float32)``, its UNet and VAE in NHWC
  (``channels_last``, as synthmed's backend runs them: 1.25x / 1.7x faster convolutions here), then one call per
  micro-batch with the prompts and negative prompts as lists, one ``torch.Generator`` per case
  seeded with the case's seed, ``output_type="np"``, nothing written (issue 22's strong baseline);
- synthmed: ``synthmed.build.generate(spec, out, backend=<DiffusionBackend>)``: DICOM image + SR
  (+ SEG), PNG, manifest, cases.jsonl, the card and the cheap QC; as a control, PNG only.

Printed per model: images/s of each side's run (load and warm-up excluded; synthmed's run includes
its card and QC) and the ratios; steady-state seconds per image (from the end of the first
micro-batch to the end of the last: the loop, without its first batch, card or QC); fixed costs
measured separately (start-up: a fresh interpreter importing what each side imports; loading;
synthmed's set-up, writer drain + card, and QC inside generate()); end to end composed from these
(start-up + load + run); and where the time goes, from timers around the text encoder, the UNet
(forward hooks), the VAE decode, the writer thread, the card and QC (CPU ops are synchronous, so a
timer around a module is its cost). Rounds alternate the order of the sides (A B C, then C B A, ...)
so that other load on the machine affects them alike; ratios come from the summed times.

Then, per model, end to end as a user meets it: fresh processes from start to exit, ``synthmed generate`` of the
first 100 cases (every output, QC included) against a script that imports, loads and runs the bare pipeline
(nothing written), alternating, best of 2 (issue 22: 100 images in <= 15 s with the fast default; >= 0.95x the
bare pipeline at the teacher's settings); each side also makes the first 50 right after, and the difference per image (the median over the rounds) is the
steady state as users meet it (issue 22: >= 1.0x the bare pipeline at the teacher's settings). ``synthmed generate`` keeps freed memory for reuse (glibc ``mallopt``;
without it, torch re-faults its freed buffers: about 3.5 M page faults per 100 images); as a control the bare script
also runs with the same setting through glibc's environment variables (``bare+malloc``). The in-process runs above
share this process's allocator, set the same way.

    python benchmarks/bench_diffusion.py [--count 32] [--rounds 2] [--steps 20] [--size 256]
                                         [--models fast,shipped,random] [--threads N] [--no-png-only]
                                         [--e2e-count 100] [--e2e-rounds 2]

On a small machine shared with other work, torch's default of one thread per core suffers
badly when another process holds a core (threads wait on each other at every op); compare
runs made under the same conditions only, and try --threads 1 to see the uncontended ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "dataset_specs" / "pneumonia.yaml"
MODELS = ("fast", "shipped", "random")
STAGES = ("text encoder", "UNet", "VAE decode")
# synthmed's commands keep freed memory for reuse (synthmed.cli._keep_freed_memory); the same, for a bare script
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

# What each side imports before it can load a model: a fresh interpreter runs this and is timed whole.
BARE_IMPORTS = "import torch\nfrom diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline"
SYNTHMED_IMPORTS = """\
import synthmed.cli, synthmed.build, synthmed.build.chunks, synthmed.qc.run
import synthmed.writers.dicom, synthmed.writers.png, synthmed.writers.sr, synthmed.writers.seg, synthmed.writers.manifest
from synthmed.backends.diffusion import DiffusionBackend
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast"""


# ----------------------------------------------------------------------------- the models

def build_random_model(folder: Path, size: int) -> Path:
    """A diffusers folder of the shipped design with random weights (torch seed 0), saved as finetune saves."""
    import torch
    from diffusers import StableDiffusionPipeline

    from synthmed.finetune import build_word_tokenizer, default_components

    torch.manual_seed(0)
    parts = default_components(build_word_tokenizer(), sample_size=size)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def describe(pipe) -> str:
    """Parameter counts and the shape-setting sizes of a pipeline's modules."""
    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    vae, unet, text = pipe.vae.config, pipe.unet.config, pipe.text_encoder.config
    return (f"unet {millions(pipe.unet)} {tuple(unet.block_out_channels)}, vae {millions(pipe.vae)} "
            f"{tuple(vae.block_out_channels)} ({vae.in_channels}-channel images, {vae.latent_channels} latent "
            f"channels), text encoder {millions(pipe.text_encoder)} (hidden {text.hidden_size}, "
            f"{text.num_hidden_layers} layers), tokenizer {len(pipe.tokenizer)} tokens")


# ----------------------------------------------------------------------------- timers

class StageClock:
    """Seconds spent in a model's text encoder, UNet and VAE decode: forward hooks on the first two, a
    wrapped ``vae.decode`` (it is a method, not a forward). ``close()`` takes them off again."""

    def __init__(self, text_encoder, unet, vae):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._started: dict[str, float] = {}
        self._handles = []
        for name, module in (("text encoder", text_encoder), ("UNet", unet)):
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                self.seconds["VAE decode"] += time.perf_counter() - t0

        vae.decode, self._vae = timed_decode, vae

    def _start(self, name):
        def hook(module, args):
            self._started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self._started.pop(name)
        return hook

    def reset(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        del self._vae.decode  # the class's method again


def start_up_seconds(code: str, repeats: int = 2) -> float:
    """Wall time of a fresh interpreter running ``code`` (the imports), best of ``repeats``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def steady(batch_ends: list[float], batch_sizes: list[int]) -> float | None:
    """Seconds per image from the end of the first micro-batch to the end of the last."""
    if len(batch_ends) < 2:
        return None
    return (batch_ends[-1] - batch_ends[0]) / sum(batch_sizes[1:])


# ----------------------------------------------------------------------------- the physical floor

def matmul_gflops(dtype: str = "float32", size: int = 2048, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of this CPU at torch's thread count: a ``size``² matmul into a preallocated output
    (a fresh 16 MiB output per call would time the allocator's page faults too), best of 3 runs of ``seconds``."""
    import torch

    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    c = torch.empty(size, size, dtype=getattr(torch, dtype))
    torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(3):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.matmul(a, b, out=c)
            calls += 1
        best = max(best, 2 * size ** 3 * calls / (time.perf_counter() - t0) / 1e9)
    return best


def model_gflop(pipe, size: int) -> dict[str, float]:
    """GFLOP of each stage, counted by torch's FlopCounterMode (matmuls and convolutions) on one case: one UNet
    evaluation on the latent of a ``size``² image (the VAE's own scale: 4x down for the default), one VAE (or
    tiny) decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae = pipe.unet, pipe.vae
    dtype = next(unet.parameters()).dtype
    side = size // pipe.vae_scale_factor
    latent = torch.randn(1, unet.config.in_channels, side, side, dtype=dtype)
    text = torch.randn(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, dtype=dtype)
    extra = {}
    if unet.config.time_cond_proj_dim:
        extra["timestep_cond"] = torch.zeros(1, unet.config.time_cond_proj_dim, dtype=dtype)
    figures = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(latent, torch.tensor(500), text, **extra)
        figures["UNet"] = counter.get_total_flops() / 1e9
        z = torch.randn(1, getattr(vae.config, "latent_channels", 4), side, side,
                        dtype=next(vae.parameters()).dtype)
        with FlopCounterMode(display=False) as counter:
            vae.decode(z)
        figures["VAE decode"] = counter.get_total_flops() / 1e9
    return figures


# ----------------------------------------------------------------------------- the two sides

def late_guidance_callback(late: dict | None):
    """A diffusers step-end callback that guides the steps below ``late["below_timestep"]`` at ``late["scale"]``
    (diffusers' "dynamic classifier-free guidance"; at 1 or less without the guidance pass, as its
    SDCFGCutoffCallback), so that the bare pipeline samples what synthmed's ``late_guidance`` samples; None: none."""
    if late is None:
        return None

    def callback(pipe, step_index, timestep, kwargs):
        timesteps = pipe.scheduler.timesteps
        below = late["below_timestep"]
        if step_index + 1 < len(timesteps) and float(timestep) >= below > float(timesteps[step_index + 1]):
            pipe._guidance_scale = late["scale"]
            if late["scale"] <= 1:  # the prompts' half of the embeddings: no guidance pass from here on
                kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    return callback


def run_bare(pipe, clock: StageClock, cases, prompts, *, micro_batch: int, size: int, steps: int,
             guidance: float, late: dict | None = None) -> dict:
    """The pipeline on synthmed's micro-batches: prompt lists, one generator per case, numpy out, nothing written."""
    import torch

    callback = late_guidance_callback(late)
    clock.reset()
    ends, sizes = [], []
    started = time.perf_counter()
    for i in range(0, len(cases), micro_batch):
        batch, texts = cases[i:i + micro_batch], prompts[i:i + micro_batch]
        images = pipe(prompt=[p.text for p in texts], negative_prompt=[p.negative for p in texts], height=size,
                      width=size, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                      generator=[torch.Generator("cpu").manual_seed(int(c.seed)) for c in batch]).images
        assert len(images) == len(batch)
        ends.append(time.perf_counter())
        sizes.append(len(batch))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "steady": steady(ends, sizes), "first_batch": ends[0] - started,
            "stages": dict(clock.seconds), "compute": seconds}


def run_synthmed(spec, backend, clock: StageClock, count: int, out: Path) -> dict:
    """generate() with our backend object, timing its parts: backend batches, writer thread, card, QC."""
    import synthmed.build as build
    from synthmed.build import chunks

    run_module = importlib.import_module("synthmed.build.run")
    backend._cache.clear()  # a fresh process starts with no prompt embeddings
    backend.cache_stats = {"hits": 0, "misses": 0, "size": 0}
    clock.reset()
    starts, ends, sizes = [], [], []
    timed = {"write": 0.0, "card": 0.0, "qc": 0.0}
    originals = {"generate": backend.generate, "write": chunks.CaseWriter.write,
                 "_finish": run_module._finish, "_run_qc": run_module._run_qc}

    def timed_generate(cases, prompts):
        starts.append(time.perf_counter())
        try:
            return originals["generate"](cases, prompts)
        finally:
            ends.append(time.perf_counter())
            sizes.append(len(cases))

    def timer(key, function):
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timed[key] += time.perf_counter() - t0
        return timed_call

    backend.generate = timed_generate
    chunks.CaseWriter.write = timer("write", originals["write"])  # runs on generate()'s writer thread
    run_module._finish = timer("card", originals["_finish"])  # manifest merge, split metadata, card
    run_module._run_qc = timer("qc", originals["_run_qc"])
    try:
        t0 = time.perf_counter()
        result = build.generate(spec, out, limit=count, backend=backend, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        del backend.generate
        chunks.CaseWriter.write = originals["write"]
        run_module._finish, run_module._run_qc = originals["_finish"], originals["_run_qc"]
    assert result.written == count and not result.interrupted, result
    files = {ext: len(list(out.rglob(f"*.{ext}"))) for ext in ("png", "dcm")}
    rows = sum(1 for _ in open(out / "manifest.csv", encoding="utf-8")) - 1
    compute = sum(e - s for s, e in zip(starts, ends))
    return {"seconds": seconds, "steady": steady(ends, sizes), "first_batch": ends[0] - starts[0], "compute": compute,
            "setup": starts[0] - t0, "after": t0 + seconds - ends[-1], "stages": dict(clock.seconds), **timed,
            "files": files, "rows": rows, "cache": dict(backend.cache_stats)}


# ----------------------------------------------------------------------------- one model

def late_text(late: dict | None) -> str:
    return "" if late is None else f"guidance {late['scale']:g} below timestep {late['below_timestep']}, "


def model_sampling(name: str, model_dir: Path, args) -> dict:
    """The sampling both sides run: the student's own recommendation (fast; its dtype as this machine resolves
    ``auto``), else --steps, --guidance, DPM-Solver++, float32. ``--dtype`` sets the dtype of both sides."""
    import torch

    from synthmed.backends.diffusion import native_dtype, recommended_sampling

    sampling = recommended_sampling(model_dir) if name == "fast" else {
        "scheduler": "dpm_solver", "steps": args.steps, "guidance_scale": args.guidance, "decoder": "full",
        "dtype": "float32", "late_guidance": recommended_sampling(model_dir)["late_guidance"]}
    dtype = args.dtype or sampling["dtype"]
    return {**sampling, "dtype": native_dtype(torch.device("cpu")) if dtype == "auto" else dtype}


def bench_model(name: str, model: str, model_dir: Path, base, args, tmp: Path, start_up: dict) -> dict:
    """Load both sides on one model, warm them up, run the rounds and print the model's figures."""
    import torch
    from diffusers import StableDiffusionPipeline

    import synthmed.build as build
    from synthmed.backends import create_backend
    from synthmed.prompts import build_prompt
    from synthmed.sampler import sample_cases

    sampling = model_sampling(name, model_dir, args)
    spec = dataclasses.replace(
        base, image=dataclasses.replace(base.image, width=args.size, height=args.size, formats=("dicom", "png")),
        generator=dataclasses.replace(base.generator, backend="diffusion", model=model, steps=sampling["steps"],
                                      guidance_scale=sampling["guidance_scale"], scheduler=sampling["scheduler"],
                                      decoder=sampling["decoder"], dtype=sampling["dtype"], threads=args.threads,
                                      late_guidance=sampling["late_guidance"] or "none"))
    spec_png = dataclasses.replace(spec, image=dataclasses.replace(spec.image, formats=("png",)))
    cases = list(sample_cases(spec, limit=args.count))
    prompts = [build_prompt(c, spec.prompt) for c in cases]

    # 1. Load both sides (timed; excluded from the runs' images/s)
    t0 = time.perf_counter()
    backend = create_backend(spec)  # what generate() builds from spec.generator; sets torch's threads
    load_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # newer diffusers call it dtype; torch_dtype works from 0.30 on
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, sampling["dtype"]),
                                                       local_files_only=True,
                                                       safety_checker=None)
    if sampling["scheduler"] == "dpm_solver":  # DPM-Solver++ from the folder's config, as synthmed makes it
        pipe.scheduler = backend._scheduler_cls.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                            timestep_spacing=backend.timestep_spacing)
    if sampling["decoder"] == "tiny":  # the student's tiny decoder, as a diffusers user swaps it in
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny.from_pretrained(model_dir / "tiny_vae", torch_dtype=getattr(torch, sampling["dtype"]),
                                                   local_files_only=True)
    for module in (pipe.unet, pipe.vae):  # NHWC convolutions, as synthmed's backend runs them (diffusers' docs too)
        module.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    load_bare = time.perf_counter() - t0

    def settings(config) -> dict:
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    assert settings(pipe.scheduler.config) == settings(backend.scheduler_config), "the two sides' schedulers differ"
    late = sampling["late_guidance"]
    if late is not None and (sampling["guidance_scale"] <= 1 or late["below_timestep"] > backend._scheduler().timesteps[0]):
        raise SystemExit(f"late guidance {late} with guidance {sampling['guidance_scale']:g}: the bare pipeline's "
                         "step-end callback changes the guidance from the second step on, of a guided run only")
    micro = backend.micro_batch
    print(f"\n=== model: {name} ({model_dir}): {sampling['scheduler']}, {sampling['steps']} steps, guidance "
          f"{sampling['guidance_scale']:g}{' (an input of the UNet: no guidance pass)' if backend.time_cond_proj_dim else ''}, "
          f"{late_text(sampling['late_guidance'])}{sampling['decoder']} decoder, {sampling['dtype']} on both sides")
    print(f"  {describe(pipe)}")
    print(f"  load: bare from_pretrained {load_bare:.2f} s | synthmed DiffusionBackend {load_synth:.2f} s "
          f"(includes checking and hashing the folder)")
    print(f"  batches: both sides {micro} cases per call (synthmed's micro-batch; spec batch_size "
          f"{spec.generator.batch_size}) | torch threads {torch.get_num_threads()}")

    # 2. Warm up each side at its shapes (2 steps): a pipeline call; a whole generate() (its writers and QC too)
    t0 = time.perf_counter()
    clock = StageClock(pipe.text_encoder, pipe.unet, pipe.vae)
    run_bare(pipe, clock, cases[:micro], prompts[:micro], micro_batch=micro, size=args.size, steps=2,
             guidance=sampling["guidance_scale"], late=sampling["late_guidance"])
    clock.close()
    warm_bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.steps = 2
    build.generate(spec, tmp / f"warm-{name}", limit=min(micro, args.count), backend=backend, progress=False)
    backend.steps = sampling["steps"]
    shutil.rmtree(tmp / f"warm-{name}", ignore_errors=True)
    warm_synth = time.perf_counter() - t0
    print(f"  warm-up (2 steps, excluded): bare {warm_bare:.2f} s | synthmed {warm_synth:.2f} s")

    # 3. Rounds, the order of the sides alternating
    clocks = {"bare": StageClock(pipe.text_encoder, pipe.unet, pipe.vae),
              "synthmed": StageClock(backend.text_encoder, backend.unet,
                                          backend.vae if backend.tiny_vae is None else backend.tiny_vae)}
    sides = ["bare", "synthmed"] + ([] if args.no_png_only else ["synthmed-png"])
    results: dict[str, list[dict]] = {s: [] for s in sides}
    n = args.count
    print(f"  {'round':>5} {'side':<13} {'seconds':>8} {'images/s':>9} {'steady s/img':>12}  notes")
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "bare":
                res = run_bare(pipe, clocks["bare"], cases, prompts, micro_batch=micro, size=args.size,
                               steps=sampling["steps"], guidance=sampling["guidance_scale"],
                               late=sampling["late_guidance"])
                note = f"{-(-n // micro)} pipeline calls, numpy out, nothing written"
            else:
                out = tmp / f"{name}-{side}-{r}"
                res = run_synthmed(spec if side == "synthmed" else spec_png, backend, clocks["synthmed"], n, out)
                shutil.rmtree(out, ignore_errors=True)
                c = res["cache"]
                note = (f"{res['files']['png']} png, {res['files']['dcm']} dcm, {res['rows']} rows; card "
                        f"{res['card']:.2f} s, QC {res['qc']:.2f} s; prompt cache {c['hits']} hits / "
                        f"{c['misses']} misses")
            results[side].append(res)
            st = f"{res['steady']:12.3f}" if res["steady"] is not None else f"{'-':>12}"
            print(f"  {r + 1:>5} {side:<13} {res['seconds']:8.2f} {n / res['seconds']:9.3f} {st}  {note}", flush=True)
    for clock in clocks.values():
        clock.close()

    # 4. Summary
    def total(side: str, key: str = "seconds") -> float:
        return sum(x[key] for x in results[side])

    def steady_of(side: str) -> float | None:
        values = [x["steady"] for x in results[side] if x["steady"] is not None]
        return statistics.mean(values) if values else None

    n_all, rounds = n * args.rounds, args.rounds
    bare, synth = total("bare"), total("synthmed")
    print(f"  summary, {rounds} round(s) x {n} images per side (load and warm-up excluded):")
    print(f"    bare                     {n_all / bare:7.3f} images/s")
    print(f"    synthmed, all outputs    {n_all / synth:7.3f} images/s   ratio synthmed/bare {bare / synth:.3f}x "
          "(the run includes its card and QC)")
    if "synthmed-png" in results:
        png = total("synthmed-png")
        print(f"    synthmed, PNG only       {n_all / png:7.3f} images/s   ratio {bare / png:.3f}x (control)")
    per_round = [b["seconds"] / m["seconds"] for b, m in zip(results["bare"], results["synthmed"])]
    print(f"    per-round ratios (all outputs): {', '.join(f'{x:.3f}x' for x in per_round)} | best round of each "
          f"side: {min(x['seconds'] for x in results['bare']) / min(x['seconds'] for x in results['synthmed']):.3f}x")
    sb, ss = steady_of("bare"), steady_of("synthmed")
    if sb and ss:
        sp = steady_of("synthmed-png") if "synthmed-png" in results else None
        png_part = f", PNG only {sp:.3f} s (ratio {sb / sp:.3f}x)" if sp else ""
        print(f"    steady state, s/image: bare {sb:.3f} s, synthmed {ss:.3f} s, ratio {sb / ss:.3f}x{png_part}")
    first_b, first_s = total("bare", "first_batch") / rounds, total("synthmed", "first_batch") / rounds
    setup, after = total("synthmed", "setup") / rounds, total("synthmed", "after") / rounds
    card, qc = total("synthmed", "card") / rounds, total("synthmed", "qc") / rounds
    print(f"    fixed costs, s: start-up (fresh interpreter + imports) bare {start_up['bare']:.2f}, synthmed "
          f"{start_up['synthmed']:.2f} | load bare {load_bare:.2f}, synthmed {load_synth:.2f} | in synthmed's run: "
          f"set-up before the first batch {setup:.2f}, after the last batch {after:.2f} (of it card {card:.2f}, "
          f"QC {qc:.2f}, writer drain and chunk part {after - card - qc:.2f}) | first micro-batch: bare "
          f"{first_b:.2f}, synthmed {first_s:.2f}")
    e2e_bare = start_up["bare"] + load_bare + bare / rounds
    e2e_synth = start_up["synthmed"] + load_synth + synth / rounds
    print(f"    end to end, {n} images (start-up + load + run, composed): bare {e2e_bare:.1f} s = {n / e2e_bare:.3f} "
          f"images/s, synthmed {e2e_synth:.1f} s = {n / e2e_synth:.3f} images/s, ratio {e2e_bare / e2e_synth:.3f}x")

    # 5. Where the time goes (per image, over the all-outputs runs; start-up and load spread over one run)
    s_stages = {k: sum(x["stages"][k] for x in results["synthmed"]) for k in STAGES}
    b_stages = {k: sum(x["stages"][k] for x in results["bare"]) for k in STAGES}
    rows = [("start-up (imports)", start_up["synthmed"] / n, start_up["bare"] / n),
            ("load", load_synth / n, load_bare / n)]
    rows += [(k, s_stages[k] / n_all, b_stages[k] / n_all) for k in STAGES]
    rows += [("rest of the batches (scheduler, noise, CFG mix, image out)", (total("synthmed", "compute")
              - sum(s_stages.values())) / n_all, (bare - sum(b_stages.values())) / n_all),
             ("set-up (run folder, cases.jsonl)", setup / n, 0.0),
             ("between batches (prompts, QC gate, hand-off to the writer thread)", (synth - total("synthmed", "compute") - total("synthmed", "setup")
                                                       - total("synthmed", "after")) / n_all, 0.0),
             ("writers: drain after the last batch", (after - card - qc) / n, 0.0),
             ("manifest merge + card", card / n, 0.0),
             ("QC (fast: per-image, spec fidelity, duplicates, dciodvfy sample)", qc / n, 0.0)]
    whole_s, whole_b = e2e_synth / n, e2e_bare / n
    print(f"  where the time goes, ms/image at {n} images (start-up and load spread over them), share of end to end:")
    print(f"    {'stage':<66} {'synthmed':>9} {'share':>6} {'bare':>9} {'share':>6}")
    for label, s, b in rows:
        print(f"    {label:<66} {s * 1000:9.1f} {s / whole_s:6.1%} {b * 1000:9.1f} {b / whole_b:6.1%}")
    print(f"    {'sum = end to end':<66} {whole_s * 1000:9.1f} {'':>6} {whole_b * 1000:9.1f}")
    write = total("synthmed", "write") / n_all
    hits = sum(x["cache"]["hits"] for x in results["synthmed"])
    looks = hits + sum(x["cache"]["misses"] for x in results["synthmed"])
    print(f"    writer thread busy {write * 1000:.1f} ms/image (DICOM + SR + SEG + PNG + rows; overlapped with the next "
          f"batch, the rows above count only where the main thread waits); prompt cache {hits}/{looks} hits; the "
          f"bare pipeline encodes {2 * micro} prompts per call")

    # 6. The physical floor: the model's arithmetic at this CPU's sustained matmul rate
    gflop = model_gflop(pipe, args.size)
    # two evaluations where a step runs the guidance pass, one where it does not (a student; late guidance at 1)
    evaluations = sum(2 if backend.classifier_free and backend.guidance_at(t) > 1 else 1
                      for t in backend._scheduler().timesteps)
    per_image = gflop["UNet"] * evaluations + gflop["VAE decode"]
    rate = args.gflops[sampling["dtype"]]
    floor = per_image / rate
    print(f"  floor: {gflop['UNet']:.2f} GFLOP per UNet evaluation x {evaluations} ({sampling['steps']} steps) + "
          f"{gflop['VAE decode']:.2f} GFLOP "
          f"of decode = {per_image:.1f} GFLOP per image; at {rate:.0f} GFLOP/s (this CPU's {sampling['dtype']} matmul) "
          f"{floor * 1000:.1f} ms/image, {floor * 100:.1f} s per 100 images plus start-up; measured steady state: bare "
          f"{floor / sb:.0%} of it, synthmed {floor / ss:.0%}" if sb and ss else "")

    figures = {"bare": n_all / bare, "synthmed": n_all / synth, "steady": (sb, ss), "e2e": (n / e2e_bare, n / e2e_synth)}
    del pipe, backend
    gc.collect()
    return figures


# ----------------------------------------------------------------------------- end to end, measured

BARE_SCRIPT = """\
import json, sys, time
import torch
from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, StableDiffusionPipeline
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"]) if job["threads"] else None
pipe = StableDiffusionPipeline.from_pretrained(job["model"], torch_dtype=getattr(torch, job["dtype"]), local_files_only=True,
                                               safety_checker=None)
if job["scheduler"] == "dpm_solver":
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             timestep_spacing="trailing")
if job["decoder"] == "tiny":
    pipe.vae = AutoencoderTiny.from_pretrained(job["model"] + "/tiny_vae", torch_dtype=getattr(torch, job["dtype"]),
                                               local_files_only=True)
for module in (pipe.unet, pipe.vae):
    module.to(memory_format=torch.channels_last)
pipe.set_progress_bar_config(disable=True)
late = job["late_guidance"]


def callback(pipe, step_index, timestep, kwargs):  # synthmed's late_guidance, as late_guidance_callback
    timesteps = pipe.scheduler.timesteps
    if late and step_index + 1 < len(timesteps) and float(timestep) >= late["below_timestep"] > float(
            timesteps[step_index + 1]):
        pipe._guidance_scale = late["scale"]
        if late["scale"] <= 1:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
    return kwargs


m, n = job["micro_batch"], int(sys.argv[2])
for i in range(0, n, m):
    j = min(i + m, n)
    images = pipe(prompt=job["prompts"][i:j], negative_prompt=job["negatives"][i:j], height=job["size"],
                  width=job["size"], num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                  callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                  output_type="np", generator=[torch.Generator("cpu").manual_seed(s) for s in job["seeds"][i:j]])
    assert len(images.images) == j - i
"""


def end_to_end(name: str, model_dir: Path, base, args, tmp: Path) -> dict:
    """Wall seconds of fresh processes making ``--e2e-count`` images, process start to exit: ``synthmed generate``
    (every output: DICOM image + SR, PNG, manifest, card, QC), the bare pipeline (nothing written) and, as a
    control, the bare pipeline with synthmed's allocator setting; the order of the sides alternating over
    ``--e2e-rounds``; the best of each side. Each side also makes half as many images: the difference is the
    steady-state cost of an image as users meet it, start-up, loading and the end-of-run work cancelled out."""
    import json

    from synthmed.backends.diffusion import MICRO_BATCH
    from synthmed.prompts import build_prompt
    from synthmed.sampler import sample_cases
    from synthmed.spec import late_guidance_flag

    sampling = model_sampling(name, model_dir, args)
    n, half = args.e2e_count, args.e2e_count // 2
    cases = list(sample_cases(base, limit=n))
    prompts = [build_prompt(c, base.prompt) for c in cases]
    job = tmp / f"e2e-{name}.json"
    job.write_text(json.dumps({"model": str(model_dir), "prompts": [p.text for p in prompts],
                               "negatives": [p.negative for p in prompts], "seeds": [int(c.seed) for c in cases],
                               "steps": sampling["steps"], "guidance": sampling["guidance_scale"],
                               "scheduler": sampling["scheduler"], "decoder": sampling["decoder"],
                               "dtype": sampling["dtype"], "size": base.image.width, "micro_batch": MICRO_BATCH,
                               "threads": args.threads, "late_guidance": sampling["late_guidance"]}))
    script = tmp / "bare_e2e.py"
    script.write_text(BARE_SCRIPT)
    synthmed = [str(Path(sys.executable).parent / "synthmed"), "generate", str(SPEC_FILE), "--model", str(model_dir),
                "--steps", str(sampling["steps"]), "--guidance-scale", str(sampling["guidance_scale"]), "--scheduler",
                sampling["scheduler"], "--decoder", sampling["decoder"], "--dtype", sampling["dtype"],
                "--late-guidance", late_guidance_flag(sampling["late_guidance"])]
    if args.threads:
        synthmed += ["--threads", str(args.threads)]
    sides = ("bare", "synthmed", "bare+malloc")
    times: dict[tuple[str, int], list[float]] = {(side, k): [] for side in sides for k in (half, n)}
    for r in range(args.e2e_rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            for k in ((n, half) if half else (n,)):
                out = tmp / f"e2e-{name}-{r}"
                command = (synthmed + ["--limit", str(k), "-o", str(out)] if side == "synthmed"
                           else [sys.executable, str(script), str(job), str(k)])
                env = {**os.environ, **MALLOC_ENV} if side == "bare+malloc" else None
                t0 = time.perf_counter()
                subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
                times[side, k].append(time.perf_counter() - t0)
                shutil.rmtree(out, ignore_errors=True)
    best = {key: min(t) for key, t in times.items() if t}
    # a side's two runs of a round follow each other (this VM's speed drifts by a third over an hour): the
    # difference within each round, then their median
    steady = {side: statistics.median((a - b) / (n - half) for a, b in zip(times[side, n], times[side, half]))
              for side in sides} if half else {}

    def figure(side: str) -> str:
        return (f"{best[side, n]:.1f} s ({n / best[side, n]:.2f} images/s; rounds "
                f"{', '.join(f'{t:.1f}' for t in times[side, n])})")

    bare, synth = best["bare", n], best["synthmed", n]
    print(f"  end to end, measured (fresh processes, process start to exit, {n} images, best of {args.e2e_rounds}): "
          f"bare {figure('bare')}, synthmed generate {figure('synthmed')}, ratio {bare / synth:.3f}x")
    print(f"    control: the bare script with synthmed's allocator setting "
          f"({' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}) {figure('bare+malloc')}, ratio to synthmed "
          f"{best['bare+malloc', n] / synth:.3f}x")
    if steady:
        print(f"    steady state as users meet it ({n} minus {half} images in one round, fresh processes, median of "
              f"{args.e2e_rounds}): {n - half} images' difference per round: "
              f"{', '.join(f'{a - b:.1f}' for a, b in zip(times['synthmed', n], times['synthmed', half]))} s "
              f"synthmed, {', '.join(f'{a - b:.1f}' for a, b in zip(times['bare', n], times['bare', half]))} s bare; bare "
              f"{steady['bare']:.3f} s/image, synthmed {steady['synthmed']:.3f} s/image, ratio "
              f"{steady['bare'] / steady['synthmed']:.3f}x; bare+malloc {steady['bare+malloc']:.3f} s/image "
              f"(ratio to synthmed {steady['bare+malloc'] / steady['synthmed']:.3f}x)")
    return {"bare": bare, "synthmed": synth, "steady": steady}


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32, help="images per side per round (the first N cases)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="width = height; a multiple of 64")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per model; the order of the sides alternates")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: shipped, random")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both sides (default: the backend's default, all cores)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default=None,
                        help="both sides' dtype (default: the model's recommendation; default-fast's is auto)")
    parser.add_argument("--no-png-only", action="store_true", help="skip the synthmed PNG-only control run")
    parser.add_argument("--e2e-count", type=int, default=100,
                        help="images of the measured end-to-end runs in fresh processes (0: skip them)")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="measured end-to-end runs per side")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models takes {', '.join(MODELS)}, got {args.models!r}")
    if args.count < 1 or args.rounds < 1:
        parser.error(f"--count and --rounds must be at least 1, got {args.count} and {args.rounds}")

    # Start-up first, in fresh interpreters, before this one holds memory
    start_up = {"bare": start_up_seconds(BARE_IMPORTS), "synthmed": start_up_seconds(SYNTHMED_IMPORTS)}

    from synthmed.cli import _keep_freed_memory

    keeps_freed_memory = _keep_freed_memory()  # as `synthmed generate` does; both in-process sides share it
    import numpy as np
    import torch
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from synthmed.backends import default_model_dir
    from synthmed.spec import load_spec

    print(f"machine: {platform.machine()} | cpus {os.cpu_count()} | load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} | torch {torch.__version__} | diffusers "
          f"{diffusers.__version__} | transformers {transformers.__version__} | numpy {np.__version__} | python "
          f"{platform.python_version()}")
    print(f"settings: {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, DPM-Solver++, "
          f"{args.count} images per side per round, {args.rounds} round(s) per model, the first cases of "
          f"{SPEC_FILE.name} with their prompts and seeds")
    print(f"start-up (fresh interpreter importing what the side needs, best of 2): bare {start_up['bare']:.2f} s, "
          f"synthmed {start_up['synthmed']:.2f} s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.gflops = {dtype: matmul_gflops(dtype) for dtype in ("float32", "bfloat16")}
    print(f"matmul (2048², preallocated output, {torch.get_num_threads()} threads): float32 "
          f"{args.gflops['float32']:.0f} GFLOP/s, bfloat16 {args.gflops['bfloat16']:.0f} GFLOP/s")
    print(f"allocator: this process keeps freed memory for reuse as `synthmed generate` does: "
          f"{'yes' if keeps_freed_memory else 'no (MALLOC_*/GLIBC_TUNABLES set, or not glibc)'}; both in-process "
          f"sides share it, so their ratios compare the pipelines alone")
    base = load_spec(SPEC_FILE)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        tmp = Path(tmp)
        for name in models:
            if name in ("shipped", "fast"):
                model = "default" if name == "shipped" else "default-fast"
                model_dir = default_model_dir(model)
            else:
                t0 = time.perf_counter()
                model_dir = build_random_model(tmp / "random-model", args.size)
                model = str(model_dir)
                print(f"\nrandom model built from synthmed.finetune.default_components in "
                      f"{time.perf_counter() - t0:.1f} s")
            figures[name] = bench_model(name, model, model_dir, base, args, tmp, start_up)
            if args.e2e_count and args.e2e_rounds and args.size == base.image.width:
                figures[name]["measured"] = end_to_end(name, model_dir, base, args, tmp)

    print("\nboth models (images/s of the runs; steady s/image; end to end composed):")
    for name, f in figures.items():
        sb, ss = f["steady"]
        steady_text = f"steady {sb:.3f} vs {ss:.3f} s/image ({sb / ss:.3f}x)" if sb and ss else "steady: -"
        print(f"  {name:<8} bare {f['bare']:.3f}, synthmed {f['synthmed']:.3f} images/s "
              f"({f['synthmed'] / f['bare']:.3f}x) | {steady_text} | end to end {f['e2e'][0]:.3f} vs "
              f"{f['e2e'][1]:.3f} images/s ({f['e2e'][1] / f['e2e'][0]:.3f}x)")
    for name, f in figures.items():
        if "measured" in f:
            m = f["measured"]
            bare, synth = m["bare"], m["synthmed"]
            # issue 22's targets: the fast default's time; the teacher's ratios (the random model is reported)
            target = {"fast": f"; target <= 15 s: {'met' if synth <= 15 else 'not met'}",
                      "shipped": f"; target >= 0.95x: {'met' if bare / synth >= 0.95 else 'not met'}"}.get(name, "")
            print(f"  {name:<8} measured end to end, {args.e2e_count} images: bare {bare:.1f} s, synthmed {synth:.1f} s "
                  f"({bare / synth:.3f}x){target}")
            if m["steady"]:
                ratio = m["steady"]["bare"] / m["steady"]["synthmed"]
                target = f"; target >= 1.0x: {'met' if ratio >= 1.0 else 'not met'}" if name == "shipped" else ""
                print(f"  {name:<8} steady state as users meet it: bare {m['steady']['bare']:.3f}, synthmed "
                      f"{m['steady']['synthmed']:.3f} s/image ({ratio:.3f}x){target}")
    print("note: synthmed applies the spec's emphasis (finding words x1.3) to its embeddings; the bare pipeline gets "
          "the same text without it (no effect on cost). synthmed encodes each distinct prompt once per run; the "
          "bare pipeline encodes every prompt and negative on every call.")


if __name__ == "__main__":
    sys.exit(main())
