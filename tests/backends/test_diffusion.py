"""The diffusion backend on tiny random diffusers pipelines (see conftest.py): loading, shapes,
exactness across batches, equality with diffusers' own StableDiffusionPipeline, every scheduler,
the prompt-embedding cache, emphasis, save/reload, int8 / coarse-to-fine / bfloat16, the folder
checks made before any weight is loaded, the model hash, and a build through ``synthmed.build``.

Every image is 64x64 (or smaller) with 2 denoising steps, so a generate call takes milliseconds.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import MAX_LENGTH, SIZE, emphasised, make_case, make_prompt  # noqa: E402

from synthmed.backends import BackendInfo, GeneratedImage  # noqa: E402
from synthmed.backends.diffusion import SCHEDULERS, DiffusionBackend, resolve_timestep_spacing  # noqa: E402
from synthmed.model_folder import ModelFolderError, check_model_folder  # noqa: E402
from synthmed.prompts import Prompt  # noqa: E402
from synthmed.writers.png import to_stored  # noqa: E402

STEPS = 2
GUIDANCE = 4.0
THREADS = 1  # the same for every backend and pipeline in this file (CPU kernels may differ by thread count)
NEGATIVE = "text, letters, watermark"


def make_backend(folder, **kwargs) -> DiffusionBackend:
    settings = dict(width=SIZE, height=SIZE, steps=STEPS, guidance_scale=GUIDANCE, scheduler="dpm_solver",
                    dtype="float32", device="cpu", threads=THREADS)
    settings.update(kwargs)
    return DiffusionBackend(folder, **settings)


def assert_same_images(one: DiffusionBackend, other: DiffusionBackend, cases) -> None:
    prompts = [make_prompt(c) for c in cases]
    for a, b in zip(one.generate(cases, prompts), other.generate(cases, prompts)):
        assert np.array_equal(a.pixels, b.pixels)


def stored(image: GeneratedImage) -> np.ndarray:
    """The 12-bit values a build would write."""
    return to_stored(image.pixels, 16)


def assert_valid(images, n: int, height: int = SIZE, width: int = SIZE) -> None:
    assert len(images) == n
    for image in images:
        assert isinstance(image, GeneratedImage)
        assert image.pixels.shape == (height, width)
        assert image.pixels.dtype == np.float32
        assert np.isfinite(image.pixels).all()
        assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
        assert image.pixels.std() > 0  # not a blank image


@pytest.fixture(scope="module")
def backend(tiny_sd_dir) -> DiffusionBackend:
    """The default settings (DPM-Solver++) on the tiny SD folder, shared by the read-only tests."""
    return make_backend(tiny_sd_dir)


@pytest.fixture(scope="module")
def sd_pipeline(tiny_sd_dir):
    """diffusers' own pipeline loaded from the same folder, for the equivalence tests."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_scheduler(base, scheduler: str):
    """diffusers' scheduler as the backend samples with it by default: its class, overrides and timestep spacing."""
    import diffusers

    cls_name, overrides = SCHEDULERS[scheduler]
    spacing = resolve_timestep_spacing(scheduler, None, dict(base.config), STEPS)
    return getattr(diffusers, cls_name).from_config(base.config, **overrides, timestep_spacing=spacing)


