"""The Gradio Blocks of the dashboard.

Left column: the launch form (gin file, extra gin files, overrides, run name, device). Main area:
the runs table, then the selected run's page: name, status and VLM-load badges, Stop, and tabs
Overview (parameters, training stats, loss curves) / Log / Evaluation (table, plot, rollout videos)
/ Config. A ``gr.Timer`` refreshes the table and the page in the browser (only what changed); the
log streams through a generator (``concurrency_limit=None``). The handlers are also API
endpoints (``/launch``, ``/follow_log``, ``/run_page``, ``/runs``, ``/stop``, ``/aim``,
``/devices``), so the dashboard can be scripted and tested with ``gradio_client``.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import gpus as gpus_mod
from app.aim_server import AimServer
from app.forms import GIN_DIR, LaunchError, list_gin_files, run_folder
from app.runner import Runner
from app.runs import (
    EVAL_COLUMNS,
    LAUNCH_FILE,
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
    RUN_COLUMNS,
    message_html,
    points_frame,
    run_header,
    runs_frame,
    status_pill,
    train_stats_html,
    vlm_badge,
)

log = logging.getLogger(__name__)

TICK_S = 2.0
LOG_POLL_S = 0.5
LOG_MAX_CHARS = 150_000
PARAM_COLUMNS = ["Part", "Parameters", "Share"]
DEFAULT_GIN = "sandbox/teacher.gin"

CSS = """
#topbar {align-items: center; gap: 12px;}
#topbar h1 {margin: 0; font-size: 1.35rem;}
.subtle {color: var(--body-text-color-subdued); font-size: 0.85rem;}
.pill {display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600;
       font-size: 0.85rem; color: white; white-space: nowrap; margin-right: 6px;}
