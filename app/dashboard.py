"""The dashboard's state and handlers: launch, stop, follow a log, the run page's parts (only
what changed since the browser's fingerprints), the runs table, the Aim link. Shared by every
session; `app.ui` lays them out and exposes them as API endpoints."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pandas as pd

from app import gpus as gpus_mod
from app.aim_server import AimServer
from app.forms import GIN_DIR, LaunchError, list_gin_files, run_folder
from app.runner import Runner
from app.runs import (
    CONSOLE_FILE,
    EVAL_COLUMNS,
    LAUNCH_FILE,
    LOG_FILE,
    curve_points,
    eval_rows,
    find_media,
    is_run_dir,
    list_runs,
    params_rows,
    read_json,
    read_log,
    read_metrics,
    read_summary,
    run_status,
    vlm_load_count,
)
from app.views import (
    message_html,
    points_frame,
    run_header,
    runs_frame,
    status_pill,
    train_stats_html,
)

log = logging.getLogger(__name__)

LOG_POLL_S = 0.5
LOG_MAX_CHARS = 150_000
PARAM_COLUMNS = ["Part", "Parameters", "Share"]


class Dashboard:
    """State shared by all sessions: the runs folder, the runner, the Aim server.

    ``login``: the dashboard requires a login. The Aim explorer has none, so it is then not
    started from here (it would open the runs to anyone who reaches its port).
    """

    def __init__(
        self,
        runs_dir: str | Path,
        *,
        gin_dir: Path = GIN_DIR,
        runner: Runner | None = None,
        aim: AimServer | None = None,
        list_gpus=gpus_mod.list_gpus,
        login: bool = False,
    ):
        self.login = login
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.gin_dir = Path(gin_dir)
        self.list_gpus = list_gpus
        self.runner = runner or Runner(self.runs_dir, gin_dir=self.gin_dir, list_gpus=list_gpus)
        self.aim = aim or AimServer(self.runs_dir)

    # -- helpers ---------------------------------------------------------------------------------

    def run_dir(self, name: str | None) -> Path | None:
        try:
            path = run_folder(self.runs_dir, name or "")
        except LaunchError:
            return None
        return path if is_run_dir(path) else None

    def run_names(self) -> list[str]:
        return [r.name for r in list_runs(self.runs_dir)]

    def device_choices(self) -> list[tuple[str, str]]:
        return gpus_mod.device_choices(self.list_gpus())

    # -- handlers --------------------------------------------------------------------------------

    def launch(self, gin_file, extra_gin_files, overrides, device, name, allow_outside=False):
        """Validate, dry-run, start. Yields (message, run selector, tabs)."""
        try:
            plan = self.runner.plan(gin_file, extra_gin_files, overrides, device, name, bool(allow_outside))
        except LaunchError as e:
            yield message_html("error", str(e)), gr.skip(), gr.skip()
            return
        verb = "Resuming" if plan.resume else "Validating"
        yield message_html("info", f"{verb} {plan.name}: checking the config (--dry_run)…"), gr.skip(), gr.skip()
        try:
            checked = self.runner.validate(plan)
            info = self.runner.start(plan)
        except LaunchError as e:
            yield message_html("error", str(e)), gr.skip(), gr.skip()
            return
        except Exception as e:  # never a traceback in the page; the server log has it
            log.exception("launch failed")
            yield message_html("error", f"Could not start the run: {type(e).__name__}: {e}"), gr.skip(), gr.skip()
            return
        what = "Resumed" if plan.resume else "Started"
        text = f"{what} {info.name} on {info.device} (pid {info.pid})."
        device = next((line for line in checked.splitlines() if line.startswith("Device: ")), "")
        text += f" {device}." if device else ""  # what the run itself sees, from its dry run
        yield (
            message_html("ok", text, _shown_command(plan.launch_command)),
            gr.update(choices=self.run_names(), value=info.name),
            gr.Tabs(selected="log"),
        )

    def stop(self, name):
        try:
            text = self.runner.stop(name)
        except LaunchError as e:
            return message_html("error", str(e))
        return message_html("info", text)

    def follow_log(self, name: str) -> Iterator[str]:
        """Yield the run's log (accumulated text) as it grows, until the run ends: the ``/follow_log``
        API endpoint for scripts (the page itself shows the log through ``page``)."""
        run_dir = self.run_dir(name)
        if run_dir is None:
            yield "" if not name else f"No run named {name!r}."
            return
        last = None
        while True:
            alive = run_status(run_dir).alive
            text = read_log(run_dir, LOG_MAX_CHARS)
            if text != last:
                last = text
                yield text
            if not alive:
                time.sleep(LOG_POLL_S)  # the last lines land as the process exits
                text = read_log(run_dir, LOG_MAX_CHARS)
                if text != last:
                    yield text
                return
            time.sleep(LOG_POLL_S)

    def aim_link(self):
        if self.login:
            yield message_html(
                "error",
                "The Aim explorer has no login, so a dashboard with a login does not start "
                f"it. On this machine, run `aim up --repo {self.runs_dir}` (it binds 127.0.0.1) "
                "and reach it through an SSH tunnel.",
            )
            return
        yield message_html("info", "Starting the Aim explorer (aim up)…")
        try:
            url = self.aim.start()
        except Exception as e:
            log.exception("aim up failed")
            yield message_html("error", f"Could not start Aim: {e}")
            return
        yield (
            f'<div class="msg msg-ok">Aim explorer: <a href="{url}" target="_blank" id="aim-link">{url}</a>'
            f' <span class="subtle">(runs folder {html.escape(str(self.runs_dir))})</span></div>'
        )

    def page(self, name, fingerprints: dict | None = None):
        """Every part of the run page; parts whose fingerprint is unchanged are ``gr.skip()``.

        Returns (header, vlm badge, stop button, params, train stats, loss plot, by-t plot,
        offline plot, eval table, eval note, plot choice, plot, video choice, video, config,
        operative config, summary, log, fingerprints).
        """
        old = dict(fingerprints or {})
        if old.get("run") != name:
            old = {}
        run_dir = self.run_dir(name)
        info = run_status(run_dir) if run_dir else None
        summary = read_summary(run_dir) if run_dir else {}
        rows = read_metrics(run_dir) if run_dir else []
        media_png = find_media(run_dir, (".png",)) if run_dir else []
        media_mp4 = find_media(run_dir, (".mp4",)) if run_dir else []
        new = {
            "run": name,
            "head": (info.status, info.step, info.last_loss, info.detail, vlm_load_count(summary, rows))
            if info
            else None,
            "summary": _stamp(run_dir / "summary.json") if run_dir else None,
            "log": tuple(_stamp(run_dir / f) for f in (LOG_FILE, CONSOLE_FILE)) if run_dir else None,
            "metrics": _stamp(run_dir / "metrics.jsonl") if run_dir else None,
            "media": tuple((str(p), _stamp(p)) for p in media_png + media_mp4),
            "eval_note": (bool(eval_rows(summary)), bool(media_png or media_mp4)),
            "config": tuple(_stamp(run_dir / f) for f in ("config.gin", "operative_config.gin", LAUNCH_FILE))
            if run_dir
            else None,
        }

        def part(key, make):
            return gr.skip() if key in old and old[key] == new[key] else make()

        head, badge = run_header(info, summary, rows) if name else run_header(None, {}, [])
        if name and run_dir is None:
            head = (
                f'<div class="run-head"><span class="run-name">{html.escape(str(name))}</span>'
                f'{status_pill("unknown")}</div><div class="run-meta">No such run in {self.runs_dir}.</div>'
            )
        out = [
            part("head", lambda: head),
            part("head", lambda: badge),
            part("head", lambda: gr.update(interactive=bool(info and info.alive and info.launch))),
            part("summary", lambda: pd.DataFrame(params_rows(summary), columns=PARAM_COLUMNS)),
            part("summary", lambda: train_stats_html(summary, info)),
            *self._plots(rows, part),
            *self._evaluation(summary, media_png, media_mp4, run_dir, part),
            *self._configs(run_dir, summary, part),
            part("log", lambda: read_log(run_dir, LOG_MAX_CHARS) if run_dir else ""),
            new,
        ]
        return tuple(out)

    def _plots(self, rows, part):
        def make():
            points = curve_points(rows)
            loss = points_frame(points["loss"])
            by_t = points_frame(points["loss_by_t"])
            offline = points_frame(points["offline"])
            return (
                gr.update(value=loss),
                gr.update(value=by_t, visible=not by_t.empty),
                gr.update(value=offline, visible=not offline.empty),
            )

        made = part("metrics", make)
        return made if isinstance(made, tuple) else (made, made, made)

    def _evaluation(self, summary, pngs, mp4s, run_dir, part):
        table = eval_rows(summary)
        evaluation = part(
            "summary", lambda: gr.update(value=pd.DataFrame(table, columns=EVAL_COLUMNS), visible=bool(table))
        )
        note = part("eval_note", lambda: gr.update(visible=not table and not pngs and not mp4s))

        def media():
            images = [(p.relative_to(run_dir).as_posix(), str(p)) for p in pngs]
            videos = [(p.relative_to(run_dir).as_posix(), str(p)) for p in mp4s]
            first_image = images[0][1] if images else None
            first_video = videos[0][1] if videos else None
            return (
                gr.update(choices=images, value=first_image, visible=len(images) > 1),
                gr.update(value=first_image, visible=bool(images)),
                gr.update(choices=videos, value=first_video, visible=bool(videos)),
                gr.update(value=first_video, visible=bool(videos)),
            )

        made = part("media", media)
        return (evaluation, note, *(made if isinstance(made, tuple) else (made,) * 4))

    def _configs(self, run_dir, summary, part):
        def make():
            if run_dir is None:
                return "", "", {}
            launch = run_dir / LAUNCH_FILE
            config = _read(run_dir / "config.gin")
            if launch.exists():
                command = read_json(launch).get("command") or []
                if command:
                    config = f"# launched by the dashboard:\n# {_shown_command(command)}\n\n{config}"
            return config, _read(run_dir / "operative_config.gin"), summary

        made = part("config", make)
        summary_out = part("summary", lambda: summary)
        if isinstance(made, tuple):
            return made[0], made[1], summary_out
        return made, made, summary_out

    def page_fresh(self, name):
        """The whole run page for ``name`` (see ``page``)."""
        return self.page(name, None)

    def tick(self, name, fingerprints, table_key):
        """Timer: runs table and selector choices (if changed) + the page (changed parts)."""
        runs = list_runs(self.runs_dir)
        key = [(r.name, r.status, r.step, r.last_loss, r.device) for r in runs]
        if key == table_key:
            table, choices = gr.skip(), gr.skip()
        else:
            table = runs_frame(runs)
            names = [r.name for r in runs]
            old_names = sorted(k[0] for k in table_key or [])
            choices = gr.skip() if sorted(names) == old_names else gr.update(choices=names)
        return (table, choices, *self.page(name, fingerprints), key)

    def on_load(self):
        """Page load: fresh choices, the newest run selected."""
        runs = list_runs(self.runs_dir)
        names = [r.name for r in runs]
        gins = list_gin_files(self.gin_dir)
        key = [(r.name, r.status, r.step, r.last_loss, r.device) for r in runs]
        devices = self.device_choices()
        return (
            gr.update(choices=gins),
            gr.update(choices=gins),
            gr.update(choices=devices),
            runs_frame(runs),
            gr.update(choices=names, value=names[0] if names else None),
            key,
        )

    def select_from_table(self, evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.skip()

    def runs_table_rows(self) -> list[dict]:
        """All runs as plain dicts: name, status, device, started, step, total_steps, last_loss."""
        return [
            {
                "name": r.name,
                "status": r.status,
                "device": r.device,
                "started": r.started_text,
                "step": r.step,
                "total_steps": r.total_steps,
                "last_loss": r.last_loss,
                "detail": r.detail,
            }
            for r in list_runs(self.runs_dir)
        ]


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _shown_command(command: list[str]) -> str:
    """A child's command line as a user would type it: `python` for the venv's interpreter path."""
    import shlex

    return " ".join(["python", *(shlex.quote(a) for a in command[1:])])
