"""synthmed.model_folder is the one home of the model-folder rules; the backend and finetune read folders through it.

The rules themselves are tested through their users, on tiny model folders: tests/backends/test_diffusion.py
(refusals, the hash), tests/hostile/test_model_folders.py (hostile folders), tests/test_finetune.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from synthmed import model_folder
from synthmed.model_folder import ModelFolderError, check_model_folder

DEFAULT_MODEL = Path(model_folder.__file__).parent / "models" / "default"
RULES = ("ModelFolderError", "check_model_folder", "load_component", "model_hash", "estimate_size",
         "REQUIRED_COMPONENTS", "WEIGHTED_COMPONENTS", "SAFE_LIBRARIES", "PICKLE_SUFFIXES", "SLOT_KINDS",
         "MAX_CONFIG_BYTES", "MAX_TOKENIZER_FILE_BYTES", "MAX_COMPONENT_PARAMETERS", "MAX_COMPONENT_LAYERS",
         "MAX_CONFIG_INTEGER", "MAX_TRAIN_TIMESTEPS")


def test_importing_the_rules_loads_no_model_library():
    """Checking a folder must not cost a torch import (``synthmed validate`` and ``plan`` start fast)."""
    code = textwrap.dedent("""
        import sys
        import synthmed.model_folder
        heavy = sorted(m for m in ("torch", "numpy", "diffusers", "transformers") if m in sys.modules)
        assert not heavy, heavy
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_backend_names_are_the_rules_themselves():
    """Code that imported the rules from synthmed.backends.diffusion keeps working, with the very same objects."""
    from synthmed.backends import diffusion

    for name in RULES:
        assert getattr(diffusion, name) is getattr(model_folder, name), name
    assert diffusion.check_model_folder.__module__ == "synthmed.model_folder"


def test_a_missing_folder_is_refused_with_its_name(tmp_path):
    with pytest.raises(ModelFolderError, match=r"model folder .*nope does not exist"):
        check_model_folder(tmp_path / "nope")


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="the default model is not installed")
def test_the_shipped_default_model_passes_the_checks_and_hashes_the_same_twice():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    index = check_model_folder(DEFAULT_MODEL, width=256, height=256)
    assert all(index[name] for name in model_folder.REQUIRED_COMPONENTS)
    digest = model_folder.model_hash(DEFAULT_MODEL)
    assert len(digest) == 64 and digest == model_folder.model_hash(DEFAULT_MODEL)