def pipeline_images(pipe, scheduler: str, case, prompt: Prompt, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """``pipe`` run the way the backend promises to match: one CPU generator seeded with the case seed."""
    import diffusers

    base = pipe.scheduler
    pipe.scheduler = reference_scheduler(base, scheduler)
    try:
        out = pipe(prompt.text, negative_prompt=prompt.negative or None, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, width=width, height=height,
                   generator=[torch.Generator("cpu").manual_seed(case.seed)], output_type="np").images
    finally:
        pipe.scheduler = base
    return out[0].mean(axis=-1)


# ----------------------------------------------------------------------------- loading and shapes

def test_tiny_sd_folder_generates_grayscale_images(backend, cases):
    images = backend.generate(cases, [make_prompt(c) for c in cases])
    assert_valid(images, len(cases))
    info = backend.info
    assert isinstance(info, BackendInfo)
    assert info.name == "diffusion"
    assert info.model_id and len(info.model_hash) >= 16
    assert info.settings["steps"] == STEPS and info.settings["scheduler"] == "dpm_solver"
    assert info.settings["width"] == SIZE and info.settings["height"] == SIZE
    json.dumps(dict(info.settings))  # recorded in the manifest: must be JSON-serialisable


def test_rgb_vae_output_is_the_channel_mean(backend, sd_pipeline):
    """Through the pipeline the tiny RGB VAE gives three different channels; the backend returns their mean."""
    case = make_case(seed=5)
    prompt = make_prompt(case)
    out = sd_pipeline(prompt.text, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                      generator=[torch.Generator("cpu").manual_seed(case.seed)], output_type="np").images[0]
    assert out.shape == (SIZE, SIZE, 3)
    assert np.abs(out[..., 0] - out[..., 1]).max() > 1e-3  # the channels really differ
    import diffusers

    sd_pipeline.scheduler, base = reference_scheduler(sd_pipeline.scheduler, "dpm_solver"), sd_pipeline.scheduler
    try:
        out = sd_pipeline(prompt.text, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=SIZE, height=SIZE,
                          generator=[torch.Generator("cpu").manual_seed(case.seed)], output_type="np").images[0]
    finally:
        sd_pipeline.scheduler = base
    ours = backend.generate([case], [prompt])[0].pixels
    np.testing.assert_allclose(ours, out.mean(axis=-1), atol=1e-5, rtol=0)


def test_one_channel_vae_folder(tiny_sd_gray_dir, cases):
    from diffusers import StableDiffusionPipeline

    gray = make_backend(tiny_sd_gray_dir, scheduler="ddim")
    case, prompt = cases[0], make_prompt(cases[0])
    image = gray.generate([case], [prompt])[0]
    assert_valid([image], 1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_gray_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipeline_images(pipe, "ddim", case, prompt)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5, rtol=0)


def test_bert_text_encoder_folder(tiny_bert_dir, cases):
    bert = make_backend(tiny_bert_dir)
    images = bert.generate(cases, [make_prompt(c) for c in cases])
    assert_valid(images, len(cases))
    assert type(bert.text_encoder).__name__ == "BertModel"
    alone = bert.generate(cases[2:3], [make_prompt(cases[2])])[0]
    assert np.array_equal(stored(alone), stored(images[2]))


def test_non_square_size_is_height_by_width(tiny_sd_dir):
    wide = make_backend(tiny_sd_dir, width=64, height=32)
    case = make_case()
    assert_valid(wide.generate([case], [make_prompt(case)]), 1, height=32, width=64)


# ----------------------------------------------------------------------------- exactness

def test_batch_equals_one_at_a_time(backend, cases):
    prompts = [make_prompt(c) for c in cases]
    together = backend.generate(cases, prompts)
    for case, prompt, image in zip(cases, prompts, together):
        alone = backend.generate([case], [prompt])[0]
        assert np.array_equal(stored(alone), stored(image)), case.case_id


def test_batch_larger_than_a_micro_batch_equals_one_at_a_time(backend):
    """Cases on both sides of a micro-batch boundary, in different positions than when alone."""
    cases = [make_case(i, seed=100 + i, severity=("mild", "moderate", "severe")[i % 3]) for i in range(10)]
    prompts = [make_prompt(c) for c in cases]
    together = backend.generate(cases, prompts)
    for i in (0, 7, 8, 9):
        alone = backend.generate([cases[i]], [prompts[i]])[0]
        assert np.array_equal(stored(alone), stored(together[i])), cases[i].case_id
    reversed_ = backend.generate(cases[::-1], prompts[::-1])[::-1]
    for a, b in zip(together, reversed_):
        assert np.array_equal(stored(a), stored(b))


def test_same_case_twice_is_identical_and_seeds_differ(backend):
    case = make_case(seed=77)
    prompt = make_prompt(case)
    first, second = backend.generate([case, case], [prompt, prompt])
    assert np.array_equal(first.pixels, second.pixels)
    again = backend.generate([case], [prompt])[0]
    assert np.array_equal(stored(first), stored(again))
    other = make_case(seed=78)
    different = backend.generate([other], [make_prompt(other)])[0]
    assert np.abs(different.pixels - first.pixels).max() > 1e-2


def test_a_new_backend_gives_the_same_images(backend, tiny_sd_dir, cases):
    prompts = [make_prompt(c) for c in cases]
    fresh = make_backend(tiny_sd_dir)
    for a, b in zip(backend.generate(cases, prompts), fresh.generate(cases, prompts)):
        assert np.array_equal(stored(a), stored(b))


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_equals_diffusers_pipeline(tiny_sd_dir, sd_pipeline, scheduler):
    """No emphasis: the backend's image is StableDiffusionPipeline's (generator=[seeded CPU generator])."""
    ours = make_backend(tiny_sd_dir, scheduler=scheduler)
    case = make_case(seed=2024)
    prompt = make_prompt(case, negative=NEGATIVE)
    assert prompt.weights == ()
    image = ours.generate([case], [prompt])[0].pixels
    expected = pipeline_images(sd_pipeline, scheduler, case, prompt)
    np.testing.assert_allclose(image, expected, atol=1e-5, rtol=0)
    # and inside a batch, at another position
    other = make_case(1, seed=9)
    batched = ours.generate([other, case], [make_prompt(other, negative=NEGATIVE), prompt])[1].pixels
    np.testing.assert_allclose(batched, expected, atol=1e-5, rtol=0)


def test_equals_diffusers_pipeline_without_guidance(tiny_sd_dir, sd_pipeline):
    ours = make_backend(tiny_sd_dir, scheduler="ddim", guidance_scale=1.0)
    case = make_case(seed=31)
    prompt = make_prompt(case)
    image = ours.generate([case], [prompt])[0].pixels
    out = sd_pipeline(prompt.text, num_inference_steps=STEPS, guidance_scale=1.0, width=SIZE, height=SIZE,
                      generator=[torch.Generator("cpu").manual_seed(case.seed)], output_type="np").images[0]
    np.testing.assert_allclose(image, out.mean(axis=-1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- schedulers

def test_scheduler_names_match_the_spec_schema():
    schema = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "dataset_spec.schema.json")
                        .read_text(encoding="utf-8"))
    names = schema["properties"]["generator"]["properties"]["scheduler"]["enum"]
    assert sorted(SCHEDULERS) == sorted(names) == sorted(
        ["dpm_solver", "ddim", "euler", "euler_ancestral", "pndm", "unipc", "lcm"])


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs_and_is_batch_invariant(tiny_sd_dir, cases, scheduler):
    ours = make_backend(tiny_sd_dir, scheduler=scheduler, steps=3)
    assert ours.info.settings["scheduler"] == scheduler
    prompts = [make_prompt(c) for c in cases]
    together = ours.generate(cases, prompts)
    assert_valid(together, len(cases))
    for i in (1, 3):
        alone = ours.generate([cases[i]], [prompts[i]])[0]
        assert np.array_equal(stored(alone), stored(together[i])), (scheduler, cases[i].case_id)


def test_euler_ancestral_noise_comes_from_the_case_seed(tiny_sd_dir):
    """The stochastic sampler's per-step noise must also be drawn from the case's own generator."""
    ours = make_backend(tiny_sd_dir, scheduler="euler_ancestral", steps=3)
    a, b = make_case(0, seed=1), make_case(1, seed=2)
    pa, pb = make_prompt(a), make_prompt(b)
    ab = ours.generate([a, b], [pa, pb])
    ba = ours.generate([b, a], [pb, pa])
    assert np.array_equal(stored(ab[0]), stored(ba[1]))
    assert np.array_equal(stored(ab[1]), stored(ba[0]))


def test_unknown_scheduler_is_refused_before_loading(tiny_sd_dir):
    with pytest.raises(ValueError, match="dpm_solver"):
        DiffusionBackend(tiny_sd_dir, width=SIZE, height=SIZE, scheduler="lms")


def test_sampling_starts_from_the_last_training_timestep_by_default(tiny_sd_dir, cases):
    """dpm_solver (and euler, unipc) sample with trailing spacing unless told otherwise: the first step is the
    training schedule's last timestep, where the folder's leading spacing starts one stride short of it."""
    folder = json.loads((Path(tiny_sd_dir) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert folder.get("timestep_spacing", "leading") == "leading"
    default, leading = make_backend(tiny_sd_dir), make_backend(tiny_sd_dir, timestep_spacing="leading")
    trained = folder.get("num_train_timesteps", 1000)
    assert int(default._scheduler().timesteps[0]) == trained - 1
    assert int(leading._scheduler().timesteps[0]) < trained - trained // (2 * STEPS)
    # recorded where it is not the folder's own: the settings of a leading run are those synthmed always wrote
    assert default.info.settings["timestep_spacing"] == "trailing" and "timestep_spacing" not in leading.info.settings
    prompts = [make_prompt(c) for c in cases[:2]]
    for a, b in zip(default.generate(cases[:2], prompts), leading.generate(cases[:2], prompts)):
        assert not np.array_equal(stored(a), stored(b))


def test_ddim_and_pndm_keep_the_folders_spacing(tiny_sd_dir):
    for scheduler in ("ddim", "pndm"):
        ours = make_backend(tiny_sd_dir, scheduler=scheduler, steps=4)
        assert ours.timestep_spacing == "leading" and "timestep_spacing" not in ours.info.settings
    assert make_backend(tiny_sd_dir, scheduler="ddim", steps=4, timestep_spacing="trailing").info.settings[
        "timestep_spacing"] == "trailing"  # 4 steps divide 1000: ddim's fixed stride lands on trailing's steps
    with pytest.raises(ValueError, match="fixed stride 1000 // 3"):
        make_backend(tiny_sd_dir, scheduler="ddim", steps=3, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="one of leading, linspace, trailing"):
        make_backend(tiny_sd_dir, timestep_spacing="sideways")


# ----------------------------------------------------------------------------- late guidance

LATE_STEPS = 4  # trailing: timesteps 999, 749, 499, 249


def _pipeline_with_callback(pipe, case, prompt, callback, steps: int = LATE_STEPS) -> np.ndarray:
    base = pipe.scheduler
    pipe.scheduler = reference_scheduler(base, "dpm_solver")
    try:
        out = pipe(prompt.text, negative_prompt=prompt.negative or None, num_inference_steps=steps,
                   guidance_scale=GUIDANCE, width=SIZE, height=SIZE, callback_on_step_end=callback,
                   generator=[torch.Generator("cpu").manual_seed(case.seed)], output_type="np").images
    finally:
        pipe.scheduler = base
    return out[0].mean(axis=-1)


def test_late_guidance_equals_diffusers_pipeline_changing_its_guidance_in_a_callback(tiny_sd_dir, sd_pipeline):
    """{scale: 2, below_timestep: 500}: the steps at 499 and 249 are guided at 2, as diffusers' pipeline does when a
    step-end callback sets its guidance scale (diffusers' "dynamic classifier-free guidance")."""
    ours = make_backend(tiny_sd_dir, steps=LATE_STEPS, late_guidance={"scale": 2.0, "below_timestep": 500})
    assert [int(t) for t in ours._scheduler().timesteps] == [999, 749, 499, 249]
    assert [ours.guidance_at(t) for t in ours._scheduler().timesteps] == [4.0, 4.0, 2.0, 2.0]
    case = make_case(seed=77)
    prompt = make_prompt(case, negative=NEGATIVE)

    def lighter_from_499(pipe, step_index, timestep, kwargs):
        if int(timestep) == 749:  # called at the end of a step: sets the guidance of the next one
            pipe._guidance_scale = 2.0
        return kwargs

    image = ours.generate([case], [prompt])[0].pixels
    np.testing.assert_allclose(image, _pipeline_with_callback(sd_pipeline, case, prompt, lighter_from_499),
                               atol=1e-5, rtol=0)
    constant = make_backend(tiny_sd_dir, steps=LATE_STEPS, late_guidance="none").generate([case], [prompt])[0]
    assert np.abs(constant.pixels - image).max() > 1e-4  # and the late steps' guidance shows (10x the tolerance)


def test_late_guidance_of_one_runs_no_guidance_pass_as_diffusers_cfg_cutoff(tiny_sd_dir, sd_pipeline):
    """A late scale of 1 runs the prompt's half only at those steps (half the UNet work there): the image of
    diffusers' SDCFGCutoffCallback, which drops the guidance pass after a step."""
    from diffusers.callbacks import SDCFGCutoffCallback

    ours = make_backend(tiny_sd_dir, steps=LATE_STEPS, late_guidance={"scale": 1.0, "below_timestep": 500})
    rows = []
    hook = ours.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    case = make_case(seed=78)
    prompt = make_prompt(case, negative=NEGATIVE)
    try:
        image = ours.generate([case], [prompt])[0].pixels
    finally:
        hook.remove()
    m = ours.micro_batch
    assert rows == [2 * m, 2 * m, m, m]
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)  # after the step at 749
    expected = _pipeline_with_callback(sd_pipeline, case, prompt, cutoff)
    np.testing.assert_allclose(image, expected, atol=1e-5, rtol=0)


def test_late_guidance_below_every_step_is_that_guidance_throughout(tiny_sd_dir, cases):
    """below_timestep 1000 takes in every step of a 1000-step model: the images of guidance_scale = its scale."""
    late = make_backend(tiny_sd_dir, late_guidance={"scale": 2.5, "below_timestep": 1000})
    assert_same_images(late, make_backend(tiny_sd_dir, guidance_scale=2.5), cases[:2])


def test_a_folder_may_recommend_late_guidance_recorded_only_when_on(tiny_sd_dir, tmp_path, cases):
    from synthmed.backends.diffusion import recommended_sampling

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    assert recommended_sampling(folder)["late_guidance"] is None
    assert "late_guidance" not in make_backend(folder).info.settings  # off: recorded as every run before it
    (folder / "sampling.json").write_text(json.dumps(
        {"recommended": {"late_guidance": {"scale": 2, "below_timestep": 500}}}), encoding="utf-8")
    late = {"scale": 2.0, "below_timestep": 500}
    assert recommended_sampling(folder) == {"scheduler": "dpm_solver", "steps": 20, "guidance_scale": 4.0,
                                            "decoder": "full", "dtype": "float32", "late_guidance": late}
    recommended = make_backend(folder)
    assert recommended.late_guidance == recommended.info.settings["late_guidance"] == late
    assert_same_images(recommended, make_backend(tiny_sd_dir, late_guidance=late), cases[:2])
    off = make_backend(folder, late_guidance="none")
    assert off.late_guidance is None and "late_guidance" not in off.info.settings
    assert_same_images(off, make_backend(tiny_sd_dir), cases[:2])
    for record, needle in (({"recommended": {"late_guidance": {"scale": 2}}}, "recommended.late_guidance"),
                           ({"recommended": {"guidance": 3}}, "recommended.guidance is not a sampling setting"),
                           ({"recommended": [1]}, "'recommended' must be an object")):
        (folder / "sampling.json").write_text(json.dumps(record), encoding="utf-8")
        with pytest.raises(ModelFolderError, match=needle):
            make_backend(folder)


def test_late_guidance_is_checked(tiny_sd_dir):
    assert make_backend(tiny_sd_dir, late_guidance={"scale": 2, "below_timestep": 500.0}).late_guidance == {
        "scale": 2.0, "below_timestep": 500}  # 500.0 is the whole number YAML and JSON Schema take it for
    for bad, needle in (({"scale": 0.5, "below_timestep": 500}, "scale must be a number from 1 to 50"),
                        ({"scale": 2, "below_timestep": 0}, "below_timestep must be a whole number from 1 to 1000"),
                        ({"scale": 2}, "'none' or {scale, below_timestep}"), ("2", "SCALE@TIMESTEP")):
        with pytest.raises(ValueError, match=needle):
            make_backend(tiny_sd_dir, late_guidance=bad)


# ----------------------------------------------------------------------------- prompt-embedding cache

def test_cache_encodes_each_distinct_prompt_once(tiny_sd_dir):
    ours = make_backend(tiny_sd_dir)
    first, second = make_case(0, seed=1), make_case(1, seed=2, finding="no_finding")
    cases = [first, second, make_case(2, seed=3), make_case(3, seed=4, finding="no_finding")]
    prompts = [make_prompt(c, negative=NEGATIVE) for c in cases]
    assert len({p.text for p in prompts}) == 2 and len({p.negative for p in prompts}) == 1
    ours.generate(cases, prompts)
    stats = dict(ours.cache_stats)
    assert stats["misses"] == 2 + 1  # two prompts and the one negative prompt
    assert stats["size"] == 3
    assert stats["hits"] >= 1
    ours.generate(cases, prompts)
    again = dict(ours.cache_stats)
    assert again["misses"] == stats["misses"]
    assert again["hits"] > stats["hits"]
    assert again["size"] == 3


def test_cache_is_bounded_and_evicts(tiny_sd_dir):
    ours = make_backend(tiny_sd_dir, cache_size=2)
    texts = ["mild pneumonia", "right lower lobe", "chest radiograph"]
    first = ours.embed(texts[0], ()).clone()
    for text in texts[1:]:
        ours.embed(text, ())
    assert ours.cache_stats["size"] == 2
    assert ours.cache_stats["misses"] == 3
    again = ours.embed(texts[0], ())  # evicted: encoded again, to the same values
    assert ours.cache_stats["misses"] == 4
    assert ours.cache_stats["size"] == 2
    assert torch.equal(again, first)
    ours.embed(texts[0], ())
    assert ours.cache_stats["hits"] == 1


def test_cached_images_equal_uncached_images(tiny_sd_dir, cases):
    prompts = [make_prompt(c) for c in cases]
    tiny_cache = make_backend(tiny_sd_dir, cache_size=1)
    big_cache = make_backend(tiny_sd_dir)
    big_cache.generate(cases, prompts)  # warm
    for a, b in zip(tiny_cache.generate(cases, prompts), big_cache.generate(cases, prompts)):
        assert np.array_equal(a.pixels, b.pixels)


# ----------------------------------------------------------------------------- emphasis

def _word_positions(tokenizer, text: str, word: str) -> list[int]:
    """Token positions of ``word`` in the encoded ``text`` (after the leading special token)."""
    start = text.index(word)
    before = tokenizer(text[:start], add_special_tokens=False).input_ids
    inside = tokenizer(word, add_special_tokens=False).input_ids
    lead = len(tokenizer("").input_ids) - len(tokenizer("", add_special_tokens=False).input_ids)
    lead = 1 if lead >= 1 else 0  # CLIP: <|startoftext|>; BERT: [CLS]
    return list(range(lead + len(before), lead + len(before) + len(inside)))


@pytest.mark.parametrize("folder", ["tiny_sd_dir", "tiny_bert_dir"])
def test_emphasis_scales_only_the_emphasised_tokens(request, folder):
    path = request.getfixturevalue(folder)
    ours = make_backend(path)
    text = make_prompt(make_case()).text
    assert "pneumonia" in text
    weight = 1.5
    weighted = emphasised(text, "pneumonia", weight)
    plain = ours.embed(text, ())
    heavy = ours.embed(weighted.text, weighted.weights)
    assert plain.shape == heavy.shape and plain.ndim == 3 and plain.shape[0] == 1
    assert plain.shape[2] == 16
    positions = _word_positions(ours.tokenizer, text, "pneumonia")
    assert positions
    changed = [i for i in range(plain.shape[1]) if not torch.equal(plain[0, i], heavy[0, i])]
    assert changed == positions
    torch.testing.assert_close(heavy[0, positions], plain[0, positions] * weight, rtol=1e-6, atol=0)
    # weight 1.0 is no emphasis at all
    neutral = emphasised(text, "pneumonia", 1.0)
    assert torch.equal(ours.embed(neutral.text, neutral.weights), plain)


def test_emphasis_changes_the_image_and_is_cached_separately(tiny_sd_dir):
    ours = make_backend(tiny_sd_dir)
    case = make_case(seed=8)
    plain = make_prompt(case)
    heavy = make_prompt(case, emphasis={"finding": 1.4})
    assert heavy.text == plain.text and heavy.weights
    a, b = ours.generate([case, case], [plain, heavy])
    assert np.abs(a.pixels - b.pixels).max() > 1e-4
    assert ours.cache_stats["misses"] == 3  # plain, emphasised, negative
    alone = ours.generate([case], [heavy])[0]
    assert np.array_equal(stored(alone), stored(b))


# ----------------------------------------------------------------------------- prompts too long for the text encoder

def _padded(prompt: Prompt, words: int) -> Prompt:
    """``prompt`` after ``words`` words of one token each ("a" in the tiny vocabulary), its emphasis moved along."""
    from synthmed.prompts import Emphasis

    pad = "a " * words
    return Prompt(pad + prompt.text, weights=tuple(Emphasis(e.start + len(pad), e.end + len(pad), e.weight, e.role)
                                                   for e in prompt.weights))


@pytest.mark.parametrize("emphasis", [None, {"finding": 1.3}])
def test_a_prompt_one_token_too_long_is_refused_not_cut(backend, emphasis):
    """The count the up-front check uses is the one embed uses (an emphasised prompt is tokenized piece by piece):
    at the limit a prompt embeds; one token more is an error, never silently cut."""
    case = make_case()
    prompt = make_prompt(case, emphasis=emphasis)
    (n,) = backend.prompt_lengths([prompt])
    assert n == len(backend.tokenizer(prompt.text).input_ids)
    fits = _padded(prompt, backend.max_length - n)
    assert backend.prompt_lengths([fits]) == [backend.max_length]
    assert backend.embed(fits.text, fits.weights).shape[1] == backend.max_length
    over = _padded(prompt, backend.max_length - n + 1)
    assert backend.prompt_lengths([over]) == [backend.max_length + 1]
    with pytest.raises(ValueError, match=f"{backend.max_length + 1} tokens long.*at most {backend.max_length}"):
        backend.embed(over.text, over.weights)


def test_generate_refuses_a_spec_whose_prompts_are_too_long_before_any_image(tiny_sd_dir, tmp_path):
    """A template that pushes the findings past the tokenizer's limit is an error naming the case, the tokens and
    the fix (exit 2), before any image; the shipped-length template builds."""
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    long_template = "{view} chest radiograph of a {age} year old {sex}, " + "a " * 60 + "{findings}."
    text = _spec_text(tiny_sd_dir).replace("prompt: {", f"prompt: {{template: {json.dumps(long_template)}, ")
    with pytest.raises(BuildError) as excinfo:
        generate(load_spec(text), tmp_path / "long", progress=False)
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 2
    assert "case-0000000's is" in message and "tokens" in message and f"than the {MAX_LENGTH} tokens" in message
    assert "prompt.template" in message and "fewer findings" in message
    assert not (tmp_path / "long" / "images").exists()
    assert generate(load_spec(_spec_text(tiny_sd_dir)), tmp_path / "short", progress=False).written == 5


def test_the_card_names_the_model_as_the_spec_does_never_by_its_absolute_path(tiny_sd_dir, tmp_path):
    """dataset_card.json and README.md travel with a shared set: they name the model as the spec wrote it (relative
    to the spec) or, given on the command line, by its folder's name; where the maker keeps files stays private."""
    import shutil

    from synthmed.build import generate

    shutil.copytree(tiny_sd_dir, tmp_path / "models" / "mine")
    shutil.copytree(tiny_sd_dir, tmp_path / "models" / "other")
    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec_text(Path("models/mine")).replace("count: 5", "count: 2"), encoding="utf-8")
    generate(spec, tmp_path / "a", progress=False, qc=False)
    generate(spec, tmp_path / "b", progress=False, qc=False, model=tmp_path / "models" / "other")
    for out, named in (("a", "models/mine"), ("b", "other")):
        card = json.loads((tmp_path / out / "dataset_card.json").read_text(encoding="utf-8"))
        assert card["backend"] == {"name": "diffusion", "model": named}
        for name in ("dataset_card.json", "README.md", "manifest.csv"):
            assert str(tmp_path) not in (tmp_path / out / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- save / reload

def test_resaved_folder_gives_identical_images(backend, tmp_path, cases):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=backend.vae, text_encoder=backend.text_encoder, tokenizer=backend.tokenizer,
                                   unet=backend.unet, scheduler=StableDiffusionPipeline.from_pretrained(
                                       backend.root, local_files_only=True, safety_checker=None,
                                       requires_safety_checker=False).scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "resaved", safe_serialization=True)
    check_model_folder(tmp_path / "resaved")
    reloaded = make_backend(tmp_path / "resaved")
    prompts = [make_prompt(c) for c in cases]
    for a, b in zip(backend.generate(cases, prompts), reloaded.generate(cases, prompts)):
        assert np.array_equal(a.pixels, b.pixels)


def test_a_folder_saved_as_a_variant_loads_as_the_same_model(backend, tmp_path, cases):
    """``save_pretrained(variant="fp16")`` (and many hub folders) keep only ``*.fp16.safetensors``: loaded as that
    variant, not refused with "no file named diffusion_pytorch_model.safetensors"."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(backend.root, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "variant", safe_serialization=True, variant="fp16")
    assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert_same_images(backend, make_backend(tmp_path / "variant"), cases[:2])
    shutil.copy(tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                tmp_path / "variant" / "unet" / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(ModelFolderError, match=r"unet holds weights of several variants \(bf16, fp16\)"):
        make_backend(tmp_path / "variant")
    assert make_backend(tmp_path / "variant", dtype="bfloat16").unet.dtype == torch.bfloat16  # its variant is taken


# ----------------------------------------------------------------------------- int8, coarse-to-fine, bfloat16

def test_int8_quantisation_runs(tiny_sd_dir, cases):
    ours = make_backend(tiny_sd_dir, quantize="int8")
    prompts = [make_prompt(c) for c in cases]
    images = ours.generate(cases, prompts)
    assert_valid(images, len(cases))
    assert ours.info.settings["quantize"] == "int8"
    alone = ours.generate(cases[2:3], prompts[2:3])[0]
    assert np.array_equal(stored(alone), stored(images[2]))


def test_coarse_to_fine_runs(tiny_sd_dir, cases):
    ours = make_backend(tiny_sd_dir, coarse_to_fine={"scale": 0.5, "strength": 0.6}, steps=3)
    prompts = [make_prompt(c) for c in cases]
    images = ours.generate(cases, prompts)
    assert_valid(images, len(cases))
    assert ours.info.settings["coarse_to_fine"] == {"scale": 0.5, "strength": 0.6}
    alone = ours.generate(cases[1:2], prompts[1:2])[0]
    assert np.array_equal(stored(alone), stored(images[1]))
    plain = make_backend(tiny_sd_dir, steps=3).generate(cases[:1], prompts[:1])[0]
    assert not np.array_equal(plain.pixels, images[0].pixels)


@pytest.mark.parametrize("bad", [{"scale": 1.5, "strength": 0.6}, {"scale": 0.5, "strength": 0.0}])
def test_coarse_to_fine_settings_are_checked(tiny_sd_dir, bad):
    with pytest.raises(ValueError, match="coarse_to_fine"):
        make_backend(tiny_sd_dir, coarse_to_fine=bad)


def test_bfloat16_runs_on_cpu(tiny_sd_dir, cases):
    ours = make_backend(tiny_sd_dir, dtype="bfloat16")
    assert ours.unet.dtype == torch.bfloat16
    prompts = [make_prompt(c) for c in cases[:2]]
    images = ours.generate(cases[:2], prompts)
    assert_valid(images, 2)
    assert ours.info.settings["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- folder checks (before loading)

def _edit_index(folder: Path, **changes) -> Path:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            index.pop(key, None)
        else:
            index[key] = value
    index_file.write_text(json.dumps(index, indent=2), encoding="utf-8")
    return index_file


def _unet_to_pickle(folder: Path) -> Path:
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    pickled = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save(state, pickled)
    weights.unlink()
    return pickled


def _no_weights_loaded():
    """Patches under which loading any diffusers or transformers model fails the test."""
    from contextlib import ExitStack
    from unittest import mock

    import diffusers
    import transformers

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} weights were loaded: the folder was not refused by the checks made before loading")

    stack = ExitStack()
    stack.enter_context(mock.patch.object(diffusers.ModelMixin, "from_pretrained", classmethod(refuse)))
    stack.enter_context(mock.patch.object(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse)))
    return stack


def _assert_refused(folder: Path, *needles: str, **kwargs) -> str:
    """The backend refuses ``folder`` with a ModelFolderError naming it (and ``needles``), before loading weights."""
    with _no_weights_loaded(), pytest.raises(ModelFolderError) as excinfo:
        make_backend(folder, **kwargs)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert str(folder) in message, message
    for needle in needles:
        assert needle in message, message
    # the same problem is found by the check alone
    check_kwargs = {k: v for k, v in kwargs.items() if k in ("allow_pickle", "width", "height")}
    check_kwargs.setdefault("width", SIZE)
    check_kwargs.setdefault("height", SIZE)
    with pytest.raises(ModelFolderError):
        check_model_folder(folder, **check_kwargs)
    return message


def test_missing_folder(tmp_path):
    _assert_refused(tmp_path / "no-such-model")


def test_missing_model_index(model_copy):
    folder = model_copy()
    (folder / "model_index.json").unlink()
    _assert_refused(folder, "model_index.json")


def test_missing_component_folder(model_copy):
    folder = model_copy()
    shutil.rmtree(folder / "vae")
    _assert_refused(folder, "vae")


def test_missing_component_config(model_copy):
    folder = model_copy()
    (folder / "unet" / "config.json").unlink()
    _assert_refused(folder, str(Path("unet") / "config.json"))


def test_missing_weights(model_copy):
    folder = model_copy()
    (folder / "text_encoder" / "model.safetensors").unlink()
    _assert_refused(folder, "text_encoder")


def test_pickle_weights_refused_unless_allowed(model_copy, backend, cases):
    folder = model_copy()
    _unet_to_pickle(folder)
    _assert_refused(folder, str(Path("unet") / "diffusion_pytorch_model.bin"), "allow_pickle")
    assert_same_images(make_backend(folder, allow_pickle=True), backend, cases)


def test_custom_code_component_refused(model_copy):
    folder = model_copy()
    _edit_index(folder, unet=["my_module", "UNet2DConditionModel"])
    _assert_refused(folder, "model_index.json", "my_module", "unet")


@pytest.mark.parametrize("class_name", ["StableDiffusionXLPipeline", "DDPMPipeline"])
def test_pipeline_class_that_is_not_latent_text_to_image_refused(model_copy, class_name):
    folder = model_copy()
    _edit_index(folder, _class_name=class_name)
    _assert_refused(folder, "model_index.json", class_name)


def test_unconditional_ddpm_folder_refused(model_copy):
    """A real DDPMPipeline folder: a UNet and a scheduler, no text encoder, tokenizer or VAE."""
    folder = model_copy()
    for name in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(folder / name)
    _edit_index(folder, _class_name="DDPMPipeline", vae=None, text_encoder=None, tokenizer=None, safety_checker=None,
                feature_extractor=None, image_encoder=None, requires_safety_checker=None)
    _assert_refused(folder, "model_index.json", "DDPMPipeline")


@pytest.mark.parametrize("width,height", [(60, 64), (64, 36), (68, 64)])
def test_size_not_a_multiple_of_the_model_factor(tiny_sd_dir, width, height):
    # VAE factor 4 x UNet factor 2 = 8
    message = _assert_refused(tiny_sd_dir, "8", width=width, height=height)
    assert str(width if width % 8 else height) in message


def test_sizes_that_are_multiples_pass_the_check(tiny_sd_dir):
    index = check_model_folder(tiny_sd_dir, width=72, height=40)
    assert index["_class_name"] == "StableDiffusionPipeline"


def _edit_config(folder: Path, file: str, **changes) -> None:
    path = folder / file
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


UNET, SCHEDULER = "unet/config.json", "scheduler/scheduler_config.json"


@pytest.mark.parametrize("file, changes, needles", [
    (UNET, {"out_channels": 3}, ("in_channels 4", "out_channels 3")),
    (UNET, {"out_channels": 8}, ("out_channels 8", "learned variance")),
    (UNET, {"num_class_embeds": 10}, ("num_class_embeds 10", "class labels")),
    (UNET, {"class_embed_type": "timestep"}, ("class_embed_type", "class labels")),
    (UNET, {"addition_embed_type": "text_time", "addition_time_embed_dim": 8}, ("addition_embed_type", "SDXL")),
    (UNET, {"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 16}, ("encoder_hid_dim_type", "not supported")),
    (SCHEDULER, {"prediction_type": "bogus"}, ("prediction_type \"bogus\"", "epsilon, v_prediction, sample")),
    (SCHEDULER, {"prediction_type": "flow_prediction"}, ("prediction_type", "flow-matching")),
    (SCHEDULER, {"use_flow_sigmas": True}, ("use_flow_sigmas", "flow-matching")),
    (SCHEDULER, {"beta_schedule": "weird"}, ("beta_schedule \"weird\"", "scaled_linear")),
    (SCHEDULER, {"beta_schedule": "sigmoid"}, ("beta_schedule \"sigmoid\"",)),  # DDPM's only: no sampler knows it
    (SCHEDULER, {"num_train_timesteps": 0}, ("num_train_timesteps 0",)),
    (SCHEDULER, {"_class_name": "FlowMatchEulerDiscreteScheduler"},
     ("FlowMatchEulerDiscreteScheduler", "flow-matching")),
])
def test_configs_synthmed_cannot_sample_are_refused_naming_file_and_key(model_copy, file, changes, needles):
    """Configs that fit their weights but not synthmed's text-to-image sampling (which would crash mid-run or
    sample the wrong process) are refused before loading, naming the file and the key."""
    folder = model_copy()
    _edit_config(folder, file, **changes)
    _assert_refused(folder, str(Path(file)), *needles)


def test_a_flow_matching_scheduler_is_refused_not_replaced(model_copy, tmp_path):
    """A flow-matching folder (its scheduler FlowMatchEulerDiscreteScheduler, as model_index.json names it) is
    refused naming the file, through generate too (exit 2), instead of being sampled by dpm_solver on default betas."""
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    folder = model_copy()
    _edit_index(folder, scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    _assert_refused(folder, "model_index.json", "FlowMatchEulerDiscreteScheduler", "flow-matching")
    with pytest.raises(BuildError) as excinfo:
        generate(load_spec(_spec_text(folder)), tmp_path / "out", progress=False)
    assert excinfo.value.exit_code == 2 and "FlowMatchEulerDiscreteScheduler" in str(excinfo.value)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_weights_cut_short_are_named_before_loading(model_copy, component):
    """An interrupted copy of a weights file is refused by name and size, not with the loader's bare
    "Unable to load weights"."""
    folder = model_copy()
    weights = next((folder / component).glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    _assert_refused(folder, str(weights), "cut short", f"{len(data) - 100:,} bytes of the {len(data):,}")


def test_weights_that_are_not_safetensors_are_named(model_copy):
    folder = model_copy()
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(b"<html>404 Not Found</html>")  # what a failed download leaves
    _assert_refused(folder, str(weights), "not a safetensors file")
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 7783176\n")
    _assert_refused(folder, str(weights), "Git LFS pointer", "git lfs pull")


def test_a_spare_variant_file_beside_the_plain_weights_is_not_checked(model_copy):
    """Only what loading reads is checked: a cut-short *.fp16.safetensors beside good plain weights is never read."""
    folder = model_copy()
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\x08")
    check_model_folder(folder, width=SIZE, height=SIZE)


def test_a_scheduler_whose_library_is_missing_names_the_library(model_copy):
    """diffusers exports a stand-in for DPMSolverSDEScheduler when torchsde is absent: the refusal names torchsde
    instead of calling the class unknown or not a DDPM-family scheduler."""
    import importlib.util

    if importlib.util.find_spec("torchsde") is not None:
        pytest.skip("torchsde is installed")
    folder = model_copy()
    _edit_index(folder, scheduler=["diffusers", "DPMSolverSDEScheduler"])
    _edit_config(folder, SCHEDULER, _class_name="DPMSolverSDEScheduler")
    _assert_refused(folder, "model_index.json", "DPMSolverSDEScheduler", "needs the optional library torchsde",
                    "pip install torchsde")
    _edit_index(folder, scheduler=["diffusers", "DDIMScheduler"])  # named only in the scheduler's own config
    _assert_refused(folder, str(Path(SCHEDULER)), "DPMSolverSDEScheduler", "torchsde")


@pytest.mark.parametrize("changes", [{"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
                                     {"beta_schedule": "weird", "trained_betas": [0.001] * 1000}])
def test_configs_synthmed_samples_pass_the_check(model_copy, changes):
    folder = model_copy()
    _edit_config(folder, SCHEDULER, **changes)
    check_model_folder(folder, width=SIZE, height=SIZE)


def test_steps_past_the_trained_timesteps_are_refused_before_loading(model_copy):
    """A folder trained on 3 timesteps cannot take 4 steps (NaN images) nor 3 ddim steps of its leading spacing
    (the last timestep 3 is past the schedule): refused naming the file, the key and what it can take."""
    folder = model_copy()
    _edit_config(folder, SCHEDULER, num_train_timesteps=3)
    check_model_folder(folder, width=SIZE, height=SIZE)
    for scheduler, steps, most in (("dpm_solver", 4, 3), ("ddim", 3, 2)):
        with _no_weights_loaded(), pytest.raises(ModelFolderError) as excinfo:
            make_backend(folder, scheduler=scheduler, steps=steps)
        message = str(excinfo.value)
        for needle in (str(Path(SCHEDULER)), "num_train_timesteps 3", f"{steps} {scheduler} steps", f"at most {most}"):
            assert needle in message, message
        assert make_backend(folder, scheduler=scheduler, steps=most).steps == most


@pytest.mark.parametrize("scheduler", ["pndm", "euler_ancestral"])
def test_a_scheduler_that_cannot_sample_a_sample_predicting_model_is_refused(model_copy, scheduler):
    folder = model_copy()
    _edit_config(folder, SCHEDULER, prediction_type="sample")
    with _no_weights_loaded(), pytest.raises(ModelFolderError, match=scheduler):
        make_backend(folder, scheduler=scheduler)
    make_backend(folder, scheduler="ddim")


# ----------------------------------------------------------------------------- model hash

def test_model_hash_is_stable_and_follows_the_weights(backend, tiny_sd_dir, model_copy):
    from safetensors.torch import load_file, save_file

    from synthmed.model_folder import model_hash

    assert model_hash(tiny_sd_dir) == model_hash(tiny_sd_dir) == backend.info.model_hash
    copy = model_copy("elsewhere")
    assert model_hash(copy) == backend.info.model_hash  # a content hash: the folder's location does not count
    assert make_backend(copy).info.model_hash == backend.info.model_hash
    (copy / "README.md").write_text("# a model card, rewritten after measuring\n")  # notes do not change images
    (copy / "evaluation.json").write_text("{}")
    assert model_hash(copy) == backend.info.model_hash
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    changed = model_hash(copy)
    assert changed != backend.info.model_hash
    assert make_backend(copy).info.model_hash == changed


# ----------------------------------------------------------------------------- through the build

def _spec_text(model: Path, **generator) -> str:
    settings = {"backend": "diffusion", "model": str(model), "steps": STEPS, "threads": THREADS, **generator}
    gen = ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
    return (
        "spec_version: 1\n"
        "name: tiny-diffusion\n"
        "seed: 20261121\n"
        "count: 5\n"
        f"image: {{size: {SIZE}, formats: [png]}}\n"
        "findings:\n"
        "  - {finding: no_finding, weight: 0.4}\n"
        "  - {finding: pneumonia, weight: 0.6, location: {right_lower_lobe: 0.5, left_lower_lobe: 0.5}}\n"
        "prompt: {emphasis: {finding: 1.3}, negative: \"text, letters, watermark\"}\n"
        f"generator: {{{gen}}}\n"
    )


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_build_with_the_diffusion_backend(tiny_sd_dir, tmp_path):
    from synthmed.build import generate
    from synthmed.spec import load_spec

    from synthmed.model_folder import model_hash

    spec = load_spec(_spec_text(tiny_sd_dir))
    assert spec.generator.backend == "diffusion" and spec.generator.steps == STEPS
    one = generate(spec, tmp_path / "one", batch_size=1, progress=False)
    three = generate(spec, tmp_path / "three", batch_size=3, progress=False)
    assert one.written == three.written == 5
    rows_one, rows_three = _manifest(tmp_path / "one"), _manifest(tmp_path / "three")
    assert len(rows_one) == len(rows_three) == 5
    expected_hash = model_hash(tiny_sd_dir)
    for a, b in zip(rows_one, rows_three):
        assert a["case_id"] == b["case_id"]
        assert a["backend"] == "diffusion"
        assert a["model_hash"] == expected_hash
        generation = json.loads(a["generation"])
        assert generation["backend"] == "diffusion"
        assert generation["steps"] == STEPS and generation["scheduler"] == "dpm_solver"
        assert generation["width"] == SIZE and generation["height"] == SIZE
        assert a["png_sha256"] and a["png_sha256"] == b["png_sha256"], a["case_id"]
        assert (tmp_path / "one" / a["png_path"]).read_bytes() == (tmp_path / "three" / b["png_path"]).read_bytes()
    assert len({r["png_sha256"] for r in rows_one}) == 5


def test_build_refuses_a_bad_model_folder_with_its_name(model_copy, tmp_path):
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    folder = model_copy()
    _unet_to_pickle(folder)
    with pytest.raises(BuildError) as excinfo:
        generate(load_spec(_spec_text(folder)), tmp_path / "out", progress=False)
    assert "diffusion_pytorch_model.bin" in str(excinfo.value)
    assert excinfo.value.exit_code == 2


def test_resume_refuses_a_model_whose_files_changed(model_copy, tmp_path):
    """The kept chunk was made by one model; finishing with other weights would mix two models in one set."""
    from safetensors.torch import load_file, save_file

    from synthmed.build import CHUNK_SIZE, BuildError, generate
    from synthmed.spec import load_spec

    folder = model_copy()
    spec = load_spec(_spec_text(folder).replace("count: 5", f"count: {CHUNK_SIZE + 2}"))
    out = tmp_path / "out"
    generate(spec, out, progress=False, limit=CHUNK_SIZE, qc=False)  # one whole chunk, kept by --resume
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    with pytest.raises(BuildError) as excinfo:
        generate(spec, out, resume=True, progress=False, qc=False)
    assert excinfo.value.exit_code == 2 and "its files changed" in str(excinfo.value)
    assert f"this run's, the model folder {folder}, has hash" in str(excinfo.value)
    assert len(list((out / "images").rglob("*.png"))) == CHUNK_SIZE  # nothing made with the other weights


def test_a_model_that_stops_loading_on_resume_keeps_the_finished_images(model_copy, tmp_path):
    """The failed resume must not clear the folder: images were made (only a run that made nothing is forgotten)."""
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    folder = model_copy()
    spec = load_spec(_spec_text(folder))
    out = tmp_path / "out"
    generate(spec, out, progress=False, limit=3, qc=False)  # 3 images, no whole chunk
    before = {p.relative_to(out): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BuildError) as excinfo:
        generate(spec, out, resume=True, progress=False, qc=False)
    assert "unet" in str(excinfo.value)
    assert {p.relative_to(out): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()} == before
    assert (out / ".synthmed" / "run.json").is_file()


def test_generate_takes_the_model_as_a_path(tiny_sd_dir, tmp_path):
    from synthmed.build import generate
    from synthmed.spec import load_spec

    result = generate(load_spec(_spec_text(tiny_sd_dir)), tmp_path / "out", model=Path(tiny_sd_dir), progress=False,
                      limit=2, qc=False)
    assert result.written == 2 and "qc=" not in repr(result)


# ----------------------------------------------------------------------------- folders that load but are wrong

def _load_refused(folder: Path, *needles: str) -> str:
    """The backend refuses ``folder`` with a ModelFolderError naming it (weights may have been read to find out)."""
    with pytest.raises(ModelFolderError) as excinfo:
        make_backend(folder)
    message = str(excinfo.value)
    assert str(folder) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_text_encoder_weights_missing_tensors_are_refused(model_copy):
    """transformers would fill the missing layers with random values and load without a word."""
    from safetensors.torch import load_file, save_file

    folder = model_copy()
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if "layers.1." not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    _load_refused(folder, "text_encoder", "missing", "layers.1.")


def test_weights_the_text_encoder_does_not_use_only_warn(model_copy, backend, cases):
    """A text encoder saved with an extra head: nothing is filled at random, the images are the same."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = model_copy()
    weights = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(weights)
    tensors["text_projection.weight"] = torch.zeros(4, 4)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="text_projection.weight"):
        extra = make_backend(folder)
    assert_same_images(extra, backend, cases)


