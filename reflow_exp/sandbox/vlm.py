"""A tiny SmolVLM written to disk, and the SmolVLA config that runs on it.

No model hub is reachable, so the sandbox makes its own backbone: a SmolVLM with a 4-layer llama
text model (hidden 64) and a 2-layer SigLIP-like vision encoder (64x64 images, patch 16, pixel
shuffle 2 -> 4 image tokens), seeded random weights, a word-level tokenizer covering the task's
instructions, and the SmolVLM image/video processors. LeRobot's SmolVLA loads it like the real
SmolVLM2 through `vlm_model_name=<folder>`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    LlamaConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from reflow_exp.architectures import make_smolvla_config
from reflow_exp.files import build_once
from reflow_exp.torch_utils import count_params

from .task import IMAGE_SIZE, INSTRUCTIONS

VLM_VERSION = 2  # bump when the architecture or vocabulary below changes: cached folders rebuild

# Sizes of the tiny SmolVLM.
TEXT_HIDDEN = 64
TEXT_LAYERS = 4
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
VISION_HIDDEN = 64
VISION_LAYERS = 2
VISION_HEADS = 2
PATCH_SIZE = 8  # 64 patches -> 16 image tokens: goals are small, 16-pixel patches blurred them
SCALE_FACTOR = 2
CHUNK_SIZE = 16

# SmolVLA reads `tokenizer.fake_image_token_id` / `global_image_token_id`; the SmolVLM processor
# needs the image and end-of-utterance tokens.
IMAGE_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
    "image_token": "<image>",
    "end_of_utterance_token": "<end_of_utterance>",
}
PAD, UNK = "<pad>", "<unk>"


# -- the tiny SmolVLM ---------------------------------------------------------------------------


def vocabulary(instructions=INSTRUCTIONS) -> list[str]:
    """Pad, unk, the image special tokens, punctuation, then every word of `instructions`."""
    words = sorted({word for text in instructions for word in text.lower().split()})
    return [PAD, UNK, *IMAGE_TOKENS.values(), ".", ",", *words]


def make_tiny_vlm(path: str | Path, seed: int = 0, image_size: int = IMAGE_SIZE, instructions=INSTRUCTIONS) -> Path:
    """Write the tiny SmolVLM (weights, config, tokenizer, processors) to `path`; return `path`.

    `instructions`: the texts whose words the tokenizer knows (default: the sandbox's).
    Idempotent: a folder already made with the same arguments is reused as is.
    """
    if image_size % (PATCH_SIZE * SCALE_FACTOR):
        raise ValueError(f"image_size must be a multiple of {PATCH_SIZE * SCALE_FACTOR}, got {image_size}")
    path = Path(path)
    marker = {
        "kind": "tiny_smolvlm",
        "version": VLM_VERSION,
        "seed": seed,
        "image_size": image_size,
        "vocabulary": vocabulary(instructions),
    }
    build_once(path, marker, lambda tmp: _write_vlm(tmp, seed, image_size, marker["vocabulary"]))
    return path


def _write_vlm(folder: Path, seed: int, image_size: int, vocab: list[str]) -> dict:
    tokenizer = _tokenizer(vocab)
    model = _model(tokenizer, seed, image_size)
    model.save_pretrained(folder)
    _processor(tokenizer, image_size).save_pretrained(folder)
    return {"parameters": count_params(model)}


def _tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """Lower-casing word-level tokenizer over `vocab`; unknown words map to <unk>."""
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation; drops "\n"
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, extra_special_tokens=IMAGE_TOKENS
    )


def _model(tokenizer: PreTrainedTokenizerFast, seed: int, image_size: int) -> SmolVLMForConditionalGeneration:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        head_dim=TEXT_HIDDEN // TEXT_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = SmolVLMVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )
    config = SmolVLMConfig(
        text_config=text,
        vision_config=vision,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # the weights are a pure function of the seed
    return SmolVLMForConditionalGeneration(config).eval()


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int) -> SmolVLMProcessor:
    """Whole images only (no tiling): each image becomes image_seq_len <image> tokens."""
    size = {"longest_edge": image_size}
    image_processor = SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size)
    video_processor = SmolVLMVideoProcessor(size=size, max_image_size=size)
    image_seq_len = (image_size // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    return SmolVLMProcessor(image_processor, tokenizer, video_processor, image_seq_len=image_seq_len)


# -- SmolVLA on the tiny SmolVLM ---------------------------------------------------------------


def tiny_smolvla_config(vlm_path: str | Path, **overrides) -> SmolVLAConfig:
    """SmolVLA config for the sandbox on the tiny SmolVLM at `vlm_path`.

    Features: observation.image (3, 64, 64) VISUAL, observation.state (2,) STATE, action (2,)
    ACTION; chunks of 16 actions, all executed. `overrides` are SmolVLAConfig fields.
    """
    inputs = overrides.pop(
        "input_features",
        {
            "observation.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE_SIZE, IMAGE_SIZE)),
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
        },
    )
    outputs = overrides.pop("output_features", {"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))})
    features = inputs | outputs
    defaults = dict(
        load_vlm_weights=True,
        num_vlm_layers=TEXT_LAYERS,
        resize_imgs_with_padding=(IMAGE_SIZE, IMAGE_SIZE),
        chunk_size=CHUNK_SIZE,
        tokenizer_max_length=16,
        push_to_hub=False,
    )
    return make_smolvla_config(vlm_path, features, **(defaults | overrides))