.pill.grey {background: #9ca3af;}
.pill.green {background: #16a34a;}
.pill.red {background: #dc2626;}
.run-head {display: flex; flex-wrap: wrap; align-items: center; gap: 6px; min-height: 42px;}
.run-head .run-name {font-size: 1.25rem; font-weight: 700; margin-right: 8px;}
.run-meta {color: var(--body-text-color-subdued); font-size: 0.85rem; margin-top: 4px;}
.msg {padding: 8px 12px; border-radius: 8px; margin: 4px 0; font-size: 0.9rem;}
.msg pre {white-space: pre-wrap; margin: 4px 0 0 0; font-size: 0.8rem;}
.msg-error {background: #fef2f2; color: #991b1b; border: 1px solid #fecaca;}
.msg-ok {background: #f0fdf4; color: #166534; border: 1px solid #bbf7d0;}
.msg-info {background: #eff6ff; color: #1e40af; border: 1px solid #bfdbfe;}
.stats {display: grid; grid-template-columns: max-content auto; gap: 4px 16px; font-size: 0.9rem;}
.stats .k {color: var(--body-text-color-subdued);}
#run-log textarea {font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px;
                   line-height: 1.35;}
.section-title {font-weight: 600; padding: 8px 12px 0 12px;}
.empty-note {color: var(--body-text-color-subdued); padding: 12px 4px;}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")


def launch_kwargs(runs_dir: str | Path, host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``demo.launch`` needs besides host/port/auth: theme, CSS, the runs folder as an
    allowed path (plots and videos are served from it), and the same-origin guard for a server
    bound to ``host`` (see ``app.origin``; ``allow_hosts``: more names users reach it by)."""
    from starlette.middleware import Middleware

    from app.origin import SameOriginOnly, allowed_hosts

    guard = Middleware(SameOriginOnly, allowed=allowed_hosts(host, allow_hosts))
    return {
        "theme": theme(),
        "css": CSS,
        "allowed_paths": [str(Path(runs_dir).resolve())],
        "app_kwargs": {"middleware": [guard]},
    }


# -- small HTML pieces -----------------------------------------------------------------------


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
        self._followers: dict[str, object] = {}  # session → token of its current log stream

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

    def follow_log(self, name, request: gr.Request = None):
        """Yield the run's log (accumulated text) as it grows, until the run ends or this session
        selects another run."""
        session = getattr(request, "session_hash", None) or ""
        token = object()
        if session:
            self._followers[session] = token
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
            if session and self._followers.get(session) is not token:
                return  # another run was selected in this session
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
        operative config, summary, fingerprints).
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

    # -- layout ----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        gins = list_gin_files(self.gin_dir)
        default_gin = DEFAULT_GIN if DEFAULT_GIN in gins else (gins[0] if gins else None)
        devices = self.device_choices()
        runs = list_runs(self.runs_dir)
        names = [r.name for r in runs]

        with gr.Blocks(title="reflow_exp · dashboard", fill_width=True) as demo:
            fingerprints = gr.State({})
            table_key = gr.State([])
            timer = gr.Timer(TICK_S)

            with gr.Row(elem_id="topbar", equal_height=True):
                gr.HTML(
                    f'<h1>reflow_exp · runs</h1><div class="subtle">Runs folder '
                    f"<code>{html.escape(str(self.runs_dir))}</code> · SmolVLA reflow distillation</div>"
                )
                aim_button = gr.Button("Open Aim explorer ↗", size="sm", variant="secondary", scale=0, min_width=190)
            aim_html = gr.HTML(elem_id="aim-status")

            with gr.Row():
                # ---- sidebar: the launch form
                with gr.Column(scale=3, min_width=340):
                    with gr.Group(elem_id="new-run"):
                        gr.HTML('<div class="section-title">New run</div>')
                        gin_file = gr.Dropdown(
                            gins,
                            value=default_gin,
                            label="Gin file (gin/)",
                            allow_custom_value=True,
                            elem_id="gin-file",
                        )
                        extra_gins = gr.Dropdown(
                            gins,
                            value=[],
                            multiselect=True,
                            allow_custom_value=True,
                            label="Extra gin files (applied after, in order)",
                            elem_id="extra-gin",
                        )
                        overrides = gr.Textbox(
                            label="Overrides: one gin binding per line",
                            lines=3,
                            max_lines=12,
                            placeholder="Trainer.steps = 100\nTrainer.lr = 3e-4",
                            elem_id="overrides",
                        )
                        run_name = gr.Textbox(
                            label="Run name", placeholder="default: a timestamp (YYYYmmdd-HHMMSS)", elem_id="run-name"
                        )
                        device = gr.Dropdown(
                            devices,
                            value=devices[0][1],
                            label="Device",
                            allow_custom_value=True,
                            elem_id="device",
                            info="GPU · memory used/total · utilisation; type 0,1 for one process per GPU",
                        )
                        allow_outside = gr.Checkbox(
                            False,
                            label="Allow writes outside runs/",
                            elem_id="allow-outside",
                            info="let overrides such as sandbox_source.root or Tracker.repo "
                            "point outside the runs folder",
                        )
                    with gr.Row():
                        gpu_refresh = gr.Button("↻ Refresh GPUs", size="sm", scale=1, min_width=100)
                        launch_button = gr.Button("Launch", variant="primary", elem_id="launch", scale=2)
                    launch_msg = gr.HTML(elem_id="launch-msg")

                # ---- main: run page
                with gr.Column(scale=9, min_width=560):
                    with gr.Accordion("Runs", open=True, elem_id="runs"):
                        runs_df = gr.Dataframe(
                            runs_frame(runs),
                            headers=RUN_COLUMNS,
                            interactive=False,
                            show_label=False,
                            elem_id="runs-table",
                            max_height=230,
                            wrap=False,
                            column_widths=["30%", "14%", "10%", "16%", "14%", "16%"],
                        )
                    with gr.Row(equal_height=True):
                        run = gr.Dropdown(
                            names,
                            value=None,
                            label="Run",
                            allow_custom_value=True,
                            scale=2,
                            min_width=200,
                            elem_id="run-select",
                        )
                        with gr.Column(scale=5):
                            header = gr.HTML(run_header(None, {}, [])[0], elem_id="run-header")
                        with gr.Column(scale=0, min_width=150):
                            badge = gr.HTML(vlm_badge(None), elem_id="vlm-badge")
                            stop_button = gr.Button(
                                "■ Stop run", variant="stop", size="sm", interactive=False, elem_id="stop"
                            )
                    stop_msg = gr.HTML(elem_id="stop-msg")
                    with gr.Tabs(selected="overview") as tabs:
                        with gr.Tab("Overview", id="overview"):
                            with gr.Row():
                                params = gr.Dataframe(
                                    pd.DataFrame(params_rows({}), columns=PARAM_COLUMNS),
                                    label="Parameters",
                                    interactive=False,
                                    elem_id="params",
                                    scale=1,
                                )
                                with gr.Column(scale=1):
                                    gr.Markdown("**Training**")
                                    train_stats = gr.HTML(elem_id="train-stats")
                            with gr.Row():
                                loss_plot = gr.LinePlot(
                                    points_frame([]),
                                    x="step",
                                    y="value",
                                    color="series",
                                    title="Training loss",
                                    y_title="loss",
                                    color_title="head",
                                    height=280,
                                    elem_id="loss-plot",
                                )
                                by_t_plot = gr.LinePlot(
                                    points_frame([]),
                                    x="step",
                                    y="value",
                                    color="series",
                                    title="Training loss by t (t=1 noise, t=0 action)",
                                    y_title="loss",
                                    color_title="bin",
                                    height=280,
                                    visible=False,
                                    elem_id="loss-by-t-plot",
                                )
                            offline_plot = gr.LinePlot(
                                points_frame([]),
                                x="step",
                                y="value",
                                color="series",
                                title="Offline action error (held-out frames)",
                                y_title="error",
                                color_title="head @ steps",
                                height=260,
                                visible=False,
                            )
                        with gr.Tab("Log", id="log"):
                            log_box = gr.Textbox(
                                show_label=False,
                                lines=26,
                                max_lines=26,
                                autoscroll=True,
                                buttons=["copy"],
                                elem_id="run-log",
                                interactive=False,
                                placeholder="The run's log.txt streams here.",
                            )
                        with gr.Tab("Evaluation", id="evaluation"):
                            eval_note = gr.HTML('<div class="empty-note">No evaluation results in this run yet.</div>')
                            eval_table = gr.Dataframe(
                                pd.DataFrame([], columns=EVAL_COLUMNS),
                                interactive=False,
                                label="Evaluation (rollouts; offline error on held-out frames)",
                                visible=False,
                                elem_id="eval-table",
                            )
                            plot_choice = gr.Dropdown([], label="Plot", visible=False)
                            plot = gr.Image(
                                label="Success and latency vs sampling steps",
                                type="filepath",
                                interactive=False,
                                visible=False,
                                elem_id="eval-plot",
                                height=400,
                                show_label=False,
                            )
                            with gr.Row():
                                video_choice = gr.Dropdown([], label="Rollout video", visible=False, scale=1)
                                video = gr.Video(
                                    label="Rollout", visible=False, autoplay=True, loop=True, scale=2, height=320
                                )
                        with gr.Tab("Config", id="config"):
                            with gr.Row():
                                config = gr.Code(
                                    label="config.gin (as given)", language="python", interactive=False, max_lines=32
                                )
                                operative = gr.Code(
                                    label="operative_config.gin (values used)",
                                    language="python",
                                    interactive=False,
                                    max_lines=32,
                                )
                            summary_json = gr.JSON(label="summary.json")

            page_outputs = [
                header,
                badge,
                stop_button,
                params,
                train_stats,
                loss_plot,
                by_t_plot,
                offline_plot,
                eval_table,
                eval_note,
                plot_choice,
                plot,
                video_choice,
                video,
                config,
                operative,
                summary_json,
                fingerprints,
            ]

            # ---- events
            demo.load(
                self.on_load, None, [gin_file, extra_gins, device, runs_df, run, table_key], api_visibility="private"
            )
            run.change(
                self.follow_log, run, log_box, api_name="follow_log", concurrency_limit=None, show_progress="hidden"
            )
            run.change(
                self.page_fresh, run, page_outputs, api_name="run_page", concurrency_limit=None, show_progress="hidden"
            )
            timer.tick(
                self.tick,
                [run, fingerprints, table_key],
                [runs_df, run, *page_outputs, table_key],
                api_visibility="private",
                concurrency_limit=None,
                show_progress="hidden",
            )
            runs_df.select(self.select_from_table, None, run, api_visibility="private")
            launch_button.click(
                self.launch,
                [gin_file, extra_gins, overrides, device, run_name, allow_outside],
                [launch_msg, run, tabs],
                api_name="launch",
                show_progress="minimal",
            )
            stop_button.click(self.stop, run, stop_msg, api_name="stop", concurrency_limit=None)
            run.change(lambda: "", None, stop_msg, api_visibility="private", show_progress="hidden")
            video_choice.input(lambda v: v, video_choice, video, api_visibility="private")
            plot_choice.input(lambda v: v, plot_choice, plot, api_visibility="private")
            gpu_refresh.click(lambda: gr.update(choices=self.device_choices()), None, device, api_name="devices")
            aim_button.click(self.aim_link, None, aim_html, api_name="aim", show_progress="minimal")
            gr.api(self.runs_table_rows, api_name="runs")
        demo.dashboard = self  # for main()/tests: demo.dashboard.aim.stop()
        return demo

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


def build_demo(runs_dir: str | Path, **kwargs) -> gr.Blocks:
    """The dashboard's Blocks over ``runs_dir`` (``kwargs`` go to ``Dashboard``)."""
    return Dashboard(runs_dir, **kwargs).build()
