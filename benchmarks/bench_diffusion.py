"""images/s of `synthmed generate` against a bare diffusers loop, side by side in one run.

Issue 5 item 7. Both sides run the same model (built here with random weights, in the shape
the shipped default will have), the same steps, size, guidance, scheduler, prompts and seeds
(the first N cases of dataset_specs/pneumonia.yaml):

- bare: ``StableDiffusionPipeline.from_pretrained(...)``, then per case one pipeline call with
  ``generator=torch.Generator('cpu').manual_seed(case.seed)`` and one 8-bit grey PIL PNG save;
- synthmed: ``synthmed.build.generate(spec, out, backend=<DiffusionBackend>)``, writing DICOM,
  16-bit PNG, cases.jsonl, the manifest and the dataset card (and, as a control, PNG only).

Model loading and one short warm-up per side are excluded from images/s on both sides (load
times are printed separately, and an images/s figure with the load included). Rounds
alternate the order of the sides (A B C, then C B A, ...) so that other load on the machine
affects both alike; the ratio is computed from the summed times over all rounds.

    python benchmarks/bench_diffusion.py [--count 32] [--steps 20] [--size 256] [--rounds 2] [--threads N]

On a small machine shared with other work, torch's default of one thread per core suffers
badly when another process holds a core (threads wait on each other at every op); compare
runs made under the same conditions only, and try --threads 1 to see the uncontended ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC_FILE = REPO / "dataset_specs" / "pneumonia.yaml"
MAX_LENGTH = 77
HIDDEN = 128


# ----------------------------------------------------------------------------- the model

def bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table (the order GPT-2/CLIP vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE: merge the lowest-ranked adjacent pair until none is known."""
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 60:
            break
        a, b = min(((word[i], word[i + 1]) for r, i in pairs if r == rank))
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def write_clip_vocabulary(folder: Path, words: list[str]) -> tuple[Path, Path, dict[str, int]]:
    """A word-level BPE vocabulary: 256 byte characters, their ``</w>`` forms, and merges that make
    every word in ``words`` one token. Merges are added greedily (run BPE with the merges so far;
    where it stops, merge the first remaining pair), which never changes an earlier word's tokens."""
    chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = tuple(word[:-1]) + (word[-1] + "</w>",)
        while True:
            pieces = _bpe(pieces, ranks)
            if len(pieces) == 1:
                break
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(ranks, key=ranks.get)
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file, vocab