def test_text_encoder_class_that_does_not_fit_its_weights_is_refused(model_copy):
    folder = model_copy()
    _edit_index(folder, text_encoder=["transformers", "BertModel"])
    _load_refused(folder, "text_encoder", "BertModel")


def test_truncated_text_encoder_weights_are_refused(model_copy):
    folder = model_copy()
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _load_refused(folder, "text_encoder")


def test_empty_tokenizer_folder_is_refused(model_copy):
    """It loads as a tokenizer of two special tokens: every prompt would become unknown tokens."""
    folder = model_copy()
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    _load_refused(folder, "tokenizer", "vocabulary")


@pytest.mark.parametrize("index, needle", [
    ([], "JSON object"),
    ({"_class_name": ["my_pipeline", "MyPipeline"]}, "custom pipeline"),
], ids=["a-list", "custom-pipeline-class"])
def test_model_index_of_the_wrong_shape_is_refused(model_copy, index, needle):
    folder = model_copy()
    if isinstance(index, dict):
        _edit_index(folder, **index)
    else:
        (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    _assert_refused(folder, "model_index.json", needle)


def test_component_config_that_is_not_json_is_refused(model_copy):
    folder = model_copy()
    (folder / "vae" / "config.json").write_text("{not json", encoding="utf-8")
    _assert_refused(folder, str(Path("vae") / "config.json"), "not valid JSON")


def test_vae_latents_the_unet_cannot_take_are_refused(model_copy):
    folder = model_copy()
    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["latent_channels"] = 8
    config_file.write_text(json.dumps(config), encoding="utf-8")
    _assert_refused(folder, "latent channels", "in_channels")


def test_a_file_given_as_the_model_folder_is_named_as_a_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    _assert_refused(weights, "is a file")


# ----------------------------------------------------------------------------- dtype: auto

@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, "float32"), (True, False, "bfloat16"),
                                                        (False, True, "bfloat16")])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, amx, avx512_bf16, expected):
    from synthmed.backends.diffusion import native_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert native_dtype(torch.device("cpu")) == expected
    assert native_dtype("mps") == "float32"


