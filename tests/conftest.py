"""Test-wide settings: never touch a model hub, keep Aim and Gradio quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402

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


# -- tiny policies and batches (tests/test_policy.py, test_prefix.py, test_reflow.py, test_evaluate.py, ...)


@pytest.fixture(scope="session")
def sandbox_stats():
    """The sandbox's normalisation statistics, roughly: state in [0, 1], small action steps."""
    import torch

    return {
        "observation.state": {"mean": torch.full((2,), 0.5), "std": torch.full((2,), 0.3)},
        "action": {"mean": torch.zeros(2), "std": torch.full((2,), 0.03)},
    }


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(seed)``: a preprocessed tiny-sandbox batch of B=3 samples with chunks of 16
    (64x64 image, 2-D state and action, 5 language tokens; action padding after 16, 10 and 4)."""
    import torch

    def make(seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        b, chunk = 3, 16
        return {
            "observation.image": torch.rand(b, 3, 64, 64, generator=g),
            "observation.state": torch.randn(b, 2, generator=g),
            "observation.language.tokens": torch.randint(6, 12, (b, 5), generator=g),
            "observation.language.attention_mask": torch.ones(b, 5, dtype=torch.bool),
            "action": torch.randn(b, chunk, 2, generator=g),
            "action_is_pad": torch.arange(chunk).expand(b, chunk) >= torch.tensor([[chunk], [10], [4]]),
        }

    return make


@pytest.fixture(scope="session")
def tiny_policy():
    """``tiny_policy(vlm, stats, seed=0, **config_overrides)``: a random-weight tiny SmolVLA composed
    as our Policy (backbone + head + processors)."""
    import torch
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    from reflow_exp.backbone import VLM_PREFIX, Backbone
    from reflow_exp.heads import ActionHead
    from reflow_exp.policy import Policy
    from reflow_exp.sandbox import tiny_smolvla_config

    def make(vlm, stats, seed=0, **overrides) -> Policy:
        torch.manual_seed(seed)
        config = tiny_smolvla_config(vlm, load_vlm_weights=False, device="cpu", **overrides)
        state = SmolVLAPolicy(config).state_dict()
        vlm_state = {k.removeprefix(VLM_PREFIX): v for k, v in state.items() if k.startswith(VLM_PREFIX)}
        head_state = {k: v for k, v in state.items() if not k.startswith(VLM_PREFIX)}
        backbone = Backbone.from_state_dict(config.vlm_model_name, config.num_vlm_layers, vlm_state, "test")
        head = ActionHead(config, backbone, head_state)
        return Policy(backbone, head, *make_smolvla_pre_post_processors(config, stats)).eval()

    return make


# -- helpers shared by tests that run real processes -------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cli():
    """``cli(gin_file, *bindings, wait=True)``: ``python -m reflow_exp.run`` in a real process, from
    the repo root; returns the finished ``subprocess.CompletedProcess`` (text output), or the
    running ``Popen`` (its own session, output discarded: read the run's log.txt) when
    ``wait=False``. ``--dry_run`` may be one of the bindings. ``launcher`` replaces the Python
    interpreter, e.g. ``[".../torchrun", "--nproc_per_node", "2"]``."""
    import subprocess
    import sys

    def run(gin_file: str, *bindings: str, wait: bool = True, timeout: float = 300, launcher: list | None = None):
        argv = [*(launcher or [sys.executable]), "-m", "reflow_exp.run", "--gin_file", gin_file]
        for binding in bindings:
            argv += [binding] if binding.startswith("--") else ["--gin_param", binding]
        env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if not wait:
            # Never a pipe: nobody reads it while the run goes on, and a full pipe would block the run.
            return subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(n=2)``: the launcher argv for ``n`` processes on a free port (a ``cli`` launcher)."""
    import sys
    from pathlib import Path

    from reflow_exp.files import free_port

    def launcher(n: int = 2) -> list[str]:
        binary = str(Path(sys.executable).parent / "torchrun")
        return [binary, "--nproc_per_node", str(n), "--master_port", str(free_port())]

    return launcher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, cli):
    """A finished tiny teacher run folder (gin/sandbox/tiny.gin: checkpoints at steps 3 and 6),
    trained by a real process once per session; its sandbox cache is ``<its runs dir>/sandbox``.
    Copy it before changing anything in it."""
    root = tmp_path_factory.mktemp("tiny-teacher")
    result = cli(
        "gin/sandbox/tiny.gin",
        f'run.runs_dir = "{root / "runs"}"',
        f'sandbox_source.root = "{root / "runs" / "sandbox"}"',
        "Tracker.enabled = False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny-teacher"


@pytest.fixture(scope="session")
def sandbox_root(tmp_path_factory):
    """One sandbox cache (tiny VLM + data) for every dashboard test of the session (built by the
    first run that asks for it)."""
    return tmp_path_factory.getbasetemp() / "dashboard-sandbox"


@pytest.fixture(scope="session")
def dashboard_server():
    """``dashboard_server(runs_dir, port)``: a context manager, see ``_running_dashboard``."""
    return _running_dashboard


@contextlib.contextmanager
def _running_dashboard(runs_dir, port: int):
    """The dashboard without a login on 127.0.0.1:`port` over `runs_dir`: yields (url, Dashboard);
    on exit stops any run a failed test left behind, the Aim explorer and the server."""
    from app.ui import build_demo, launch_kwargs

    demo = build_demo(runs_dir)
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_kwargs(runs_dir)
    )
    try:
        yield url, demo.dashboard
    finally:
        for name in demo.dashboard.runner.running():
            with contextlib.suppress(Exception):
                demo.dashboard.runner.stop(name)
        demo.dashboard.aim.stop()
        demo.close()
