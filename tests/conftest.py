"""Test-wide settings: never touch a model hub, keep Aim and Gradio quiet."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """The sandbox's tiny SmolVLM, written once per test session."""
    from reflow_exp.sandbox import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("sandbox") / "vlm", seed=0)


@pytest.fixture(autouse=True)
def _clear_gin():
    """`run.main` leaves its config bound and locked; every test starts and ends with none."""
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
