"""A distilled few-step student in the diffusion backend (the folder ``synthmed distill`` writes; built tiny and
random in conftest.py): diffusers' pipeline gives the same image, one UNet evaluation per step, images that do not
depend on the batch, sampling settings from the folder when the spec sets none, the settings it refuses, int8.
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

from conftest import SIZE, STUDENT_GUIDANCE, make_case, make_prompt  # noqa: E402

from synthmed.backends.diffusion import (PLAIN_SAMPLING, DiffusionBackend, recommended_sampling,  # noqa: E402
                                         guidance_embedding)
from synthmed.model_folder import ModelFolderError  # noqa: E402
from synthmed.writers.png import to_stored  # noqa: E402

THREADS = 1
NEGATIVE = "text, letters, watermark"


def student_backend(folder, **kwargs) -> DiffusionBackend:
    """No sampling settings: the folder's (lcm, 4 steps, guidance 4)."""
    return DiffusionBackend(folder, width=SIZE, height=SIZE, device="cpu", threads=THREADS, **kwargs)


def stored(image) -> np.ndarray:
    return to_stored(image.pixels, 16)


@pytest.fixture(scope="module")
def student(tiny_student_dir) -> DiffusionBackend:
    return student_backend(tiny_student_dir)


class UNetCalls:
    """Counts the UNet's evaluations and the rows of each (a forward pre-hook), and keeps its keyword arguments."""

    def __init__(self, backend: DiffusionBackend):
        self.rows: list[int] = []
        self.kwargs: list[dict] = []
        self.handle = backend.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.rows.append(int((args[0] if args else kwargs["sample"]).shape[0]))
        self.kwargs.append(dict(kwargs))

    def close(self) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- settings from the folder

def test_a_student_samples_with_its_recommended_settings(student, tiny_student_dir, tiny_sd_dir):
    settings = student.info.settings
    assert (settings["scheduler"], settings["steps"], settings["guidance_scale"]) == ("lcm", 4, STUDENT_GUIDANCE)
    assert settings["distilled"] == {"method": "latent consistency distillation", "mode": "full",
                                     "teacher_hash": "0" * 64}
    assert student.time_cond_proj_dim == 8 and not student.classifier_free
    # any other folder: exactly the settings every spec had before students (and no new key in the manifest)
    teacher = student_backend(tiny_sd_dir)
    assert {k: teacher.info.settings[k] for k in PLAIN_SAMPLING} == PLAIN_SAMPLING == {
        "scheduler": "dpm_solver", "steps": 20, "guidance_scale": 4.0}
    assert "distilled" not in teacher.info.settings and teacher.classifier_free
    # what the spec sets wins
    mine = student_backend(tiny_student_dir, steps=2, guidance_scale=6.0)
    assert (mine.info.settings["steps"], mine.info.settings["guidance_scale"]) == (2, 6.0)


def test_an_lcm_folder_without_distillation_json_recommends_lcm(tiny_student_dir, tiny_sd_dir, tmp_path):
    """A diffusers LCM folder made elsewhere: 4 lcm steps; guidance 4 when the UNet takes it, else 1 (an LCM-LoRA
    merged into a plain UNet has its guidance in its weights)."""
    conditioned = tmp_path / "conditioned"
    shutil.copytree(tiny_student_dir, conditioned)
    (conditioned / "distillation.json").unlink()
    assert recommended_sampling(conditioned) == {"scheduler": "lcm", "steps": 4, "guidance_scale": 4.0,
                                                  "decoder": "full", "dtype": "float32", "late_guidance": None}
    plain = tmp_path / "plain"
    shutil.copytree(tiny_sd_dir, plain)
    shutil.copy(conditioned / "scheduler" / "scheduler_config.json", plain / "scheduler" / "scheduler_config.json")
    assert recommended_sampling(plain) == {"scheduler": "lcm", "steps": 4, "guidance_scale": 1.0, "decoder": "full",
                                          "dtype": "float32", "late_guidance": None}
    assert recommended_sampling(tiny_sd_dir) == {**PLAIN_SAMPLING, "decoder": "full", "dtype": "float32",
                                                 "late_guidance": None}


@pytest.mark.parametrize("content, needle", [("{not json", "cannot be read as JSON"),
                                             ('{"recommended": {"scheduler": "lms", "steps": 4, "guidance_scale": 1}}',
                                              "recommended.scheduler"),
                                             ('{"recommended": {"scheduler": "lcm", "steps": 0, "guidance_scale": 1}}',
                                              "recommended.steps")])
