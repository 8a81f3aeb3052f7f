"""An exported SmolVLA policy run by ONNX Runtime, behind the `ChunkPolicy` interface.

`OnnxPolicy.from_pretrained(policy_folder, onnx_dir=None)` loads `<onnx_dir>/model.onnx` (default
`<policy_folder>/onnx`, what `python -m reflow_exp.export onnx` writes) and the folder's LeRobot
processors. Each chunk: the preprocessor normalises the state and tokenises the task (Python),
ONNX Runtime runs the graph from explicit noise (B, chunk_size, max_action_dim) drawn per row
from the generator seeded in `reset`, as `SmolVLAChunkPolicy` does, so both sample the same chunk
from the same seed; the postprocessor unnormalises. Time follows SmolVLA (t=1 noise -> t=0 action);
the graph's Euler step count is fixed at export (`spec.num_steps`).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reflow_exp.chunk_policy import SmolVLAChunkPolicy
from reflow_exp.export import ONNX_FILE, SPEC_FILE, Spec, expected_spec

ORT_TYPES = {"tensor(float)": "float32", "tensor(bool)": "bool", "tensor(int64)": "int64"}


def onnxruntime():
    """The onnxruntime module, or one line saying what to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "onnxruntime is not installed: `pip install onnxruntime==1.32.0` (CPU; onnxruntime-gpu for CUDA) "
            "to run an exported policy"
        ) from None
    return ort


class OnnxPolicy(SmolVLAChunkPolicy):
    """An exported SmolVLA graph + the policy folder's processors: a ChunkPolicy, and LeRobot's
    `select_action` contract (one action (B, action_dim) per call from a queue of
    `n_action_steps` actions per chunk).

    Args:
        session: an onnxruntime.InferenceSession of model.onnx.
        spec: its `model.json`.
        config: the policy's SmolVLAConfig; the session's inputs/outputs must match it.
        preprocessor / postprocessor: the policy folder's LeRobot processors (on the CPU).
    """

    def __init__(self, session, spec: Spec, config, preprocessor, postprocessor, source: str = "model.onnx"):
        self.session = session
        self.spec = spec
        self.config = config
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.n_action_steps = config.n_action_steps
        self._generators: list[torch.Generator] = []
        self._queue: collections.deque = collections.deque()
        check_session(session, config, spec, source)

    @classmethod
    def from_pretrained(cls, folder: str | Path, onnx_dir: str | Path | None = None, providers=None) -> OnnxPolicy:
        """Load `<onnx_dir>/model.onnx` (default `<folder>/onnx`) for the SmolVLA policy in `folder`."""
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import make_pre_post_processors

        from reflow_exp.policy import check_processors, check_smolvla_folder, resolve_policy_folder

        ort = onnxruntime()
        folder = resolve_policy_folder(folder)
        check_smolvla_folder(folder)
        check_processors(folder)
        onnx_dir = Path(onnx_dir) if onnx_dir is not None else folder / "onnx"
        if not (onnx_dir / ONNX_FILE).is_file():
            raise FileNotFoundError(
                f"{onnx_dir / ONNX_FILE} is missing: export the policy first, "
                f"`python -m reflow_exp.export onnx {folder} --out {onnx_dir}`"
            )
        spec = Spec.load(onnx_dir / SPEC_FILE)
        config = PreTrainedConfig.from_pretrained(folder)
        config.device = "cpu"
        pre, post = make_pre_post_processors(
            config, pretrained_path=str(folder), preprocessor_overrides={"device_processor": {"device": "cpu"}}
        )
        session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=providers or ["CPUExecutionProvider"])
        return cls(session, spec, config, pre, post, str(onnx_dir / ONNX_FILE))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reset(self, seeds: list[int] | None = None) -> None:
        """A new batch of episodes: one noise generator per env seed (None: keep them), queue emptied."""
        if seeds is not None:
            super().reset(seeds)
        self._queue.clear()

    def select_action(self, batch: dict) -> Tensor:
        """LeRobot's contract: the next action (B, action_dim), re-planning when the queue is empty."""
        if not self._queue:
            chunk = self.predict_chunk(batch, self.spec.num_steps)  # (B, chunk, action_dim)
            self._queue.extend(chunk.transpose(0, 1)[: self.n_action_steps])
        return self._queue.popleft()

    def _sample(self, batch: dict, noise: Tensor, num_steps: int) -> Tensor:
        """The graph on a preprocessed batch: (B, chunk, action_dim), normalised."""
        if num_steps != self.spec.num_steps:
            raise ValueError(
                f"this ONNX graph was exported with {self.spec.num_steps} Euler steps, asked for {num_steps}; "
                f"evaluate it at step_counts=({self.spec.num_steps},) or export again with --num_steps {num_steps}"
            )
        feeds = graph_inputs(self.spec, self.config, batch, noise)
        return torch.from_numpy(self.session.run(["actions"], feeds)[0])


def graph_inputs(spec: Spec, config, batch: dict, noise: Tensor) -> dict[str, np.ndarray]:
    """A preprocessed LeRobot batch -> the graph's feeds. A camera missing from the batch is fed as a
    black frame with its mask False (LeRobot leaves it out; masked tokens change nothing); the
    language is padded with masked tokens to `tokenizer_max_length`."""
    size = noise.shape[0]
    images, masks = [], []
    for key in spec.cameras:
        if key in batch:
            images.append(batch[key][:, -1] if batch[key].ndim == 5 else batch[key])  # (B, T, ...): last frame
            masks.append(batch.get(f"{key}_padding_mask", torch.ones(size, dtype=torch.bool)))
        else:
            images.append(torch.zeros(size, *config.image_features[key].shape))
            masks.append(torch.zeros(size, dtype=torch.bool))
    tokens = batch["observation.language.tokens"]
    mask = batch["observation.language.attention_mask"].bool()
    pad = config.tokenizer_max_length - tokens.shape[1]
    tokens = torch.nn.functional.pad(tokens, (0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad))
    state = batch["observation.state"]
    state = state[:, -1] if state.ndim > 2 else state
    tensors = [*images, torch.stack(masks, dim=1), tokens, mask, state, noise]
    return {
        entry["name"]: tensor.detach().cpu().numpy().astype(entry["dtype"])
        for entry, tensor in zip(spec.inputs, tensors)
    }


def check_session(session, config, spec: Spec, source: str) -> None:
    """Refuse a graph whose inputs/outputs (names, shapes, dtypes) are not what `config` needs.

    Raises:
        ValueError: naming the graph's side and the config's side.
    """
    wanted = expected_spec(config, spec.num_steps, spec.opset, spec.config_sha256, spec.source)
    want = [(e["name"], list(e["shape"]), e["dtype"]) for e in wanted.inputs + wanted.outputs]
    have = [
        (node.name, ["batch" if isinstance(d, str) else d for d in node.shape], ORT_TYPES.get(node.type, node.type))
        for node in [*session.get_inputs(), *session.get_outputs()]
    ]
    if have != want:
        raise ValueError(
            f"{source} does not fit the policy config: the graph has {_describe(have)}, the config needs "
            f"{_describe(want)}. Export this policy folder again: python -m reflow_exp.export onnx <folder>"
        )


def _describe(entries) -> str:
    return ", ".join(f"{name} {shape} {dtype}" for name, shape, dtype in entries)
