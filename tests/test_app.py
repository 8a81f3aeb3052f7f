"""The dashboard: reading run folders, GPUs, the launcher and the runner directly (the launch form
is tests/test_forms.py), then the running app through ``gradio_client`` (launch the tiny sandbox
config, follow its log to the end, read back the VLM load count and the parameter table; bad form
input gets a clear message and starts nothing)."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from app import gpus, processes, runs
from app.forms import LaunchError
from app.launcher import main as launcher_main
from app.runner import LaunchPlan, Runner
from reflow_exp.files import free_port

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


# -- GPUs ------------------------------------------------------------------------------------


def test_gpus_parse_and_device_checks():
    text = "0, GPU-aaa, NVIDIA H100 80GB HBM3, 81559, 1234, 7\n1, GPU-bbb, NVIDIA A10, 24564, [N/A], 0\nbad line\n"
    found = gpus.parse_nvidia_smi(text)
    assert [(g.index, g.name, g.memory_total_mib, g.memory_used_mib, g.utilization_pct) for g in found] == [
        (0, "NVIDIA H100 80GB HBM3", 81559.0, 1234.0, 7.0),
        (1, "NVIDIA A10", 24564.0, None, 0.0),
    ]
    assert found[0].label == "GPU 0 · NVIDIA H100 80GB HBM3 · 1.2/79.6 GiB · 7% busy"
    assert gpus.device_choices(found)[-1] == ("CPU", "cpu") and gpus.device_choices([]) == [("CPU", "cpu")]
    assert gpus.resolve_device("cpu", found) == "" and gpus.resolve_device("CPU", []) == ""
    assert gpus.resolve_device("1", found) == "1" and gpus.resolve_device("cuda:0", found) == "0"
    with pytest.raises(ValueError, match="GPU 2 does not exist: this machine has GPUs 0, 1"):
        gpus.resolve_device("2", found)
    with pytest.raises(ValueError, match="no GPU"):
        gpus.resolve_device("0", [])
    with pytest.raises(ValueError, match="Unknown device"):
        gpus.resolve_device("tpu", found)


TWO_GPUS = [
    gpus.Gpu(0, "GPU-aaa", "NVIDIA H100", 81559.0, 500.0, 0.0),
    gpus.Gpu(1, "GPU-bbb", "NVIDIA H100", 81559.0, 500.0, 0.0),
]


def test_several_gpus_and_busy_gpus():
    assert gpus.resolve_device("0,1", TWO_GPUS) == "0,1" and gpus.resolve_device(" 1 , 0 ", TWO_GPUS) == "1,0"
    assert gpus.device_choices(TWO_GPUS)[2] == ("All 2 GPUs (0,1) · one process each", "0,1")
    assert gpus.device_label("0,1") == "GPUs 0,1 · 2 processes" and gpus.device_label("1") == "GPU 1"
    assert gpus.process_count("0,1") == 2 and gpus.process_count("") == gpus.process_count("3") == 1
    for bad, words in (("0,0", "names a GPU twice"), ("0,cpu", "mixes CPU and GPUs"), ("0,2", "GPU 2 does not exist")):
        with pytest.raises(ValueError, match=words):
            gpus.resolve_device(bad, TWO_GPUS)
    apps = gpus.parse_compute_apps("GPU-bbb, 4242\nGPU-bbb, 4343\nno pid line\n")
    assert apps == {"GPU-bbb": (4242, 4343)}
    busy = [TWO_GPUS[0], gpus.Gpu(1, "GPU-bbb", "NVIDIA H100", 81559.0, 9000.0, 90.0, pids=apps["GPU-bbb"])]
    assert busy[1].label.endswith("in use by pid 4242, 4343")
    with pytest.raises(ValueError, match="GPU 1 is busy: process\\(es\\) 4242, 4343 compute on it"):
        gpus.resolve_device("0,1", busy)


def test_runner_starts_one_process_per_chosen_gpu_with_torchrun(tmp_path):
    runner = Runner(tmp_path / "runs", list_gpus=lambda: TWO_GPUS)
    plan = runner.plan("sandbox/tiny.gin", [], "", "0,1", "two-gpus")
    assert plan.cuda_visible_devices == "0,1" and plan.processes == 2 and plan.master_port > 0
    assert plan.launch_command[:8] == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(plan.master_port),
        "-m",
    ]
    assert plan.launch_command[8:] == ["reflow_exp.run", *plan.command[3:]]
    assert plan.command[1:3] == ["-m", "reflow_exp.run"]  # what --dry_run validates: one process
    assert runner._env(plan.cuda_visible_devices)["CUDA_VISIBLE_DEVICES"] == "0,1"
    cpu = runner.plan("sandbox/tiny.gin", [], "", "cpu", "on-cpu")
    assert cpu.processes == 1 and cpu.launch_command == cpu.command  # the CPU: one plain process


def test_list_gpus_without_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert gpus.list_gpus() == []


# -- reading run folders ---------------------------------------------------------------------


def _metrics(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "half-writ')


METRICS = [
    {"step": 0, "time": 1, "context": {"subset": "setup"}, "vlm_load_count": 1.0},
    {"step": 0, "time": 1, "context": {"subset": "eval", "head": "student", "steps": 1}, "offline_error": 0.5},
    {"step": 0, "time": 2, "context": {"subset": "train", "head": "student"}, "loss": 1.0, "loss_t0.00-0.50": 2.0},
    {
        "step": 2,
        "time": 3,
        "context": {"subset": "train", "head": "student"},
        "loss": 0.5,
        "lr": 1e-3,
        "loss_t0.00-0.50": 1.0,
        "loss_t0.50-1.00": 0.25,
    },
]


def test_metrics_and_summary_readers(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", METRICS)
    rows = runs.read_metrics(tmp_path)
    assert len(rows) == 4  # the half-written line is skipped
    assert runs.train_progress(rows) == (2, 0.5)
    assert runs.vlm_load_count({}, rows) == 1 and runs.vlm_load_count({"vlm_load_count": 2}, rows) == 2
    assert runs.vlm_load_count({}, []) is None
    points = runs.curve_points(rows)
    assert [(p["step"], p["value"]) for p in points["loss"]] == [(0, 1.0), (2, 0.5)]
    assert {p["series"] for p in points["loss_by_t"]} == {"t ∈ [0.00, 0.50)", "t ∈ [0.50, 1.00)"}
    assert points["offline"] == [{"step": 0, "value": 0.5, "series": "student @1 steps"}]

    summary = {
        "params": {"total": 1000, "trainable": 250, "backbone": 750, "teacher_head": 250},
        "eval": {
            "teacher": {
                "10": {
                    "success_rate": 0.9,
                    "ci_low": 0.699,
                    "ci_high": 0.972,
                    "mean_return": 0.8,
                    "latency_ms": 36.25,
                    "episodes": 20,
                }
            },
            "student": {"1": {"success_rate": 0.85, "latency_ms": 9.0, "episodes": 20}},
        },
        "offline": {"student": {"1": {"error": 0.14}, "2": {"error": 0.02}}, "straightness": {"student": 0.3}},
    }
    assert runs.params_rows(summary) == [
        ["Total", "1,000", ""],
        ["Trainable", "250", "25.00%"],
        ["Backbone (VLM)", "750", "75.00%"],
        ["Teacher head", "250", "25.00%"],
        ["Student head", "—", ""],
    ]
    assert runs.eval_rows(summary) == [
        ["teacher", 10, "90%", "70–97%", "0.800", "36.2", "20", "—"],
        ["student", 1, "85%", "—", "—", "9.0", "20", "0.1400"],
        ["student", 2, "—", "—", "—", "—", "—", "0.0200"],
    ]
    (tmp_path / "operative_config.gin").write_text("Trainer.lr = 0.1\nTrainer.steps = 6\n")
    assert runs.total_steps(tmp_path) == 6

    (tmp_path / "eval" / "videos").mkdir(parents=True)
    (tmp_path / "checkpoints" / "000001").mkdir(parents=True)
    for f in ["eval_plot.png", "eval/videos/s1_ep0.mp4", "checkpoints/000001/x.png", "eval/.hidden.mp4"]:
        (tmp_path / f).write_bytes(b"")
    assert runs.find_media(tmp_path, (".png",)) == [tmp_path / "eval_plot.png"]
    assert runs.find_media(tmp_path, (".mp4",)) == [tmp_path / "eval/videos/s1_ep0.mp4"]


def _launched(run_dir: Path, pid: int, **extra) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": pid,
        "pgid": pid,
        "proc_start": processes.process_start_time(pid),
        "cuda_visible_devices": "0",
        "started": 1000.0,
        "stop_requested": None,
        **extra,
    }
    runs.write_json_atomic(run_dir / runs.LAUNCH_FILE, record)


def _live_launcher(run_dir: Path) -> subprocess.Popen:
    """A real launcher of `run_dir` (what a dashboard starts), its child sleeping; kill it after."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [PY, "-m", "app.launcher", str(run_dir), "--", PY, "-c", "import time; time.sleep(120)"]
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True)
    _launched(run_dir, proc.pid)
    return proc


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_run_status(tmp_path):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()

    alive = _live_launcher(tmp_path / "alive")
    try:
        _check_run_status(tmp_path, dead)
    finally:
        _kill_group(alive)


