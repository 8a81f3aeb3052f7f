"""Faults and attacks, reproduced with real processes, files, signals and HTTP requests (issue 14):
the dashboard acts only inside its runs folder and only for same-origin requests; a diverging run
stops with a finite ``last``; a run folder has one owner; damaged files are detected and
regenerated or skipped; config mistakes exit 2 before anything is written; a run's status comes
from its exit record."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app import runs
from app.forms import LaunchError
from app.runner import Runner
from reflow_exp import run as run_cli
from reflow_exp.checkpoint import latest_checkpoint
from reflow_exp.files import free_port
from reflow_exp.rundir import RunDir
from reflow_exp.tracking import Tracker

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

    from app.ui import build_demo, launch_kwargs

    runs_dir = tmp_path / "runs"
    demo = build_demo(runs_dir, login=True)
    _, url, _ = demo.queue().launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        server_port=free_port(),
        quiet=True,
        auth=("user", "secret"),
        **launch_kwargs(runs_dir),
    )
    try:
        assert _request(url + "gradio_api/info", {})[0] in (401, 403)  # the login covers the API
        message = Client(url, auth=("user", "secret"), verbose=False).predict(api_name="/aim")
        assert "msg-error" in message and "no login" in message and "aim-link" not in message
        assert demo.dashboard.aim.url is None
    finally:
        demo.dashboard.aim.stop()
        demo.close()


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
