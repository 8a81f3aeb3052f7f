"""The embedded sandbox: everything local and deterministic from a seed.

- `task`: the 2-D "go around the bar to the named goal" gymnasium env (`reflow_exp/Sandbox-v0`,
  registered on import of this package);
- `expert`: a scripted demonstrator that takes either route at random, and a route classifier;
- `vlm`: a tiny SmolVLM written to disk, and the SmolVLA config that uses it;
- `dataset`: records expert demonstrations into a LeRobotDataset; `build_sandbox` makes it all.

`vlm` and `dataset` import transformers and lerobot, so their names load on first use: an env
worker that only needs `gym.make(ENV_ID)` stays light.
"""

import importlib

from .expert import ROUTES, ScriptedExpert, route_of
from .task import ENV_ID, EVAL_SEED_OFFSET, INSTRUCTIONS, TRAIN_SEED_OFFSET, SandboxEnv, register

_LAZY = {
    "make_tiny_vlm": "vlm",
    "tiny_smolvla_config": "vlm",
    "record_dataset": "dataset",
    "build_sandbox": "dataset",
}

__all__ = [
    "ENV_ID",
    "EVAL_SEED_OFFSET",
    "INSTRUCTIONS",
    "ROUTES",
    "TRAIN_SEED_OFFSET",
    "SandboxEnv",
    "ScriptedExpert",
    "route_of",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
