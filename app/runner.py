"""Launching and stopping runs: each run is ``python -m app.launcher <run_dir> -- python -m
reflow_exp.run ...`` in its own process group, with the chosen device in its environment only.

Launch = check the form (``plan``: gin files inside gin/, overrides, name, device), validate the
config with ``--dry_run`` in a subprocess (``validate``), then start (``start``). Several GPUs start
one process per GPU with torchrun (``LaunchPlan.launch_command``). Stop = SIGINT
to the run's process group, escalating to SIGTERM and SIGKILL in a background thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app import gpus as gpus_mod
from app.forms import (
    GIN_DIR,
    REPO_ROOT,
    LaunchError,
    build_command,
    check_write_locations,
    config_error_message,
    default_run_name,
    parse_overrides,
    resolve_gin_file,
    run_folder,
)
from app.processes import launcher_alive, pid_alive, process_start_time
from app.runs import EXIT_FILE, LAUNCH_FILE, RunInfo, is_run_dir, read_json, run_status, write_json_atomic
from reflow_exp.files import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    name: str
    run_dir: Path
    gin_files: list[str]  # as passed to the CLI, relative to the repo root: gin/...
    overrides: list[str]
    cuda_visible_devices: str  # "" = CPU
    command: list[str]  # one process: python -m reflow_exp.run ... (also what --dry_run validates)
    resume: bool  # the run folder exists: the run continues from its last checkpoint
    master_port: int = 0  # several GPUs: torchrun's rendezvous port

    @property
    def processes(self) -> int:
        return gpus_mod.process_count(self.cuda_visible_devices)

    @property
    def launch_command(self) -> list[str]:
        """What starts: ``command``, or torchrun with one process per chosen GPU (global batch =
        the job's batch_size × processes)."""
        if self.processes == 1:
            return self.command
        python, *rest = self.command
        return [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(self.processes),
            "--master_port",
            str(self.master_port),
            *rest,
        ]


class Runner:
    """Starts and stops runs under ``runs_dir``.

    Args:
        runs_dir: the runs folder (``run.runs_dir`` of every launched run).
        repo_root: working directory of the runs (``gin/`` paths are relative to it).
        python: interpreter for the runs (default: this one, i.e. the venv's).
        list_gpus: returns the machine's GPUs (nvidia-smi); injectable for tests.
        dry_run_timeout: seconds the ``--dry_run`` validation may take.
        stop_grace: seconds after SIGINT before SIGTERM, and after SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        runs_dir: str | Path,
        *,
        repo_root: Path = REPO_ROOT,
        gin_dir: Path = GIN_DIR,
        python: str = sys.executable,
        list_gpus: Callable[[], list] = gpus_mod.list_gpus,
        dry_run_timeout: float = 300.0,
        stop_grace: tuple[float, float] = (60.0, 20.0),
    ):
        self.runs_dir = Path(runs_dir).resolve()
        self.repo_root = Path(repo_root)
        self.gin_dir = Path(gin_dir)
        self.python = python
        self.list_gpus = list_gpus
        self.dry_run_timeout = dry_run_timeout
        self.stop_grace = stop_grace
        self._children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- launch ----------------------------------------------------------------------------------

    def plan(
        self,
        gin_file: str,
        extra_gin_files: list[str] | None,
        overrides: str | None,
        device: str | None,
        name: str | None,
        allow_outside: bool = False,
    ) -> LaunchPlan:
        """Check the form (fast, nothing started) and build the command.

        ``allow_outside``: let overrides point write locations (``forms.write_locations``) outside the
        runs folder.

        Raises:
            LaunchError: with a message for the user.
        """
        files = [resolve_gin_file(gin_file, self.gin_dir)]
        for extra in extra_gin_files or []:
            if str(extra).strip():
                files.append(resolve_gin_file(extra, self.gin_dir))
        rel_files = [_relative_to_repo(p, self.repo_root) for p in files]
        bindings = parse_overrides(overrides)
        if not allow_outside:
            check_write_locations(bindings, self.runs_dir, self.repo_root)
        try:
            cuda = gpus_mod.resolve_device(device, self.list_gpus() if _wants_gpu(device) else [])
        except ValueError as e:
            raise LaunchError(str(e)) from None
        name = (name or "").strip() or default_run_name(self.runs_dir)
        run_dir = run_folder(self.runs_dir, name)
        resume = run_dir.exists()
        if resume:
            if not is_run_dir(run_dir):
                raise LaunchError(f"{run_dir} exists and is not a run folder; choose another run name.")
            info = run_status(run_dir)
            if info.alive:
                raise LaunchError(f"Run {name!r} is already {info.status}; choose another run name or stop it first.")
        command = build_command(rel_files, bindings, name, self.runs_dir, python=self.python)
        port = free_port() if gpus_mod.process_count(cuda) > 1 else 0
        return LaunchPlan(name, run_dir, rel_files, bindings, cuda, command, resume, port)

    def validate(self, plan: LaunchPlan) -> str:
        """Run the CLI with ``--dry_run`` (writes nothing); returns its output.

        Raises:
            LaunchError: the config's error (file:line) or the dry run's last error line.
        """
        try:
            result = subprocess.run(
                [*plan.command, "--dry_run"],
                cwd=self.repo_root,
                env=self._env(plan.cuda_visible_devices),
                capture_output=True,
                text=True,
                timeout=self.dry_run_timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"Validating the config (--dry_run) took over {self.dry_run_timeout:.0f} s; nothing was started."
            ) from None
        except OSError as e:
            raise LaunchError(f"Cannot run {plan.command[0]!r}: {e}") from None
        if result.returncode != 0:
            kind = "Config error" if result.returncode == 2 else "The dry run failed"
            raise LaunchError(f"{kind}: {config_error_message(result.stderr, result.stdout)}")
        return result.stdout

    def start(self, plan: LaunchPlan) -> RunInfo:
        """Start the run (after ``validate``) and record the launch in ``dashboard.json``."""
        with self._lock:
            info = run_status(plan.run_dir) if plan.run_dir.exists() else None
            if info is not None and info.alive:
                raise LaunchError(f"Run {plan.name!r} is already {info.status}.")
            plan.run_dir.mkdir(parents=True, exist_ok=True)
            previous = read_json(plan.run_dir / LAUNCH_FILE)
            (plan.run_dir / EXIT_FILE).unlink(missing_ok=True)
            wrapper = [self.python, "-m", "app.launcher", str(plan.run_dir), "--", *plan.launch_command]
            proc = subprocess.Popen(
                wrapper,
                cwd=self.repo_root,
                env=self._env(plan.cuda_visible_devices),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            record = {
                "name": plan.name,
                "pid": proc.pid,
                "pgid": proc.pid,  # start_new_session: the wrapper leads its own group
                "proc_start": process_start_time(proc.pid),
                "cuda_visible_devices": plan.cuda_visible_devices,
                "device": gpus_mod.device_label(plan.cuda_visible_devices),
                "processes": plan.processes,
                "command": plan.launch_command,
                "gin_files": plan.gin_files,
                "overrides": plan.overrides,
                "cwd": str(self.repo_root),
                "started": time.time(),
                "resumed": plan.resume,
                "stop_requested": None,
                "history": [*previous.pop("history", []), previous] if previous else [],
            }
            write_json_atomic(plan.run_dir / LAUNCH_FILE, record)
            self._children[plan.name] = proc
            threading.Thread(target=proc.wait, name=f"reap-{plan.name}", daemon=True).start()
        return run_status(plan.run_dir)

    def launch(self, gin_file, extra_gin_files, overrides, device, name, allow_outside=False) -> RunInfo:
        """``plan`` + ``validate`` + ``start``."""
        plan = self.plan(gin_file, extra_gin_files, overrides, device, name, allow_outside)
        self.validate(plan)
        return self.start(plan)

    def _env(self, cuda_visible_devices: str) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices  # the child's only; never the dashboard's
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # indices as nvidia-smi lists them
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- stop ------------------------------------------------------------------------------------

    def stop(self, name: str) -> str:
        """Send SIGINT to the run's process group; escalate in the background. Returns a message.

        Raises:
            LaunchError: no such run, or it was not started by a dashboard.
        """
        run_dir = run_folder(self.runs_dir, name or "")  # never a folder outside runs_dir
        if not is_run_dir(run_dir):
            raise LaunchError(f"No run named {name!r} in {self.runs_dir}.")
        launch = read_json(run_dir / LAUNCH_FILE)
        info = run_status(run_dir)
        if not launch:
            raise LaunchError(f"Run {name!r} was not started from the dashboard; stop it where it runs (Ctrl-C).")
        if not info.alive:
            return f"Run {name} is not running ({info.status})."
        if not launcher_alive(launch, run_dir):  # e.g. a CLI run, or a record naming another process
            raise LaunchError(
                f"Run {name!r} was not started by a dashboard (its {LAUNCH_FILE} names no live launcher of "
                f"{run_dir}); stop it where it runs (Ctrl-C)."
            )
        launch["stop_requested"] = time.time()
        write_json_atomic(run_dir / LAUNCH_FILE, launch)
        _signal_group(int(launch["pid"]), signal.SIGINT)  # the launcher leads its own process group
        threading.Thread(target=self._escalate, args=(name, run_dir, launch), daemon=True, name=f"stop-{name}").start()
        grace_int, grace_term = self.stop_grace
        return (
            f"Stopping {name}: sent SIGINT (the run closes its log and Aim run); SIGTERM follows after "
            f"{grace_int:.0f} s and SIGKILL {grace_term:.0f} s later if it is still running."
        )

    def _escalate(self, name: str, run_dir: Path, launch: dict) -> None:
        """SIGTERM, then SIGKILL, to the launcher's group while it is still this run's launcher."""
        pid, start = int(launch["pid"]), launch["proc_start"]
        for sig, wait in ((signal.SIGTERM, self.stop_grace[0]), (signal.SIGKILL, self.stop_grace[1])):
            if _wait_dead(pid, start, wait) or not launcher_alive(launch, run_dir):
                return
            log.warning("run %s still alive; sending %s", name, sig.name)
            _signal_group(pid, sig)
        _wait_dead(pid, start, 10)

    def running(self) -> list[str]:
        """Names of the runs this dashboard process started that are still alive."""
        return [n for n, p in self._children.items() if p.poll() is None]


def _wants_gpu(device) -> bool:
    return str(device if device is not None else "").strip().lower() not in ("", gpus_mod.CPU)


def _relative_to_repo(path: Path, repo_root: Path) -> str:
    try:
        return path.resolve().relative_to(Path(repo_root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group that launcher ``pid`` leads (and nothing when it leads none)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_dead(pid: int, start: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid, start):
            return True
        time.sleep(0.2)
    return not pid_alive(pid, start)
