"""ChunkedFrames gives exactly what LeRobotDataset with action delta_timestamps gives, for video and
image cameras, in DataLoader workers too; bad datasets and feature mismatches fail clearly."""

import shutil
import subprocess
import sys

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from reflow_exp.data import (
    ChunkedFrames, DataSource, check_features, dataset_stats, load_dataset, make_dataloader, open_metadata,
    policy_features, split_episodes,
)
from reflow_exp.sandbox import record_dataset
from reflow_exp.sandbox.dataset import CAMERA_KEYS

CHUNK = 16
REPO = "reflow_exp/sandbox"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two-camera sandbox datasets: {"video": root, "image": root}."""
    base = tmp_path_factory.mktemp("data")
    roots = {kind: base / kind for kind in ("video", "image")}
    for kind, root in roots.items():
        record_dataset(root, episodes=5, seed=3, video=kind == "video", cameras=2)
    return roots


def source(root, **kwargs) -> DataSource:
    return DataSource("unused", REPO, str(root), **kwargs)


def assert_same_item(expected: dict, got: dict, where) -> None:
    assert expected.keys() == got.keys(), where
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype and torch.equal(got[key], value), (where, key)
        else:
            assert got[key] == value, (where, key)


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("episodes", [None, [1, 3]])
def test_items_match_lerobot_dataset(recorded, kind, episodes):
    """Item for item, frames included (the same decoder at the same timestamps: exactly equal)."""
    root = recorded[kind]
    reference = LeRobotDataset(REPO, root=root, episodes=episodes,
                               delta_timestamps={"action": [k / 10 for k in range(CHUNK)]})
    assert set(CAMERA_KEYS) <= set(reference.meta.video_keys if kind == "video" else reference.meta.image_keys)
    data = source(root)
    ours = load_dataset(data, open_metadata(data), CHUNK, episodes)
    assert len(ours) == len(reference)
    padded = 0
    for i in range(len(ours)):
        got = ours[i]
        assert_same_item(reference[i], got, (kind, i))
        padded += int(got["action_is_pad"].any())
    assert padded > 0  # episode ends were exercised


def test_workers_give_the_same_batches(recorded):
    data = source(recorded["video"])
    frames = load_dataset(data, open_metadata(data), CHUNK)
    batches = [list(make_dataloader(frames, 16, seed=0, num_workers=workers, shuffle=False))
               for workers in (0, 2)]
    assert len(batches[0]) == len(batches[1]) > 1
    for one, other in zip(*batches):
        assert one["task"] == other["task"]
        for key in ("index", "action", "action_is_pad", *CAMERA_KEYS):
            assert torch.equal(one[key], other[key]), key


def test_only_the_policys_cameras_are_decoded_and_renamed(recorded):
    rename = {CAMERA_KEYS[1]: "observation.images.wrist"}
    data = source(recorded["video"], rename_map=rename)
    meta = open_metadata(data)
    features = policy_features(meta, rename)
    assert "observation.images.wrist" in features and CAMERA_KEYS[1] not in features
    assert dataset_stats(meta, rename).keys() == {rename.get(k, k) for k in meta.stats}
    item = load_dataset(data, meta, CHUNK, cameras=["observation.images.wrist"])[0]
    plain = load_dataset(source(recorded["video"]), meta, CHUNK)[0]
    assert torch.equal(item["observation.images.wrist"], plain[CAMERA_KEYS[1]])
    assert CAMERA_KEYS[0] not in item and CAMERA_KEYS[1] not in item


def test_pyav_fallback_says_so_in_one_line(recorded):
    """Without torchcodec, LeRobot's pyav decoder reads the same frames (within 1/255 here)."""
    script = (
        "import sys; sys.modules['torchcodec'] = None\n"
        "import torch\n"
        "from reflow_exp.data import DataSource, load_dataset, open_metadata\n"
        f"data = DataSource('unused', '{REPO}', '{recorded['video']}')\n"
        "frames = load_dataset(data, open_metadata(data), 16)\n"
        f"torch.save(frames[7]['{CAMERA_KEYS[1]}'], '{recorded['video']}/pyav.pt')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "torchcodec" in line]
    assert len(lines) == 1 and lines[0].startswith("[Data] Video decoder: pyav"), lines
    assert "Traceback" not in done.stderr
    data = source(recorded["video"])
    torchcodec_frame = load_dataset(data, open_metadata(data), CHUNK)[7][CAMERA_KEYS[1]]
    pyav_frame = torch.load(recorded["video"] / "pyav.pt")
    assert pyav_frame.shape == torchcodec_frame.shape
    assert (pyav_frame - torchcodec_frame).abs().max() <= 1 / 255 + 1e-6


# ----------------------------------------------------------------------------- bad input
def test_folder_without_info_json(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing .*meta/info.json.*LeRobotDataset.create"):
        open_metadata(source(tmp_path))


def _copy(recorded, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(recorded["video"], root)
    return root, root / "videos" / CAMERA_KEYS[1] / "chunk-000" / "file-000.mp4"


def test_missing_video_file_names_episode_and_file(recorded, tmp_path):
    root, video = _copy(recorded, tmp_path)
    video.unlink()
    data = source(root)
    with pytest.raises(FileNotFoundError, match=rf"Episode 1's video for {CAMERA_KEYS[1]} is missing: .*file-000.mp4"):
        load_dataset(data, open_metadata(data), CHUNK, episodes=[1, 2])


def test_truncated_video_file_names_episode_and_file(recorded, tmp_path):
    root, video = _copy(recorded, tmp_path)
    with open(video, "r+b") as f:
        f.truncate(video.stat().st_size // 2)
    data = source(root)
    with pytest.raises(RuntimeError, match=r"Cannot decode the end of .*file-000.mp4 \(episode 4, .*truncated"):
        load_dataset(data, open_metadata(data), CHUNK)


def test_rename_map_with_unknown_keys(recorded):
    with pytest.raises(ValueError, match=r"rename_map names keys the dataset does not have: \['observation.images.top'\]"):
        open_metadata(source(recorded["video"], rename_map={"observation.images.top": "observation.images.cam"}))
    with pytest.raises(ValueError, match="same name"):
        open_metadata(source(recorded["video"], rename_map={CAMERA_KEYS[1]: CAMERA_KEYS[0]}))


def _policy(features: dict):
    """A SmolVLA config reading `features` (what check_features looks at)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    return SmolVLAConfig(input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
                         output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
                         device="cpu")


def test_feature_mismatch_lists_both_sides_and_the_fix(recorded):
    meta = open_metadata(source(recorded["video"]))
    dataset = policy_features(meta)
    check_features(_policy(dataset), dataset)  # the same features pass
    wanted = {**dataset, "observation.images.top": dataset[CAMERA_KEYS[1]]}
    del wanted[CAMERA_KEYS[1]]
    with pytest.raises(ValueError) as error:
        check_features(_policy(wanted), dataset, "lerobot_source.rename_map")
    message = str(error.value)
    assert "the policy reads observation.images.top (VISUAL), which the dataset lacks" in message
    assert "Policy features:  observation.image (3, 64, 64), observation.state (2,)" in message
    assert f"Dataset features: observation.image (3, 64, 64), {CAMERA_KEYS[1]} (3, 64, 64)" in message
    assert f"lerobot_source.rename_map = {{\"{CAMERA_KEYS[1]}\": \"observation.images.top\"}}" in message
    bigger_state = {**dataset, "observation.state": PolicyFeature(FeatureType.STATE, (6,))}
    with pytest.raises(ValueError, match=r"observation.state: the policy has shape \(6,\), the dataset \(2,\)"):
        check_features(_policy(bigger_state), dataset)


def test_split_and_loader_errors(recorded):
    assert split_episodes(10, 2) == (list(range(8)), [8, 9])
    with pytest.raises(ValueError, match="holdout_episodes"):
        split_episodes(3, 3)
    frames = ChunkedFrames(LeRobotDataset(REPO, root=recorded["image"]), CHUNK)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(frames, batch_size=10_000, seed=0)