def prompt_words(texts: list[str], unique: bool = True) -> list[str]:
    """The words CLIP's pre-tokenizer makes of these texts (lower case, byte characters); unique: each once, first seen first."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file, _ = write_clip_vocabulary(Path(tmp), [])
        backend = CLIPTokenizer(str(vocab_file), str(merges_file)).backend_tokenizer
    words = [w for text in texts for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
    return list(dict.fromkeys(words)) if unique else words


def build_model(folder: Path, texts: list[str], size: int, vae_channels: int) -> tuple[Path, dict]:
    """A Stable-Diffusion-shaped folder with random weights: word-level CLIP tokenizer, CLIP text
    encoder (hidden 128, 2 layers, 4 heads), 8x VAE (32-64-128-128), 3-level UNet (32-64-128,
    cross-attention at the two lower levels), DPM-Solver++."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = prompt_words(texts)
    vocab_file, merges_file, vocab = write_clip_vocabulary(folder.parent / "_tokenizer", words)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, projection_dim=HIDDEN)).eval()
    vae = AutoencoderKL(
        in_channels=vae_channels, out_channels=vae_channels, block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, sample_size=size)
    unet = UNet2DConditionModel(
        sample_size=size // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8)
    scheduler = DPMSolverMultistepScheduler(  # Stable Diffusion 1.x's noise schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    tokens = [len(tokenizer(t).input_ids) - 2 for t in texts]
    single = sum(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    return folder, {"vocab": len(vocab), "words": len(words), "tokens_per_prompt": statistics.mean(tokens),
                    "words_per_prompt": statistics.mean(len(prompt_words([t], unique=False)) for t in texts),
                    "single_token_words": single, **params}


# ----------------------------------------------------------------------------- the two sides

def run_bare(pipe, cases, prompts, size: int, steps: int, guidance: float, out: Path) -> dict:
    """One pipeline call and one PIL PNG save per image; timed from after the load to the last save."""
    import torch

    out.mkdir(parents=True)
    call = save = 0.0
    started = time.perf_counter()
    for case, prompt in zip(cases, prompts):
        t0 = time.perf_counter()
        image = pipe(prompt.text, negative_prompt=prompt.negative or None, height=size, width=size,
                     num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(int(case.seed))).images[0]
        t1 = time.perf_counter()
        image.convert("L").save(out / f"{case.case_id}.png")
        call += t1 - t0
        save += time.perf_counter() - t1
    return {"seconds": time.perf_counter() - started, "compute": call, "write": save}


def run_synthmed(spec, backend, count: int, out: Path) -> dict:
    """generate() with our backend object; times the whole call, the backend's share and the writer thread."""
    import synthmed.build as build
    from synthmed.build import chunks

    backend._cache.clear()
    backend.cache_stats = {"hits": 0, "misses": 0, "size": 0}
    inner, write = [0.0], [0.0]
    backend_generate, writer_write = backend.generate, chunks.CaseWriter.write

    def timed_generate(cases, prompts):
        t0 = time.perf_counter()
        try:
            return backend_generate(cases, prompts)
        finally:
            inner[0] += time.perf_counter() - t0

    def timed_write(self, *a, **k):  # runs on generate()'s single writer thread
        t0 = time.perf_counter()
        try:
            return writer_write(self, *a, **k)
        finally:
            write[0] += time.perf_counter() - t0

    backend.generate = timed_generate
    chunks.CaseWriter.write = timed_write
    try:
        t0 = time.perf_counter()
        result = build.generate(spec, out, limit=count, backend=backend, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        del backend.generate
        chunks.CaseWriter.write = writer_write
    assert result.written == count and not result.interrupted, result
    files = {ext: len(list(out.rglob(f"*.{ext}"))) for ext in ("png", "dcm")}
    rows = sum(1 for _ in open(out / "manifest.csv", encoding="utf-8")) - 1
    stats = dict(backend.cache_stats)
    return {"seconds": seconds, "compute": inner[0], "write": write[0], "files": files, "rows": rows,
            "cache": stats}


def breakdown(backend, size: int, steps: int, reps: int = 5) -> None:
    """Where a side's compute goes: the UNet at 2 x batch rows per step (classifier-free guidance)
    and the VAE decode, at the bare loop's batch (1) and synthmed's micro-batch, per image."""
    import torch

    latent = size // backend.vae_scale
    print(f"  breakdown (same modules, per image, best of {reps} UNet / 3 VAE calls; a {steps}-step image = {steps} UNet calls + 1 decode):")
    for batch in (1, backend.micro_batch):
        x = torch.randn(2 * batch, backend.unet.config.in_channels, latent, latent)
        emb = torch.randn(2 * batch, backend.max_length, backend.unet.config.cross_attention_dim)
        z = torch.randn(batch, backend.unet.config.in_channels, latent, latent)
        t = torch.tensor(500)
        with torch.inference_mode():
            unet, vae = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                backend.unet(x, t, encoder_hidden_states=emb, return_dict=False)
                unet.append(time.perf_counter() - t0)
            for _ in range(3):
                t0 = time.perf_counter()
                backend.vae.decode(z, return_dict=False)
                vae.append(time.perf_counter() - t0)
        u, v = min(unet) / batch, min(vae) / batch
        print(f"    batch {batch} (UNet rows {2 * batch}): UNet {u * 1000:7.1f} ms/image/step -> {u * steps:6.3f} s/image; "
              f"VAE decode {v:6.3f} s/image; sum {u * steps + v:6.3f} s/image")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32, help="images per side per round (the first N cases)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="width = height; a multiple of 32")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the order of the sides alternates")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both sides (default: the backend's default, all cores)")
    parser.add_argument("--vae-channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--no-png-only", action="store_true", help="skip the synthmed PNG-only control run")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing the UNet and VAE at both batch shapes")
    args = parser.parse_args()

    import numpy as np
    import torch
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    from synthmed.backends import create_backend

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    from synthmed.prompts import build_prompt
    from synthmed.sampler import sample_cases
    from synthmed.spec import load_spec

    print(f"machine: {platform.machine()} | cpus {os.cpu_count()} | torch {torch.__version__} | "
          f"diffusers {diffusers.__version__} | transformers {transformers.__version__} | numpy {np.__version__} | "
          f"python {platform.python_version()}")
    threads_default = torch.get_num_threads()
    base = load_spec(SPEC_FILE)
    texts = sorted({t for c in sample_cases(base) for t in [build_prompt(c, base.prompt).text]}) + [base.prompt.negative]

    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        model_dir, model_info = build_model(tmp / "model", texts, args.size, args.vae_channels)
        print(f"model: built in {time.perf_counter() - t0:.1f} s (random weights, seed 0) | "
              f"unet {model_info['unet'] / 1e6:.2f} M, vae {model_info['vae'] / 1e6:.2f} M "
              f"({args.vae_channels} channels), text encoder {model_info['text_encoder'] / 1e6:.2f} M params | "
              f"tokenizer: {model_info['vocab']} tokens, {model_info['tokens_per_prompt']:.1f} tokens for "
              f"{model_info['words_per_prompt']:.1f} words per prompt, {model_info['single_token_words']}/{model_info['words']} "
              f"distinct words are one token")

        spec = dataclasses.replace(
            base, image=dataclasses.replace(base.image, width=args.size, height=args.size, formats=("dicom", "png")),
            generator=dataclasses.replace(base.generator, backend="diffusion", model=str(model_dir), steps=args.steps,
                                          guidance_scale=args.guidance, scheduler="dpm_solver",
                                          threads=args.threads))
        spec_png = dataclasses.replace(spec, image=dataclasses.replace(spec.image, formats=("png",)))
        cases = list(sample_cases(spec, limit=args.count))
        prompts = [build_prompt(c, spec.prompt) for c in cases]

        # Load both (excluded from images/s; printed)
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        load_bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend = create_backend(spec)  # what generate() would build: DiffusionBackend from spec.generator
        load_synth = time.perf_counter() - t0
        assert type(pipe.scheduler).__name__ == backend._scheduler_cls.__name__
        print(f"settings: {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, dpm_solver "
              f"(dpmsolver++), {args.count} images per side per round, {args.rounds} rounds, cases "
              f"{cases[0].case_id}..{cases[-1].case_id} of {SPEC_FILE.name} with their prompts and seeds")
        print(f"threads: torch.get_num_threads() {threads_default} at start, {torch.get_num_threads()} after "
              f"loading (the backend sets {backend.threads}; both sides run with it) | synthmed micro-batch "
              f"{backend.micro_batch}, spec batch_size {spec.generator.batch_size} | bare: batch 1 per call")
        print(f"load: bare from_pretrained {load_bare:.2f} s | synthmed DiffusionBackend {load_synth:.2f} s "
              f"(includes hashing the model folder)")

        # Warm-up (2 steps) of the shapes each side runs: UNet 2x1 / VAE 1 (bare), UNet 2x8 / VAE 8 (synthmed)
        t0 = time.perf_counter()
        pipe(prompts[0].text, negative_prompt=prompts[0].negative or None, height=args.size, width=args.size,
             num_inference_steps=2, guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(0))
        warm_bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.steps = 2
        backend.generate(cases[:1], prompts[:1])
        backend.steps = args.steps
        warm_synth = time.perf_counter() - t0
        print(f"warm-up (2 steps, excluded): bare {warm_bare:.2f} s | synthmed {warm_synth:.2f} s")

        sides = ["bare", "synthmed"] + ([] if args.no_png_only else ["synthmed-png"])
        results: dict[str, list[dict]] = {s: [] for s in sides}
        print()
        print(f"{'round':>5} {'side':<13} {'seconds':>8} {'s/image':>8} {'images/s':>9} {'compute s':>10} "
              f"{'write s':>8}  notes")
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                out = tmp / f"{side}-{r}"
                if side == "bare":
                    res = run_bare(pipe, cases, prompts, args.size, args.steps, args.guidance, out)
                    note = "pipeline calls | PIL 8-bit PNG saves"
                else:
                    res = run_synthmed(spec if side == "synthmed" else spec_png, backend, args.count, out)
                    c = res["cache"]
                    note = (f"backend.generate | writer thread (overlapped); {res['files']['png']} png, "
                            f"{res['files']['dcm']} dcm, {res['rows']} manifest rows; prompt cache "
                            f"{c['hits']} hits / {c['misses']} misses")
                results[side].append(res)
                n = args.count
                print(f"{r + 1:>5} {side:<13} {res['seconds']:8.2f} {res['seconds'] / n:8.3f} "
                      f"{n / res['seconds']:9.3f} {res['compute']:10.2f} {res['write']:8.2f}  {note}", flush=True)
                shutil.rmtree(out, ignore_errors=True)

        def total(side: str, key: str = "seconds") -> float:
            return sum(x[key] for x in results[side])

        n_all = args.count * args.rounds
        bare, synth = total("bare"), total("synthmed")
        print()
        print(f"summary over {args.rounds} round(s), {n_all} images per side (load and warm-up excluded):")
        for side in sides:
            s = total(side)
            print(f"  {side:<13} {s / n_all:7.3f} s/image  {n_all / s:7.3f} images/s")
        print(f"  ratio synthmed/bare (images/s): {bare / synth:.3f}x   (target >= 1.0x; from the summed times)")
        per_round = [b["seconds"] / m["seconds"] for b, m in zip(results["bare"], results["synthmed"])]
        best = min(x["seconds"] for x in results["bare"]) / min(x["seconds"] for x in results["synthmed"])
        print(f"  per-round ratios: {', '.join(f'{x:.3f}x' for x in per_round)} | median {statistics.median(per_round):.3f}x"
              f" | best round of each side: {best:.3f}x (least disturbed by other load; spread across rounds: bare "
              f"{min(x['seconds'] for x in results['bare']):.1f}-{max(x['seconds'] for x in results['bare']):.1f} s, "
              f"synthmed {min(x['seconds'] for x in results['synthmed']):.1f}-"
              f"{max(x['seconds'] for x in results['synthmed']):.1f} s)")
        with_load_bare = (bare / args.rounds + load_bare) / args.count
        with_load_synth = (synth / args.rounds + load_synth) / args.count
        print(f"  with load included (one round + one load each): bare {1 / with_load_bare:.3f} images/s, "
              f"synthmed {1 / with_load_synth:.3f} images/s, ratio {with_load_bare / with_load_synth:.3f}x")
        print(f"  compute only (pipeline calls vs backend.generate): bare {total('bare', 'compute') / n_all:.3f} "
              f"s/image, synthmed {total('synthmed', 'compute') / n_all:.3f} s/image, ratio "
              f"{total('bare', 'compute') / total('synthmed', 'compute'):.3f}x (micro-batch 8 vs batch 1)")
        outside = synth - total("synthmed", "compute")
        print(f"  synthmed time outside backend.generate: {outside / n_all * 1000:.1f} ms/image "
              f"({outside / synth:.1%} of generate()); writer thread busy {total('synthmed', 'write') / n_all * 1000:.1f} "
              f"ms/image ({total('synthmed', 'write') / synth:.1%} of generate(), mostly overlapped with generation)")
        if "synthmed-png" in results:
            png = total("synthmed-png")
            dicom = (total("synthmed", "write") - total("synthmed-png", "write")) / n_all
            best_png = min(x["seconds"] for x in results["synthmed-png"])
            best_both = min(x["seconds"] for x in results["synthmed"])
            print(f"  synthmed PNG only: {png / n_all:.3f} s/image; writer thread {total('synthmed-png', 'write') / n_all * 1000:.1f}"
                  f" ms/image (PNG only) vs {total('synthmed', 'write') / n_all * 1000:.1f} ms/image (DICOM+PNG): DICOM "
                  f"costs {dicom * 1000:.1f} ms/image of writer time = {dicom / (synth / n_all):.1%} of synthmed's s/image; "
                  f"wall time, best rounds: DICOM+PNG {best_both / args.count:.3f} vs PNG only "
                  f"{best_png / args.count:.3f} s/image (the wall difference is mostly other load's noise)")
        print(f"  bare PNG saves: {total('bare', 'write') / n_all * 1000:.1f} ms/image "
              f"({total('bare', 'write') / bare:.1%} of its time, not overlapped)")
        hits = sum(x["cache"]["hits"] for x in results["synthmed"])
        misses = sum(x["cache"]["misses"] for x in results["synthmed"])
        print(f"  prompt-embedding cache (cleared before each run): {hits} hits / {hits + misses} look-ups = "
              f"{hits / max(hits + misses, 1):.1%} hit rate; the bare pipeline encodes prompt and negative "
              f"on every call ({2 * args.count} encodes per run)")
        if not args.no_breakdown:
            breakdown(backend, args.size, args.steps)
        print("  note: synthmed applies the spec's emphasis (finding words x1.3) to its embeddings; the bare pipeline "
              "gets the same text without emphasis (no effect on cost). synthmed writes 12-bit DICOM + 16-bit PNG + "
              "manifest, cases.jsonl and card; bare writes one 8-bit PNG.")


if __name__ == "__main__":
    sys.exit(main())
