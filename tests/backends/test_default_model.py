"""The shipped default model: present, small, safe, offline, and it makes a labelled image."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from synthmed.backends import default_model_dir  # noqa: E402
from synthmed.backends.diffusion import check_model_folder  # noqa: E402
from synthmed.build import generate  # noqa: E402

MODEL = default_model_dir()


def test_shipped_model_is_a_small_fp16_safetensors_diffusers_folder():
    index = check_model_folder(MODEL, width=256, height=256)  # raises if anything is missing or pickled
    assert index["_class_name"] == "StableDiffusionPipeline"
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl")]
    from safetensors import safe_open

    for weights in MODEL.glob("*/*.safetensors"):
        with safe_open(str(weights), "pt") as fh:
            assert {str(fh.get_slice(k).get_dtype()) for k in fh.keys()} == {"F16"}, weights


def test_model_card_records_training_and_quality():
    card = (MODEL / "README.md").read_text(encoding="utf-8")
    for heading in ("Training", "Label fidelity", "By view", "FID", "Memorisation", "Speed", "Intended use"):
        assert heading in card, heading
    evaluation = json.loads((MODEL / "evaluation.json").read_text(encoding="utf-8"))
    assert set(evaluation["by_view"]) == {"PA", "AP", "LL"}  # the evaluation spec's views, each read on its own
    assert sum(v["cases"] for v in evaluation["by_view"].values()) == evaluation["eval_cases"]
    training = json.loads((MODEL / "training.json").read_text(encoding="utf-8"))
    assert training["steps"] > 0
    while "base_training" in training:  # fine-tuned from an earlier synthmed model: its lineage ends at scratch
        training = training["base_training"]
        assert training["steps"] > 0
    assert training["settings"]["base"] == "scratch" and training["vae_steps"] > 0


def test_the_default_recommends_its_late_guidance_and_its_card_measured_it():
    """generate samples the default as its card measured it: guidance 4, 2 below timestep 500 (sampling.json, from
    the recipe file make default-model installs)."""
    from pathlib import Path

    from synthmed.backends.diffusion import recommended_sampling

    late = {"scale": 2.0, "below_timestep": 500}
    assert recommended_sampling(MODEL)["late_guidance"] == late
    recipe = Path(__file__).resolve().parents[2] / "dataset_specs" / "default_model_sampling.json"
    assert (MODEL / "sampling.json").read_bytes() == recipe.read_bytes()
    sampling = json.loads((MODEL / "evaluation.json").read_text(encoding="utf-8"))["sampling"]
    assert sampling["late_guidance"] == late and sampling["guidance_scale"] == 4.0
    text = _card_script().sampling_text({"sampling": sampling})
    assert text.endswith("guidance 4 then 2 below timestep 500") and "(" not in text  # printed inside parentheses
    assert f"({text})" in " ".join((MODEL / "README.md").read_text(encoding="utf-8").split())


def _card_script():
    """scripts/model_card.py as a module (scripts/ is not a package)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "model_card.py"
    spec = importlib.util.spec_from_file_location("model_card", script)
    card_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card_script)
    return card_script


def test_model_card_describes_the_training_its_record_holds():
    card_script = _card_script()
    training = json.loads((MODEL / "training.json").read_text(encoding="utf-8"))
    assert card_script.training_steps_lines(training) in (MODEL / "README.md").read_text(encoding="utf-8")
    lora_stage = {**training, "settings": {**training["settings"], "learning_rate": None, "lr_schedule": "constant",
                                          "train_text_encoder": False, "mode": "lora"}}
    text = " ".join(card_script.training_steps_lines(lora_stage).split())
    assert "(lora UNet, learning rate 0.0001 constant" in text  # LoRA's default rate, no text encoder
    first = card_script.lineage(training)[0]

    def card_of(*bases):  # the first stage, then one more stage from each base in turn
        record = first
        for base in bases:
            record = {**record, "settings": {**record["settings"], "base": base}, "base_training": record}
        return " ".join(card_script.training_steps_lines(record).split())

    assert "runs both stages" in card_of("/x/out/default-model-constant")
    text = card_of("/x/out/default-model-constant", "/x/out/default-model-anneal1-model", "/x/out/default-model-anneal2-model")
    assert "runs every stage" in text and "default-model-refresh" not in text  # make default-model's four stages
    text = card_of("/x/out/default-model-constant", "/x/out/default-model-base", "/x/out/default-model-base")
    assert "runs the first two stages" in text and "Each later stage is `make default-model-refresh`" in text
    weighted = {**training, "settings": {**training["settings"], "finding_loss_weight": 5.0}}
    assert "seed 3, findings' loss weight 5)" in " ".join(card_script.training_steps_lines(weighted).split())


