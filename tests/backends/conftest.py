"""Tiny random diffusers pipelines for the diffusion-backend tests, built offline from configs.

Following diffusers' own tests (``tests/pipelines/stable_diffusion``, ``get_dummy_components``):
every component is made from a config under ``torch.manual_seed(0)``, small enough that a
64x64 image takes a few tens of milliseconds on a CPU, and saved with ``save_pretrained``
as safetensors. Nothing is downloaded: the tokenizers are built from vocabulary files
written here.

Folders (session-scoped, read-only for tests; a test that breaks a folder copies it first):

- ``tiny_sd_dir``: Stable Diffusion 1.x layout (CLIP text encoder + CLIP BPE tokenizer), RGB VAE.
- ``tiny_sd_gray_dir``: the same with a one-channel VAE.
- ``tiny_bert_dir``: the same UNet/VAE/scheduler with a BERT text encoder and WordPiece tokenizer
  (the layout of LDM-style models whose text encoder is not CLIP).
- ``tiny_student_dir``: the layout ``synthmed distill`` writes for a full-mode student: the UNet takes the
  guidance scale as an input (``time_cond_proj_dim``), an LCMScheduler, and ``distillation.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from synthmed.prompts import Emphasis, Prompt, build_prompt  # noqa: E402
from synthmed.sampler import Case, FindingLabel  # noqa: E402

# words of our prompts that get a BPE merge chain (a single token each) in the tiny CLIP vocabulary
PROMPT_WORDS = ("chest", "radiograph", "pneumonia", "right", "left", "lower", "upper", "lobe", "mild",
                "moderate", "severe", "year", "old", "female", "male", "of", "a", "no", "finding",
                "pleural", "effusion", "cardiomegaly", "text", "letters", "watermark", "and")
CROSS_ATTENTION_DIM = 16
MAX_LENGTH = 77
SIZE = 64  # image side used by the tests; the UNet x VAE size factor of these models is 8


# ----------------------------------------------------------------------------- tokenizers

def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocabulary(folder: Path, words=PROMPT_WORDS) -> tuple[Path, Path, dict[str, int]]:
    """A byte-level BPE vocabulary: 256 byte characters, their ``</w>`` forms, merges for ``words``."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        # left-to-right chain: c h -> ch, ch e -> che, ..., ches t</w> -> chest</w>
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file, vocab


def write_bert_vocabulary(folder: Path, words=PROMPT_WORDS) -> Path:
    """A WordPiece vocabulary: the BERT specials, digits, letters, punctuation and whole prompt words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(".,;:!?-'()") + [str(d) for d in range(10)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)] + ["##" + str(d) for d in range(10)]
    tokens += [w for w in dict.fromkeys(words) if w not in tokens] + ["pa", "ap"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- components

def tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, norm_num_groups=4, attention_head_dim=2, **overrides)


def tiny_vae(channels: int = 3):
    """Three blocks: VAE scale factor 4, so with the UNet's one downsampling sizes must be multiples of 8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16), in_channels=channels, out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4, norm_num_groups=4, sample_size=SIZE)


def tiny_scheduler():
    from diffusers import DDIMScheduler

    # Stable Diffusion 1.x's scheduler settings
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_clip(workdir: Path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_file, merges_file, vocab = write_clip_vocabulary(workdir)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    config = CLIPTextConfig(hidden_size=CROSS_ATTENTION_DIM, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, vocab_size=len(vocab), max_position_embeddings=MAX_LENGTH,
                            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, layer_norm_eps=1e-5,
                            projection_dim=CROSS_ATTENTION_DIM)
    torch.manual_seed(0)
    return CLIPTextModel(config).eval(), tokenizer


def tiny_bert(workdir: Path):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab_file = write_bert_vocabulary(workdir)
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=MAX_LENGTH)
    config = BertConfig(vocab_size=len(vocab_file.read_text(encoding="utf-8").split()), hidden_size=CROSS_ATTENTION_DIM,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=MAX_LENGTH + 3, pad_token_id=0)
    torch.manual_seed(0)
    return BertModel(config).eval(), tokenizer


def save_pipeline(folder: Path, text_encoder, tokenizer, vae_channels: int = 3, unet=None, scheduler=None) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=tiny_vae(vae_channels), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_unet() if unet is None else unet,
                                   scheduler=tiny_scheduler() if scheduler is None else scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


