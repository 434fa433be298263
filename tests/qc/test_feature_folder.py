"""--features FOLDER: a torchvision or timm model folder (config.json + model.safetensors) as QC's feature space.

The library is stood in for by a tiny module with the same entry points (``torchvision.models.get_model`` /
``list_models``; ``timm.create_model`` / ``is_model`` / ``list_models``, and timm's ``forward_features`` /
``forward_head(pre_logits=True)`` / ``get_classifier``), so the folder checks, the fit check, the safetensors
loading, the preprocessing and the penultimate features are tested on every machine; the tests at the end build
real torchvision and timm models where those libraries load (here they do not: no CPU torchvision for this torch).
No download anywhere.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from synthmed.qc.feature_folder import (FolderFeatures, check_config, load_feature_folder,  # noqa: E402
                                        looks_like_folder)
from synthmed.qc.inputs import QCError  # noqa: E402

nn = torch.nn


# ----------------------------------------------------------------------------- stand-ins for the two libraries

class TinyNet(nn.Module):
    """torchvision's shape: a body, a pool, and ``fc`` (a Linear) at the end of forward."""

    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        self.seen = x.detach().clone()
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(x)


class TinyVGG(nn.Module):
    """torchvision's VGG shape: a ``classifier`` Sequential whose last Linear gives the logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, num_classes))

    def forward(self, x):
        return self.classifier(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class TinyTimm(nn.Module):
    """timm's shape: forward_features, forward_head(pre_logits=True), get_classifier, pretrained_cfg."""

    def __init__(self, num_classes: int = 5, in_chans: int = 3, embed_dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, embed_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"input_size": (in_chans, 24, 24), "mean": (0.25,) * in_chans,
                               "std": (0.5,) * in_chans}

    def forward_features(self, x):
        self.seen = x.detach().clone()
        return self.stem(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head


@pytest.fixture
def fake_torchvision(monkeypatch):
    models = types.ModuleType("torchvision.models")
    builders = {"tinynet": TinyNet, "tinyvgg": TinyVGG}
    models.calls = []

    def list_models(module=None):
        return sorted(builders)

    def get_model(name, weights=None, **kwargs):
        models.calls.append((name, weights, kwargs))
        assert weights is None  # never a download
        return builders[name](**kwargs)

    models.list_models, models.get_model = list_models, get_model
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return models


@pytest.fixture
def fake_timm(monkeypatch):
    timm = types.ModuleType("timm")
    timm.__version__ = "0-test"
    timm.calls = []

    def is_model(name):
        return name.split(".")[0] == "tiny_timm"

    def list_models(pattern="*"):
        return ["tiny_timm"]

    def create_model(name, pretrained=False, **kwargs):
        timm.calls.append((name, pretrained, kwargs))
        assert pretrained is False
        return TinyTimm(**kwargs)

    timm.is_model, timm.list_models, timm.create_model = is_model, list_models, create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    return timm


def make_folder(folder: Path, config: dict, model: nn.Module | None, *, drop: tuple[str, ...] = (),
                rename: dict[str, str] | None = None) -> Path:
    """A model folder: config.json and model.safetensors of ``model``'s state_dict (less ``drop``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if model is not None:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
        for old, new in (rename or {}).items():
            state[new] = state.pop(old)
        safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    return folder


def seeded(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs).eval()


def images(n: int = 3, side: int = 32) -> np.ndarray:
    return np.random.default_rng(1).random((n, side, side), dtype=np.float32)


# ----------------------------------------------------------------------------- torchvision-shaped models

def test_a_torchvision_folder_gives_the_features_before_the_classifier(tmp_path, fake_torchvision):
    model = seeded(TinyNet, num_classes=7)
    folder = make_folder(tmp_path / "tiny", {"library": "torchvision", "architecture": "tinynet", "num_classes": 7,
                                             "input_size": [3, 16, 16], "mean": [0.5], "std": [0.25]}, model)
    extractor = load_feature_folder(folder)
    assert isinstance(extractor, FolderFeatures) and extractor.name.startswith("torchvision:tinynet@sha256:")
    assert fake_torchvision.calls == [("tinynet", None, {"num_classes": 7})]
    x = images()
    features = extractor(x)
    assert features.shape == (3, 4) and features.dtype == np.float64
    # the same as the saved model's pooled features (its fc cut off), on the config's preprocessing
    expected_input = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(16, 16), mode="bilinear",
                                                     antialias=True, align_corners=False).expand(-1, 3, -1, -1)
    expected_input = (expected_input - 0.5) / 0.25
    assert torch.allclose(extractor.model.seen, expected_input)
    with torch.no_grad():
        expected = torch.relu(model.bn(model.conv(expected_input))).mean(dim=(2, 3)).double().numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_a_sequential_classifier_loses_only_its_last_linear(tmp_path, fake_torchvision):
    folder = make_folder(tmp_path / "vgg", {"library": "torchvision", "architecture": "tinyvgg"}, seeded(TinyVGG))
    extractor = load_feature_folder(folder)
    assert extractor(images(2)).shape == (2, 6)  # after the first Linear + ReLU: VGG's 4096 in small
    assert extractor.preprocessing["input_size"] == [3, 224, 224]  # torchvision's default, ImageNet's mean / std
    assert extractor.preprocessing["mean"] == [0.485, 0.456, 0.406]


def test_the_classifier_may_be_missing_or_of_another_class_count(tmp_path, fake_torchvision):
    """torchxrayvision's 18 outputs, or a backbone saved without its head: the features come before it."""
    backbone = seeded(TinyNet, num_classes=18)
    without = make_folder(tmp_path / "no-head", {"library": "torchvision", "architecture": "tinynet"}, backbone,
                          drop=("fc.weight", "fc.bias", "bn.num_batches_tracked"))
    other = make_folder(tmp_path / "18", {"library": "torchvision", "architecture": "tinynet"}, backbone)
    x = images(2)
    np.testing.assert_allclose(load_feature_folder(without)(x), load_feature_folder(other)(x))


def test_weights_that_do_not_fit_are_refused_with_the_file_and_the_tensors(tmp_path, fake_torchvision):
    config = {"library": "torchvision", "architecture": "tinynet"}
    wide = make_folder(tmp_path / "wide", config, seeded(TinyNet, width=6))
    with pytest.raises(QCError, match=r"model.safetensors does not fit torchvision 'tinynet'.*of another shape: "
                                      r"conv.weight \[6, 3, 3, 3\]"):
        load_feature_folder(wide)
    renamed = make_folder(tmp_path / "renamed", config, seeded(TinyNet), rename={"conv.weight": "stem.weight"})
    with pytest.raises(QCError, match=r"1 missing: conv.weight; 1 not in the model: stem.weight"):
        load_feature_folder(renamed)


# ----------------------------------------------------------------------------- timm-shaped models

def test_a_timm_folder_reads_timms_own_config(tmp_path, fake_timm):
    """timm's config.json (as save_for_hf writes it): no library key, preprocessing under pretrained_cfg."""
    model = seeded(TinyTimm, num_classes=3, in_chans=1)
    config = {"architecture": "tiny_timm", "num_classes": 3, "num_features": 8, "global_pool": "avg",
              "model_args": {"in_chans": 1},
              "pretrained_cfg": {"input_size": [1, 20, 20], "mean": [0.5], "std": [0.2], "interpolation": "bicubic",
                                 "crop_pct": 0.9, "classifier": "head"}}
    extractor = load_feature_folder(make_folder(tmp_path / "timm", config, model))
    assert fake_timm.calls == [("tiny_timm", False, {"in_chans": 1, "num_classes": 3})]
    assert extractor.name.startswith("timm:tiny_timm@sha256:")
    x = images(2)
    features = extractor(x)
    assert features.shape == (2, 8)  # forward_head(pre_logits=True): the pooled, normed features
    assert extractor.model.seen.shape == (2, 1, 20, 20)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(extractor.model.seen), pre_logits=True)
    np.testing.assert_allclose(features, expected.double().numpy(), rtol=1e-5)


