"""The tiny decoder: a model folder's ``tiny_vae/`` (a TAESD-style diffusers AutoencoderTiny, as ``synthmed distill``
trains one) decodes the latents instead of the VAE when the spec (``generator.decoder``), ``--decoder`` or the
folder's distillation.json asks for it; the folders are the tiny random ones of conftest.py plus a random tiny_vae.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from conftest import SIZE, make_case, make_prompt  # noqa: E402
from test_student import _spec, stored, student_backend  # noqa: E402 - the student tests' spec and backend

from synthmed.backends.diffusion import DiffusionBackend, recommended_sampling  # noqa: E402
from synthmed.model_folder import REQUIRED_COMPONENTS, TINY_DECODER, ModelFolderError, model_hash  # noqa: E402


def add_tiny_decoder(folder: Path, seed: int = 0, levels: int | None = None,
                     latent_channels: int | None = None) -> Path:
    """A random grayscale AutoencoderTiny in ``tiny_vae/``: by default for the folder's VAE (its latent channels and
    its number of levels, so its scale factor)."""
    from diffusers import AutoencoderTiny

    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    levels = levels or len(vae["block_out_channels"])
    torch.manual_seed(seed)
    tiny = AutoencoderTiny(in_channels=1, out_channels=1, latent_channels=latent_channels or vae["latent_channels"],
                           encoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,
                           decoder_block_out_channels=(8,) * levels, num_decoder_blocks=(1,) * levels)
    tiny.save_pretrained(folder / TINY_DECODER, safe_serialization=True)
    return folder


def recommend(folder: Path, decoder: str | None) -> None:
    """Set (or, with None, remove) distillation.json's recommended decoder."""
    path = folder / "distillation.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    record["recommended"].pop("decoder", None)
    if decoder is not None:
        record["recommended"]["decoder"] = decoder
    path.write_text(json.dumps(record), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_student(tiny_student_dir, tmp_path_factory) -> Path:
    """The tiny student with a tiny decoder, which its distillation.json recommends (read-only for tests)."""
    folder = tmp_path_factory.mktemp("tiny-decoder") / "student"
    shutil.copytree(tiny_student_dir, folder)
    recommend(folder, "tiny")
    return add_tiny_decoder(folder)


@pytest.fixture(scope="module")
def plain_with_tiny(tiny_sd_dir, tmp_path_factory) -> Path:
    """The tiny SD folder (RGB VAE, no distillation.json) with a tiny decoder (read-only for tests)."""
    folder = tmp_path_factory.mktemp("tiny-decoder-plain") / "model"
    shutil.copytree(tiny_sd_dir, folder)
    return add_tiny_decoder(folder)


@pytest.fixture
def student_copy(tiny_student, tmp_path):
    """A fresh copy of ``tiny_student`` that a test may break."""
    target = tmp_path / "student"
    shutil.copytree(tiny_student, target)
    return target


def _one(backend: DiffusionBackend, seed: int = 2024):
    case = make_case(seed=seed)
    return backend.generate([case], [make_prompt(case)])[0]


class DecoderCalls:
    """Counts the forward calls of the VAE's decoder and encoder and of the tiny decoder."""

    def __init__(self, backend: DiffusionBackend):
        self.calls = {"vae": 0, "vae_encoder": 0, "tiny": 0}
        modules = {"vae": backend.vae.decoder, "vae_encoder": backend.vae.encoder}
        if backend.tiny_vae is not None:
            modules["tiny"] = backend.tiny_vae.decoder
        self.handles = [m.register_forward_pre_hook(self._counter(name)) for name, m in modules.items()]

    def _counter(self, name):
        def hook(_module, _args):
            self.calls[name] += 1
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _calls(backend: DiffusionBackend, seed: int = 2024) -> tuple[dict, object]:
    counter = DecoderCalls(backend)
    try:
        image = _one(backend, seed)
    finally:
        counter.close()
    return counter.calls, image


# ----------------------------------------------------------------------------- which decoder

def test_the_tiny_decoder_decodes_when_the_folder_recommends_it(tiny_student):
    assert recommended_sampling(tiny_student)["decoder"] == "tiny"
    backend = student_backend(tiny_student)
    assert backend.decoder == "tiny" and backend.tiny_vae is not None
    assert backend.info.settings["decoder"] == "tiny"
    calls, _ = _calls(backend)
    assert calls == {"vae": 0, "vae_encoder": 0, "tiny": 1}


def test_the_image_is_the_tiny_decoders_of_the_same_latents(tiny_student):
    """The full and the tiny backend denoise the same latents; the tiny one's image is tiny_vae.decode of them."""
    full, tiny = student_backend(tiny_student, decoder="full"), student_backend(tiny_student)
    latents = []
    decode = full._decode
    full._decode = lambda x: (latents.append(x.clone()), decode(x))[1]
    full_image, tiny_image = _one(full), _one(tiny)
    assert not np.array_equal(stored(full_image), stored(tiny_image))
    with torch.inference_mode():
        decoded = tiny.tiny_vae.decode(latents[0][:1] / tiny.tiny_vae.config.scaling_factor, return_dict=False)[0]
    assert decoded.shape == (1, 1, SIZE, SIZE)  # the VAE's size: the same downscale factor
    expected = (decoded.float() / 2 + 0.5).clamp(0, 1).mean(dim=1)[0].numpy()
    np.testing.assert_allclose(tiny_image.pixels, expected, atol=1e-5, rtol=0)


def test_without_a_recommendation_the_vae_decodes(tiny_student, plain_with_tiny, student_copy):
    # a folder with no distillation.json: full, even with a tiny_vae/ (and no new key in the manifest)
    assert recommended_sampling(plain_with_tiny)["decoder"] == "full"
    plain = DiffusionBackend(plain_with_tiny, width=SIZE, height=SIZE, steps=2, device="cpu", threads=1)
    assert plain.decoder == "full" and plain.tiny_vae is None and "decoder" not in plain.info.settings
    # a student whose distillation.json names no decoder, or full
    for decoder in (None, "full"):
        recommend(student_copy, decoder)
        assert recommended_sampling(student_copy)["decoder"] == "full"
        backend = student_backend(student_copy)
        assert backend.tiny_vae is None and "decoder" not in backend.info.settings
        assert _calls(backend)[0] == {"vae": 1, "vae_encoder": 0, "tiny": 0}
    # what the spec asks for wins over the folder: tiny for the plain folder
    asked = DiffusionBackend(plain_with_tiny, width=SIZE, height=SIZE, steps=2, device="cpu", threads=1,
                             decoder="tiny")
    assert asked.info.settings["decoder"] == "tiny" and _calls(asked)[0]["tiny"] == 1


def test_the_spec_decoder_full_overrides_the_recommendation(tiny_student):
    from synthmed.backends import resolve_generator
    from synthmed.spec import load_spec

    assert resolve_generator(load_spec(_spec(tiny_student))).decoder == "tiny"
    spec = load_spec(_spec(tiny_student, decoder="full"))
    assert spec.generator.decoder == "full" and resolve_generator(spec).decoder == "full"
    assert load_spec(_spec(tiny_student, decoder=None)).generator.decoder is None  # null: the recommendation
    backend = student_backend(tiny_student, decoder="full")
    assert backend.tiny_vae is None and "decoder" not in backend.info.settings
    assert _calls(backend)[0] == {"vae": 1, "vae_encoder": 0, "tiny": 0}


def test_a_spec_decoder_must_be_full_or_tiny(tiny_student):
    from synthmed.spec import SpecError, load_spec

    with pytest.raises(SpecError, match="generator.decoder"):
        load_spec(_spec(tiny_student, decoder="small"))
    with pytest.raises(ValueError, match="decoder must be one of full, tiny"):
        student_backend(tiny_student, decoder="small")


# ----------------------------------------------------------------------------- refusals

def test_tiny_without_a_tiny_decoder_is_refused_naming_the_folder(tiny_student_dir, student_copy):
    with pytest.raises(ModelFolderError, match="has no tiny decoder") as excinfo:
        student_backend(tiny_student_dir, decoder="tiny")
    assert str(tiny_student_dir) in str(excinfo.value) and "decoder full" in str(excinfo.value)
    # recommended by distillation.json, but missing
    shutil.rmtree(student_copy / TINY_DECODER)
    with pytest.raises(ModelFolderError, match="recommends the tiny decoder") as excinfo:
        student_backend(student_copy)
    assert "distillation.json" in str(excinfo.value) and "has no tiny decoder" in str(excinfo.value)
    assert student_backend(student_copy, decoder="full").tiny_vae is None  # the way out the message names


def test_the_cli_refuses_tiny_without_a_tiny_decoder_as_a_usage_error(tiny_student_dir, tmp_path):
    from click.testing import CliRunner

    from synthmed.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec(tiny_student_dir), encoding="utf-8")
    result = CliRunner().invoke(main, ["generate", str(spec), "-o", str(tmp_path / "out"), "--decoder", "tiny", "-q",
                                       "--no-qc"])
    assert result.exit_code == 2, result.output
    assert "has no tiny decoder" in result.output and str(tiny_student_dir) in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "images").exists()


