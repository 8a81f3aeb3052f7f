"""ChunkedFrames gives exactly what LeRobotDataset with action delta_timestamps gives, for video and
image cameras, in DataLoader workers too; bad datasets and feature mismatches fail clearly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from reflow_exp.data import (
    ChunkedFrames,
    DataSource,
    check_features,
    dataset_stats,
    default_workers,
    load_dataset,
    make_dataloader,
    open_metadata,
    policy_features,
    split_episodes,
    without_cameras,
)
from reflow_exp.sandbox import record_dataset
from reflow_exp.sandbox.dataset import CAMERA_KEYS
from reflow_exp.visited import Offset

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
    reference = LeRobotDataset(
        REPO, root=root, episodes=episodes, delta_timestamps={"action": [k / 10 for k in range(CHUNK)]}
    )
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
    batches = [list(make_dataloader(frames, 16, seed=0, num_workers=workers, shuffle=False)) for workers in (0, 2)]
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


def test_without_cameras_the_items_keep_everything_else_and_decode_nothing(recorded, tmp_path):
    """For training from cached image embeddings: the same items minus the cameras, also through the
    teacher-visited frames' ConcatDataset + Offset; with the video files gone they still load."""

    def frames_and_visited(root):
        frames = load_dataset(source(root), open_metadata(source(root)), CHUNK)
        return torch.utils.data.ConcatDataset([frames, Offset(frames, len(frames), 5)]), len(frames)

    reference, n = frames_and_visited(recorded["video"])
    shutil.copytree(recorded["video"], tmp_path / "video")
    combined, _ = frames_and_visited(tmp_path / "video")
    bare = without_cameras(combined)
    shutil.rmtree(tmp_path / "video" / "videos")
    with pytest.raises(RuntimeError, match="Cannot decode"):  # the original decodes, and the files are gone
        combined[0]
    for row in (0, n - 1, n + 3):
        expected = {key: value for key, value in reference[row].items() if key not in CAMERA_KEYS}
        assert_same_item(expected, bare[row], row)


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
    unknown = r"rename_map names keys the dataset does not have: \['observation.images.top'\]"
    with pytest.raises(ValueError, match=unknown):
        open_metadata(source(recorded["video"], rename_map={"observation.images.top": "observation.images.cam"}))
    with pytest.raises(ValueError, match="same name"):
        open_metadata(source(recorded["video"], rename_map={CAMERA_KEYS[1]: CAMERA_KEYS[0]}))


def _policy(features: dict):
    """A SmolVLA config reading `features` (what check_features looks at)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    return SmolVLAConfig(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={k: f for k, f in features.items() if f.type is FeatureType.ACTION},
        device="cpu",
    )


def test_feature_mismatch_lists_both_sides_and_the_fix(recorded, capsys):
    meta = open_metadata(source(recorded["video"]))
    dataset = policy_features(meta)
    assert check_features(_policy(dataset), dataset) == list(CAMERA_KEYS)  # the same features pass
    one_camera = {k: f for k, f in dataset.items() if k != CAMERA_KEYS[1]}
    assert check_features(_policy(one_camera), dataset) == [CAMERA_KEYS[0]]  # an extra dataset camera: a note
    assert f"cameras ['{CAMERA_KEYS[1]}']: they are left out" in capsys.readouterr().out

    # LeRobot's rule: a camera the policy reads but the data lack is left out, with one line.
    three = {**dataset, "observation.images.top": dataset[CAMERA_KEYS[0]]}
    assert check_features(_policy(three), dataset, "lerobot_source.rename_map") == list(CAMERA_KEYS)
    out = capsys.readouterr().out
    assert "The dataset lacks the policy's cameras ['observation.images.top']: they are left out" in out
    assert "A rename_map would feed them" in out and "lerobot_source.rename_map" in out
    assert check_features(_policy(three), dataset, quiet=True) == list(CAMERA_KEYS)
    assert capsys.readouterr().out == ""

    # None of the policy's cameras: an error listing both sides and the rename_map fix.
    others = {k: f for k, f in dataset.items() if k not in CAMERA_KEYS}
    others["observation.images.top"] = dataset[CAMERA_KEYS[0]]
    with pytest.raises(ValueError) as error:
        check_features(_policy(others), dataset, "lerobot_source.rename_map")
    message = str(error.value)
    assert "the policy reads the cameras ['observation.images.top'], and the dataset has none of them" in message
    assert "Policy features:  observation.state (2,), observation.images.top (3, 64, 64), action (2,)" in message
    assert f"Dataset features: observation.image (3, 64, 64), {CAMERA_KEYS[1]} (3, 64, 64)" in message
    assert f'lerobot_source.rename_map = {{"{CAMERA_KEYS[0]}": "observation.images.top"}}' in message

    for key, shape in (("observation.state", (6,)), ("action", (7,))):
        other = {**dataset, key: PolicyFeature(dataset[key].type, shape)}
        with pytest.raises(ValueError, match=rf"{key}: the policy has shape \({shape[0]},\), the dataset \(2,\)"):
            check_features(_policy(other), dataset)


def test_split_and_loader_errors(recorded):
    assert split_episodes(10, 2) == (list(range(8)), [8, 9])
    with pytest.raises(ValueError, match="holdout_episodes"):
        split_episodes(3, 3)
    frames = ChunkedFrames(LeRobotDataset(REPO, root=recorded["image"]), CHUNK)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(frames, batch_size=10_000, seed=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        make_dataloader(frames, batch_size=4, seed=0, num_workers=-1)
    assert default_workers(3) == 3 and 0 <= default_workers() <= 4


# ----------------------------------------------------------------------------- end to end
def run_job(runs, gin_file, *params) -> int:
    from reflow_exp import run

    params = [f'run.runs_dir = "{runs}"', "Tracker.enabled = False", *params]
    if "reflow" in gin_file:  # the sandbox env renders one camera: no rollouts
        params += ["reflow.teacher_eval_steps = ()", "reflow.student_eval_steps = ()"]
    return run.main(["--gin_file", gin_file] + [x for p in params for x in ("--gin_param", p)])


def act_with_lerobot(student_dir, frames: ChunkedFrames) -> torch.Tensor:
    """One action from LeRobot's own SmolVLAPolicy.select_action on a dataset frame."""
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    policy = SmolVLAPolicy.from_pretrained(student_dir).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(student_dir))
    batch = next(iter(make_dataloader(frames, 1, seed=0, shuffle=False)))
    observation = {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}
    with torch.no_grad():
        return post(policy.select_action(pre(observation)))


