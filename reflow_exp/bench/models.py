"""What the benchmarks run on: sizes, cached random-weight teacher checkpoints, batches, both sides.

Sizes:
- `tiny`: the sandbox's tiny SmolVLM (64×64 images, text hidden 64, 4 layers), chunk 16: for tests.
- `mid`: a SmolVLM scaled down ~5× (256×256 images, text hidden 512, 8 layers, vision 384 wide,
  6 layers), chunk 50.
- `real`: SmolVLA's architecture, SmolVLM2-500M cut to 16 text layers (the exact config shipped in
  `reflow_exp/architectures`), one 512×512 camera, 6-D state and action, chunk 50.

A teacher checkpoint is LeRobot's own `SmolVLAPolicy` with seeded random float32 weights, saved with
its processors (dummy mean 0 / std 1 statistics) into `<cache>/<size>/teacher` once and reused.
Timings do not depend on the weights' values.

The naive side of each comparison is LeRobot's `SmolVLAPolicy` used as is: one object per role,
each with its own VLM and its own prefix pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
from transformers import AutoConfig, LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from reflow_exp.architectures import SHIPPED, make_smolvla_config
from reflow_exp.backbone import VLM_PREFIX
from reflow_exp.files import build_once
from reflow_exp.sandbox.vlm import make_tiny_vlm
from reflow_exp.torch_utils import count_params

REAL_VLM = SHIPPED["HuggingFaceTB/SmolVLM2-500M-Video-Instruct"]
CHECKPOINT_VERSION = 1  # bump when the checkpoint recipe changes: cached teachers rebuild


@dataclass(frozen=True)
class Size:
    """One benchmark size: the SmolVLA shape and the batches each benchmark uses at it."""

    name: str
    image: int  # square camera side, also SmolVLA's resize target
    chunk: int
    state_dim: int
    action_dim: int
    lang_tokens: int  # language tokens per sample (a short instruction)
    train_batch: int  # train_step's batch
    throughput_batch: int  # latency's throughput batch


SIZES = {
    "tiny": Size(
        "tiny", image=64, chunk=16, state_dim=2, action_dim=2, lang_tokens=5, train_batch=4, throughput_batch=8
    ),
    "mid": Size(
        "mid", image=256, chunk=50, state_dim=6, action_dim=6, lang_tokens=16, train_batch=4, throughput_batch=8
    ),
    "real": Size(
        "real", image=512, chunk=50, state_dim=6, action_dim=6, lang_tokens=16, train_batch=1, throughput_batch=2
    ),
}


def get_size(name: str) -> Size:
    if name not in SIZES:
        raise ValueError(f"Unknown size {name!r}; choose one of {sorted(SIZES)}")
    return SIZES[name]


# ----------------------------------------------------------------------------- checkpoints
def vlm_folder(size: Size, cache: Path) -> Path:
    """A folder with the SmolVLM's config, tokenizer and processor (weights are never read from it)."""
    if size.name == "tiny":
        return make_tiny_vlm(Path(cache) / "tiny" / "vlm", seed=0, image_size=size.image)
    if size.name == "real":
        return REAL_VLM
    folder = Path(cache) / "mid" / "vlm"
    build_once(folder, {"kind": "mid_smolvlm", "version": CHECKPOINT_VERSION}, _write_mid_vlm)
    return folder


def _write_mid_vlm(folder: Path) -> dict:
    """The mid SmolVLM's config, with the shipped placeholder tokenizer and processor."""
    real = AutoConfig.from_pretrained(REAL_VLM)
    text = LlamaConfig(
        **{
            **real.text_config.to_dict(),
            "hidden_size": 512,
            "intermediate_size": 1536,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 64,
        }
    )
    vision = SmolVLMVisionConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        image_size=256,
        patch_size=16,
    )
    config = SmolVLMConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        scale_factor=real.scale_factor,
        image_token_id=real.image_token_id,
        pad_token_id=real.pad_token_id,
    )
    config.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL_VLM / name, folder / name)
    return {}


def smolvla_config(size: Size, vlm: Path, **overrides) -> SmolVLAConfig:
    """SmolVLA's defaults on `vlm` for `size`'s camera, state, action and chunk."""
    num_layers = AutoConfig.from_pretrained(vlm).text_config.num_hidden_layers
    features = {
        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, size.image, size.image)),
        "observation.state": PolicyFeature(FeatureType.STATE, (size.state_dim,)),
        "action": PolicyFeature(FeatureType.ACTION, (size.action_dim,)),
    }
    fields = {
        "load_vlm_weights": False,
        "num_vlm_layers": min(16, num_layers),
        "chunk_size": size.chunk,
        "resize_imgs_with_padding": (size.image, size.image),
        "device": "cpu",
        "push_to_hub": False,
    }
    return make_smolvla_config(vlm, features, **(fields | overrides))


def teacher_checkpoint(size: Size, cache: Path = Path("runs/bench/cache")) -> Path:
    """A LeRobot-format SmolVLA teacher with seeded random float32 weights, made once and cached
    (the real one is 1.8 GB); remade when the size or the VLM's config changes."""
    vlm = vlm_folder(size, cache)
    folder = Path(cache) / size.name / "teacher"
    marker = {
        "kind": "bench_teacher",
        "version": CHECKPOINT_VERSION,
        "size": size.name,
        "shape": [size.image, size.chunk, size.state_dim, size.action_dim],
        "vlm": str(Path(vlm).resolve()),
        "vlm_config": json.loads((Path(vlm) / "config.json").read_text()),
    }
    build_once(folder, marker, lambda work: _write_teacher(work, smolvla_config(size, vlm)))
    return folder