def test_a_distillation_json_recommending_another_decoder_is_refused(student_copy):
    recommend(student_copy, "small")
    with pytest.raises(ModelFolderError, match="recommended.decoder") as excinfo:
        student_backend(student_copy)
    assert "distillation.json" in str(excinfo.value)


def test_a_pickled_tiny_decoder_loads_only_when_pickle_is_allowed(tiny_student, student_copy):
    from safetensors.torch import load_file

    folder = student_copy / TINY_DECODER
    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelFolderError, match="pickle") as excinfo:
        student_backend(student_copy)
    assert str(folder / "diffusion_pytorch_model.bin") in str(excinfo.value)
    allowed = student_backend(student_copy, allow_pickle=True)
    assert np.array_equal(stored(_one(allowed)), stored(_one(student_backend(tiny_student))))


def test_a_tiny_decoder_of_another_class_is_refused_naming_the_file(student_copy):
    config_file = student_copy / TINY_DECODER / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["_class_name"] = "AutoencoderKL"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelFolderError, match="is not AutoencoderTiny") as excinfo:
        student_backend(student_copy)
    assert str(config_file) in str(excinfo.value)


@pytest.mark.parametrize("levels, latents, needle", [(4, None, "upsamples 8x but the VAE's scale factor is 4"),
                                                     (None, 3, "takes 3 latent channels but the VAE makes 4")])
