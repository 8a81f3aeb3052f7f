"""The image embedding cache: same loss and teacher actions as the encoder, rebuilt when stale or
corrupt, refused under image augmentation, and the reflow job's switch."""

import os
import subprocess

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
from lerobot.transforms.transforms import ImageTransforms, ImageTransformsConfig

from reflow_exp import coupling, flow, run
from reflow_exp.backbone import Backbone
from reflow_exp.data import DataSource, load_dataset, make_dataloader, open_metadata
from reflow_exp.embedding_cache import ImageEmbeddingCache, sample_rows
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
    cache = ImageEmbeddingCache(dtype="float32")  # exact; reduced precision: the parity test below
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

    with open(file, "r+b") as f:  # NaN into the last frame's embeddings (bfloat16, little-endian)
        f.seek(size - 2)
        f.write(torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
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
        f.write(torch.tensor([123.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
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
    cache = ImageEmbeddingCache(dtype="float32")
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


def test_reduced_precision_storage_keeps_the_student_loss(setup, tmp_path):
    """bfloat16 and float16 files: half the bytes of float32, the same loss within 1e-2 relative."""
    batch = setup["preprocess"](next(iter(setup["loader"])))
    losses, sizes = {}, {}
    for dtype in ("float32", "bfloat16", "float16"):
        cache = ImageEmbeddingCache(folder=str(tmp_path / dtype), dtype=dtype)
        assert cache.prepare(setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
        assert all(t.dtype == getattr(torch, dtype) for t in cache.tensors.values())
        assert cache.lookup(batch).embeddings[0].dtype == torch.float32  # the compute dtype
        torch.manual_seed(1)
        losses[dtype] = _model(setup, cache).loss(batch)[0].item()
        sizes[dtype] = cache.report["bytes_per_frame"]
    relative = {dtype: abs(losses[dtype] / losses["float32"] - 1) for dtype in ("bfloat16", "float16")}
    print(f"relative loss difference to float32: {relative}")
    for dtype in ("bfloat16", "float16"):
        assert relative[dtype] <= 1e-2, losses
        assert sizes[dtype] * 2 == sizes["float32"]
    with pytest.raises(ValueError, match="ImageEmbeddingCache.dtype must be one of"):
        ImageEmbeddingCache(dtype="int8")


def test_a_changed_storage_dtype_rebuilds_the_file(setup, tmp_path, capsys):
    args = (setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    ImageEmbeddingCache(dtype="float32").prepare(*args)
    capsys.readouterr()
    ImageEmbeddingCache().prepare(*args)
    assert "the VLM, image preprocessing or data changed" in capsys.readouterr().out


def test_reuse_checks_a_bounded_sample_and_lookups_catch_the_rest(setup, tmp_path, capsys):
    rows = sample_rows(1_000_000)
    assert len(rows) <= 256 and {0, 999_999} <= set(rows.tolist())
    assert sample_rows(5).tolist() == [0, 1, 2, 3, 4]
    args = (setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    cache = ImageEmbeddingCache()
    cache.prepare(*args)
    batch = setup["preprocess"](next(iter(setup["loader"])))
    row = cache.row[int(batch["index"][1])]
    cache.tensors[cache.cameras[0]][row, 0, 0] = float("nan")  # as if damaged on disk after the check
    with pytest.raises(ValueError, match="non-finite embeddings for observation.image .* delete the file"):
        cache.lookup(batch)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount; skipped otherwise), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_the_cache_refuses_a_disk_without_room(setup, tmp_path, small_disk):
    """Free space is checked before the file is sized: the error gives bytes needed and free and the
    opt-out, and no file is left behind."""
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - 8192))  # leaves 8 KiB: less than the cache needs
    cache = ImageEmbeddingCache(folder=str(small_disk))
    args = (setup["teacher"], setup["loader"], setup["preprocess"], tmp_path, DATA)
    with pytest.raises(OSError, match=r"needs [\d,]+ bytes in .* which has [\d,]+ free.*image_embedding_cache = False"):
        cache.prepare(*args)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    (small_disk / "filler").unlink()
    assert ImageEmbeddingCache(folder=str(small_disk)).prepare(*args)  # with room it builds
