"""The wrapper every dashboard run executes under::

    python -m app.launcher <run_dir> -- python -m reflow_exp.run --gin_file ... --gin_param ...

It is the leader of the run's process group (the dashboard starts it with
``start_new_session=True``), runs the command with stdout/stderr appended to
``<run_dir>/console.txt``, and when the command exits writes ``<run_dir>/dashboard_exit.json``
(``{"exit_code", "ended"}``), so the dashboard knows how a run ended even if it was restarted
meanwhile. Stop = SIGINT to the group: the run unwinds (closing Aim in its ``finally``); this
wrapper ignores SIGINT/SIGTERM itself (a no-op handler, which exec resets to the default in the
child) and records the exit. Standard library only (and ``reflow_exp.files``): starts in milliseconds.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from reflow_exp.files import write_json_atomic

EXIT_FILE = "dashboard_exit.json"
CONSOLE_FILE = "console.txt"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m app.launcher RUN_DIR -- COMMAND...", file=sys.stderr)
        return 2
    run_dir, command = Path(argv[0]), argv[2:]
    run_dir.mkdir(parents=True, exist_ok=True)

    def note(signum, frame):  # the group got the signal too; the child decides how to end
        pass

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    with open(run_dir / CONSOLE_FILE, "ab", buffering=0) as console:
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        except OSError as e:
            console.write(f"error: cannot start {command[0]!r}: {e}\n".encode())
            code = 127
        else:
            code = child.wait()  # retried across our no-op signal handlers (PEP 475)
    write_json_atomic(run_dir / EXIT_FILE, {"exit_code": code, "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