def _write_teacher(folder: Path, config: SmolVLAConfig) -> dict:
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        policy = SmolVLAPolicy(config)
    policy.save_pretrained(folder)
    stats = {
        key: {"mean": torch.zeros(feature.shape), "std": torch.ones(feature.shape)}
        for key, feature in {**config.input_features, **config.output_features}.items()
        if feature.type is not FeatureType.VISUAL
    }
    for processor in make_smolvla_pre_post_processors(config, stats):
        processor.save_pretrained(folder)
    return {"parameters": count_params(policy)}


# ----------------------------------------------------------------------------- batches
def make_batch(config: SmolVLAConfig, size: Size, batch: int, seed: int = 0, device="cpu") -> dict:
    """A preprocessed batch (what the SmolVLA preprocessor outputs): images in [0, 1], normalised
    state and action chunk, `size.lang_tokens` language tokens, no padding."""
    g = torch.Generator().manual_seed(seed)
    vocab = AutoConfig.from_pretrained(config.vlm_model_name).text_config.vocab_size
    out = {
        "observation.image": torch.rand(batch, 3, size.image, size.image, generator=g),
        "observation.state": torch.randn(batch, size.state_dim, generator=g),
        "observation.language.tokens": torch.randint(0, vocab, (batch, size.lang_tokens), generator=g),
        "observation.language.attention_mask": torch.ones(batch, size.lang_tokens, dtype=torch.bool),
        "action": torch.randn(batch, size.chunk, size.action_dim, generator=g),
        "action_is_pad": torch.zeros(batch, size.chunk, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in out.items()}


# ----------------------------------------------------------------------------- both sides
def load_ours(size: Size, cache: Path, device="cpu"):
    """Our teacher policy (backbone + frozen head) and a student head copied from it, as the reflow
    job builds them, on `device`."""
    from reflow_exp.jobs.builders import student_head
    from reflow_exp.policy import Policy

    teacher = Policy.from_pretrained(teacher_checkpoint(size, cache))
    teacher.backbone.to(device)
    teacher.head.to(device).requires_grad_(False)
    return teacher, student_head(teacher, student_steps=1, freeze_vision_encoder=None)


def lerobot_policy(config: SmolVLAConfig, backbone, head_state: dict, trainable: bool) -> SmolVLAPolicy:
    """LeRobot's own SmolVLAPolicy holding `backbone`'s VLM weights and `head_state` (copied).

    The VLM tensors alias the backbone's (frozen either way, so the computation is LeRobot's own;
    this only saves RAM). `trainable`: the expert and projections train, the VLM stays frozen, as
    LeRobot's `train_expert_only` does.
    """
    device = next(backbone.parameters()).device
    with init_empty_weights(include_buffers=False), contextlib.redirect_stdout(io.StringIO()):
        policy = SmolVLAPolicy(config)
    state = {VLM_PREFIX + k: v for k, v in backbone.vlm.state_dict().items()}
    state |= {k: v.to(device, copy=True) for k, v in head_state.items()}
    policy.load_state_dict(state, strict=True, assign=True)
    policy.to(device)  # the buffers built outside the meta context
    policy.requires_grad_(False)
    if trainable:
        for name, param in policy.named_parameters():
            param.requires_grad_(not name.startswith(VLM_PREFIX))
        policy.model.state_proj.requires_grad_(config.train_state_proj)
    return policy


# ----------------------------------------------------------------------------- counting VLM loads
class VlmLoadCounter:
    """Counts VLM materialisations, whoever does them: a `SmolVLMForConditionalGeneration` built with
    real (non-meta) parameters, one built on meta whose parameters `load_state_dict` then fills, or a
    `from_pretrained` of that class. Install once per process (the start-up child does).

    `init_s` adds up the seconds spent constructing SmolVLMs with real parameters (random
    initialisation that a checkpoint then overwrites, on LeRobot's path)."""

    def __init__(self):
        self.count = 0
        self.init_s = 0.0
        self._in_from_pretrained = 0

    def install(self) -> VlmLoadCounter:
        cls, counter = SmolVLMForConditionalGeneration, self
        init, load_state_dict, from_pretrained = cls.__init__, cls.load_state_dict, cls.from_pretrained.__func__

        def counted_init(module, *args, **kwargs):
            start = time.perf_counter()
            init(module, *args, **kwargs)
            if not counter._in_from_pretrained and not _on_meta(module):
                counter.count += 1
                counter.init_s += time.perf_counter() - start

        def counted_load_state_dict(module, *args, **kwargs):
            was_meta = _on_meta(module)
            result = load_state_dict(module, *args, **kwargs)
            if was_meta and not _on_meta(module):
                counter.count += 1
            return result

        def counted_from_pretrained(klass, *args, **kwargs):
            counter._in_from_pretrained += 1
            try:
                return from_pretrained(klass, *args, **kwargs)
            finally:
                counter._in_from_pretrained -= 1
                counter.count += 1

        cls.__init__ = counted_init
        cls.load_state_dict = counted_load_state_dict
        cls.from_pretrained = classmethod(counted_from_pretrained)
        return self


def _on_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
