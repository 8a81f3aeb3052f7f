"""Faults and attacks, reproduced with real processes, files, signals and HTTP requests (issue 14):
the dashboard acts only inside its runs folder and only for same-origin requests; a diverging run
stops with a finite ``last``; a run folder has one owner; damaged files are detected and
regenerated or skipped; config mistakes exit 2 before anything is written; a run's status comes
from its exit record."""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app import runs
from app.forms import LaunchError
from app.processes import process_start_time
from app.runner import Runner
from reflow_exp import run as run_cli
from reflow_exp.checkpoint import latest_checkpoint
from reflow_exp.files import free_port
from reflow_exp.rundir import RunDir
from reflow_exp.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_for(predicate, timeout: float, what: str, proc=None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {tail}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"bare {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _bindings(runs_dir: Path, *extra: str) -> list[str]:
    return [f'run.runs_dir = "{runs_dir}"', f'sandbox_source.root = "{runs_dir / "sandbox"}"', *extra]


@pytest.fixture
def teacher_copy(tiny_teacher, tmp_path):
    """A copy of the tiny teacher's run folder (sandbox cache beside it, shared)."""
    copy = tmp_path / "runs" / "tiny-teacher"
    shutil.copytree(tiny_teacher, copy, symlinks=True)
    (tmp_path / "runs" / "sandbox").symlink_to(tiny_teacher.parent / "sandbox")
    return copy


# -- issue 26 ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(folder: Path, megabytes: int):
    """A filesystem of `megabytes` mounted at `folder`: tmpfs, else a loop-mounted ext4 image;
    skips the test when this machine allows neither (mounting needs root)."""
    folder.mkdir(parents=True)
    tmpfs = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)]
    if subprocess.run(tmpfs, capture_output=True).returncode != 0:
        image = folder.parent / f"{folder.name}.img"
        with open(image, "wb") as f:
            f.truncate(megabytes << 20)
        made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True).returncode == 0
        if not made or subprocess.run(["mount", "-o", "loop", str(image), str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount a small filesystem here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_fails_the_run_within_a_minute_naming_the_disk(cli, tiny_teacher, tmp_path):
    """Issue 26 item 1: the runs folder (run folder + Aim repo) on a 24 MB tmpfs fills up with
    checkpoints (a save every step, none pruned); the process exits (no hang in Aim's RocksDB
    flush), status.json says failed and names the full filesystem, and the run lock is released."""
    with _small_disk(tmp_path / "disk", 24) as disk:
        console = tmp_path / "console.txt"
        argv = [sys.executable, "-m", "reflow_exp.run", "--gin_file", "gin/sandbox/tiny_reflow.gin"]
        for binding in (
            f'run.runs_dir = "{disk}"',
            f'sandbox_source.root = "{tiny_teacher.parent / "sandbox"}"',  # outside: only the run fills the disk
            f'ImageEmbeddingCache.folder = "{tmp_path / "cache"}"',
            f'reflow.teacher = "{tiny_teacher}"',
            "Trainer.steps = 100000",
            "Trainer.save_every = 1",
        ):
            argv += ["--gin_param", binding]
        env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(console, "w") as out:
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_for(lambda: "No space left on device" in console.read_text(), 240, "a full disk", proc, console)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the run did not exit within 60 s of the full disk: {console.read_text()[-2000:]}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == run_cli.EXIT_JOB_FAILED, console.read_text()[-2000:]
        status = json.loads((disk / "tiny-reflow" / "status.json").read_text())
        assert status["status"] == "failed" and status["exit_code"] == 1, status
        assert "the disk is full" in status["message"] and f"mounted at {disk}" in status["message"], status
        assert runs.run_status(disk / "tiny-reflow").status == "failed"
        lock = os.open(disk / "tiny-reflow" / ".lock", os.O_RDWR)

        def lock_is_free() -> bool:  # once the run and the workers it forked are gone
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        try:
            _wait_for(lock_is_free, 10, "the run lock to be released")
        finally:
            os.close(lock)


SLEEPER = "import time\ntry:\n    time.sleep(300)\nexcept KeyboardInterrupt:\n    raise SystemExit(130)"


def test_stop_signals_only_a_launcher_of_that_run_folder(dashboard):
    """Issue 26 item 3: a copied run folder is not running and its Stop signals nothing; a
    dashboard.json written by hand naming another process (with or without its start time) is
    refused; the real run still stops."""
    from gradio_client import Client

    from app.runner import LaunchPlan

    url, board = dashboard
    client = Client(url, verbose=False)
    original = board.runs_dir / "original"
    board.runner.start(LaunchPlan("original", original, [], [], "", [sys.executable, "-c", SLEEPER], resume=False))
    launcher = runs.read_json(original / runs.LAUNCH_FILE)["pid"]
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _wait_for(lambda: runs.run_status(original).status == "running", 20, "the original run")
        shutil.copytree(original, board.runs_dir / "copy")
        assert runs.run_status(board.runs_dir / "copy").status != "running"
        forged = {"pid": victim.pid, "pgid": victim.pid}
        for name, record in (
            ("no-start-time", forged),
            ("with-start-time", forged | {"proc_start": process_start_time(victim.pid)}),
        ):
            (board.runs_dir / name).mkdir()
            runs.write_json_atomic(board.runs_dir / name / runs.LAUNCH_FILE, record)
            assert runs.run_status(board.runs_dir / name).status != "running"
        for name in ("copy", "no-start-time", "with-start-time"):
            message = client.predict(name, api_name="/stop")
            assert "Stopping" not in message, message
        time.sleep(0.5)
        assert victim.poll() is None, "an unrelated process was signalled"
        assert runs.run_status(original).status == "running", "the original was signalled through its copy"

        assert "Stopping" in client.predict("original", api_name="/stop")
        _wait_for(lambda: runs.run_status(original).status == "stopped", 30, "the original to stop")
    finally:
        victim.kill()
        victim.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher, signal.SIGKILL)


def test_a_copied_cli_run_folder_is_not_running(cli, tiny_teacher, tmp_path):
    """Issue 26 item 3: status.json's "running" record counts only while a process holds the run
    folder's lock, so a copy of a running command-line run is not shown as running."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "sandbox").symlink_to(tiny_teacher.parent / "sandbox")
    run_dir = runs_dir / "long"
    proc = cli(
        "gin/sandbox/tiny.gin",
        *_bindings(runs_dir, 'run.name = "long"', "Trainer.steps = 100000", "Tracker.enabled = False"),
        wait=False,
    )
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "last").exists(), 240, "a checkpoint", proc, run_dir / "log.txt")
        assert runs.run_status(run_dir).status == "running"
        shutil.copytree(run_dir, runs_dir / "copy", symlinks=True)
        assert json.loads((runs_dir / "copy" / "status.json").read_text())["status"] == "running"
        assert runs.run_status(runs_dir / "copy").status == "failed"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


def test_a_resume_with_another_process_count_is_refused(cli, teacher_copy, torchrun):
    """Issue 26 item 2: a run trained with 1 process, resumed with `torchrun --nproc_per_node 2`,
    exits 1 naming both counts (its data position counts per-process batches); nothing trains."""
    before = (teacher_copy / "metrics.jsonl").read_text()
    result = cli(
        "gin/sandbox/tiny.gin",
        *_bindings(teacher_copy.parent, "Trainer.steps = 8", "Tracker.enabled = False"),
        launcher=torchrun(),
    )
    assert result.returncode != 0, result.stdout[-2000:]
    expected = "was trained with 1 process(es), this run has 2; a run resumes only with the same number"
    assert expected in result.stderr, result.stderr[-3000:]
    assert "reflow_exp/trainer.py" not in result.stderr  # no traceback of ours (torchrun prints its own)
    status = json.loads((teacher_copy / "status.json").read_text())
    assert status["status"] == "failed" and expected in status["message"]
    assert (teacher_copy / "metrics.jsonl").read_text() == before  # not a step trained
    assert (
        json.loads((teacher_copy / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())[
            "processes"
        ]
        == 1
    )


def _set_one_value_to_nan(path: Path) -> str:
    """Overwrite the first value of the first float32 tensor of a safetensors file with NaN, in
    place: size and header unchanged. Returns the tensor's name."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        name, info = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
        f.seek(8 + header_len + info["data_offsets"][0])
        f.write(struct.pack("<f", float("nan")))
    return name


def test_a_checkpoint_with_nan_inside_falls_back_to_the_one_before(cli, teacher_copy):
    """Issue 26 item 5: one NaN in checkpoints/000006/training_state/trainable_params.safetensors
    (same size, headers intact): the resume warns naming the file and continues from 000003."""
    checkpoints = teacher_copy / "checkpoints"
    damaged = checkpoints / "000006" / "training_state" / "trainable_params.safetensors"
    size = damaged.stat().st_size
    tensor = _set_one_value_to_nan(damaged)
    assert damaged.stat().st_size == size and latest_checkpoint(checkpoints) == checkpoints / "000006"
    result = cli("gin/sandbox/tiny.gin", *_bindings(teacher_copy.parent, "Tracker.enabled = False"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"Warning: checkpoint {checkpoints / '000006'} is damaged (training_state/trainable_params.safetensors: "
        f"NaN/inf values in tensor {tensor!r}); falling back to the one before it"
    ) in result.stderr, result.stderr[-2000:]
    assert f"Resuming training from {checkpoints / '000003'} (step 3 of 6)" in result.stdout
    for name, value in load_file(damaged).items():  # saved again from step 3
        assert torch.isfinite(value).all(), name


# -- issue 26 item 9: smaller faults -----------------------------------------------------------


def test_out_of_range_values_exit_2_before_the_run_folder(cli, tmp_path, capsys):
    """`train_teacher.batch_size = 0` and `Trainer.steps = -5` exit 2 like wrong types, naming the
    binding and the bound, before the run folder exists (they failed in the job, after it)."""
    runs_dir = tmp_path / "runs"
    result = cli("gin/sandbox/tiny.gin", f'run.runs_dir = "{runs_dir}"', "train_teacher.batch_size = 0")
    assert result.returncode == run_cli.EXIT_CONFIG_ERROR, result.stderr[-2000:]
    assert "train_teacher.batch_size: got 0, must be >= 1" in result.stderr and "Traceback" not in result.stderr
    argv = ["--gin_file", "gin/sandbox/tiny.gin", "--gin_param", f'run.runs_dir = "{runs_dir}"']
    assert run_cli.main([*argv, "--gin_param", "Trainer.steps = -5"]) == run_cli.EXIT_CONFIG_ERROR
    assert "Trainer.steps: got -5, must be >= 1" in capsys.readouterr().err
    assert not runs_dir.exists()


def test_the_dashboard_survives_odd_inputs_and_huge_files(dashboard):
    """A NUL byte in the gin-file field and a 1 MB run name get short errors; a summary.json with
    parts of the wrong type shows a run page; 50 MB summary.json / metrics.jsonl are read within
    limits (the summary skipped, the metrics' tail)."""
    from gradio_client import Client

    url, board = dashboard
    client = Client(url, verbose=False)
    message, _ = client.predict("sandbox/tiny\x00.gin", [], "", "cpu", "nul", api_name="/launch")
    assert "msg-error" in message and "NUL byte" in message, message
    message, _ = client.predict("sandbox/tiny.gin", [], "", "cpu", "x" * (1 << 20), api_name="/launch")
    assert "msg-error" in message and "1,048,576 characters" in message and len(message) < 2000, message[:300]

    odd = board.runs_dir / "odd-summary"
    odd.mkdir()
    (odd / "config.gin").write_text("")
    runs.write_json_atomic(odd / "summary.json", {"eval": "x", "params": 3, "offline": {"teacher": 5}, "train": []})
    page = client.predict("odd-summary", api_name="/run_page")
    assert "odd-summary" in str(page[0])

    huge = board.runs_dir / "huge"
    huge.mkdir()
    (huge / "config.gin").write_text("")
    (huge / "summary.json").write_text('{"pad": "' + "x" * (50 << 20) + '"}')
    row = json.dumps({"step": 1, "time": 0, "context": {"subset": "train"}, "loss": 0.5}) + "\n"
    last = json.dumps({"step": 999999, "time": 0, "context": {"subset": "train"}, "loss": 0.25}) + "\n"
    with open(huge / "metrics.jsonl", "w") as f:
        f.write(row * ((50 << 20) // len(row)) + last)
    start = time.monotonic()
    info = runs.run_status(huge)
    assert time.monotonic() - start < 5
    assert info.step == 999999 and info.last_loss == 0.25 and runs.read_summary(huge) == {}
    start = time.monotonic()
    client.predict("huge", api_name="/run_page")
    assert time.monotonic() - start < 10


def test_stale_temp_files_of_dead_processes_are_removed_at_start(tmp_path):
    """A SIGKILLed writer's `.<file>.tmp-<pid>` (e.g. a half-built image embedding cache) is deleted
    when the run folder is opened again; a live process's temp file is kept."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writer.kill()
    writer.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / f".image_embeddings.safetensors.tmp-{writer.pid}"
    stale.write_bytes(b"\0" * 4096)
    live = run_dir / f".summary.json.tmp-{os.getpid()}"
    live.write_text("{}")
    with RunDir(run_dir, tracker=Tracker(run_dir, enabled=False)):
        pass
    assert not stale.exists() and live.exists()
    assert f"Removed {stale.name}" in (run_dir / "log.txt").read_text()


def test_logging_warnings_reach_log_txt(tmp_path):
    """A library that set up logging before the run (its handler holds the console's stderr)
    still gets its warnings into log.txt."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        with RunDir(tmp_path / "run", tracker=Tracker(tmp_path / "run", enabled=False)):
            logging.getLogger("some.library").warning("a warning through logging")
    finally:
        logging.getLogger().removeHandler(handler)
    assert handler.stream is sys.stderr  # restored
    assert "a warning through logging" in (tmp_path / "run" / "log.txt").read_text()


def test_summary_records_the_device_and_the_dashboard_shows_it(tiny_teacher):
    """A run started from the command line: summary.json says where it ran; the Device column
    reads it (it showed "—")."""
    record = json.loads((tiny_teacher / "summary.json").read_text())["run"]
    assert record["processes"] == 1 and record["description"].startswith(record["device"])
    assert not (tiny_teacher / runs.LAUNCH_FILE).exists()
    shown = runs.run_status(tiny_teacher).device
    assert shown == "CPU" if record["device"] == "cpu" else shown.startswith("GPU")


def test_every_folder_binding_is_confined_to_the_runs_folder(tmp_path):
    """Issue 26 item 4: `ImageEmbeddingCache.folder` and `metaworld_source.root` were missing from a
    hand-kept list. The list is now every parameter annotated `WritesFolder`; any configurable
    parameter whose name says folder must carry it (or be set by the dashboard itself)."""
    import inspect

    from app.forms import RESERVED_BINDINGS, write_locations
    from reflow_exp.gin_config import registered_configurables

    runner = Runner(tmp_path / "runs", list_gpus=lambda: [])
    for override in (f'ImageEmbeddingCache.folder = "{tmp_path / "x"}"', f'metaworld_source.root = "{tmp_path / "y"}"'):
        with pytest.raises(LaunchError, match="outside the runs folder|runs folder"):
            runner.plan("sandbox/tiny.gin", [], override, "cpu", "w")
    locations = write_locations()
    folder_like = set()
    for name, fn in registered_configurables().items():
        target = fn.__init__ if inspect.isclass(fn) else fn
        for param in inspect.signature(target).parameters:
            if param in ("root", "folder", "repo", "path") or param.endswith(("_dir", "_root", "_folder")):
                folder_like.add(f"{name}.{param}")
    unconfined = folder_like - locations.keys() - set(RESERVED_BINDINGS)
    assert not unconfined, f"annotate these with WritesFolder: {sorted(unconfined)}"
    assert {"ImageEmbeddingCache.folder", "metaworld_source.root", "sandbox_source.root", "Tracker.repo"} <= set(
        locations
    )


# -- issue 26 item 7: data problems found at load -----------------------------------------------


def _dataset_with_nan(tiny_teacher, folder: Path, column: str, row: int) -> tuple[int, int]:
    """A copy of the tiny sandbox dataset with `column` NaN at `row`; returns (episode, frame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(tiny_teacher.parent / "sandbox" / "data", folder)
    (file,) = (folder / "data").glob("chunk-*/file-*.parquet")
    table = pq.read_table(file)
    values = table.column(column).to_pylist()
    values[row] = [float("nan")] * len(values[row])
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type))
    pq.write_table(table, file)
    return table.column("episode_index")[row].as_py(), table.column("frame_index")[row].as_py()


@pytest.mark.parametrize("column", ["observation.state", "action"])
def test_nan_in_the_small_columns_is_refused_at_load(tiny_teacher, tmp_path, column):
    """NaN in observation.state (found only when a batch held it) or in action (trained on
    silently) is refused when the dataset loads, naming the column, episode and frame."""
    from reflow_exp.data import DataSource, load_dataset, open_metadata

    episode, frame = _dataset_with_nan(tiny_teacher, tmp_path / "data", column, row=30)
    data = DataSource("unused", "reflow_exp/sandbox", str(tmp_path / "data"))
    with pytest.raises(
        ValueError, match=f"{column} holds NaN/inf values in 1 frame.* episode {episode}, frame {frame}"
    ):
        load_dataset(data, open_metadata(data), 16)


def test_data_at_another_frame_rate_than_the_teacher_is_refused(cli, teacher_copy, tmp_path):
    """A 5 fps dataset for a teacher trained at 10 fps (its summary.json records it): reflow exits 2
    naming both rates and the binding that allows it, before the run folder exists."""
    assert json.loads((teacher_copy / "summary.json").read_text())["data_split"]["fps"] == 10
    sandbox = tmp_path / "sandbox5"
    shutil.copytree(teacher_copy.parent / "sandbox", sandbox, symlinks=True)
    info = sandbox / "data" / "meta" / "info.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"fps": 5}))
    result = cli(
        "gin/sandbox/tiny_reflow.gin",
        f'run.runs_dir = "{tmp_path / "runs"}"',
        f'sandbox_source.root = "{sandbox}"',
        f'reflow.teacher = "{teacher_copy}"',
        "Tracker.enabled = False",
    )
    assert result.returncode == run_cli.EXIT_CONFIG_ERROR, result.stderr[-2000:]
    assert "the teacher was trained on data at 10 fps, this dataset is at 5 fps" in result.stderr, result.stderr[-2000:]
    assert "reflow.allow_fps_mismatch = True" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "tiny-reflow").exists()


# -- issue 26 item 6: login brute force --------------------------------------------------------


def _login(url: str, password: str) -> int:
    data = urllib.parse.urlencode({"username": "user", "password": password}).encode()
    try:
        with NO_PROXY.open(urllib.request.Request(url + "login", data=data, method="POST"), timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_login_failures_slow_down_then_lock_out_the_client(tmp_path, caplog):
    """Each failed login makes the client's next attempt wait longer, N failures lock it out (429,
    even with the right password), and every failure is logged with the client's address."""
    throttle = {"base_delay_s": 0.25, "max_delay_s": 0.5, "max_failures": 4, "lockout_s": 60}
    with _dashboard_with_login(tmp_path / "runs", login_throttle=throttle) as (url, _):
        caplog.set_level("WARNING", logger="app.login_throttle")
        assert _login(url, "secret") == 200
        start = time.monotonic()
        assert [_login(url, f"guess{i}") for i in range(4)] == [400] * 4
        assert time.monotonic() - start >= 0.25 + 0.5 + 0.5  # waits before guesses 2, 3 and 4
        assert _login(url, "secret") == 429 and _login(url, "guess") == 429
        failures = [r.getMessage() for r in caplog.records if "login failed from 127.0.0.1" in r.getMessage()]
        assert len(failures) == 4 and "locked out for 60 s" in failures[-1], failures


@contextlib.contextmanager
def _dashboard_with_login(runs_dir, **launch_options):
    """The dashboard with the login user/secret on a free port: yields (url, demo)."""
    from app.ui import build_demo, launch_kwargs

    demo = build_demo(runs_dir, login=True)
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        auth=("user", "secret"),
        **launch_kwargs(runs_dir, **launch_options),
    )
    try:
        yield url, demo
    finally:
        demo.dashboard.aim.stop()
        demo.close()


# -- issue 26 item 8: several processes ---------------------------------------------------------


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "reflow_exp.run" in child.cmdline():
                return child.pid
        except psutil.Error:
            continue
    return None


def test_a_dead_rank_is_named_and_other_ranks_print_only_errors(tiny_teacher, tmp_path, torchrun):
    """Two processes (torchrun): rank 1 prints no warnings (only rank 0 does); when rank 1 is
    SIGKILLed, rank 0's status.json names rank 1 and its pid, says the run resumes, and the
    launcher ends within a minute."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "sandbox").symlink_to(tiny_teacher.parent / "sandbox")
    run_dir, logs = runs_dir / "two", tmp_path / "rank-logs"
    argv = [*torchrun(), "--log-dir", str(logs), "--redirects", "3"]
    argv += ["-m", "reflow_exp.run", "--gin_file", "gin/sandbox/tiny.gin"]
    for binding in _bindings(runs_dir, 'run.name = "two"', "Trainer.steps = 100000", "Tracker.enabled = False"):
        argv += ["--gin_param", binding]
    argv += ["--gin_param", "train_teacher.batch_size = 4"]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(
            lambda: (run_dir / "checkpoints" / "last").exists(), 240, "a checkpoint", launcher, run_dir / "log.txt"
        )
        rank1 = _rank_pid(launcher.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)
        launcher.wait(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed", status
    assert f"rank 1 (pid {rank1}) of this run died" in status["message"] and "resumes" in status["message"], status
    (rank1_err,) = logs.glob("*/attempt_*/1/stderr.log")
    text = rank1_err.read_text()
    assert "Warning" not in text and "WARNING" not in text, text[-3000:]
    assert latest_checkpoint(run_dir / "checkpoints") is not None


@pytest.mark.parametrize(
    "rank, expected",
    [
        ("1", "rank 1 of 2 could not reach rank 0 at 127.0.0.1:{port} within 3 s"),
        ("0", "rank 0 of 2: the other processes did not join it at 127.0.0.1:{port} within 3 s"),
    ],
)
def test_a_process_group_that_never_forms_says_so_in_one_line(tmp_path, rank, expected):
    """A lone rank 1 (nobody listens) or a lone rank 0 (nobody joins) exits 1 with one line that
    names its own situation, without the C++ stacks torch logs for each connection try."""
    port = free_port()
    env = os.environ | {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "reflow_exp.run", "--gin_file", "gin/sandbox/tiny.gin"]
    argv += ["--gin_param", f'run.runs_dir = "{tmp_path / "runs"}"', "--gin_param", "run.dist_timeout_s = 3"]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == run_cli.EXIT_JOB_FAILED, result.stderr[-2000:]
    assert expected.format(port=port) in result.stderr, result.stderr[-2000:]
    assert "frame #" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


# -- 1, 4, 5: the dashboard ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, dashboard_server):
    """The dashboard without a login, on 127.0.0.1: (url, Dashboard)."""
    with dashboard_server(tmp_path_factory.mktemp("faults-dashboard") / "runs", free_port()) as served:
        yield served


def test_stop_never_signals_a_process_outside_the_runs_folder(dashboard, tmp_path):
    """Issue item 1: `/stop` with `../outside/victim` (and a symlink leading out) is refused."""
    from gradio_client import Client

    url, board = dashboard
    victim_dir = board.runs_dir.parent / "outside" / "victim"
    victim_dir.mkdir(parents=True)
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        runs.write_json_atomic(victim_dir / runs.LAUNCH_FILE, {"pid": victim.pid, "pgid": victim.pid})
        (board.runs_dir / "link").symlink_to(victim_dir)
        client = Client(url, verbose=False)
        for name in ("../outside/victim", "link", str(victim_dir)):
            message = client.predict(name, api_name="/stop")
            assert "msg-error" in message and "Stopping" not in message, message
        with pytest.raises(LaunchError, match="outside the runs folder"):
            board.runner.stop("link")
        assert board.run_dir("link") is None  # nor shown on the run page
        time.sleep(0.5)
        assert victim.poll() is None, "the victim was signalled"
    finally:
        victim.kill()
        victim.wait()


def test_overrides_cannot_make_a_run_write_outside_the_runs_folder(dashboard, tmp_path):
    """Issue item 4: write locations in overrides must stay inside runs/ unless the form allows it."""
    from gradio_client import Client

    url, board = dashboard
    outside = tmp_path / "any" / "dir"
    runner = Runner(board.runs_dir, list_gpus=lambda: [])
    for override in (
        f'sandbox_source.root = "{outside}"',
        f'Tracker.repo = "{outside}"',
        'sandbox_source.root = "runs/../../elsewhere"',
        "tracking.Tracker.repo = '~/aim'",
        f'teacher/Tracker.repo = "{outside}"',
        "sandbox_source.root = %ROOT",
    ):
        with pytest.raises(LaunchError, match="runs folder|quoted folder path"):
            runner.plan("sandbox/tiny.gin", [], override, "cpu", "w")
    # Inside the runs folder, the default (None) and the explicit option are fine.
    runner.plan(
        "sandbox/tiny.gin", [], f'sandbox_source.root = "{board.runs_dir / "sandbox"}"\nTracker.repo = None', "cpu", "w"
    )
    runner.plan("sandbox/tiny.gin", [], f'Tracker.repo = "{outside}"', "cpu", "w", allow_outside=True)

    message, _ = Client(url, verbose=False).predict(
        "sandbox/tiny.gin", [], f'sandbox_source.root = "{outside}"', "cpu", "outside-write", api_name="/launch"
    )
    assert "msg-error" in message and "Allow writes outside runs/" in message.replace("&quot;", '"')
    assert not outside.exists() and not (board.runs_dir / "outside-write").exists()
    assert not board.runner.running()


def _request(url: str, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_foreign_origin_or_host_gets_403(dashboard):
    """Issue item 5: cross-origin and DNS-rebinding requests are refused; same-origin ones work."""
    from gradio_client import Client

    url, _ = dashboard
    info = url + "gradio_api/info"
    port = url.rstrip("/").rsplit(":", 1)[1]
    assert _request(info, {})[0] == 200
    assert _request(info, {"Origin": url.rstrip("/")})[0] == 200
    assert _request(info, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
    for headers in (
        {"Origin": "http://evil.example"},
        {"Host": "evil.example"},
        {"Host": "evil.example", "Origin": "http://evil.example"},
        {"Origin": "null"},
    ):
        status, answer = _request(info, headers)
        assert status == 403, headers
        if "Host" not in headers:
            assert "access-control-allow-origin" not in {k.lower() for k in answer}, answer
    # A cross-origin POST to the API starts nothing.
    request = urllib.request.Request(
        url + "gradio_api/call/stop",
        data=b'{"data": ["x"]}',
        method="POST",
        headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        NO_PROXY.open(request, timeout=30)
    assert refused.value.code == 403
    assert Client(url, verbose=False).predict(api_name="/runs") is not None  # no login needed locally


def test_aim_explorer_is_not_started_when_the_dashboard_has_a_login(tmp_path):
    """Issue item 5: the Aim explorer has no login, so a dashboard with one does not start it."""
    from gradio_client import Client

    with _dashboard_with_login(tmp_path / "runs") as (url, demo):
        assert _request(url + "gradio_api/info", {})[0] in (401, 403)  # the login covers the API
        message = Client(url, auth=("user", "secret"), verbose=False).predict(api_name="/aim")
        assert "msg-error" in message and "no login" in message and "aim-link" not in message
        assert demo.dashboard.aim.url is None


# -- 2: NaN ------------------------------------------------------------------------------------


def test_diverging_run_stops_with_a_clear_message_and_a_finite_last(cli, tiny_teacher, tmp_path):
    """Issue item 2: `Trainer.lr=1e6` exits non-zero naming the step and the cause; `last` is finite,
    metrics.jsonl is strict JSON, status.json and the runs table say failed."""
    runs_dir = tmp_path / "runs"
    (runs_dir).mkdir()
    (runs_dir / "sandbox").symlink_to(tiny_teacher.parent / "sandbox")
    result = cli(
        "gin/sandbox/tiny.gin",
        *_bindings(
            runs_dir, 'run.name = "nan"', "Trainer.lr = 1e6", "Trainer.save_every = 1", "Tracker.enabled = False"
        ),
    )
    assert result.returncode == run_cli.EXIT_JOB_FAILED, result.stderr[-2000:]
    error = next(line for line in result.stderr.splitlines() if "error: " in line)
    assert " at step " in error and (" is nan " in error or " is inf " in error) and "Trainer.lr" in error, error
    assert "Traceback" not in result.stderr

    run_dir = runs_dir / "nan"
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and (run_dir / "checkpoints" / "last").resolve() == last.resolve()
    for name, tensor in load_file(last / "pretrained_model" / "model.safetensors").items():
        assert torch.isfinite(tensor).all(), name
    failed_step = int(error.split(" at step ")[1].split(";")[0])
    assert int(last.name) < failed_step
    _strict_json_lines(run_dir / "metrics.jsonl")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 1 and " at step " in status["message"]
    assert "In call to configurable" not in status["message"]
    info = runs.run_status(run_dir)
    assert info.status == "failed" and "at step" in info.detail


def test_reflow_refuses_a_teacher_with_nan_weights(cli, teacher_copy):
    """Issue item 2: reflow from a diverged teacher stops at load, naming the file."""
    weights = teacher_copy / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and "expert" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights)
    result = cli(
        "gin/sandbox/tiny_reflow.gin",
        *_bindings(teacher_copy.parent, f'reflow.teacher = "{teacher_copy}"', "Tracker.enabled = False"),
    )
    assert result.returncode == 1
    assert "pretrained_model/model.safetensors holds NaN/inf weights in 1 tensor(s)" in result.stderr, result.stderr
    assert "Generating" not in result.stdout and "Creating student" not in result.stdout


def test_non_finite_metrics_are_written_as_null(tmp_path):
    """Issue item 8: metrics.jsonl never holds bare NaN/Infinity tokens."""
    with RunDir(tmp_path / "run", tracker=Tracker(tmp_path / "run", enabled=False)) as run:
        run.log_metrics(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5}, subset="train")
    (row,) = _strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert row["loss"] is None and row["grad_norm"] is None and row["lr"] == 0.5


# -- 3 and 8: one owner per run folder; status from exit records -------------------------------


def test_one_process_per_run_folder_and_status_from_exit_records(cli, tiny_teacher, tmp_path):
    """Issue items 3 and 8: a second process with the same run.name is refused (naming the first's
    pid) before it writes anything, Aim on; the lock of a SIGKILLed process does not block; a run
    interrupted and then resumed to the end is `finished` in the runs table."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "sandbox").symlink_to(tiny_teacher.parent / "sandbox")
    run_dir = runs_dir / "same"
    long_run = _bindings(runs_dir, 'run.name = "same"', "Trainer.steps = 100000", "Trainer.log_every = 1")

    first = cli("gin/sandbox/tiny.gin", *long_run, wait=False)
    try:
        _wait_for(
            lambda: (run_dir / "checkpoints" / "last").exists(), 240, "first checkpoint", first, run_dir / "log.txt"
        )
        assert runs.run_status(run_dir).status == "running"  # a CLI run: status.json + its live pid
        before = sorted(
            (p.name, p.stat().st_size)
            for p in run_dir.iterdir()
            if p.name not in ("log.txt", "metrics.jsonl", "checkpoints")
        )
        log_before = (run_dir / "log.txt").read_text().count("Run folder")
        second = cli("gin/sandbox/tiny.gin", *long_run, "Trainer.lr = 3e-4")
        assert second.returncode == run_cli.EXIT_RUN_LOCKED, second.stderr[-2000:]
        assert f"in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        after = sorted(
            (p.name, p.stat().st_size)
            for p in run_dir.iterdir()
            if p.name not in ("log.txt", "metrics.jsonl", "checkpoints")
        )
        assert after == before  # no config.<time>.gin, no status change, no Aim hash rewrite
        assert (run_dir / "log.txt").read_text().count("Run folder") == log_before
        first.send_signal(signal.SIGINT)
        first.wait(60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == run_cli.EXIT_INTERRUPTED
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert runs.run_status(run_dir).status == "stopped"

    # A process that dies holding the folder (SIGKILL) leaves a stale .lock file: it does not block.
    third = cli("gin/sandbox/tiny.gin", *long_run, wait=False)
    try:
        _wait_for(
            lambda: json.loads((run_dir / "status.json").read_text()).get("pid") == third.pid,
            120,
            "the third run's status",
            third,
            run_dir / "log.txt",
        )
        os.killpg(third.pid, signal.SIGKILL)
        third.wait(30)
    finally:
        third.kill()
        third.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == third.pid
    assert runs.run_status(run_dir).status == "failed"  # died without an exit record

    last = int(latest_checkpoint(run_dir / "checkpoints").name)
    resumed = cli("gin/sandbox/tiny.gin", *_bindings(runs_dir, 'run.name = "same"', f"Trainer.steps = {last + 2}"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Interrupted; the run resumes" in (run_dir / "log.txt").read_text()  # the old guess said "stopped"
    info = runs.run_status(run_dir)
    assert info.status == "finished" and info.exit_code == 0


def test_status_uses_the_exit_code_not_log_text(tiny_teacher, tmp_path):
    """Issue item 8: a finished run whose log holds a library's traceback (torchcodec prints one
    when FFmpeg is missing, e.g. in cached-pair runs) is finished; a status.json older than a
    dashboard launch does not count."""
    run_dir = tmp_path / "runs" / "done"
    shutil.copytree(tiny_teacher, run_dir, symlinks=True)
    with open(run_dir / "log.txt", "a") as log:
        log.write('Traceback (most recent call last):\n  File "torchcodec/_core/ops.py"\nRuntimeError: no FFmpeg\n')
    assert json.loads((run_dir / "status.json").read_text())["exit_code"] == 0
    assert runs.run_status(run_dir).status == "finished"

    # Relaunched by a dashboard later; the launcher died before the run wrote anything.
    runs.write_json_atomic(run_dir / runs.LAUNCH_FILE, {"pid": 1 << 22, "started": time.time() + 1})
    runs.write_json_atomic(run_dir / runs.EXIT_FILE, {"exit_code": 2, "ended": time.time() + 2})
    info = runs.run_status(run_dir)
    assert info.status == "failed" and "config error" in info.detail


# -- 6: damaged files --------------------------------------------------------------------------


def test_damaged_last_checkpoint_falls_back_to_the_one_before(cli, teacher_copy):
    """Issue item 6: an empty file in the last checkpoint: resume warns and continues from the one
    before, and saves the last step again."""
    checkpoints = teacher_copy / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["000003", "000006", "last"]
    (checkpoints / "000006" / "training_state" / "optimizer_state.safetensors").write_bytes(b"")
    result = cli("gin/sandbox/tiny.gin", *_bindings(teacher_copy.parent, "Tracker.enabled = False"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"Warning: checkpoint {checkpoints / '000006'} is damaged "
        "(training_state/optimizer_state.safetensors: the file is empty)"
    ) in result.stderr
    assert f"Resuming training from {checkpoints / '000003'} (step 3 of 6)" in result.stdout
    assert latest_checkpoint(checkpoints) == checkpoints / "000006"
    assert (checkpoints / "000006" / "training_state" / "optimizer_state.safetensors").stat().st_size > 0


def test_truncated_files_are_damaged(tiny_teacher, tmp_path):
    """Issue item 6: a truncated safetensors or JSON file also makes a checkpoint fall back."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_teacher / "checkpoints", checkpoints, symlinks=True)
    weights = checkpoints / "000006" / "pretrained_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert latest_checkpoint(checkpoints) == checkpoints / "000003"
    step_file = checkpoints / "000003" / "training_state" / "training_step.json"
    step_file.write_text(step_file.read_text()[:5])
    assert latest_checkpoint(checkpoints) is None


def test_damaged_pair_files_are_regenerated(tiny_teacher, tmp_path, capsys):
    """Issue item 6: a truncated pair file and one with NaN actions are regenerated, not reused."""
    from reflow_exp import coupling, flow
    from reflow_exp.data import DataSource, load_dataset, make_dataloader, open_metadata
    from reflow_exp.heads import ActionHead
    from reflow_exp.policy import Policy
    from reflow_exp.reflow import Reflow

    teacher = Policy.from_pretrained(tiny_teacher)
    student = ActionHead(teacher.config, teacher.backbone, teacher.head.lerobot.state_dict())
    cached = coupling.CachedCoupling(pairs_per_sample=1, teacher_steps=2)
    model = Reflow(teacher.backbone, teacher.head, student, cached, flow.uniform_time)
    data = DataSource("unused", "reflow_exp/sandbox", str(tiny_teacher.parent / "sandbox" / "data"))
    meta = open_metadata(data)
    loader = make_dataloader(load_dataset(data, meta, teacher.config.chunk_size, [0]), 8, seed=0, shuffle=False)

    def prepare() -> str:
        cached.prepare(model, loader, teacher.preprocessor, tmp_path, {"teacher": "a"})
        return capsys.readouterr().out

    file = tmp_path / coupling.CachedCoupling.FILE
    assert "Generating" in prepare()
    good = {name: tensor.clone() for name, tensor in load_file(file).items()}  # load_file maps the file
    assert "Reusing cached pairs" in prepare()

    file.write_bytes(file.read_bytes()[:-64])  # truncated
    out = prepare()
    assert "Generating" in out and "the pair file is damaged: truncated" in out, out
    assert torch.equal(load_file(file)["action"], good["action"])

    with safe_open(str(file), framework="pt") as f:
        key = f.metadata()["fingerprint"]  # the same teacher, data and settings: only the values are bad
    nan = dict(good, action=torch.full_like(good["action"], float("nan")))
    save_file(nan, str(file), metadata={"fingerprint": key})
    out = prepare()
    assert "Generating" in out and "NaN/inf" in out, out
    assert torch.isfinite(cached.action).all() and torch.equal(cached.action, good["action"])


STRACE = shutil.which("strace")

FSYNC_SCRIPT = """
import sys
from pathlib import Path
from reflow_exp.checkpoint import save_checkpoint
from reflow_exp.files import write_atomic
root = Path(sys.argv[1])
def write(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_bytes(b"w" * 100)
save_checkpoint(root / "checkpoints", 5, write)
write_atomic(root / "summary.json", "{}")
"""


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_atomic_saves_are_fsynced_before_and_after_the_rename(tmp_path):
    """Issue item 6: file contents, then the rename, then the folder reach the disk (power loss)."""
    trace = tmp_path / "trace.txt"
    subprocess.run(
        [
            STRACE,
            "-f",
            "-y",
            "-e",
            "trace=fsync,rename,renameat,renameat2",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            FSYNC_SCRIPT,
            str(tmp_path),
        ],
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    calls = [line.split(" ", 1)[1] for line in trace.read_text().splitlines() if "fsync(" in line or "rename" in line]
    ckpts = tmp_path / "checkpoints"

    def index(*words: str) -> int:
        return next(i for i, c in enumerate(calls) if all(w in c for w in words))

    publish = index("rename", ".tmp-5", "000005")
    assert index("fsync(", f"{ckpts}/.tmp-5/model/weights.bin>") < publish
    assert index("fsync(", f"{ckpts}/.tmp-5>") < publish
    assert publish < index("fsync(", f"<{ckpts}>")
    summary = index("rename", ".summary.json.tmp-")
    assert index("fsync(", ".summary.json.tmp-") < summary < index("fsync(", f"<{tmp_path}>")


# -- 7: late or unclear errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "binding, expected",
    [
        ('Trainer.steps = "ten"', "Trainer.steps: got str 'ten', expected int"),
        ('Trainer.lr = "1e-3"', "Trainer.lr: got str '1e-3', expected float (write 1e-3 without quotes)"),
        ("Trainer.steps = 5.5", "Trainer.steps: got float 5.5, expected int"),
        ('Trainer.save_every = "3"', "Trainer.save_every: got str '3', expected int | None"),
        ("Trainer.steps = True", "Trainer.steps: got bool True, expected int"),
        ('Trainer.betas = (0.9, "x")', "Trainer.betas: got tuple (0.9, 'x'), expected tuple[float, float]"),
    ],
)
def test_wrong_types_exit_2_before_anything_is_written(tmp_path, capsys, binding, expected):
    """Issue item 7: values that do not fit the parameter's annotation, in --gin_param or a file."""
    argv = ["--gin_file", "gin/sandbox/tiny.gin", "--gin_param", f'run.runs_dir = "{tmp_path / "runs"}"']
    assert run_cli.main([*argv, "--gin_param", binding]) == run_cli.EXIT_CONFIG_ERROR
    assert f"--gin_param '{binding}': {expected}" in capsys.readouterr().err
    config = tmp_path / "bad.gin"
    config.write_text(f"include 'sandbox/tiny.gin'\n\n{binding}\n")
    assert run_cli.main(["--gin_file", str(config), *argv[2:]]) == run_cli.EXIT_CONFIG_ERROR
    assert f"{config}:3: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_wrong_type_exits_2_in_a_real_process_before_the_run_folder(cli, tmp_path):
    result = cli("gin/sandbox/tiny.gin", f'run.runs_dir = "{tmp_path / "runs"}"', 'Trainer.steps = "ten"')
    assert result.returncode == 2 and "expected int" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_every_shipped_config_passes_the_type_check():
    import gin

    for config in (
        "sandbox/teacher.gin",
        "sandbox/tiny.gin",
        "smolvla/eval_pusht.gin",
        "sandbox/reflow.gin",
        "sandbox/tiny_reflow.gin",
        "smolvla/reflow.gin",
    ):
        gin.clear_config()
        teacher = ['reflow.teacher = "lerobot/smolvla_base"'] if "reflow" in config else []
        assert run_cli.load_config([config], teacher) is not None


def test_undefined_macro_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "macro.gin"
    config.write_text("include 'sandbox/tiny.gin'\nSTEPS = 3\nTrainer.steps = %STEPS\nTrainer.log_every = %EVERY\n")
    assert run_cli.main(["--gin_file", str(config), "--dry_run"]) == run_cli.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert f"{config}:4: macro %EVERY is not defined; add `EVERY = ...`" in err and "STEPS" not in err


def test_truncated_teacher_weights_name_the_file(tiny_teacher, tmp_path):
    from reflow_exp.policy import Policy

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher / "checkpoints" / "last" / "pretrained_model", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot load {weights}: truncated"):
        Policy.from_pretrained(folder)


def test_a_teacher_of_another_policy_type_is_refused_before_parsing(tiny_teacher, tmp_path, capsys):
    from reflow_exp.policy import Policy

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher / "checkpoints" / "last" / "pretrained_model", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"type": "act"}))
    with pytest.raises(ValueError, match="describes a 'act' policy; this needs a SmolVLA policy"):
        Policy.from_pretrained(folder)
    argv = ["--gin_file", "gin/sandbox/tiny_reflow.gin", "--gin_param", f'reflow.teacher = "{folder}"', "--dry_run"]
    assert run_cli.main(argv) == run_cli.EXIT_JOB_FAILED
    assert "this needs a SmolVLA policy" in capsys.readouterr().err


def test_dry_run_fails_for_a_missing_teacher_folder(tmp_path, capsys):
    for teacher in (tmp_path / "nope", "./nope", "../no/such/teacher"):
        argv = [
            "--gin_file",
            "gin/sandbox/tiny_reflow.gin",
            "--gin_param",
            f'reflow.teacher = "{teacher}"',
            "--gin_param",
            f'run.runs_dir = "{tmp_path / "runs"}"',
            "--dry_run",
        ]
        assert run_cli.main(argv) == run_cli.EXIT_JOB_FAILED, teacher
        assert f"Cannot find the teacher folder '{teacher}'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _refused_before_the_run_folder(result, runs) -> str:
    """A refusal as a config error: exit 2, the message alone, no run folder, no weight read."""
    assert result.returncode == run_cli.EXIT_CONFIG_ERROR, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Loading" not in result.stdout
    assert not (runs / "tiny-reflow").exists()
    return result.stderr


def test_a_dataset_with_none_of_the_teachers_cameras_exits_2_before_the_run_folder(cli, tiny_teacher, tmp_path):
    runs = tmp_path / "runs"
    result = cli(
        "gin/sandbox/tiny_reflow.gin",
        f'reflow.teacher = "{tiny_teacher}"',
        f'run.runs_dir = "{runs}"',
        f'sandbox_source.root = "{tiny_teacher.parent / "sandbox"}"',
        'sandbox_source.rename_map = {"observation.image": "observation.images.top"}',
    )
    err = _refused_before_the_run_folder(result, runs)
    assert "the policy reads the cameras ['observation.image'], and the dataset has none of them" in err
    assert "Dataset features: observation.images.top (3, 64, 64)" in err
    assert 'sandbox_source.rename_map = {"observation.images.top": "observation.image"}' in err


def test_a_teacher_without_processor_files_exits_2_saying_how_to_make_them(cli, tiny_teacher, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher / "checkpoints" / "last" / "pretrained_model", folder)
    for file in folder.glob("policy_*processor*"):
        file.unlink()
    runs = tmp_path / "runs"
    result = cli(
        "gin/sandbox/tiny_reflow.gin",
        f'reflow.teacher = "{folder}"',
        f'run.runs_dir = "{runs}"',
        f'sandbox_source.root = "{tiny_teacher.parent / "sandbox"}"',
    )
    err = _refused_before_the_run_folder(result, runs)
    assert f"{folder} holds model.safetensors but not LeRobot's processor files" in err
    assert "policy_preprocessor.json" in err and "migrate_policy_normalization" in err