def test_timm_preprocessing_falls_back_to_the_models_own(tmp_path, fake_timm):
    folder = make_folder(tmp_path / "bare", {"architecture": "tiny_timm"}, seeded(TinyTimm))
    extractor = load_feature_folder(folder)
    assert extractor.preprocessing == {"input_size": [3, 24, 24], "mean": [0.25] * 3, "std": [0.5] * 3,
                                       "interpolation": "bilinear"}
    extractor(images(1))
    assert extractor.model.seen.shape == (1, 3, 24, 24)


def test_a_grey_film_is_repeated_over_three_channels(tmp_path, fake_timm):
    folder = make_folder(tmp_path / "rgb", {"architecture": "tiny_timm", "input_size": [3, 32, 32],
                                            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, seeded(TinyTimm))
    extractor = load_feature_folder(folder)
    extractor(images(1))
    seen = extractor.model.seen[0]
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    np.testing.assert_allclose(seen[0].numpy(), (images(1)[0] - 0.5) / 0.5, rtol=1e-6)  # same size: no resize


# ----------------------------------------------------------------------------- refusals, each naming the file

@pytest.mark.parametrize("config, message", [
    ({"library": "keras", "architecture": "densenet121"}, "library: 'keras' is not one synthmed builds"),
    ({"library": "torchvision"}, "architecture: missing or empty"),
    ({"architecture": "hf-hub:microsoft/rad-dino"}, "names a hub or a file"),
    ({"architecture": "tiny_timm", "model_args": {"checkpoint_path": "/tmp/x.pth"}},
     "model_args.checkpoint_path: not allowed"),
    ({"architecture": "tiny_timm", "model_args": {"pretrained": True}}, "model_args.pretrained: not allowed"),
    ({"architecture": "tiny_timm", "model_args": {"depth": 10 ** 9}}, "model_args.depth"),
    ({"architecture": "tiny_timm", "input_size": [4, 224, 224]}, "input_size: [4, 224, 224]"),
    ({"architecture": "tiny_timm", "std": [0.2, 0.0, 0.2]}, "std: [0.2, 0.0, 0.2] must be 3 finite number"),
    ({"architecture": "tiny_timm", "num_classes": -1}, "num_classes: -1"),
])
def test_invalid_configs_are_refused_with_every_problem(tmp_path, config, message):
    folder = make_folder(tmp_path / "bad", config, seeded(TinyTimm))
    with pytest.raises(QCError, match="config.json") as info:
        load_feature_folder(folder)
    assert message in str(info.value)


def test_every_problem_of_a_config_is_named_at_once():
    with pytest.raises(QCError) as info:
        check_config({"library": "onnx", "input_size": "big", "mean": "x"})
    assert all(key in str(info.value) for key in ("library:", "architecture:", "input_size:", "mean:"))


def test_missing_folder_files_and_pickles_are_refused(tmp_path):
    with pytest.raises(QCError, match="feature extractor folder .*nowhere does not exist"):
        load_feature_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QCError, match=r"empty/config.json is missing"):
        load_feature_folder(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(QCError, match=r"empty/model.safetensors is missing: the weights must be in safetensors$"):
        load_feature_folder(empty)
    (empty / "model.safetensors").write_bytes(b"")
    (empty / "config.json").write_text("{not json")
    with pytest.raises(QCError, match=r"config.json is not valid JSON"):
        load_feature_folder(empty)
    (empty / "config.json").write_text('["a list"]')
    with pytest.raises(QCError, match=r"config.json must hold a JSON object"):
        load_feature_folder(empty)
    pickled = make_folder(tmp_path / "pickled", {"architecture": "tiny_timm"}, None)
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(QCError, match=r"model.safetensors is missing.*pytorch_model.bin, a pickle file"):
        load_feature_folder(pickled)
    (pickled / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(QCError, match=r"model.safetensors is not a safetensors file"):
        load_feature_folder(pickled)


def test_unknown_architectures_are_refused(tmp_path, fake_torchvision, fake_timm):
    with pytest.raises(QCError, match=r"'densenet999' is not a torchvision classification model"):
        load_feature_folder(make_folder(tmp_path / "tv", {"library": "torchvision", "architecture": "densenet999"},
                                        seeded(TinyNet)))
    with pytest.raises(QCError, match=r"'vit_huge_999' is not a timm model"):
        load_feature_folder(make_folder(tmp_path / "timm", {"architecture": "vit_huge_999"}, seeded(TinyTimm)))


def test_a_library_not_installed_says_what_to_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(QCError, match=r"needs timm, which is not installed: pip install 'synthmed\[features\]'"):
        load_feature_folder(make_folder(tmp_path / "timm", {"architecture": "tiny_timm"}, seeded(TinyTimm)))
    with pytest.raises(QCError, match=r"needs torchvision, which is not installed: .*--index-url"):
        load_feature_folder(make_folder(tmp_path / "tv", {"library": "torchvision", "architecture": "resnet18"},
                                        seeded(TinyNet)))


def test_a_torchvision_built_for_another_torch_is_named(tmp_path, monkeypatch):
    """A CUDA torchvision beside a CPU torch fails at import ('operator torchvision::nms does not exist')."""
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    with pytest.raises(QCError, match=r"installed but does not load \(RuntimeError: operator torchvision::nms does "
                                      r"not exist\); install the build that matches your torch"):
        load_feature_folder(make_folder(tmp_path / "tv", {"library": "torchvision", "architecture": "resnet18"},
                                        seeded(TinyNet)))


def test_folders_are_told_from_module_attribute(tmp_path):
    assert looks_like_folder(str(tmp_path))
    assert looks_like_folder("features/densenet121") and looks_like_folder("./x") and looks_like_folder("densenet")
    assert not looks_like_folder("tests.qc.test_qc_cli:ThumbFeatures")


# ----------------------------------------------------------------------------- through qc and the command line

SPEC = """\
spec_version: 1
name: feature-folder-test
seed: 5
count: 8
image: {size: 64}
findings:
  - finding: no_finding
    weight: 1
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    import os

    from synthmed.build import generate

    out = tmp_path_factory.mktemp("built") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)  # durability is not what these tests check
        generate(SPEC, out, backend="pattern", progress=False, qc=False)
    return out


def run_cli(*args):
    from click.testing import CliRunner

    from synthmed.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_qc_features_folder_end_to_end(built, tmp_path, fake_torchvision):
    folder = make_folder(tmp_path / "features" / "tiny", {"library": "torchvision", "architecture": "tinynet",
                                                          "input_size": 16}, seeded(TinyNet))
    cli = run_cli("qc", built, "-q", "--no-auditor", "--features", folder, "--reference", built / "manifest.csv",
                  "--report-dir", tmp_path / "report")
    assert cli.exit_code == 0, cli.output
    report = json.loads((tmp_path / "report" / "qc_report.json").read_text())
    ref = report["sections"]["reference"]
    assert report["feature_extractor"].startswith("torchvision:tinynet@sha256:")
    assert ref["status"] == "done" and ref["dimensions"] == 4 and ref["fid"] == pytest.approx(0.0, abs=1e-6)
    # the API takes the folder as a Path too
    from synthmed.qc import qc

    result = qc(built, feature_extractor=folder, auditor=False, write=False)
    assert result.report["feature_extractor"] == report["feature_extractor"]


def broken_config(folder: Path) -> Path:
    (folder / "config.json").write_text("{")
    return folder


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: make_folder(d / "no-weights", {"library": "torchvision", "architecture": "tinynet"}, None),
     "model.safetensors is missing"),
    (lambda d: broken_config(make_folder(d / "bad-json", {}, seeded(TinyNet))), "config.json is not valid JSON"),
    (lambda d: make_folder(d / "unknown", {"library": "torchvision", "architecture": "resnet9000"}, seeded(TinyNet)),
     "'resnet9000' is not a torchvision classification model"),
    (lambda d: make_folder(d / "wide", {"library": "torchvision", "architecture": "tinynet"},
                           seeded(TinyNet, width=6)), "does not fit torchvision 'tinynet'"),
])
def test_qc_features_folder_errors_exit_2_without_a_traceback(built, tmp_path, fake_torchvision, setup, message):
    folder = setup(tmp_path)
    cli = run_cli("qc", built, "-q", "--no-auditor", "--features", folder, "--report-dir", tmp_path / "report")
    assert cli.exit_code == 2, cli.output
    assert message in cli.output and str(folder) in cli.output and "Traceback" not in cli.output
    assert not (tmp_path / "report").exists()  # refused before any image is read or any file written


# ----------------------------------------------------------------------------- the real libraries, where they load

def real(library: str):
    try:
        return __import__(library)
    except Exception as e:  # not installed, or a build for another torch
        pytest.skip(f"{library} does not load here ({type(e).__name__}: {e})")


def test_real_torchvision_resnet18(tmp_path):
    tv = real("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=3).eval()
    folder = make_folder(tmp_path / "resnet18", {"library": "torchvision", "architecture": "resnet18",
                                                 "num_classes": 3, "input_size": [3, 64, 64]}, model)
    extractor = load_feature_folder(folder)
    x = images(2)
    features = extractor(x)
    assert features.shape == (2, 512)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        batch = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(64, 64), mode="bilinear",
                                                antialias=True, align_corners=False).expand(-1, 3, -1, -1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        np.testing.assert_allclose(features, model((batch - mean) / std).double().numpy(), rtol=1e-4, atol=1e-5)


def test_real_timm_vit_saved_by_timm_itself(tmp_path):
    timm = real("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4).eval()
    timm.models.save_for_hf(model, str(tmp_path / "vit"), safe_serialization=True)
    assert not (tmp_path / "vit" / "pytorch_model.bin").exists()
    extractor = load_feature_folder(tmp_path / "vit")
    assert extractor.preprocessing["input_size"] == [3, 32, 32]
    features = extractor(images(2, side=48))
    assert features.shape == (2, 192)
    with torch.no_grad():
        seen = torch.nn.functional.interpolate(torch.from_numpy(images(2, side=48))[:, None], size=(32, 32),
                                               mode=extractor.config.interpolation, antialias=True,
                                               align_corners=False).expand(-1, 3, -1, -1)
        mean = torch.tensor(extractor.config.mean).view(1, 3, 1, 1)
        std = torch.tensor(extractor.config.std).view(1, 3, 1, 1)
        expected = model.forward_head(model.forward_features((seen - mean) / std), pre_logits=True)
    np.testing.assert_allclose(features, expected.double().numpy(), rtol=1e-4, atol=1e-5)
