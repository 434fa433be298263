"""Hostile model folders (issue #17): a folder given as ``generator.model`` is data from anywhere.

Each test copies a tiny random diffusers folder (built by the functions of ``tests/backends/conftest.py``,
whose fixtures only reach tests/backends), breaks it the way a hostile or careless user would, and checks
that synthmed refuses it with a clear error, before loading weights or allocating what the folder asks for.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tracemalloc
from pathlib import Path
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from synthmed.backends.diffusion import (  # noqa: E402
    MAX_COMPONENT_PARAMETERS, MAX_CONFIG_BYTES, MAX_TOKENIZER_FILE_BYTES, DiffusionBackend, ModelFolderError,
    check_model_folder, estimate_size)
from synthmed.cli import main as cli_main  # noqa: E402

SIZE = 64


def _tiny_models():
    path = Path(__file__).resolve().parents[1] / "backends" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_synthmed_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    helpers = _tiny_models()
    root = tmp_path_factory.mktemp("hostile-tiny-sd")
    text_encoder, tokenizer = helpers.tiny_clip(root / "vocab")
    return helpers.save_pipeline(root / "model", text_encoder, tokenizer)


@pytest.fixture
def folder(tiny_sd, tmp_path) -> Path:
    """A fresh copy of the tiny folder, for this test to break."""
    return Path(shutil.copytree(tiny_sd, tmp_path / "model"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _refused(folder: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(ModelFolderError) as excinfo:
        check_model_folder(folder, width=SIZE, height=SIZE, **kwargs)
    message = str(excinfo.value)
    for needle in needles:
        assert needle in message, message
    return message


def _spec(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "spec_version: 1\nname: hostile-model\nseed: 7\ncount: 2\n"
        f"image: {{size: {SIZE}, formats: [png]}}\n"
        "findings:\n  - {finding: no_finding, weight: 1}\n"
        f"generator: {{backend: diffusion, model: {json.dumps(str(model))}, steps: 2, threads: 1}}\n",
        encoding="utf-8")
    return path


def _generate(spec: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli_main, ["generate", str(spec), "-o", str(out), "--no-qc", *extra])


# ----------------------------------------------------------------------------- #17.7 slots and pickles

@pytest.mark.parametrize("slot, model, weights", [
    ("scheduler", "unet", "diffusion_pytorch_model.bin"),
    ("tokenizer", "text_encoder", "pytorch_model.bin"),
])
def test_weighted_class_in_a_weightless_slot_loads_no_pickle(folder, slot, model, weights):
    """#17.7: a model class with pickled weights in the scheduler or tokenizer slot is refused; nothing is unpickled."""
    from safetensors.torch import load_file

    library = "diffusers" if model == "unet" else "transformers"
    cls = "UNet2DConditionModel" if model == "unet" else "CLIPTextModel"
    _edit_json(folder / "model_index.json", **{slot: [library, cls]})
    shutil.copy(folder / model / "config.json", folder / slot / "config.json")
    (state_file,) = (folder / model).glob("*.safetensors")
    torch.save(load_file(state_file), folder / slot / weights)
    real_load = torch.load
    with mock.patch("torch.load", side_effect=real_load) as loads, pytest.raises(ModelFolderError) as excinfo:
        DiffusionBackend(folder, width=SIZE, height=SIZE, steps=2, threads=1)
    assert loads.call_count == 0, "a pickle was unpickled without allow_pickle"
    message = str(excinfo.value)
    assert f"'{slot}'" in message and cls in message, message


@pytest.mark.parametrize("slot", ["scheduler", "tokenizer"])
def test_a_pickle_in_any_slot_needs_allow_pickle(folder, slot):
    """#17.7: the pickle rule holds for every file of every slot, not only the weighted ones."""
    torch.save({"x": torch.zeros(1)}, folder / slot / "extra.pt")
    _refused(folder, str(Path(slot) / "extra.pt"), "allow-pickle")
    check_model_folder(folder, width=SIZE, height=SIZE, allow_pickle=True)  # allowed on request


# ----------------------------------------------------------------------------- #17.8 bounds

@pytest.mark.parametrize("file, key, value", [
    ("scheduler/scheduler_config.json", "num_train_timesteps", 300_000_000),
    ("unet/config.json", "layers_per_block", 20_000),
    ("vae/config.json", "layers_per_block", 20_000),
    ("text_encoder/config.json", "num_hidden_layers", 100_000),
    ("text_encoder/config.json", "vocab_size", 10 ** 9),
])
def test_config_sizes_beyond_the_limits_are_refused_before_building(folder, file, key, value):
    """#17.8: an absurd size in a config is refused naming the file, the key and the value, before any allocation."""
    _edit_json(folder / file, **{key: value})
    _refused(folder, str(Path(file)), key, str(value))