def _check_run_status(tmp_path: Path, dead: subprocess.Popen) -> None:
    _launched(tmp_path / "done", dead.pid)
    runs.write_json_atomic(tmp_path / "done" / runs.EXIT_FILE, {"exit_code": 0, "ended": 1})
    _launched(tmp_path / "crashed", dead.pid)
    runs.write_json_atomic(tmp_path / "crashed" / runs.EXIT_FILE, {"exit_code": 1, "ended": 1})
    _launched(tmp_path / "stopped", dead.pid, stop_requested=5.0)
    runs.write_json_atomic(tmp_path / "stopped" / runs.EXIT_FILE, {"exit_code": 130, "ended": 1})
    _launched(tmp_path / "killed", dead.pid, stop_requested=5.0)  # SIGKILLed: no exit file
    _launched(tmp_path / "lost", dead.pid)  # died without a word
    # Same pid, other process (pid reuse): the recorded start time does not match.
    _launched(tmp_path / "reused", os.getpid(), proc_start=1)
    # Started from the CLI: no dashboard files; the run's own status.json (none: an older run).
    for name, record, summary in [
        ("cli-done", {}, {"train": {}}),
        ("cli-stopped", {"status": "interrupted", "exit_code": 130}, {}),
        ("cli-failed", {"status": "failed", "exit_code": 1, "message": "ValueError: x"}, {}),
        ("cli-running", {"status": "running", "pid": os.getpid(), "started": time.time()}, {}),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.txt").write_text("Traceback (most recent call last):\n")  # log text is not read
        runs.write_json_atomic(tmp_path / name / "summary.json", summary)
        if record:
            runs.write_json_atomic(tmp_path / name / runs.STATUS_FILE, record)
    lock = os.open(tmp_path / "cli-running" / ".lock", os.O_RDWR | os.O_CREAT)  # as a running CLI run holds it
    fcntl.flock(lock, fcntl.LOCK_EX)
    (tmp_path / "sandbox" / "data").mkdir(parents=True)  # a data cache, not a run
    (tmp_path / ".aim").mkdir()

    found = {r.name: r for r in runs.list_runs(tmp_path)}
    assert {n: r.status for n, r in found.items()} == {
        "alive": "running",
        "done": "finished",
        "crashed": "failed",
        "stopped": "stopped",
        "killed": "stopped",
        "lost": "failed",
        "reused": "failed",
        "cli-done": "finished",
        "cli-stopped": "stopped",
        "cli-failed": "failed",
        "cli-running": "running",
    }
    assert found["cli-failed"].detail == "exit code 1: ValueError: x"
    assert found["alive"].device == "GPU 0" and found["cli-done"].device == "—"
    assert found["crashed"].detail == "exit code 1"
    assert found["alive"].alive and not found["done"].alive
    os.close(lock)


# -- the launcher wrapper and the runner (no torch: plain python children) -------------------


def test_launcher_records_exit_code_and_console(tmp_path):
    code = "import sys; print('hello from the run'); sys.exit(3)"
    assert launcher_main([str(tmp_path / "r"), "--", PY, "-c", code]) == 0
    assert runs.read_json(tmp_path / "r" / runs.EXIT_FILE)["exit_code"] == 3
    assert "hello from the run" in (tmp_path / "r" / runs.CONSOLE_FILE).read_text()
    assert runs.read_log(tmp_path / "r").startswith("hello from the run")  # no log.txt yet: the console


CHILD = textwrap.dedent("""
    import os, sys, time, signal
    if sys.argv[1] == "ignore_int":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("CUDA_VISIBLE_DEVICES=%r ORDER=%s UNBUFFERED=%s" % (os.environ.get("CUDA_VISIBLE_DEVICES"),
          os.environ.get("CUDA_DEVICE_ORDER"), os.environ.get("PYTHONUNBUFFERED")))
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted cleanly")
        sys.exit(130)
""")


def _start_plain(runner: Runner, name: str, mode: str, cuda: str = "") -> runs.RunInfo:
    run_dir = runner.runs_dir / name
    plan = LaunchPlan(name, run_dir, [], [], cuda, [PY, "-u", "-c", CHILD, mode], resume=False)
    info = runner.start(plan)
    deadline = time.monotonic() + 20
    while "CUDA_VISIBLE_DEVICES" not in runs.read_log(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return info


def _wait_status(run_dir: Path, status: str, timeout: float = 20) -> runs.RunInfo:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = runs.run_status(run_dir)
        if info.status == status:
            return info
        time.sleep(0.1)
    return runs.run_status(run_dir)


def test_runner_start_env_and_stop(tmp_path):
    runner = Runner(tmp_path / "runs", stop_grace=(1.0, 1.0))
    info = _start_plain(runner, "gentle", "normal", cuda="")
    assert info.status == "running" and info.device == "CPU"
    launch = runs.read_json(info.path / runs.LAUNCH_FILE)
    assert launch["pid"] == launch["pgid"] and launch["cuda_visible_devices"] == ""
    assert os.getpgid(launch["pid"]) == launch["pid"] != os.getpgid(0)  # its own process group
    console = runs.read_log(info.path)
    assert "CUDA_VISIBLE_DEVICES=''" in console and "ORDER=PCI_BUS_ID" in console and "UNBUFFERED=1" in console
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != ""  # parent untouched

    assert "sent SIGINT" in runner.stop("gentle")
    stopped = _wait_status(info.path, "stopped")
    assert stopped.status == "stopped" and stopped.exit_code == 130
    assert "interrupted cleanly" in runs.read_log(info.path)
    assert "not running" in runner.stop("gentle")

    # A run that ignores SIGINT gets SIGTERM after the grace period.
    stubborn = _start_plain(runner, "stubborn", "ignore_int")
    runner.stop("stubborn")
    assert _wait_status(stubborn.path, "stopped", timeout=15).exit_code == -signal.SIGTERM
    with pytest.raises(LaunchError, match="No run named"):
        runner.stop("nope")


def test_runner_plan_refuses_a_running_name_and_non_runs(tmp_path):
    runner = Runner(tmp_path / "runs", list_gpus=lambda: [])
    (runner.runs_dir / "sandbox" / "data").mkdir(parents=True)
    with pytest.raises(LaunchError, match="not a run folder"):
        runner.plan("sandbox/tiny.gin", [], "", "cpu", "sandbox")
    busy = _live_launcher(runner.runs_dir / "busy")
    try:
        with pytest.raises(LaunchError, match="already running"):
            runner.plan("sandbox/tiny.gin", [], "", "cpu", "busy")
    finally:
        _kill_group(busy)
    plan = runner.plan("sandbox/tiny.gin", ["sandbox/data.gin"], "Trainer.steps = 2", "cpu", "")
    assert plan.gin_files == ["gin/sandbox/tiny.gin", "gin/sandbox/data.gin"] and not plan.resume
    assert plan.command[-4:] == [
        "--gin_param",
        f'run.name = "{plan.name}"',
        "--gin_param",
        f'run.runs_dir = "{runner.runs_dir}"',
    ]


def test_auth_from_env():
    from app.main import auth_from_env, parse_args

    assert auth_from_env({}) is None
    assert auth_from_env({"REFLOW_DASHBOARD_USER": "u", "REFLOW_DASHBOARD_PASSWORD": "p"}) == ("u", "p")
    with pytest.raises(SystemExit, match="both"):
        auth_from_env({"REFLOW_DASHBOARD_USER": "u"})
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.port is None and args.runs_dir.endswith("runs")


# -- the running app, through gradio_client --------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory, dashboard_server):
    os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")
    from gradio_client import Client

    with dashboard_server(tmp_path_factory.mktemp("dashboard-api") / "runs", free_port()) as (url, dashboard):
        yield Client(url, verbose=False), dashboard


@pytest.fixture(scope="module")
def tiny_run(app, sandbox_root):
    """The tiny teacher launched from the dashboard and followed to its end.

    While it trains, two slow-starting requests run beside it (their tests read the results):
    a launch whose config the dry run rejects, and ``aim up``.
    """
    client, dashboard = app
    message, selected = client.predict(
        "sandbox/tiny.gin",
        [],
        f'sandbox_source.root = "{sandbox_root}"',
        "cpu",
        "tiny-api",
        allow_outside=True,
        api_name="/launch",
    )  # a shared cache
    assert "Started tiny-api on CPU" in message, message
    assert (selected["value"] if isinstance(selected, dict) else selected) == "tiny-api"  # the run page follows
    side_jobs = {
        "bad_config": client.submit(
            "sandbox/tiny.gin",
            [],
            f'sandbox_source.root = "{sandbox_root}"\nTrainer.stepz = 3',
            "cpu",
            "bad-config",
            allow_outside=True,
            api_name="/launch",
        ),
        "aim": client.submit(api_name="/aim"),
    }
    log = client.submit("tiny-api", api_name="/follow_log").result(timeout=300)
    return SimpleNamespace(name="tiny-api", log=log, side_jobs=side_jobs)


def test_launch_follow_log_and_read_back(app, tiny_run):
    client, dashboard = app
    name, log = tiny_run.name, tiny_run.log
    assert "Job train_teacher" in log and "weights ..." in log and "Saved checkpoint" in log
    assert log.count("weights ...") == 1  # the VLM loaded once

    header, badge, params, *_ = client.predict(name, api_name="/run_page")  # (buttons are not API outputs)
    assert "finished" in header and "CPU" in header
    assert 'data-count="1"' in badge and "VLM loaded 1×" in badge and "green" in badge
    table = {row[0]: row[1:] for row in params["data"]}
    assert list(table) == ["Total", "Trainable", "Backbone (VLM)", "Teacher head", "Student head"]
    summary = json.loads((dashboard.runs_dir / name / "summary.json").read_text())
    assert table["Total"][0] == f"{summary['params']['total']:,}"
    share = 100 * summary["params"]["trainable"] / summary["params"]["total"]
    assert table["Trainable"] == [f"{summary['params']['trainable']:,}", f"{share:.2f}%"]
    assert table["Student head"] == ["—", ""]  # a teacher run has no student

    (row,) = [r for r in client.predict(api_name="/runs") if r["name"] == name]
    assert row["status"] == "finished" and row["device"] == "CPU" and row["step"] == row["total_steps"] == 6
    assert row["last_loss"] == pytest.approx(summary["train"]["last_loss"])
    launch = json.loads((dashboard.runs_dir / name / "dashboard.json").read_text())
    assert launch["cuda_visible_devices"] == "" and launch["command"][1:3] == ["-m", "reflow_exp.run"]
    assert launch["processes"] == 1  # the CPU: one process, no torchrun

    # A fresh dashboard over the same folder (an app restart) finds the run as it was.
    from app.ui import Dashboard

    again = {r["name"]: r for r in Dashboard(dashboard.runs_dir).runs_table_rows()}
    assert again[name]["status"] == "finished" and again[name]["device"] == "CPU"


@pytest.mark.parametrize(
    "form, words",
    [
        (("nope.gin", [], "", "cpu", ""), "Unknown gin file 'nope.gin'"),
        (("../pyproject.toml", [], "", "cpu", ""), "outside gin/"),
        (("sandbox/tiny.gin", ["/etc/passwd"], "", "cpu", ""), "outside gin/"),
        (("sandbox/tiny.gin", [], "Trainer.steps 3", "cpu", ""), "Override line 1"),
        (("sandbox/tiny.gin", [], "", "7", ""), "GPU 7 does not exist"),
        (("sandbox/tiny.gin", [], "", "cpu", "../escape"), "Run name '../escape' is not allowed"),
    ],
)
def test_bad_form_input_starts_nothing(app, form, words):
    client, dashboard = app
    before = sorted(os.listdir(dashboard.runs_dir))
    message, _ = client.predict(*form, api_name="/launch")
    assert words in message.replace("&#x27;", "'") and "msg-error" in message
    assert "Traceback" not in message
    assert sorted(os.listdir(dashboard.runs_dir)) == before and not dashboard.runner.running()


def test_two_gpus_missing_here_are_refused_before_the_run_folder(app):
    """The dashboard lists two GPUs (nvidia-smi's answer stubbed: this machine has none); launching
    on both validates with CUDA_VISIBLE_DEVICES=0,1, which the run's own device check refuses."""
    client, dashboard = app
    saved = dashboard.list_gpus, dashboard.runner.list_gpus
    dashboard.list_gpus = dashboard.runner.list_gpus = lambda: TWO_GPUS
    try:
        message, _ = client.predict("sandbox/tiny.gin", [], "", "0,1", "two-gpus", api_name="/launch")
    finally:
        dashboard.list_gpus, dashboard.runner.list_gpus = saved
    assert "CUDA_VISIBLE_DEVICES=0,1 names 2 GPU(s) but CUDA sees 0" in message and "msg-error" in message
    assert not (dashboard.runs_dir / "two-gpus").exists()


def test_config_error_from_the_dry_run_is_shown_inline(app, tiny_run):
    client, dashboard = app
    message, _ = tiny_run.side_jobs["bad_config"].result(timeout=300)
    text = message.replace("&#x27;", "'")
    assert "Config error" in text and "doesn't have a parameter named 'stepz'" in text and "Traceback" not in text
    assert not (dashboard.runs_dir / "bad-config").exists()
    assert set(dashboard.runner.running()) <= {"tiny-api"}


def test_aim_explorer_link(app, tiny_run):
    client, dashboard = app
    html = tiny_run.side_jobs["aim"].result(timeout=300)
    assert 'id="aim-link"' in html, html
    url = html.split('href="')[1].split('"')[0]
    assert url.startswith("http://127.0.0.1:")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "api/projects/", timeout=10) as response:
        assert response.status == 200
    dashboard.aim.stop()
    assert dashboard.aim.url is None
