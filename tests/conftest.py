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


# -- helpers shared by tests that run real processes -------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cli():
    """``cli(gin_file, *bindings, wait=True)``: ``python -m reflow_exp.run`` in a real process, from
    the repo root; returns the finished ``subprocess.CompletedProcess`` (text output), or the
    running ``Popen`` (its own session, output discarded: read the run's log.txt) when
    ``wait=False``. ``--dry_run`` may be one of the bindings."""
    import subprocess
    import sys

    def run(gin_file: str, *bindings: str, wait: bool = True, timeout: float = 300):
        argv = [sys.executable, "-m", "reflow_exp.run", "--gin_file", gin_file]
        for binding in bindings:
            argv += [binding] if binding.startswith("--") else ["--gin_param", binding]
        env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if not wait:
            # Never a pipe: nobody reads it while the run goes on, and a full pipe would block the run.
            return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, cli):
    """A finished tiny teacher run folder (gin/sandbox/tiny.gin: checkpoints at steps 3 and 6),
    trained by a real process once per session; its sandbox cache is ``<its runs dir>/sandbox``.
    Copy it before changing anything in it."""
    root = tmp_path_factory.mktemp("tiny-teacher")
    result = cli("gin/sandbox/tiny.gin", f'run.runs_dir = "{root / "runs"}"',
                 f'sandbox_source.root = "{root / "runs" / "sandbox"}"', "Tracker.enabled = False")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny-teacher"


@contextlib.contextmanager
def running_dashboard(runs_dir, port: int):
    """The dashboard without a login on 127.0.0.1:`port` over `runs_dir`: yields (url, Dashboard);
    on exit stops any run a failed test left behind, the Aim explorer and the server."""
    from app.ui import build_demo, launch_kwargs

    demo = build_demo(runs_dir)
    _, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port,
                                    quiet=True, **launch_kwargs(runs_dir))
    try:
        yield url, demo.dashboard
    finally:
        for name in demo.dashboard.runner.running():
            with contextlib.suppress(Exception):
                demo.dashboard.runner.stop(name)
        demo.dashboard.aim.stop()
        demo.close()