def test_two_video_cameras_teacher_reflow_export(tmp_path):
    """train_teacher -> reflow -> export on a two-camera video sandbox dataset, one camera renamed;
    the student acts through LeRobot's select_action."""
    runs, rename = tmp_path / "runs", {CAMERA_KEYS[1]: "observation.images.wrist"}
    sandbox = [
        f'sandbox_source.root = "{tmp_path / "sandbox"}"',
        "sandbox_source.video = True",
        "sandbox_source.cameras = 2",
        f"sandbox_source.rename_map = {json.dumps(rename)}",
    ]
    assert run_job(runs, "gin/sandbox/tiny.gin", *sandbox) == 0
    assert run_job(runs, "gin/sandbox/tiny_reflow.gin", *sandbox, f'reflow.teacher = "{runs / "tiny-teacher"}"') == 0
    student = runs / "tiny-reflow" / "student"
    config = json.loads((student / "config.json").read_text())
    assert {CAMERA_KEYS[0], "observation.images.wrist"} <= set(config["input_features"])
    frames = load_dataset(
        source(tmp_path / "sandbox" / "data", rename_map=rename),
        open_metadata(source(tmp_path / "sandbox" / "data")),
        CHUNK,
    )
    action = act_with_lerobot(student, frames)
    assert action.shape == (1, 2) and torch.isfinite(action).all()


def test_lerobot_train_teacher_is_distilled_on_its_video_dataset(recorded, tiny_vlm, tmp_path):
    """A SmolVLA trained by LeRobot's own `lerobot-train` on a video dataset is the teacher of reflow."""
    out = tmp_path / "lerobot-train"
    command = [
        str(Path(sys.executable).parent / "lerobot-train"),
        f"--dataset.repo_id={REPO}",
        f"--dataset.root={recorded['video']}",
        "--policy.type=smolvla",
        f"--policy.vlm_model_name={tiny_vlm}",
        "--policy.load_vlm_weights=true",
        "--policy.push_to_hub=false",
        "--policy.device=cpu",
        "--wandb.enable=false",
        f"--output_dir={out}",
        "--steps=2",
        "--batch_size=4",
        "--num_workers=0",
        "--save_freq=2",
        "--log_freq=1",
        "--policy.num_vlm_layers=4",
        "--policy.chunk_size=16",
        "--policy.n_action_steps=16",
        "--policy.resize_imgs_with_padding=[64,64]",
        "--policy.tokenizer_max_length=16",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = out / "checkpoints" / "last" / "pretrained_model"
    runs = tmp_path / "runs"
    data = [
        "reflow.source = @lerobot_source",
        f'lerobot_source.repo_id = "{REPO}"',
        f'lerobot_source.root = "{recorded["video"]}"',
        f'reflow.teacher = "{teacher}"',
        "Trainer.steps = 2",
    ]
    # a camera the teacher reads but the dataset lacks (renamed away) is left out, as LeRobot does
    renamed = f'lerobot_source.rename_map = {{"{CAMERA_KEYS[1]}": "observation.images.top"}}'
    assert run_job(runs, "gin/sandbox/tiny_reflow.gin", *data, renamed, 'run.name = "one-camera"') == 0
    log = (runs / "one-camera" / "log.txt").read_text()
    assert f"The dataset lacks the policy's cameras ['{CAMERA_KEYS[1]}']: they are left out" in log
    assert "A rename_map would feed them" in log
    assert run_job(runs, "gin/sandbox/tiny_reflow.gin", *data) == 0
    summary = json.loads((runs / "tiny-reflow" / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["vlm_load_count"] == 1
    action = act_with_lerobot(
        runs / "tiny-reflow" / "student",
        load_dataset(source(recorded["video"]), open_metadata(source(recorded["video"])), CHUNK),
    )
    assert action.shape == (1, 2)


def test_per_frame_files_refuse_duplicated_frame_indices():
    """Pairs and image embeddings are looked up by the frame's dataset `index`: a duplicate would make
    one frame's row silently serve another (e.g. a second dataset added without offsetting indices)."""
    from reflow_exp.data import rows_by_index

    assert rows_by_index([7, 3, 9], "pairs.safetensors") == {7: 0, 3: 1, 9: 2}
    with pytest.raises(ValueError, match=r"pairs.safetensors: 1 duplicated frame indices"):
        rows_by_index([0, 1, 1, 2], "pairs.safetensors")