def test_parameter_estimate_refuses_a_model_too_large_to_build(folder):
    """#17.8: sizes that are each plausible but together make a huge model are refused by the estimate."""
    _edit_json(folder / "text_encoder" / "config.json", hidden_size=16384, intermediate_size=65536,
               num_hidden_layers=48, num_attention_heads=128)
    _refused(folder, str(Path("text_encoder/config.json")), "hidden_size 16384", "G parameters",
             f"limit is {MAX_COMPONENT_PARAMETERS / 1e9:g} G")


def test_real_stable_diffusion_sizes_are_within_the_limits(folder):
    """#17.8: the limits admit a Stable Diffusion 1.x/2.x fine-tune (RoentGen): SD 1.5 UNet, SD VAE, CLIP ViT-L."""
    unet = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
            "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    vae = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
           "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4}
    clip = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768}
    # real counts (diffusers 0.42 / transformers 5 on the meta device): 859.5 M, 83.7 M, 123.1 M
    real_counts = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    for name, config in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
        real = real_counts[name]
        params, layers = estimate_size(name, config)
        assert real <= params <= 1.5 * real, (name, params, real)
        assert params < MAX_COMPONENT_PARAMETERS and layers < 100
        _edit_json(folder / name / "config.json", **config)
    check_model_folder(folder)


def test_a_huge_model_index_is_not_read_whole(folder):
    """#17.8: a model_index.json padded to a huge size is refused without reading it into memory."""
    index = folder / "model_index.json"
    with open(index, "a", encoding="utf-8") as fh:
        fh.write(" " * (MAX_CONFIG_BYTES + 8 * 1024 * 1024))
    tracemalloc.start()
    try:
        message = _refused(folder, "model_index.json", "MiB")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_CONFIG_BYTES * 2, f"{peak / 2 ** 20:.0f} MiB allocated to refuse it"
    assert "limit" in message


def test_a_huge_tokenizer_file_is_refused(folder):
    """#17.8: every file read while loading is bounded, the tokenizer's vocabulary files included."""
    vocab = folder / "tokenizer" / "vocab.json"
    with open(vocab, "wb") as fh:
        fh.truncate(MAX_TOKENIZER_FILE_BYTES + 1)  # sparse: no disk space used
    _refused(folder, str(Path("tokenizer/vocab.json")), "MiB")


# ----------------------------------------------------------------------------- #17.13 clear errors, nothing left

@pytest.mark.parametrize("damage, needles", [
    ("model-in-tokenizer-slot", ("'tokenizer'", "CLIPTextModel")),
    ("negative-model-max-length", ("tokenizer_config.json", "model_max_length", "-5")),
])
def test_broken_folder_exits_2_and_the_corrected_rerun_works(folder, tmp_path, damage, needles):
    """#17.13: a broken folder is a clear error (exit 2, no traceback) that leaves no .synthmed/ to block a rerun."""
    index_file, tokenizer_config = folder / "model_index.json", folder / "tokenizer" / "tokenizer_config.json"
    good_index, good_tokenizer = index_file.read_bytes(), tokenizer_config.read_bytes()
    if damage == "model-in-tokenizer-slot":  # a text encoder, weights and all, saved where the tokenizer goes
        _edit_json(index_file, tokenizer=["transformers", "CLIPTextModel"])
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folder / "text_encoder" / name, folder / "tokenizer" / name)
    else:
        _edit_json(tokenizer_config, model_max_length=-5)
    spec, out = _spec(tmp_path, folder), tmp_path / "out"
    result = _generate(spec, out)
    assert result.exit_code == 2, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    assert not (out / ".synthmed").exists()
    index_file.write_bytes(good_index)
    tokenizer_config.write_bytes(good_tokenizer)
    for name in ("config.json", "model.safetensors"):
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    result = _generate(spec, out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(list((out / "images").rglob("*.png"))) == 2


# ----------------------------------------------------------------------------- #17.18 quiet means quiet

def test_quiet_generate_shows_no_library_progress_bar(folder, tmp_path, capfd):
    """#17.18: transformers' 'Loading weights' bar does not appear under -q (nor any other library bar)."""
    result = _generate(_spec(tmp_path, folder), tmp_path / "out", "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    captured = capfd.readouterr()
    for text in (result.output, captured.out, captured.err):
        assert "Loading weights" not in text and "it/s]" not in text, text
