"""One prefix pass per batch, shared by every head that borrows the frozen backbone.

SmolVLA's prefix is [image tokens, language tokens, state token]. Image and language tokens never
attend to the state token, and the backbone is frozen, so their keys/values are the same for every
head: `encode` runs the vision encoder and the VLM over them once. Only the state token depends on
the head (its `state_proj`), so `extend` pushes that single token through the VLM layers per head.
The result is the K/V cache LeRobot's `denoise_step` consumes; `velocity` and `sample` use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lerobot.policies.common.vla_utils import make_att_2d_masks
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor
from transformers import DynamicCache

from reflow_exp import flow
from reflow_exp.heads import ActionHead


@dataclass
class ImageEmbeddings:
    """Precomputed image part of the prefix: per camera, what `vlm_with_expert.embed_image` returns
    (vision encoder + connector output, before `embed_prefix` scales it by sqrt(hidden)), and the
    camera's mask, in the order of `policy.prepare_images`.

    embeddings: per camera (B, image_tokens, hidden); masks: per camera (B,) bool.
    """

    embeddings: list[Tensor]
    masks: list[Tensor]


@dataclass
class Prefix:
    """K/V of the prefix for every VLM layer, and which prefix tokens are real (not padding).

    cache: per layer keys/values (B, kv_heads, L, head_dim); pad_masks: (B, L) bool.
    """

    cache: DynamicCache
    pad_masks: Tensor


@torch.no_grad()
def encode(head: ActionHead, batch: dict, images: ImageEmbeddings | None = None) -> Prefix:
    """Image + language part of the prefix, through the frozen VLM once (any head's config works:
    the image and language embeddings come from the shared backbone).

    `images`: the image embeddings computed beforehand (`reflow_exp.embedding_cache`); the vision
    encoder is then skipped and the batch's camera frames are not read.
    """
    policy = head.lerobot
    state = policy.prepare_state(batch)
    if images is None:
        pixels, img_masks = policy.prepare_images(batch)
        given = contextlib.nullcontext()
    else:  # LeRobot's embed_prefix calls embed_image(image) per camera: hand it the embedding itself
        pixels, img_masks = images.embeddings, images.masks
        given = embed_image_replaced(policy.model.vlm_with_expert, lambda embedding: embedding)
    with given:
        embs, pad_masks, att_masks = policy.model.embed_prefix(
            pixels, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state=state
        )
    embs, pad_masks, att_masks = embs[:, :-1], pad_masks[:, :-1], att_masks[:, :-1]  # drop the state token
    _, cache = policy.model.vlm_with_expert.forward(
        attention_mask=make_att_2d_masks(pad_masks, att_masks),
        position_ids=torch.cumsum(pad_masks, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[embs, None],
        use_cache=True,
    )
    return Prefix(cache, pad_masks)


def extend(head: ActionHead, prefix: Prefix, batch: dict) -> Prefix:
    """This head's full prefix: the shared one plus its own state token (B, 1, hidden), which attends
    to every real prefix token and itself. Differentiable in `state_proj` when it is trainable."""
    model = head.lerobot.model
    state = model.state_proj(head.lerobot.prepare_state(batch))[:, None, :]  # (B, 1, hidden)
    pad_masks = torch.cat([prefix.pad_masks, torch.ones_like(prefix.pad_masks[:, :1])], dim=1)
    cache = _fork(prefix.cache)
    with _every_layer_self_attention(model.vlm_with_expert):
        model.vlm_with_expert.forward(
            attention_mask=pad_masks[:, None, :],  # (B, 1, L+1)
            position_ids=prefix.pad_masks.sum(dim=1, keepdim=True),  # (B, 1)
            past_key_values=cache,
            inputs_embeds=[state, None],
            use_cache=True,
        )
    return Prefix(cache, pad_masks)


def velocity(head: ActionHead, prefix: Prefix, x_t: Tensor, t: Tensor) -> Tensor:
    """The head's velocity (B, chunk, max_action_dim) at x_t (same shape) and time t (B,), t=1 noise."""
    return head.lerobot.model.denoise_step(
        prefix_pad_masks=prefix.pad_masks, past_key_values=prefix.cache, x_t=x_t, timestep=t
    )


def sample(head: ActionHead, prefix: Prefix, noise: Tensor, steps: int) -> tuple[Tensor, list[Tensor]]:
    """Euler-integrate the head from noise (t=1) to an action (t=0); returns it and the velocities."""
    return flow.euler(lambda x_t, t: velocity(head, prefix, x_t, t), noise, steps)


def _fork(cache: DynamicCache) -> DynamicCache:
    """A cache of its own over the same prefix tensors, so one head's additions never reach another."""
    forked = DynamicCache()
    for index, layer in enumerate(cache.layers):
        forked.update(layer.keys, layer.values, index)
    return forked


def image_embeddings(head: ActionHead, batch: dict) -> ImageEmbeddings:
    """The image part of a prefix pass on `batch`, computed now: SmolVLA's resize and [-1, 1]
    scaling, then the vision encoder and connector, per camera."""
    pixels, masks = head.lerobot.prepare_images(batch)
    embed = head.lerobot.model.vlm_with_expert.embed_image
    return ImageEmbeddings([embed(image) for image in pixels], masks)


@contextlib.contextmanager
def embed_image_replaced(vlm_with_expert, embed: Callable[[Tensor], Tensor]):
    """LeRobot's code with `embed` in place of `vlm_with_expert.embed_image` (vision encoder +
    connector); everything `embed_prefix` does around it (the sqrt(hidden) scaling, special tokens,
    masks, padding) stays LeRobot's own."""
    # LeRobot's embed_prefix has no parameter for precomputed image embeddings; an instance attribute
    # shadows the method for this object only (other policies keep theirs) and `del` restores it. If
    # LeRobot renamed `embed_image`, the replacement would go unused; tests/test_prefix.py and
    # tests/test_embedding_cache.py compare the cached path with LeRobot's own.
    vlm_with_expert.embed_image = embed
    try:
        yield
    finally:
        del vlm_with_expert.embed_image


@contextlib.contextmanager
def _every_layer_self_attention(vlm_with_expert):
    """LeRobot's layer loop sends odd layers to the expert's cross-attention unless it is filling a new
    cache; extending a filled cache by the state token needs the prefill path on every layer.

    Tied to LeRobot 0.6.1's `SmolVLMWithExpertModel.forward` (it tests `"cross" not in
    self.attention_mode` per layer) and has no argument for it; if that test changes, the state token
    attends differently, which tests/test_prefix.py's equality with LeRobot's joint forward checks."""
    mode = vlm_with_expert.attention_mode
    vlm_with_expert.attention_mode = "self_attn"
    try:
        yield
    finally:
        vlm_with_expert.attention_mode = mode