def test_a_tiny_decoder_for_other_latents_is_refused(student_copy, levels, latents, needle):
    shutil.rmtree(student_copy / TINY_DECODER)
    add_tiny_decoder(student_copy, levels=levels, latent_channels=latents)
    with pytest.raises(ModelFolderError, match=needle) as excinfo:
        student_backend(student_copy)
    assert str(student_copy / TINY_DECODER / "config.json") in str(excinfo.value)


# ----------------------------------------------------------------------------- with int8 and coarse_to_fine

def test_int8_combines_with_the_tiny_decoder(tiny_student):
    ours = student_backend(tiny_student, quantize="int8")
    assert (ours.info.settings["quantize"], ours.info.settings["decoder"]) == ("int8", "tiny")
    cases = [make_case(i, seed=400 + i) for i in range(2)]
    images = ours.generate(cases, [make_prompt(c) for c in cases])
    assert len(images) == 2 and all(im.pixels.shape == (SIZE, SIZE) for im in images)
    assert not np.array_equal(stored(images[0]), stored(images[1]))
    assert np.abs(images[0].pixels - _one(student_backend(tiny_student), 400).pixels).max() < 0.2


def test_coarse_to_fine_decodes_with_the_tiny_decoder_and_encodes_with_the_vae(plain_with_tiny):
    """The tiny decoder's gray image goes to the RGB VAE's encoder as three equal channels."""
    settings = dict(width=SIZE, height=SIZE, steps=4, device="cpu", threads=1,
                    coarse_to_fine={"scale": 0.5, "strength": 0.6})
    tiny = DiffusionBackend(plain_with_tiny, decoder="tiny", **settings)
    calls, image = _calls(tiny)
    assert calls == {"vae": 0, "vae_encoder": 1, "tiny": 2}  # the coarse and the fine decode; the refine's encode
    full_calls, full_image = _calls(DiffusionBackend(plain_with_tiny, **settings))
    assert full_calls == {"vae": 2, "vae_encoder": 1, "tiny": 0}
    assert image.pixels.shape == (SIZE, SIZE) and not np.array_equal(stored(image), stored(full_image))


