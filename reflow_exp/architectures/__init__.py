"""SmolVLA configurations: the one builder (`make_smolvla_config`), and the architecture descriptions
shipped with reflow_exp (configs without weights, for offline dry runs and parameter counts).

`SmolVLM2-500M-Video-Instruct/` holds that model's exact `config.json` (SmolVLA's default VLM). Its
tokenizer and processor files are the sandbox's tiny placeholders: LeRobot's SmolVLA constructor
insists on a processor, and parameter counts do not depend on it. Never train with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

HERE = Path(__file__).parent
SHIPPED = {"HuggingFaceTB/SmolVLM2-500M-Video-Instruct": HERE / "SmolVLM2-500M-Video-Instruct"}

# A 6-DoF arm with one camera, as in SmolVLA's SO-100 data; counts do not depend on it (max dims 32).
PLACEHOLDER_FEATURES = {
    "input_features": {
        "observation.images.camera1": PolicyFeature(FeatureType.VISUAL, (3, 480, 640)),
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
    },
    "output_features": {"action": PolicyFeature(FeatureType.ACTION, (6,))},
}


def make_smolvla_config(vlm_model_name: str | Path, features: dict[str, PolicyFeature], **fields) -> SmolVLAConfig:
    """SmolVLA's configuration on `vlm_model_name` for `features` (LeRobot PolicyFeatures: ACTION ones
    become `output_features`, the others `input_features`); `fields` are other SmolVLAConfig fields
    (SmolVLA's defaults otherwise, except `n_action_steps`: the whole chunk unless given)."""
    fields.setdefault("n_action_steps", fields.get("chunk_size", SmolVLAConfig.chunk_size))
    return SmolVLAConfig(
        vlm_model_name=str(vlm_model_name),
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        **fields,
    )


def resolve_vlm(name_or_path: str) -> str:
    """A local folder as is; a hub id we ship a description of → that description; else unchanged."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    return str(SHIPPED.get(name_or_path, name_or_path))


def architecture_config(teacher: str) -> SmolVLAConfig:
    """The teacher's SmolVLA config without reading weights: its config.json when `teacher` is a
    local policy folder, else (a hub id) SmolVLA's defaults; the VLM resolved with `resolve_vlm`.

    Raises:
        FileNotFoundError: `teacher` is a local path (see `looks_local`) that does not exist.
        ValueError: the folder holds another policy type.
    """
    from reflow_exp.policy import check_smolvla_folder, local_policy_folder, looks_local

    folder = local_policy_folder(teacher)
    if folder is not None:
        check_smolvla_folder(folder)
    elif looks_local(teacher):  # a missing folder, not a hub id: the real run would fail on it
        raise FileNotFoundError(f"Cannot find the teacher folder {teacher!r} (relative to {Path.cwd()}).")
    config = PreTrainedConfig.from_pretrained(folder) if folder else SmolVLAConfig(**PLACEHOLDER_FEATURES)
    return dataclasses.replace(config, vlm_model_name=resolve_vlm(config.vlm_model_name))