STUDENT_GUIDANCE = 4.0  # what the tiny student's distillation.json recommends


def save_student(folder: Path, text_encoder, tokenizer) -> Path:
    """A full-mode student's folder as ``synthmed distill`` writes it, with random weights (its guidance input
    too, so that the guidance scale changes the image): UNet with ``time_cond_proj_dim``, LCMScheduler with the
    solver's 50 steps, and distillation.json recommending lcm, 4 steps, guidance 4."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(tiny_scheduler().config, original_inference_steps=50, timestep_scaling=10.0)
    save_pipeline(folder, text_encoder, tokenizer, unet=tiny_unet(time_cond_proj_dim=8), scheduler=scheduler)
    (folder / "distillation.json").write_text(json.dumps({
        "format": 1, "method": "latent consistency distillation", "mode": "full",
        "teacher": {"path": "tiny-sd", "model_hash": "0" * 64},
        "recommended": {"scheduler": "lcm", "steps": 4, "guidance_scale": STUDENT_GUIDANCE}}), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion 1.x-shaped diffusers folder (CLIP text encoder, RGB VAE), random weights."""
    root = tmp_path_factory.mktemp("tiny-sd")
    text_encoder, tokenizer = tiny_clip(root / "vocab")
    return save_pipeline(root / "model", text_encoder, tokenizer)


@pytest.fixture(scope="session")
def tiny_sd_gray_dir(tmp_path_factory) -> Path:
    """``tiny_sd_dir`` with a one-channel (grayscale) VAE."""
    root = tmp_path_factory.mktemp("tiny-sd-gray")
    text_encoder, tokenizer = tiny_clip(root / "vocab")
    return save_pipeline(root / "model", text_encoder, tokenizer, vae_channels=1)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """A guidance-conditioned LCM student of the tiny SD layout (see :func:`save_student`)."""
    root = tmp_path_factory.mktemp("tiny-student")
    text_encoder, tokenizer = tiny_clip(root / "vocab")
    return save_student(root / "model", text_encoder, tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """The tiny UNet/VAE/scheduler with a BERT text encoder and WordPiece tokenizer."""
    root = tmp_path_factory.mktemp("tiny-bert")
    text_encoder, tokenizer = tiny_bert(root / "vocab")
    folder = save_pipeline(root / "model", text_encoder, tokenizer)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    assert index["text_encoder"] == ["transformers", "BertModel"], index
    assert index["tokenizer"][0] == "transformers" and "Bert" in index["tokenizer"][1], index
    return folder


@pytest.fixture
def model_copy(tiny_sd_dir, tmp_path):
    """A fresh copy of ``tiny_sd_dir`` that a test may break."""

    def copy(name: str = "model") -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_sd_dir, target)
        return target

    return copy


# ----------------------------------------------------------------------------- cases and prompts

def make_case(index: int = 0, seed: int = 1234, finding: str = "pneumonia", location: str | None = "right_lower_lobe",
              severity: str | None = "mild", sex: str = "F", age: int = 58, view: str = "PA") -> Case:
    if finding == "no_finding":
        location = severity = None
    return Case(case_id=f"case-{index:07d}", index=index, split="train", seed=seed,
                findings=(FindingLabel(finding, location, severity),), sex=sex, age=age, view=view)


def make_prompt(case: Case, emphasis: dict[str, float] | None = None, negative: str = "") -> Prompt:
    """The built-in template filled with the case; ``emphasis`` weights roles (``{'finding': 1.3}``)."""
    from synthmed.spec import PromptSpec

    spec = PromptSpec(template="{view} chest radiograph of a {age} year old {sex}. {findings}.",
                      template_id="synthmed-v1", emphasis=tuple((emphasis or {}).items()), negative=negative)
    return build_prompt(case, spec)


def emphasised(text: str, word: str, weight: float, negative: str = "") -> Prompt:
    """``text`` with every occurrence of ``word`` weighted ``weight``."""
    spans, start = [], text.find(word)
    while start >= 0:
        spans.append(Emphasis(start, start + len(word), weight, "finding"))
        start = text.find(word, start + len(word))
    return Prompt(text, negative, tuple(spans))


@pytest.fixture
def cases():
    """Four cases with different seeds and findings (two of them share a prompt)."""
    return [make_case(0, seed=11), make_case(1, seed=22, finding="no_finding"),
            make_case(2, seed=33, location="left_lower_lobe", severity="severe"), make_case(3, seed=44)]