# ----------------------------------------------------------------------------- through the build, and the hash

def _generation(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return [json.loads(row["generation"]) | {"_png": row["png_sha256"]} for row in csv.DictReader(fh)]


def test_a_build_records_the_tiny_decoder_only_when_it_decodes(tiny_student, tmp_path):
    from click.testing import CliRunner

    from synthmed.build import BuildError, generate
    from synthmed.cli import main
    from synthmed.spec import load_spec

    spec = load_spec(_spec(tiny_student))
    one, two = (generate(spec, tmp_path / name, progress=False, qc=False) for name in ("one", "two"))
    assert one.written == two.written == 3
    rows = _generation(tmp_path / "one")
    assert all(r["decoder"] == "tiny" for r in rows)
    assert [r["_png"] for r in rows] == [r["_png"] for r in _generation(tmp_path / "two")]  # the same bytes twice
    run = json.loads((tmp_path / "one" / ".synthmed" / "run.json").read_text(encoding="utf-8"))
    assert run["generator"]["decoder"] == "tiny"
    # the command line's --decoder full: the VAE, and no decoder key anywhere (as every earlier manifest)
    path = tmp_path / "spec.yaml"
    path.write_text(_spec(tiny_student), encoding="utf-8")
    result = CliRunner().invoke(main, ["generate", str(path), "-o", str(tmp_path / "full"), "--decoder", "full",
                                       "-q", "--no-qc"])
    assert result.exit_code == 0, result.output
    full = _generation(tmp_path / "full")
    assert all("decoder" not in r for r in full) and {r["_png"] for r in full}.isdisjoint(r["_png"] for r in rows)
    run = json.loads((tmp_path / "full" / ".synthmed" / "run.json").read_text(encoding="utf-8"))
    assert "decoder" not in run["generator"]
    # a run is finished only with the decoder it began with
    with pytest.raises(BuildError, match="generator.decoder") as excinfo:
        generate(load_spec(_spec(tiny_student, decoder="full")), tmp_path / "one", resume=True, progress=False,
                 qc=False)
    assert excinfo.value.exit_code == 2


def _hash_without_tiny_decoder(root: Path) -> str:
    """model_hash as it was before tiny decoders: model_index.json and the five slots' files."""
    digest = hashlib.sha256()
    files = [root / "model_index.json"] + [p for c in REQUIRED_COMPONENTS for p in (root / c).rglob("*")]
    for file in sorted(p for p in files if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"):
        digest.update(str(file.relative_to(root)).encode("utf-8") + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_the_model_hash_covers_the_tiny_decoder(tiny_student_dir, tiny_sd_dir, student_copy):
    for folder in (tiny_student_dir, tiny_sd_dir):  # folders without one: the hash they always had
        assert model_hash(folder) == _hash_without_tiny_decoder(folder)
    with_tiny = model_hash(student_copy)
    assert with_tiny != _hash_without_tiny_decoder(student_copy) == model_hash(tiny_student_dir)
    shutil.rmtree(student_copy / TINY_DECODER)
    add_tiny_decoder(student_copy, seed=1)  # other weights, the same config
    assert model_hash(student_copy) not in (with_tiny, model_hash(tiny_student_dir))
    assert student_backend(student_copy).info.model_hash == model_hash(student_copy)
