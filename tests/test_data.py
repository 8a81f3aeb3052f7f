"""ChunkedFrames gives exactly what LeRobotDataset with action delta_timestamps gives."""

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from reflow_exp.data import ChunkedFrames, make_dataloader, split_episodes
from reflow_exp.sandbox import record_dataset

CHUNK = 16


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "data"
    record_dataset(root, episodes=4, seed=3)
    return root


@pytest.mark.parametrize("episodes", [None, [1, 3]])
def test_items_match_lerobot_dataset(recorded, episodes):
    fps = 10
    reference = LeRobotDataset(
        "reflow_exp/sandbox", root=recorded, episodes=episodes,
        delta_timestamps={"action": [k / fps for k in range(CHUNK)]},
    )
    ours = ChunkedFrames(LeRobotDataset("reflow_exp/sandbox", root=recorded, episodes=episodes), CHUNK)
    assert len(ours) == len(reference)
    padded = 0
    for i in range(len(ours)):
        expected, got = reference[i], ours[i]
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), (i, key)
            else:
                assert got[key] == value
        padded += int(got["action_is_pad"].any())
    assert padded > 0  # episode ends were exercised


def test_split_and_loader_errors(recorded):
    assert split_episodes(10, 2) == (list(range(8)), [8, 9])
    with pytest.raises(ValueError, match="holdout_episodes"):
        split_episodes(3, 3)
    frames = ChunkedFrames(LeRobotDataset("reflow_exp/sandbox", root=recorded), CHUNK)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(frames, batch_size=10_000, seed=0)
