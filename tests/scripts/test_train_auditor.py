"""scripts/train_auditor.py: a killed training resumes from its checkpoint to the weights of an unbroken one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from script_helpers import load_script, write_tiny_manifest  # noqa: E402

FINDINGS = ["no_finding", "pleural_effusion:left:mild", "cardiomegaly::moderate", "nodule:right_upper_zone:severe"]


@pytest.fixture(scope="module")
def script():
    return load_script("train_auditor")


@pytest.fixture
def manifest(tmp_path) -> Path:
    """A tiny manifest of random 32 x 32 drr films."""
    return write_tiny_manifest(tmp_path / "set", FINDINGS, n=24, size=32, val_every=4, views=("PA", "AP", "LL"))


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
    assert config["training"]["dataset"] is None and "(spec" not in card  # no dataset card beside this manifest


def test_the_card_names_the_spec_its_films_were_built_from(script, manifest, tmp_path):
    (manifest.parent / "dataset_card.json").write_text(json.dumps(
        {"name": "x", "count": 24, "spec": {"name": "auditor-training-drr", "count": 40000}}))
    assert _train(script, manifest, tmp_path / "out") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(spec `auditor-training-drr`, its first 24 cases of 40,000)" in card
    assert json.loads((tmp_path / "out" / "config.json").read_text())["training"]["dataset"] == {
        "spec_name": "auditor-training-drr", "cases": 24, "spec_count": 40000}


def test_blur_softens_each_image_by_its_own_sigma(script):
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.random((3, 1, 24, 24)).astype(np.float32))
    out = script.gaussian_blur(batch, np.array([0.0, 1.0, 2.5]))
    assert torch.equal(out[0], batch[0])  # sigma 0: untouched
    assert out[1].std() < batch[1].std() and out[2].std() < out[1].std()  # more blur, less texture
    assert torch.allclose(out.mean(dim=(2, 3)), batch.mean(dim=(2, 3)), atol=0.02)  # the mean level stays


def test_blur_and_init_are_used_and_written_to_the_card(script, manifest, tmp_path):
    assert _train(script, manifest, tmp_path / "plain") == 0
    assert _train(script, manifest, tmp_path / "blurred", "--blur", "1.5") == 0
    assert any(not np.array_equal(a, b) for a, b in zip(_weights(tmp_path / "plain").values(),
                                                          _weights(tmp_path / "blurred").values()))
    assert _train(script, manifest, tmp_path / "tuned", "--init", str(tmp_path / "blurred"), "--epochs", "1") == 0
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["training"]["init"] == str(tmp_path / "blurred") and config["training"]["blur"] == 0.0
    card = (tmp_path / "blurred" / "README.md").read_text()
    assert "Gaussian blur of half the images (sigma up to 1.5 px" in card
    assert "started from the weights" in (tmp_path / "tuned" / "README.md").read_text()


def test_init_from_an_auditor_of_another_design_is_refused(script, manifest, tmp_path, capsys):
    assert _train(script, manifest, tmp_path / "a") == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["embedding_dim"] = 64  # its weights no longer fit its config
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="--init .* does not match"):
        _train(script, manifest, tmp_path / "b", "--init", str(tmp_path / "a"))
    assert _train(script, manifest, tmp_path / "d", "--blur", "1") == 0
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["finding_names"] = config["finding_names"][::-1]  # loads, but reads findings in another order
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="another design .*finding_names"):
        _train(script, manifest, tmp_path / "e", "--init", str(tmp_path / "d"))
    with pytest.raises(SystemExit) as exit_info:
        _train(script, manifest, tmp_path / "c", "--init", str(tmp_path / "nothing"))
    assert exit_info.value.code == 2 and "no auditor there" in capsys.readouterr().err