def test_a_damaged_distillation_json_is_refused_naming_it(tiny_student_dir, tmp_path, content, needle):
    folder = tmp_path / "student"
    shutil.copytree(tiny_student_dir, folder)
    (folder / "distillation.json").write_text(content, encoding="utf-8")
    with pytest.raises(ModelFolderError, match=needle) as excinfo:
        student_backend(folder)
    assert "distillation.json" in str(excinfo.value)


# ----------------------------------------------------------------------------- the same images as diffusers

@pytest.mark.parametrize("guidance", [STUDENT_GUIDANCE, 1.5])
def test_a_student_equals_diffusers_pipeline(tiny_student_dir, guidance):
    """StableDiffusionPipeline with the folder's LCMScheduler, generator=[seeded CPU generator]: it embeds the
    guidance scale itself and runs no guidance pass; the backend's image is the same, alone and in a batch."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_student_dir, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    case = make_case(seed=2024)
    prompt = make_prompt(case, negative=NEGATIVE)
    expected = pipe(prompt.text, negative_prompt=prompt.negative, num_inference_steps=4, guidance_scale=guidance,
                    width=SIZE, height=SIZE, generator=[torch.Generator("cpu").manual_seed(case.seed)],
                    output_type="np").images[0].mean(axis=-1)
    ours = student_backend(tiny_student_dir, guidance_scale=guidance)
    np.testing.assert_allclose(ours.generate([case], [prompt])[0].pixels, expected, atol=1e-5, rtol=0)
    other = make_case(1, seed=9)
    batched = ours.generate([other, case], [make_prompt(other, negative=NEGATIVE), prompt])[1].pixels
    np.testing.assert_allclose(batched, expected, atol=1e-5, rtol=0)


def test_the_guidance_scale_reaches_the_student(tiny_student_dir, cases):
    prompts = [make_prompt(c) for c in cases[:1]]
    low = student_backend(tiny_student_dir, guidance_scale=1.5).generate(cases[:1], prompts)[0]
    high = student_backend(tiny_student_dir, guidance_scale=8.0).generate(cases[:1], prompts)[0]
    assert not np.array_equal(stored(low), stored(high))


def test_guidance_embedding_is_diffusers_own():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 0.5, 3.0, 7.0])
    for dim in (8, 9, 256):
        expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), expected)


# ----------------------------------------------------------------------------- one evaluation per step, batch-free

def test_one_unet_evaluation_per_step_for_a_student_two_rows_for_a_teacher(student, tiny_sd_dir):
    case = make_case(seed=7)
    calls = UNetCalls(student)
    try:
        student.generate([case], [make_prompt(case, negative=NEGATIVE)])
    finally:
        calls.close()
    assert calls.rows == [student.micro_batch] * 4  # 4 steps, one evaluation of the (padded) micro-batch each
    assert all(kw["timestep_cond"].shape == (student.micro_batch, 8) for kw in calls.kwargs)
    teacher = DiffusionBackend(tiny_sd_dir, width=SIZE, height=SIZE, steps=4, scheduler="lcm", guidance_scale=4.0,
                               device="cpu", threads=THREADS)
    calls = UNetCalls(teacher)
    try:
        teacher.generate([case], [make_prompt(case, negative=NEGATIVE)])
    finally:
        calls.close()
    assert calls.rows == [2 * teacher.micro_batch] * 4  # the guidance pass: prompt and negative rows each step
    assert all("timestep_cond" not in kw for kw in calls.kwargs)


def test_student_images_do_not_depend_on_the_batch(student):
    """The LCM sampler draws fresh noise between steps: from each case's own generator."""
    cases = [make_case(i, seed=100 + i) for i in range(10)]  # more than one micro-batch
    prompts = [make_prompt(c) for c in cases]
    together = student.generate(cases, prompts)
    for i in (0, 9):
        alone = student.generate([cases[i]], [prompts[i]])[0]
        assert np.array_equal(stored(alone), stored(together[i])), cases[i].case_id
    swapped = student.generate([cases[1], cases[0]], [prompts[1], prompts[0]])
    assert np.array_equal(stored(swapped[1]), stored(together[0]))
    assert len({stored(im).tobytes() for im in together}) == len(cases)


# ----------------------------------------------------------------------------- what a student refuses, and int8

@pytest.mark.parametrize("scheduler", ["dpm_solver", "ddim"])
def test_a_student_refuses_another_scheduler_naming_it(tiny_student_dir, scheduler):
    with pytest.raises(ValueError, match="generator.scheduler") as excinfo:
        student_backend(tiny_student_dir, scheduler=scheduler)
    assert repr(scheduler) in str(excinfo.value) and "lcm" in str(excinfo.value)


