"""``reflow-dashboard``: start the Gradio dashboard over a runs folder.

    reflow-dashboard [--host 127.0.0.1] [--port 7860] [--runs-dir runs]

Binds 127.0.0.1 unless told otherwise. Set ``REFLOW_DASHBOARD_USER`` and
``REFLOW_DASHBOARD_PASSWORD`` to require a login (do, before binding anything but localhost).
Requests from other origins, or naming a host other than loopback, the bound address or an
``--allow-host``, get 403 (``app.origin``). With a login, the Aim explorer (which has none) is
not started from the dashboard. Runs keep going when the dashboard stops; started again, it
finds them in the runs folder.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path

from app.forms import REPO_ROOT

USER_ENV = "REFLOW_DASHBOARD_USER"
PASSWORD_ENV = "REFLOW_DASHBOARD_PASSWORD"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reflow-dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address users reach the dashboard by, besides loopback and --host "
        "(repeatable; needed with --host 0.0.0.0)",
    )
    parser.add_argument(
        "--runs-dir",
        default=str(REPO_ROOT / "runs"),
        help="folder of the run folders, also the Aim repo (default: <repo>/runs)",
    )
    return parser.parse_args(argv)


def auth_from_env(environ=os.environ) -> tuple[str, str] | None:
    """(user, password) from the environment, None when neither is set.

    Raises:
        SystemExit: only one of the two is set.
    """
    user, password = environ.get(USER_ENV), environ.get(PASSWORD_ENV)
    if not user and not password:
        return None
    if not user or not password:
        raise SystemExit(f"reflow-dashboard: set both {USER_ENV} and {PASSWORD_ENV} (or neither).")
    return user, password


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = auth_from_env()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.chdir(REPO_ROOT)  # runs are launched from the repo root (gin/ paths)

    from app.ui import build_demo, launch_kwargs  # gradio is slow to import: after argument errors

    runs_dir = Path(args.runs_dir).resolve()
    demo = build_demo(runs_dir, login=auth is not None)
    atexit.register(demo.dashboard.aim.stop)
    signal.signal(signal.SIGTERM, _terminate)  # close like Ctrl-C, so atexit stops `aim up`
    print(f"reflow dashboard over {runs_dir}" + (" (login required)" if auth else ""), flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        auth_message="reflow_exp dashboard" if auth else None,
        **launch_kwargs(runs_dir, args.host, tuple(args.allow_host)),
    )
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
