"""Policy: a backbone and one head make a SmolVLA policy; load from and export to LeRobot folders.

Batches are in LeRobot's format after the SmolVLA preprocessor (normalised state/action, tokenised
task): `observation.image` (B, 3, H, W) in [0, 1], `observation.state` (B, state_dim),
`observation.language.tokens` / `.attention_mask` (B, L), and for training `action`
(B, chunk, action_dim) with `action_is_pad` (B, chunk).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.policies.factory import make_pre_post_processors
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from reflow_exp import distributed
from reflow_exp.backbone import VLM_PREFIX, Backbone
from reflow_exp.checkpoint import file_problem
from reflow_exp.heads import ActionHead


class Policy(nn.Module):
    """`backbone` (frozen, possibly shared) + `head` = a SmolVLA policy.

    The processors (LeRobot pipelines: normalise + tokenise in, unnormalise out) travel with the
    policy so that `save_pretrained` writes a folder LeRobot loads unchanged.
    """

    def __init__(self, backbone: Backbone, head: ActionHead, preprocessor=None, postprocessor=None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor

    @property
    def config(self):
        return self.head.config

    def loss(self, batch: dict, noise: Tensor | None = None, time: Tensor | None = None):
        """SmolVLA's flow-matching loss (1-rectified flow): MSE between the predicted velocity and
        `noise - action` at `x_t = t*noise + (1-t)*action`, over valid dims and steps.

        Noise and time are drawn as LeRobot draws them, for the global batch when several
        processes train (`distributed.rank_rows`), and the mean is over the global batch's valid
        entries (`distributed.global_mean`). Returns (scalar loss, {}): no metrics beyond the loss
        itself.
        """
        model, (b, chunk) = self.head.lerobot.model, batch["action"].shape[:2]
        device = batch["action"].device
        if noise is None:  # (B, chunk, max_action_dim), like LeRobot's own draw in VLAFlowMatching.forward
            dim = self.config.max_action_dim
            noise = distributed.rank_rows(lambda n: model.sample_noise((n, chunk, dim), device), b)
        if time is None:
            time = distributed.rank_rows(lambda n: model.sample_time(n, device), b)
        if distributed.rank_and_world()[1] == 1 or "action_is_pad" not in batch:
            loss, _ = self.head.lerobot.forward(batch, noise=noise, time=time)
            return loss, {}
        # LeRobot's loss is the mean over the valid entries of the whole (global) batch: per-sample
        # means times their valid counts give the sums (B,), divided by the global count.
        per_sample, _ = self.head.lerobot.forward(batch, noise=noise, time=time, reduction="none")
        counts = ((~batch["action_is_pad"]).sum(dim=1) * self.config.action_feature.shape[0]).clamp_min(1)
        return distributed.global_mean(per_sample * counts, counts), {}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict, noise: Tensor | None = None, num_steps: int | None = None):
        """Sample an action chunk (B, chunk, action_dim), still normalised, with `num_steps` Euler
        steps from t=1 (noise, shape (B, chunk, max_action_dim)) to t=0 (default: config.num_steps)."""
        with self.head.num_steps(num_steps):
            return self.head.lerobot.predict_action_chunk(batch, noise=noise)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write an ordinary LeRobot SmolVLA folder: config.json, model.safetensors, processors."""
        path = Path(path)
        with self.head.with_vlm_registered() as lerobot_policy:
            lerobot_policy.save_pretrained(path)
        if self.preprocessor is not None:
            self.preprocessor.save_pretrained(path)
            self.postprocessor.save_pretrained(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Policy:
        """Load a LeRobot SmolVLA policy (a folder, a run folder of ours, or a cached hub id; see
        `resolve_policy_folder`) onto `device`; the VLM weights are read once, straight from the file.

        The preprocessor sends batches to `device` whatever device the checkpoint was saved on (the
        override LeRobot's own train/eval scripts pass).
        """
        path = resolve_policy_folder(path)
        device = torch.device(device)
        check_smolvla_folder(path)  # before draccus parses config.json as some other policy's config
        check_processors(path)
        config = PreTrainedConfig.from_pretrained(path)
        config.device = device.type
        state = load_weights(path / "model.safetensors")
        vlm_state = {k.removeprefix(VLM_PREFIX): v for k, v in state.items() if k.startswith(VLM_PREFIX)}
        head_state = {k: v for k, v in state.items() if not k.startswith(VLM_PREFIX)}
        backbone = Backbone.from_state_dict(config.vlm_model_name, config.num_vlm_layers, vlm_state, str(path))
        head = ActionHead(config, backbone.to(device), head_state)  # the head is built on the backbone's device
        pre, post = make_pre_post_processors(
            config, pretrained_path=str(path), preprocessor_overrides={"device_processor": {"device": str(device)}}
        )
        return cls(backbone, head, pre, post)


def check_smolvla_folder(folder: Path) -> None:
    """Refuse a policy folder whose config.json is missing, unreadable or of another policy type.

    Raises:
        ValueError / FileNotFoundError: naming the file and what is needed.
    """
    config_file = Path(folder) / "config.json"
    try:
        kind = json.loads(config_file.read_text(encoding="utf-8")).get("type")
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file} is missing: a LeRobot policy folder has a config.json") from None
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_file} is not a policy config (not a JSON object: {e})") from None
    if kind != "smolvla":
        raise ValueError(
            f"{config_file} describes a {kind!r} policy; this needs a SmolVLA policy (type 'smolvla'), e.g. a "
            "checkpoint of `lerobot-train --policy.type=smolvla` or a run folder of ours"
        )


