"""scripts/train_auditor.py: a killed training resumes from its checkpoint to the weights of an unbroken one."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from PIL import Image  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_auditor.py"
FINDINGS = ["no_finding", "pleural_effusion:left:mild", "cardiomegaly::moderate", "nodule:right_upper_zone:severe"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_auditor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def manifest(tmp_path) -> Path:
    """A tiny manifest of random 32 x 32 films, some of them from the drr backend."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(24):
        name = f"images/case-{i:03d}.png"
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(folder / name)
        rows.append({"file_name": name, "split": "val" if i % 4 == 0 else "train", "findings": FINDINGS[i % 4],
                     "view": ("PA", "AP", "LL")[i % 3], "backend": "drr"})
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "manifest.csv"


def _train(script, manifest, out, *extra):
    return script.main(["--manifest", str(manifest), "-o", str(out), "--epochs", "3", "--batch-size", "6",
                        "--threads", "1", *extra])


def _weights(folder: Path) -> dict:
    return {k: v.numpy() for k, v in safetensors_torch.load_file(str(folder / "model.safetensors")).items()}


def test_a_killed_training_resumes_to_the_weights_of_an_unbroken_one(script, manifest, tmp_path, monkeypatch):
    assert _train(script, manifest, tmp_path / "unbroken") == 0

    save = script.Checkpoint.save
    calls = []

    def save_then_die(self, epoch, *args):
        save(self, epoch, *args)
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt  # killed after epoch 2 was checkpointed

    monkeypatch.setattr(script.Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(script, manifest, tmp_path / "resumed", "--checkpoint", str(tmp_path / "ckpt"))
    assert calls == [1, 2] and not (tmp_path / "resumed" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-002.pt", "state.json"]
    monkeypatch.setattr(script.Checkpoint, "save", save)
    assert _train(script, manifest, tmp_path / "resumed", "--checkpoint", str(tmp_path / "ckpt")) == 0

    unbroken, resumed = _weights(tmp_path / "unbroken"), _weights(tmp_path / "resumed")
    assert unbroken.keys() == resumed.keys()
    for name in unbroken:
        np.testing.assert_array_equal(unbroken[name], resumed[name], err_msg=name)


def test_a_checkpoint_of_another_training_is_refused(script, manifest, tmp_path):
    assert _train(script, manifest, tmp_path / "a", "--checkpoint", str(tmp_path / "ckpt")) == 0
    with pytest.raises(SystemExit, match="belongs to another training"):
        script.main(["--manifest", str(manifest), "-o", str(tmp_path / "b"), "--epochs", "3", "--batch-size", "6",
                     "--threads", "1", "--lr", "0.001", "--checkpoint", str(tmp_path / "ckpt")])


def test_the_card_says_which_films_and_gives_figures_by_view(script, manifest, tmp_path):
    assert _train(script, manifest, tmp_path / "out") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    assert config["films"] == "drr" and "drr films" in config["intended_use"]
    assert "digitally reconstructed radiographs" in card and "phantom backend" not in card
    assert "| LL |" in card and "location as the film shows it" in card
    assert script.films_of([{"backend": "phantom"}, {"backend": "drr"}]) == "phantom"