def test_coarse_to_fine_with_a_student_is_refused(tiny_student_dir):
    with pytest.raises(ValueError, match="4-step student"):
        student_backend(tiny_student_dir, coarse_to_fine={"scale": 0.5, "strength": 0.6})


def test_more_lcm_steps_than_the_solver_had_are_refused(tiny_student_dir):
    """LCMScheduler's steps are a subset of the distillation solver's 50; more would fail inside diffusers."""
    assert student_backend(tiny_student_dir, steps=50).steps == 50
    with pytest.raises(ValueError, match="generator.steps.*at most the 50 steps"):
        student_backend(tiny_student_dir, steps=51)


def test_int8_combines_with_a_student(tiny_student_dir, student):
    ours = student_backend(tiny_student_dir, quantize="int8")
    settings = ours.info.settings
    assert (settings["quantize"], settings["scheduler"], settings["steps"]) == ("int8", "lcm", 4)
    cases = [make_case(i, seed=300 + i) for i in range(3)]
    prompts = [make_prompt(c) for c in cases]
    calls = UNetCalls(ours)
    try:
        images = ours.generate(cases, prompts)
    finally:
        calls.close()
    assert calls.rows == [1] * 4 * len(cases)  # each case alone (int8 scales over the batch), one evaluation a step
    alone = ours.generate(cases[1:2], prompts[1:2])[0]
    assert np.array_equal(stored(alone), stored(images[1]))
    plain = student.generate(cases[:1], prompts[:1])[0]
    assert np.abs(images[0].pixels - plain.pixels).max() < 0.2  # the same model, quantised


# ----------------------------------------------------------------------------- through the build

def _spec(model: Path, **generator) -> str:
    settings = {"backend": "diffusion", "model": str(model), "threads": THREADS, **generator}
    gen = ", ".join(f"{k}: {json.dumps(v)}" for k, v in settings.items())
    return ("spec_version: 1\nname: tiny-student\nseed: 5\ncount: 3\n"
            f"image: {{size: {SIZE}, formats: [png]}}\n"
            "findings:\n  - {finding: no_finding, weight: 1}\n  - {finding: pneumonia, weight: 1}\n"
            f"generator: {{{gen}}}\n")


