"""``aim up`` over the runs folder, started on demand on 127.0.0.1 at a free port.

The dashboard never reads Aim's storage itself (PITFALLS.md: another process's SDK sees nothing
until ``aim up`` has indexed the runs); it only links to the explorer. Aim has no login: a
dashboard that requires one does not start it (``app.ui.Dashboard.aim_link``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from reflow_exp.files import free_port


def aim_executable() -> str | None:
    """``aim`` next to this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "aim"
    return str(beside) if beside.exists() else shutil.which("aim")


class AimServer:
    """One ``aim up --repo <runs_dir>`` process, shared by all sessions of the dashboard."""

    def __init__(self, runs_dir: str | Path, host: str = "127.0.0.1"):
        self.runs_dir = Path(runs_dir).resolve()
        self.host = host
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_path = Path(tempfile.gettempdir()) / f"reflow-dashboard-aim-{os.getpid()}.log"
        self._lock = threading.Lock()

    @property
    def url(self) -> str | None:
        """The explorer's address while the server runs."""
        if self._proc is not None and self._proc.poll() is None and self.port:
            return f"http://{self.host}:{self.port}/"
        return None

    def start(self, timeout: float = 90.0) -> str:
        """Start ``aim up`` if needed and wait until it answers; returns its URL.

        Raises:
            RuntimeError: no ``aim`` executable, or it exited / did not answer in time (with
                the end of its output).
        """
        with self._lock:
            if self.url and self._answers(2.0):
                return self.url
            self.stop()
            aim = aim_executable()
            if aim is None:
                raise RuntimeError("The `aim` command is not installed in this environment (pip install aim).")
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self.port = free_port(self.host)
            log = open(self._log_path, "wb")
            self._proc = subprocess.Popen(
                [aim, "up", "--repo", str(self.runs_dir), "--host", self.host, "--port", str(self.port), "--yes"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"`aim up` exited (code {self._proc.returncode}): {self._log_tail()}")
                if self._answers(1.0):
                    return self.url
                time.sleep(0.5)
            self.stop()
            raise RuntimeError(f"`aim up` did not answer within {timeout:.0f} s: {self._log_tail()}")

    def _answers(self, timeout: float) -> bool:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        try:
            with opener.open(f"http://{self.host}:{self.port}/api/projects/", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _log_tail(self, chars: int = 600) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return " ".join(text[-chars:].split()) or "(no output)"

    def stop(self) -> None:
        """Stop the server (its whole process group): SIGINT, then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # aim's worker processes share the group; make sure none is left behind
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
