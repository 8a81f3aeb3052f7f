"""Export a SmolVLA policy folder to ONNX: `python -m reflow_exp.export onnx <policy folder> [--out DIR]`.

The graph is the whole chunk prediction for one observation batch, from SmolVLA's image
preprocessing to the last Euler step:

    images (per camera, (B, 3, H, W) float in [0, 1], the env's frames)
      -> SmolVLA's resize-with-pad and [-1, 1] scaling (inside the graph)
      -> vision encoder + connector, language embedding, state projection (the prefix)
      -> the VLM's prefix K/V, then `num_steps` Euler steps of the expert, unrolled
    -> actions (B, chunk_size, action_dim), still normalised.

Time follows SmolVLA: t=1 is noise, t=0 the action, dt = -1/num_steps. The noise
(B, chunk_size, max_action_dim) is an input, so an ONNX run and a PyTorch run from the same noise
are comparable. Normalisation, tokenisation and unnormalisation (LeRobot's processors) stay in
Python: `reflow_exp.onnx_policy.OnnxPolicy` runs them around the graph.

Inputs, in order (`Spec.inputs`): one image per camera of `config.image_features` (empty cameras
excluded: the graph adds them itself, as LeRobot does), `image_masks` (B, cameras) bool (False: the
camera is missing in that row), `lang_tokens` (B, tokenizer_max_length) int64, `lang_mask` (same
shape) bool, `state` (B, state_dim) float32 (normalised), `noise`. Output: `actions`. The batch
axis is dynamic; every other size is fixed by the policy's config.

The folder gets `model.onnx` and `model.json` (the `Spec`: names, shapes, dtypes, num_steps,
chunk_size, the source config's SHA-256).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

ONNX_FILE = "model.onnx"
SPEC_FILE = "model.json"
DEFAULT_OPSET = 17
EXPORT_BATCH = 2  # the example batch traced; the batch axis is exported as dynamic


@dataclasses.dataclass
class Spec:
    """What an exported graph takes and gives (`model.json`).

    inputs / outputs: [{"name", "shape" (with "batch" for the dynamic axis), "dtype"}], in order.
    cameras: the image inputs' feature keys, in the graph's order.
    """

    inputs: list[dict]
    outputs: list[dict]
    cameras: list[str]
    num_steps: int
    chunk_size: int
    n_action_steps: int
    opset: int
    config_sha256: str
    source: str

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Spec:
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing: export the policy again (python -m reflow_exp.export onnx)"
            ) from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is not an export description ({e}); export the policy again") from None


def cameras_of(config) -> list[str]:
    """The policy's real cameras (config order), without LeRobot's `empty_camera_*` placeholders."""
    return [key for key in config.image_features if not key.startswith("observation.images.empty_camera_")]


def expected_spec(config, num_steps: int, opset: int, config_sha256: str, source: str) -> Spec:
    """The inputs/outputs a graph of this policy config must have (see the module docstring)."""
    cameras = cameras_of(config)
    lang = config.tokenizer_max_length
    state = config.robot_state_feature.shape[0]
    inputs = [
        {"name": key, "shape": ["batch", *config.image_features[key].shape], "dtype": "float32"} for key in cameras
    ]
    inputs += [
        {"name": "image_masks", "shape": ["batch", len(cameras)], "dtype": "bool"},
        {"name": "lang_tokens", "shape": ["batch", lang], "dtype": "int64"},
        {"name": "lang_mask", "shape": ["batch", lang], "dtype": "bool"},
        {"name": "state", "shape": ["batch", state], "dtype": "float32"},
        {"name": "noise", "shape": ["batch", config.chunk_size, config.max_action_dim], "dtype": "float32"},
    ]
    action_dim = config.action_feature.shape[0]
    outputs = [{"name": "actions", "shape": ["batch", config.chunk_size, action_dim], "dtype": "float32"}]
    return Spec(
        inputs, outputs, cameras, num_steps, config.chunk_size, config.n_action_steps, opset, config_sha256, source
    )


class ChunkGraph(nn.Module):
    """LeRobot's SmolVLA sampling as one tensor-in, tensor-out function (what gets traced).

    `forward(*images, image_masks, lang_tokens, lang_mask, state, noise) -> actions`
    (shapes in the module docstring). Calls LeRobot's own pieces: `prepare_images`,
    `prepare_state`, `embed_prefix`, `vlm_with_expert.forward` for the prefix K/V and
    `denoise_step` per Euler step, from t=1 (noise) to t=0 (action), dt = -1/num_steps.
    """

    def __init__(self, lerobot_policy, num_steps: int):
        super().__init__()
        self.policy = lerobot_policy
        self.cameras = cameras_of(lerobot_policy.config)
        self.num_steps = num_steps

    def forward(self, *inputs: Tensor) -> Tensor:
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        *images, image_masks, lang_tokens, lang_mask, state, noise = inputs
        policy, model = self.policy, self.policy.model
        batch = {key: image for key, image in zip(self.cameras, images)}
        batch |= {f"{key}_padding_mask": image_masks[:, i] for i, key in enumerate(self.cameras)}
        pixels, masks = policy.prepare_images(batch)  # resize-with-pad, [0, 1] -> [-1, 1]
        state = policy.prepare_state({"observation.state": state})  # (B, max_state_dim)
        embs, pad_masks, att_masks = model.embed_prefix(pixels, masks, lang_tokens, lang_mask, state=state)
        _, cache = model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        x_t, dt = noise, -1.0 / self.num_steps  # (B, chunk, max_action_dim) at t=1
        for step in range(self.num_steps):
            t = torch.full_like(noise[:, 0, 0], 1.0 + step * dt)  # (B,), as LeRobot's euler_integrate
            v_t = model.denoise_step(prefix_pad_masks=pad_masks, past_key_values=cache, x_t=x_t, timestep=t)
            x_t = x_t + dt * v_t
        return x_t[:, :, : policy.config.action_feature.shape[0]]  # (B, chunk, action_dim)


def example_inputs(spec: Spec, batch: int = EXPORT_BATCH, seed: int = 0) -> list[Tensor]:
    """Random tensors in the spec's shapes and dtypes (images in [0, 1], all masks True)."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for entry in spec.inputs:
        shape = [batch if dim == "batch" else dim for dim in entry["shape"]]
        if entry["dtype"] == "bool":
            tensors.append(torch.ones(shape, dtype=torch.bool))
        elif entry["dtype"] == "int64":
            tensors.append(torch.randint(0, 4, shape, generator=g))
        elif entry["name"] in spec.cameras:
            tensors.append(torch.rand(shape, generator=g))
        else:
            tensors.append(torch.randn(shape, generator=g))
    return tensors


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_onnx(folder: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET, num_steps=None) -> Path:
    """Export the SmolVLA policy in `folder` (see `reflow_exp.policy.resolve_policy_folder`) to
    `out/model.onnx` + `out/model.json` (default out: `<folder>/onnx`); returns `out`.

    `num_steps`: Euler steps unrolled into the graph (default: the config's `num_steps`).
    Raises ValueError for a folder of another policy type, before anything is built or traced.
    """
    from reflow_exp.heads import num_steps as steps_set
    from reflow_exp.policy import Policy, check_smolvla_folder, resolve_policy_folder

    folder = resolve_policy_folder(folder)
    check_smolvla_folder(folder)
    policy = Policy.from_pretrained(folder).eval()
    config = policy.config
    steps = num_steps or config.num_steps
    with steps_set(config, steps):
        pass  # validates `steps` (>= 1) with the same message as everywhere else
    out = Path(out) if out is not None else folder / "onnx"
    out.mkdir(parents=True, exist_ok=True)
    spec = expected_spec(config, steps, opset, file_sha256(folder / "config.json"), str(folder))
    names = [entry["name"] for entry in spec.inputs]
    dynamic = {name: {0: "batch"} for name in [*names, "actions"]}
    with (
        policy.head.with_vlm_registered() as lerobot_policy,
        torch.no_grad(),
        _vision_mask_skipped(),
        _bool_cumsum_as_int64(opset),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed by the config; parity is tested
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)  # chosen
        graph = ChunkGraph(lerobot_policy, steps).eval()
        example = tuple(example_inputs(spec))
        vision = lerobot_policy.model.vlm_with_expert.get_vlm_model().vision_model.embeddings
        ids = _position_ids_seen(vision, lambda: graph(*example))
        with _vision_positions_fixed(vision, ids):
            torch.onnx.export(
                graph,
                example,
                str(out / ONNX_FILE),
                input_names=names,
                output_names=["actions"],
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
    spec.save(out / SPEC_FILE)
    return out


def _position_ids_seen(embeddings: nn.Module, run) -> Tensor:
    """The patch position ids (1, patches) that SmolVLM's vision embeddings compute during `run()`
    (eager, every camera): its bucketize + boolean-mask scatter does not export (ScatterND on mixed
    types), and for a full frame of a fixed size the ids are a constant."""
    seen = []
    hook = embeddings.position_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        run()
    finally:
        hook.remove()
    if any(ids.shape != seen[0].shape or not torch.equal(ids, seen[0][:1].expand_as(ids)) for ids in seen):
        raise ValueError(
            "the cameras' patch position ids differ (frames of different sizes after SmolVLA's resize); "
            "export needs one frame size: set resize_imgs_with_padding in the policy config"
        )
    return seen[0][:1]


@contextlib.contextmanager
def _vision_positions_fixed(embeddings: nn.Module, ids: Tensor):
    """SmolVLM's vision embeddings with the position ids `ids` (1, patches) as a constant: patch
    embedding + position embedding, as transformers computes them for a full (unpadded) frame."""

    def forward(pixel_values: Tensor, patch_attention_mask: Tensor | None = None) -> Tensor:
        patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        return patches + embeddings.position_embedding(ids)

    embeddings.forward = forward  # an instance attribute shadows the method; `del` restores it
    try:
        yield
    finally:
        del embeddings.forward


@contextlib.contextmanager
def _vision_mask_skipped():
    """Trace the SigLIP encoder without its attention mask: LeRobot's `embed_image` passes no patch
    mask (every patch of a resized frame is valid), so the all-True bidirectional mask that
    transformers builds is a no-op, and building it fails under tracing (transformers 5.5's
    `sdpa_mask` reads a traced length as the deprecated `cache_position` tensor)."""
    from transformers.models.smolvlm import modeling_smolvlm

    saved = modeling_smolvlm.create_bidirectional_mask
    modeling_smolvlm.create_bidirectional_mask = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_smolvlm.create_bidirectional_mask = saved


@contextlib.contextmanager
def _bool_cumsum_as_int64(opset: int):
    """Export `torch.cumsum` of a bool tensor (SmolVLA's position ids, `cumsum(pad_masks) - 1`) as
    CumSum of its int64 cast, which is what torch computes; the stock exporter emits CumSum on bool,
    which ONNX Runtime rejects as an invalid graph."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i", "none")
    def cumsum(g, values, dim, dtype=None):
        if values.type().scalarType() == "Bool":
            values = g.op("Cast", values, to_i=torch.onnx.TensorProtoDataType.INT64)
        return g.op("CumSum", values, g.op("Constant", value_t=torch.tensor(dim)))

    torch.onnx.register_custom_op_symbolic("aten::cumsum", cumsum, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::cumsum", opset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.export", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    onnx = commands.add_parser("onnx", help="export a SmolVLA policy folder to model.onnx + model.json")
    onnx.add_argument("folder", help="a LeRobot SmolVLA folder or a run folder of ours")
    onnx.add_argument("--out", type=Path, help="output folder (default: <policy folder>/onnx)")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    onnx.add_argument("--num_steps", type=int, help="Euler steps unrolled (default: the config's num_steps)")
    args = parser.parse_args(argv)
    try:
        out = export_onnx(args.folder, args.out, args.opset, args.num_steps)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / ONNX_FILE} and {out / SPEC_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
