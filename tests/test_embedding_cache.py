"""The image embedding cache: same loss and teacher actions as the encoder, rebuilt when stale or
corrupt, refused under image augmentation, and the reflow job's switch."""

import os

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
from lerobot.transforms.transforms import ImageTransforms, ImageTransformsConfig

from reflow_exp import coupling, flow, run
from reflow_exp.backbone import Backbone
from reflow_exp.data import DataSource, load_dataset, make_dataloader, open_metadata
from reflow_exp.embedding_cache import ImageEmbeddingCache
from reflow_exp.heads import ActionHead
from reflow_exp.reflow import Reflow
from reflow_exp.sandbox import build_sandbox, tiny_smolvla_config

DATA = {"data": "d0", "episodes": [0, 1]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight teacher on the tiny sandbox VLM, a student copy, and two recorded episodes."""
    built = build_sandbox(tmp_path_factory.mktemp("embcache") / "sandbox", seed=0, episodes=2)
    source = DataSource(str(built["vlm_path"]), built["repo_id"], str(built["dataset_root"]))
    meta = open_metadata(source)
    config = tiny_smolvla_config(built["vlm_path"], load_vlm_weights=False, device="cpu")
    torch.manual_seed(0)
    backbone = Backbone.from_pretrained_vlm(source.vlm_model_name, config.num_vlm_layers)
    teacher = ActionHead(config, backbone)
    student = ActionHead(config, backbone, teacher.lerobot.state_dict())
    preprocess, _ = make_smolvla_pre_post_processors(config, meta.stats)
    loader = make_dataloader(load_dataset(source, meta, config.chunk_size), 8, seed=0, shuffle=False)
    return {
        "backbone": backbone,
        "teacher": teacher,
        "student": student,
        "preprocess": preprocess,
        "loader": loader,
        "source": source,
        "meta": meta,
    }


def _model(setup, image_cache=None):
    return Reflow(
        setup["backbone"],
        setup["teacher"],
        setup["student"],
        coupling.OnlineCoupling(teacher_steps=3),
        flow.uniform_time,
        image_cache=image_cache,
    )


def test_cached_embeddings_give_the_same_loss_and_teacher_actions(setup, tmp_path, capsys):
    cache = ImageEmbeddingCache()
    assert cache.prepare(setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    assert "Building image embeddings" in capsys.readouterr().out
    assert cache.report["frames"] == len(setup["loader"].dataset) and cache.report["bytes_per_frame"] > 0
    batch = setup["preprocess"](next(iter(setup["loader"])))
    plain, cached = _model(setup), _model(setup, cache)
    noise = torch.randn(8, 16, 32)
    calls = []
    vision = setup["teacher"].lerobot.model.vlm_with_expert.get_vlm_model().vision_model
    handle = vision.register_forward_hook(lambda *_: calls.append(1))
    try:
        expected = plain.teacher_actions(batch, noise, 3, plain.encode(batch))
        encoder_calls = len(calls)
        got = cached.teacher_actions(batch, noise, 3, cached.encode(batch))
    finally:
        handle.remove()
    assert encoder_calls == len(calls) == 1  # the cached path never ran the vision encoder
    assert torch.allclose(got, expected, atol=1e-6)
    losses = []
    for model in (plain, cached):
        torch.manual_seed(1)
        losses.append(model.loss(batch)[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_the_file_is_reused_until_a_fingerprint_changes_and_rebuilt_when_corrupt(setup, tmp_path, capsys):
    args = (setup["teacher"], setup["loader"], setup["preprocess"], tmp_path)
    cache = ImageEmbeddingCache()
    cache.prepare(*args, DATA)
    file = tmp_path / ImageEmbeddingCache.FILE
    stamp = file.stat().st_mtime_ns
    capsys.readouterr()
    ImageEmbeddingCache().prepare(*args, DATA)
    assert file.stat().st_mtime_ns == stamp and "Reusing image embeddings" in capsys.readouterr().out

    ImageEmbeddingCache().prepare(*args, {**DATA, "data": "d1"})  # the data changed
    assert "the VLM, image preprocessing or data changed" in capsys.readouterr().out

    size = file.stat().st_size
    os.truncate(file, size - 100)
    ImageEmbeddingCache().prepare(*args, DATA)
    assert "unreadable" in capsys.readouterr().out and file.stat().st_size == size

    with open(file, "r+b") as f:  # NaN into the last frame's embeddings (float32, little-endian)
        f.seek(size - 4)
        f.write(b"\x00\x00\xc0\x7f")
    ImageEmbeddingCache().prepare(*args, DATA)
    assert "non-finite" in capsys.readouterr().out

    vision = setup["teacher"].lerobot.model.vlm_with_expert.get_vlm_model().vision_model
    with torch.no_grad():  # other vision weights: the fingerprint changes
        vision.post_layernorm.bias.add_(0.1)
        try:
            ImageEmbeddingCache().prepare(*args, DATA)
        finally:
            vision.post_layernorm.bias.sub_(0.1)
    assert "the VLM, image preprocessing or data changed" in capsys.readouterr().out


def test_a_stale_file_with_a_matching_fingerprint_is_caught_by_the_spot_check(setup, tmp_path, capsys):
    args = (setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    ImageEmbeddingCache().prepare(*args)
    file = tmp_path / ImageEmbeddingCache.FILE
    data_start = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    frames = len(setup["loader"].dataset)
    with open(file, "r+b") as f:  # the first camera's first value, right after the index column
        f.seek(data_start + 8 * frames)
        f.write(torch.tensor([123.0]).numpy().tobytes())
    capsys.readouterr()
    ImageEmbeddingCache().prepare(*args)
    assert "differ from a fresh computation" in capsys.readouterr().out


def test_unknown_frames_are_an_error(setup, tmp_path):
    cache = ImageEmbeddingCache()
    cache.prepare(setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    batch = setup["preprocess"](next(iter(setup["loader"])))
    batch["index"] = batch["index"] + 10_000
    with pytest.raises(ValueError, match="frame index 10000 is not in the image embedding cache"):
        cache.lookup(batch)


def test_image_augmentation_refuses_the_cache(setup, tmp_path, capsys):
    augmented = LeRobotDataset(
        setup["source"].repo_id,
        root=setup["meta"].root,
        image_transforms=ImageTransforms(ImageTransformsConfig(enable=True)),
    )
    loader = make_dataloader(augmented, 8, seed=0, shuffle=False)
    args = (setup["teacher"], loader, setup["preprocess"], tmp_path, DATA)
    with pytest.raises(ValueError, match="image augmentation is on"):
        ImageEmbeddingCache(required=True).prepare(*args)
    cache = ImageEmbeddingCache()
    assert not cache.prepare(*args) and cache.lookup({"index": torch.tensor([0])}) is None
    assert "Image embedding cache off: image augmentation is on" in capsys.readouterr().out
    assert not (tmp_path / ImageEmbeddingCache.FILE).exists()


def test_the_reflow_job_refuses_the_cache_without_the_shared_prefix(tmp_path, capsys):
    argv = [
        "--gin_file",
        "gin/sandbox/tiny_reflow.gin",
        "--gin_param",
        f'run.runs_dir = "{tmp_path}"',
        "--gin_param",
        'reflow.teacher = "unused"',
        "--gin_param",
        "reflow.shared_prefix = False",
        "--gin_param",
        "reflow.image_embedding_cache = True",
    ]
    assert run.main(argv) != 0  # before the teacher ("unused") is looked up
    assert "image_embedding_cache=True needs reflow.shared_prefix=True" in capsys.readouterr().err


@pytest.mark.parametrize("empty_cameras", [0, 1])
def test_a_teacher_camera_the_data_lack(setup, tmp_path, capsys, empty_cameras):
    """LeRobot leaves a missing camera out (empty_cameras=0): the cache serves the others and gives
    LeRobot's loss; when SmolVLA would feed it as a blank image instead, the cache stays off."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    features = {**setup["teacher"].config.input_features}
    features["observation.images.wrist"] = PolicyFeature(FeatureType.VISUAL, (3, 64, 64))
    config = tiny_smolvla_config(
        setup["source"].vlm_model_name,
        input_features=features,
        empty_cameras=empty_cameras,
        load_vlm_weights=False,
        device="cpu",
    )
    teacher = ActionHead(config, setup["backbone"], setup["teacher"].lerobot.state_dict())
    student = ActionHead(config, setup["backbone"], setup["teacher"].lerobot.state_dict())
    heads = {**setup, "teacher": teacher, "student": student}
    cache = ImageEmbeddingCache()
    on = cache.prepare(teacher, setup["loader"], setup["preprocess"], tmp_path, DATA)
    assert on == (empty_cameras == 0)
    if not on:
        out = capsys.readouterr().out
        assert "lacks the teacher's camera(s) ['observation.images.wrist'" in out and "as blank images" in out
        return
    assert cache.cameras == ["observation.image"]
    batch = setup["preprocess"](next(iter(setup["loader"])))
    losses = []
    for model in (_model(heads), _model(heads, cache)):
        torch.manual_seed(1)
        losses.append(model.loss(batch)[0])
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