PROCESSOR_FILES = ("policy_preprocessor.json", "policy_postprocessor.json")


def check_processors(folder: Path) -> None:
    """Refuse a policy folder without LeRobot's processor files (some hub checkpoints hold only
    config.json and model.safetensors): without them nothing knows the normalisation statistics.

    Raises:
        FileNotFoundError: naming the missing files and how to make them.
    """
    missing = [name for name in PROCESSOR_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} holds model.safetensors but not LeRobot's processor files {missing} (normalisation "
            "statistics and tokenizer settings). Make them with LeRobot's migration, `python -m "
            f"lerobot.processor.migrate_policy_normalization --pretrained-path {folder}`, or save "
            "`make_smolvla_pre_post_processors(config, dataset_stats=<the training data's stats>)` into the folder"
        )


def load_weights(weights: Path) -> dict[str, Tensor]:
    """A policy's model.safetensors, refusing a damaged file or NaN/inf weights (a diverged
    training run) with a message that names the file.

    Raises:
        ValueError: damaged or non-finite.
    """
    problem = file_problem(weights)
    if problem is None:
        try:
            state = load_file(weights)
        except SafetensorError as e:
            problem = str(e)
    if problem is not None:
        raise ValueError(f"cannot load {weights}: {problem}. Copy or export the policy again.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if bad:
        raise ValueError(
            f"{weights} holds NaN/inf weights in {len(bad)} tensor(s), e.g. {bad[0]}: the policy diverged "
            "while training. Use an earlier checkpoint of it, or retrain it with a lower Trainer.lr."
        )
    return state


def _all_finite(tensor: Tensor) -> bool:
    """A sum is NaN/inf when any value is (cheap: no mask); only then look value by value, since
    a sum of finite values may also overflow."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def looks_local(name_or_path: str | Path) -> bool:
    """Whether a policy name is meant as a local path rather than a hub id (``org/name``):
    absolute, ``.``/``~``-relative, not exactly one ``/``, or its parent folder exists here."""
    text = str(name_or_path)
    return os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") != 1 or Path(text).parent.is_dir()


def local_policy_folder(name_or_path: str | Path) -> Path | None:
    """The LeRobot policy folder at `name_or_path`: the folder itself, or inside a run folder of ours
    (`student/`, `checkpoints/last/pretrained_model/`); None when nothing local matches."""
    path = Path(name_or_path)
    for candidate in (path, path / "student", path / "checkpoints" / "last" / "pretrained_model"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    if path.exists():
        raise FileNotFoundError(
            f"{path} holds no LeRobot policy: no model.safetensors in it, in student/ or in "
            "checkpoints/last/pretrained_model/"
        )
    return None


def resolve_policy_folder(name_or_path: str | Path) -> Path:
    """A local policy folder (see `local_policy_folder`) or a hub id from the local Hugging Face cache."""
    folder = local_policy_folder(name_or_path)
    if folder is not None:
        return folder
    if looks_local(name_or_path):
        raise FileNotFoundError(f"Cannot find the policy folder {name_or_path!r} (relative to {os.getcwd()}).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as error:  # offline, unknown id, no access: one message for all
        raise FileNotFoundError(
            f"Cannot find the policy {name_or_path!r}: no such local folder, and the hub gave: {error}. "
            "Pass a LeRobot policy folder or a run folder of ours, or download the hub id first."
        ) from error