def smoke_row(tmp_path, generator: str, out: str = "out") -> dict:
    """The manifest row of one severe left pleural effusion made with ``generator`` (a YAML flow mapping), offline."""
    spec = tmp_path / f"{out}.yaml"
    spec.write_text(f"""
spec_version: 1
name: shipped-model-smoke
seed: 3
count: 2
image: {{size: 256, formats: [png, dicom]}}
findings:
  - finding: pleural_effusion
    weight: 1
    location: left
    severity: severe
generator: {generator}
""", encoding="utf-8")
    result = generate(spec, tmp_path / out, limit=1, progress=False, qc=False)
    with open(result.manifest, newline="", encoding="utf-8") as fh:
        (row,) = list(csv.DictReader(fh))
    return row


@pytest.mark.slow
def test_default_model_generates_a_labelled_image_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = smoke_row(tmp_path, "{backend: diffusion, model: default, steps: 4, threads: 1}")
    assert row["model_id"] == "synthmed-default" and row["findings"] == "pleural_effusion:left:severe"
    assert row["Pleural Effusion"] == "1" and (tmp_path / "out" / row["png_path"]).is_file()


def test_a_shipped_model_missing_from_the_installation_is_named(monkeypatch, tmp_path):
    from synthmed import backends
    from synthmed.backends import BackendUnavailable, create_backend
    from synthmed.spec import load_spec

    with pytest.raises(ValueError, match="no shipped model is called 'fastest'"):
        default_model_dir("fastest")
    monkeypatch.setattr(backends, "default_model_dir", lambda name="default": tmp_path / name)
    spec = load_spec("spec_version: 1\nname: d\ncount: 2\nfindings: [{finding: cardiomegaly, weight: 1}]\n"
                     "generator: {model: default-fast}\n")
    with pytest.raises(BackendUnavailable, match="the shipped default-fast model is not in this installation"):
        create_backend(spec)


def test_the_card_reads_each_view_on_its_own_cases():
    """A user who makes only frontal films reads the frontal figures: each view's agreements, on that view's cases."""
    import numpy as np

    from synthmed.qc.auditor import AuditorPrediction

    card_script = _card_script()
    rows = [{"view": view, "findings": "pleural_effusion:left:severe"} for view in ("PA", "PA", "LL")]

    def read(right):  # the effusion read (left, severe) on the cases where ``right`` is true, nothing elsewhere
        findings, locations = ("pleural_effusion", "no_finding"), ("left", "right", "none")
        return AuditorPrediction(
            np.array([[0.9, 0.1] if r else [0.1, 0.9] for r in right], np.float32),
            np.array([[0.9, 0.05, 0.05] if r else [0.05, 0.05, 0.9] for r in right], np.float32),
            np.array([[0.0, 0.0, 0.1, 0.9] if r else [0.9, 0.1, 0.0, 0.0] for r in right], np.float32),
            finding_names=findings, location_names=locations)

    views = card_script.by_view(read([True, False, True]), read([True, True, True]), rows, rows)
    assert views["PA"]["cases"] == 2 and views["LL"]["cases"] == 1
    assert views["PA"]["model"] == {"finding_set": 0.5, "location": 0.5, "severity": 0.5}
    assert views["LL"]["model"]["finding_set"] == 1.0 and views["PA"]["ceiling"]["finding_set"] == 1.0
    table = card_script.view_table(views, "model", "drr")
    assert "| PA | 2 | 0.500 / 1.000 | 0.500 / 1.000 | 0.500 / 1.000 |" in table
    assert "0.500 / 1.000 / 1.000" in card_script.view_table(views, "student", "drr", views | {"PA": {
        "model": {"finding_set": 1.0, "location": 1.0, "severity": 1.0}}})
