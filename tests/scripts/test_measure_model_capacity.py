"""scripts/measure_model_capacity.py: its candidates have the shapes they are measured for, and a measurement of a
trained VAE folder writes its figures to --json."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("scipy")
from script_helpers import load_script, write_tiny_manifest  # noqa: E402



@pytest.fixture(scope="module")
def script():
    return load_script("measure_model_capacity")


def test_each_vae_candidate_downsamples_by_two_per_level_after_the_first(script):
    film = torch.zeros(1, 1, 64, 64)
    for name, (channels, _, latent) in script.CANDIDATES.items():
        vae = script.make_vae(name).eval()
        with torch.inference_mode():
            z = vae.encode(film).latent_dist.mean
            back = vae.decode(z).sample
        side = 64 // 2 ** (len(channels) - 1)
        assert tuple(z.shape) == (1, latent, side, side), name
        assert tuple(back.shape) == (1, 1, 64, 64), name


def test_each_unet_candidate_takes_the_latent_it_is_timed_on(script):
    text = torch.zeros(1, 24, 128)
    for name, (_, _, _, side, latent, *_) in script.UNETS.items():
        unet = script.make_unet(name).eval()
        with torch.inference_mode():
            out = unet(torch.zeros(1, latent, side, side), 500, encoder_hidden_states=text).sample
        assert tuple(out.shape) == (1, latent, side, side), name


def test_the_scratch_unet_design_is_the_candidate_its_timing_chose(script):
    from synthmed.finetune import UNET_CONFIG

    def plain(value):
        return tuple(value) if isinstance(value, (list, tuple)) else value

    measured = script.make_unet("u16l64a1").config
    for key in ("block_out_channels", "layers_per_block", "norm_num_groups", "attention_head_dim",
                "down_block_types", "up_block_types", "in_channels"):
        assert plain(measured[key]) == plain(UNET_CONFIG[key]), key


def test_a_trained_vae_folder_is_measured_into_the_json(script, tmp_path):
    manifest = write_tiny_manifest(tmp_path / "set", ("no_finding", "pleural_effusion:left:mild",
                                                      "cardiomegaly::moderate"), n=6, size=64, val_every=2)
    script.make_vae("v16d4").save_pretrained(tmp_path / "vae")
    out = tmp_path / "figures.json"

    assert script.main(["--manifest", str(manifest), "--candidates", "", "--vae-folder",
                        str(tmp_path / "vae"), "--train", "1", "--held-out", "3", "--threads", "1",
                        "--json", str(out)]) == 0
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["settings"]["vae_folder"] == [str(tmp_path / "vae")]
    measured = figures["trained"][str(tmp_path / "vae")]
    assert measured["parameters"] > 0 and 0 < measured["psnr_db"] < 60
    assert set(measured["auditor"]) == {"finding_set_agreement", "location_agreement", "severity_agreement"}