def test_auto_dtype_runs_and_is_recorded_as_chosen(tiny_sd_dir, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    auto = make_backend(tiny_sd_dir, dtype="auto")
    assert auto.dtype == torch.bfloat16 and next(auto.unet.parameters()).dtype == torch.bfloat16
    assert (auto.info.settings["dtype"], auto.info.settings["dtype_choice"]) == ("bfloat16", "auto")
    case = make_case(1)
    image = auto.generate([case], [make_prompt(case)])[0]
    assert np.isfinite(image.pixels).all() and image.pixels.std() > 0
    plain = make_backend(tiny_sd_dir, dtype="float32")
    assert plain.info.settings["dtype"] == "float32" and "dtype_choice" not in plain.info.settings


def test_auto_with_int8_computes_in_float32_and_bfloat16_with_int8_is_refused(tiny_sd_dir, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # auto would be bf16
    quantized = make_backend(tiny_sd_dir, dtype="auto", quantize="int8")
    assert quantized.dtype == torch.float32 and quantized.info.settings["dtype"] == "float32"
    case = make_case(2)
    assert np.isfinite(quantized.generate([case], [make_prompt(case)])[0].pixels).all()
    with pytest.raises(ValueError, match="quantize: int8 computes in float32; dtype bfloat16"):
        make_backend(tiny_sd_dir, dtype="bfloat16", quantize="int8")


def test_a_student_may_recommend_a_dtype_and_a_bad_one_is_refused(tiny_sd_dir, tmp_path):
    from synthmed.backends.diffusion import recommended_sampling

    folder = tmp_path / "student"
    shutil.copytree(tiny_sd_dir, folder)
    record = {"recommended": {"scheduler": "dpm_solver", "steps": 3, "guidance_scale": 2.0, "dtype": "auto"}}
    (folder / "distillation.json").write_text(json.dumps(record))
    assert recommended_sampling(folder)["dtype"] == "auto"
    assert recommended_sampling(tiny_sd_dir)["dtype"] == "float32"
    record["recommended"]["dtype"] = "float8"
    (folder / "distillation.json").write_text(json.dumps(record))
    with pytest.raises(ModelFolderError, match="recommended.dtype"):
        recommended_sampling(folder)


def test_a_resume_refuses_to_finish_a_run_in_another_dtype_than_auto_began_it(tiny_sd_dir, tmp_path, monkeypatch):
    """dtype auto picks per machine: a run begun in float32 is not finished in bfloat16 (mixed films); the message
    names both, and the same machine finishes it."""
    from test_student import _spec

    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    spec = load_spec(_spec(tiny_sd_dir, dtype="auto", steps=2).replace("count: 3", "count: 66"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    generate(spec, tmp_path / "run", limit=64, progress=False, qc=False)  # one whole chunk, in float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # "another machine"
    with pytest.raises(BuildError, match="partly made in float32, but this run computes in bfloat16") as excinfo:
        generate(spec, tmp_path / "run", resume=True, progress=False, qc=False)
    assert excinfo.value.exit_code == 2
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)  # back where it began
    assert generate(spec, tmp_path / "run", resume=True, progress=False, qc=False).written == 2


def test_generate_computes_with_its_threads_and_gives_the_callers_back(tiny_sd_dir, tmp_path):
    """generator.threads (or the usable CPUs) hold only while images are made: a notebook that set its own thread
    count, or seeded torch, finds both as it left them after building a backend and after generate."""
    from synthmed.build import generate
    from synthmed.spec import load_spec

    before = torch.get_num_threads()
    mine = 3 if before != 3 else 2
    torch.set_num_threads(mine)
    try:
        backend = make_backend(tiny_sd_dir, threads=1)
        assert torch.get_num_threads() == mine
        seen = []
        step = backend._generate_micro_batch
        backend._generate_micro_batch = lambda *a: seen.append(torch.get_num_threads()) or step(*a)
        backend.generate([make_case(0)], [make_prompt(make_case(0))])
        assert seen == [1] and torch.get_num_threads() == mine
        torch.manual_seed(11)
        expected = torch.rand(2)
        torch.manual_seed(11)
        generate(load_spec(_spec_text(tiny_sd_dir).replace("count: 5", "count: 2")), tmp_path / "out", progress=False,
                 qc=False)
        assert torch.get_num_threads() == mine and torch.equal(torch.rand(2), expected)
    finally:
        torch.set_num_threads(before)


def _components(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                scheduler=pipe.scheduler)


def test_a_backend_over_a_model_in_memory_follows_its_weights(tiny_sd_dir):
    """from_components serves a model being trained: after its weights change it draws with the new ones (no
    cached prompt embedding of the old text encoder), and its model_hash is of the weights, not one name for all."""
    parts = _components(tiny_sd_dir)
    settings = dict(width=SIZE, height=SIZE, steps=STEPS, guidance_scale=GUIDANCE, threads=THREADS)
    backend = DiffusionBackend.from_components(**parts, **settings)
    case = make_case(0)
    before = backend.generate([case], [make_prompt(case)])[0].pixels
    hash_before = backend.info.model_hash
    with torch.no_grad():
        for p in parts["text_encoder"].parameters():
            p.mul_(0.5)
    after = backend.generate([case], [make_prompt(case)])[0].pixels
    fresh = DiffusionBackend.from_components(**parts, **settings)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, fresh.generate([case], [make_prompt(case)])[0].pixels)
    assert fresh.info.model_hash != hash_before and len(hash_before) == 64
    assert backend.info.model_hash == fresh.info.model_hash  # the same object, trained further: another model
    assert DiffusionBackend.from_components(**parts, **settings, model_hash="mine").info.model_hash == "mine"


def test_a_resume_with_a_backend_object_of_other_settings_is_refused(tiny_sd_dir, tmp_path):
    """A Backend object's sampling settings are not the spec's: a resume whose backend samples otherwise than the
    kept rows were made is refused naming the settings, not mixed into one set; the same settings resume."""
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    spec = load_spec(_spec_text(tiny_sd_dir).replace("count: 5", "count: 70"))
    out = tmp_path / "out"
    generate(spec, out, backend=make_backend(tiny_sd_dir, steps=2), progress=False, qc=False, limit=64)
    with pytest.raises(BuildError, match=r"partly made with other settings .*steps 2 -> 3") as refused:
        generate(spec, out, backend=make_backend(tiny_sd_dir, steps=3), progress=False, qc=False, resume=True)
    assert refused.value.exit_code == 2
    result = generate(spec, out, backend=make_backend(tiny_sd_dir, steps=2), progress=False, qc=False, resume=True)
    assert (result.reused, result.written) == (64, 6)