def test_a_build_records_the_settings_the_model_chose(tiny_student_dir, tiny_sd_dir, tmp_path):
    from synthmed.backends import resolve_generator
    from synthmed.build import generate
    from synthmed.spec import load_spec

    spec = load_spec(_spec(tiny_student_dir))
    assert (spec.generator.steps, spec.generator.scheduler, spec.generator.guidance_scale) == (None, None, None)
    generate(spec, tmp_path / "student", progress=False, qc=False)
    run = json.loads((tmp_path / "student" / ".synthmed" / "run.json").read_text(encoding="utf-8"))
    assert {k: run["generator"][k] for k in ("scheduler", "steps", "guidance_scale")} == {
        "scheduler": "lcm", "steps": 4, "guidance_scale": STUDENT_GUIDANCE}
    with open(tmp_path / "student" / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    generation = json.loads(rows[0]["generation"])
    assert (generation["scheduler"], generation["steps"], generation["quantize"]) == ("lcm", 4, "none")
    assert generation["distilled"]["mode"] == "full"
    # lcm places its own steps: the folder's spacing, recorded as before (not at all)
    assert "timestep_spacing" not in run["generator"] and "timestep_spacing" not in generation
    # a spec for an ordinary model: dpm_solver's 20 steps at 4.0, spaced trailing (not the folder's leading)
    plain = resolve_generator(load_spec(_spec(tiny_sd_dir)))
    assert (plain.steps, plain.guidance_scale, plain.scheduler, plain.timestep_spacing) == (
        20, 4.0, "dpm_solver", "trailing")
    assert resolve_generator(load_spec(_spec(tiny_sd_dir, scheduler="ddim"))).timestep_spacing is None
    assert resolve_generator(load_spec(_spec(tiny_sd_dir)), backend="phantom").timestep_spacing is None


def test_a_build_refuses_a_scheduler_the_student_cannot_take(tiny_student_dir, tmp_path):
    from synthmed.build import BuildError, generate
    from synthmed.spec import load_spec

    with pytest.raises(BuildError, match="generator.scheduler") as excinfo:
        generate(load_spec(_spec(tiny_student_dir, scheduler="euler")), tmp_path / "out", progress=False, qc=False)
    assert excinfo.value.exit_code == 2


def test_the_cli_sets_the_timestep_spacing_and_refuses_one_lcm_cannot_take(tiny_student_dir, tiny_sd_dir, tmp_path):
    from click.testing import CliRunner

    from synthmed.cli import main

    spec = tmp_path / "student.yaml"
    spec.write_text(_spec(tiny_student_dir), encoding="utf-8")
    result = CliRunner().invoke(main, ["generate", str(spec), "-o", str(tmp_path / "student"), "-q", "--no-qc",
                                       "--timestep-spacing", "trailing"])
    assert result.exit_code == 2, result.output
    assert "the lcm scheduler places its own steps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "student" / "images").exists()
    plain = tmp_path / "plain.yaml"
    plain.write_text(_spec(tiny_sd_dir, steps=2), encoding="utf-8")
    for spacing, recorded in (("linspace", "linspace"), ("leading", None)):  # leading: the folder's own
        out = tmp_path / f"plain-{spacing}"
        result = CliRunner().invoke(main, ["generate", str(plain), "-o", str(out), "-q", "--no-qc",
                                           "--timestep-spacing", spacing])
        assert result.exit_code == 0, result.output
        run = json.loads((out / ".synthmed" / "run.json").read_text(encoding="utf-8"))
        with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
            generation = json.loads(next(csv.DictReader(fh))["generation"])
        assert run["generator"].get("timestep_spacing") == generation.get("timestep_spacing") == recorded


def test_a_run_sampled_with_the_folders_spacing_resumes_only_with_it(tiny_sd_dir, tmp_path):
    """A run made with the folder's own spacing records none, as every run before timestep_spacing did: resuming
    it under the new default (trailing) is refused, naming the key; with --timestep-spacing leading it finishes."""
    from click.testing import CliRunner

    from synthmed.cli import main

    spec, out = tmp_path / "plain.yaml", tmp_path / "out"
    spec.write_text(_spec(tiny_sd_dir, steps=2), encoding="utf-8")
    base = ["generate", str(spec), "-o", str(out), "-q", "--no-qc"]
    assert CliRunner().invoke(main, base + ["--limit", "2", "--timestep-spacing", "leading"]).exit_code == 0
    assert "timestep_spacing" not in json.loads((out / ".synthmed" / "run.json").read_text(encoding="utf-8"))[
        "generator"]
    refused = CliRunner().invoke(main, base + ["--resume"])
    assert refused.exit_code == 2 and "generator.timestep_spacing None -> 'trailing'" in refused.output
    finished = CliRunner().invoke(main, base + ["--resume", "--timestep-spacing", "leading"])
    assert finished.exit_code == 0, finished.output
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all("timestep_spacing" not in json.loads(r["generation"]) for r in rows)


def test_a_folder_whose_scheduler_config_names_no_spacing_records_none_where_it_samples_as_before(tiny_sd_dir,
                                                                                                  tmp_path):
    """Without the key diffusers uses its class's default (leading for DDIM): sampled as before, recorded as before."""
    from synthmed.backends import resolve_generator
    from synthmed.spec import load_spec

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("timestep_spacing", None)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    assert resolve_generator(load_spec(_spec(folder, scheduler="ddim", steps=2))).timestep_spacing is None
    assert resolve_generator(load_spec(_spec(folder, steps=2))).timestep_spacing == "trailing"


# ----------------------------------------------------------------------------- late guidance

def test_a_guidance_conditioned_student_takes_late_guidance_as_its_guidance_input(tiny_student_dir, cases):
    """A student embeds the guidance scale (no guidance pass): late guidance changes the embedding of the late steps
    only, and below every step it is that guidance throughout."""
    late = student_backend(tiny_student_dir, late_guidance={"scale": 2.0, "below_timestep": 500})
    calls = UNetCalls(late)
    try:
        late.generate(cases[:1], [make_prompt(cases[0])])
    finally:
        calls.close()
    timesteps = [float(t) for t in late._scheduler().timesteps]
    assert len(calls.rows) == len(timesteps) and set(calls.rows) == {late.micro_batch}  # no guidance pass
    for t, kwargs in zip(timesteps, calls.kwargs):
        w = (2.0 if t < 500 else STUDENT_GUIDANCE) - 1.0
        expected = guidance_embedding(torch.full((late.micro_batch,), w), late.time_cond_proj_dim)
        assert torch.equal(kwargs["timestep_cond"], expected), t
    assert late.info.settings["late_guidance"] == {"scale": 2.0, "below_timestep": 500}
    everywhere = student_backend(tiny_student_dir, late_guidance={"scale": 2.0, "below_timestep": 1000})
    plain = student_backend(tiny_student_dir, guidance_scale=2.0)
    prompts = [make_prompt(c) for c in cases[:2]]
    for a, b in zip(everywhere.generate(cases[:2], prompts), plain.generate(cases[:2], prompts)):
        assert np.array_equal(a.pixels, b.pixels)


def test_the_cli_sets_late_guidance_and_a_run_resumes_only_with_the_guidance_it_began_with(tiny_sd_dir, tmp_path):
    """A folder recommending late guidance: the run records it (run.json and the generation column); a run begun
    with --late-guidance none records nothing, as runs before the key, and resumes only with it (the refusal names
    the key); a malformed value is a usage error."""
    from click.testing import CliRunner

    from synthmed.cli import main

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    late = {"scale": 2.0, "below_timestep": 500}
    (folder / "sampling.json").write_text(json.dumps({"recommended": {"late_guidance": late}}), encoding="utf-8")
    spec = tmp_path / "plain.yaml"
    spec.write_text(_spec(folder, steps=2), encoding="utf-8")

    def read(out):
        run = json.loads((out / ".synthmed" / "run.json").read_text(encoding="utf-8"))
        with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
            return run["generator"], [json.loads(r["generation"]) for r in csv.DictReader(fh)]

    made = CliRunner().invoke(main, ["generate", str(spec), "-o", str(tmp_path / "recommended"), "-q", "--no-qc"])
    assert made.exit_code == 0, made.output
    generator, rows = read(tmp_path / "recommended")
    assert generator["late_guidance"] == late and all(r["late_guidance"] == late for r in rows)
    mine = CliRunner().invoke(main, ["generate", str(spec), "-o", str(tmp_path / "mine"), "-q", "--no-qc",
                                     "--late-guidance", "1.5@300"])
    assert mine.exit_code == 0, mine.output
    assert read(tmp_path / "mine")[0]["late_guidance"] == {"scale": 1.5, "below_timestep": 300}

    out = tmp_path / "off"
    base = ["generate", str(spec), "-o", str(out), "-q", "--no-qc"]
    assert CliRunner().invoke(main, base + ["--limit", "2", "--late-guidance", "none"]).exit_code == 0
    assert "late_guidance" not in read(out)[0]
    refused = CliRunner().invoke(main, base + ["--resume"])
    assert refused.exit_code == 2 and "generator.late_guidance None -> " in refused.output, refused.output
    assert "finish it with the guidance it began with: --late-guidance none" in refused.output
    finished = CliRunner().invoke(main, base + ["--resume", "--late-guidance", "none"])
    assert finished.exit_code == 0, finished.output
    generator, rows = read(out)
    assert "late_guidance" not in generator and len(rows) == 3 and all("late_guidance" not in r for r in rows)

    for bad in ("2", "2@later", "60@500", "0.5@500"):
        wrong = CliRunner().invoke(main, base + ["--overwrite", "--late-guidance", bad])
        assert wrong.exit_code == 2 and "--late-guidance" in wrong.output and "Traceback" not in wrong.output, bad


def test_an_interrupted_run_prints_a_resume_command_that_repeats_the_late_guidance(tiny_sd_dir, tmp_path,
                                                                                    monkeypatch):
    """The printed command is rerunnable: --late-guidance as it was written, not as synthmed parsed it."""
    import shlex

    from click.testing import CliRunner

    import synthmed.build
    from synthmed.cli import main
    from synthmed.spec import load_spec

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthmed.build, "generate", interrupted)
    spec = tmp_path / "plain.yaml"
    spec.write_text(_spec(tiny_sd_dir, steps=2), encoding="utf-8")
    result = CliRunner().invoke(main, ["generate", str(spec), "-o", str(tmp_path / "out"), "--late-guidance", "2@500"])
    assert result.exit_code == 130
    words = shlex.split(result.output.split("rerun with --resume to finish: ", 1)[1].strip())
    assert words[words.index("--late-guidance") + 1] == "2@500" and words[-1] == "--resume"
    assert load_spec(spec.read_text(encoding="utf-8").replace(
        "threads:", "late_guidance: {scale: 2, below_timestep: 500.0}, threads:")).generator.late_guidance == {
        "scale": 2.0, "below_timestep": 500}  # and a spec's 500.0 is the whole number it means
