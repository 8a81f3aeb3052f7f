"""The Gradio Blocks of the dashboard: layout and wiring (the handlers are `app.dashboard`'s).

Left column: the launch form (gin file, extra gin files, overrides, run name, device). Main area:
the runs table, then the selected run's page: name, status and VLM-load badges, Stop, and tabs
Overview (parameters, training stats, loss curves) / Log / Evaluation (table, plot, rollout videos)
/ Config. A ``gr.Timer`` refreshes the table and the page, log included, in the browser (only
what changed). No page event streams: Gradio runs the listeners of one trigger in order and
defers a listener until its previous call ends, so a log stream on ``run.change`` kept showing
the first run while it trained and held back the events after it. The handlers are also API
endpoints (``/launch``, ``/follow_log`` (streams a log until the run ends), ``/run_page``,
``/runs``, ``/stop``, ``/aim``, ``/devices``), so the dashboard can be scripted and tested with
``gradio_client``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.dashboard import PARAM_COLUMNS, Dashboard
from app.forms import list_gin_files
from app.runs import EVAL_COLUMNS, list_runs, params_rows
from app.views import RUN_COLUMNS, points_frame, run_header, runs_frame, vlm_badge

TICK_S = 2.0
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


def _series_plot(title: str, y_title: str, color_title: str, height: int = 280, **options) -> gr.LinePlot:
    """An empty step/value line plot with one line per series (`views.points_frame` fills it)."""
    return gr.LinePlot(
        points_frame([]),
        x="step",
        y="value",
        color="series",
        title=title,
        y_title=y_title,
        color_title=color_title,
        height=height,
        **options,
    )


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")


def launch_kwargs(
    runs_dir: str | Path,
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
    login_throttle: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What ``demo.launch`` needs besides host/port/auth: theme, CSS, the runs folder as an
    allowed path (plots and videos are served from it), the same-origin guard for a server
    bound to ``host`` (see ``app.origin``; ``allow_hosts``: more names users reach it by), and
    with a login the brute-force guard (``app.login_throttle``; ``login_throttle``: its settings,
    e.g. ``{"max_failures": 5}``)."""
    from starlette.middleware import Middleware

    from app.login_throttle import LoginThrottle
    from app.origin import SameOriginOnly, allowed_hosts

    middleware = [Middleware(SameOriginOnly, allowed=allowed_hosts(host, allow_hosts))]
    middleware.append(Middleware(LoginThrottle, **(login_throttle or {})))  # idle without a login
    return {
        "theme": theme(),
        "css": CSS,
        "allowed_paths": [str(Path(runs_dir).resolve())],
        "app_kwargs": {"middleware": middleware},
    }


# -- small HTML pieces -----------------------------------------------------------------------


def build_blocks(dashboard: Dashboard) -> gr.Blocks:
    """The Blocks: layout and wiring of `dashboard`'s handlers (API endpoints included)."""
    gins = list_gin_files(dashboard.gin_dir)
    default_gin = DEFAULT_GIN if DEFAULT_GIN in gins else (gins[0] if gins else None)
    devices = dashboard.device_choices()
    runs = list_runs(dashboard.runs_dir)
    names = [r.name for r in runs]

    with gr.Blocks(title="reflow_exp · dashboard", fill_width=True) as demo:
        fingerprints = gr.State({})
        table_key = gr.State([])
        timer = gr.Timer(TICK_S)

        with gr.Row(elem_id="topbar", equal_height=True):
            gr.HTML(
                f'<h1>reflow_exp · runs</h1><div class="subtle">Runs folder '
                f"<code>{html.escape(str(dashboard.runs_dir))}</code> · SmolVLA reflow distillation</div>"
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
                        info="let overrides such as sandbox_source.root or Tracker.repo point outside the runs folder",
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
                            loss_plot = _series_plot("Training loss", "loss", "head", elem_id="loss-plot")
                            by_t_plot = _series_plot(
                                "Training loss by t (t=1 noise, t=0 action)",
                                "loss",
                                "bin",
                                visible=False,
                                elem_id="loss-by-t-plot",
                            )
                        offline_plot = _series_plot(
                            "Offline action error (held-out frames)", "error", "head @ steps", height=260, visible=False
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
                            placeholder="The run's log.txt shows here.",
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
            log_box,
            fingerprints,
        ]

        # ---- events
        demo.load(
            dashboard.on_load, None, [gin_file, extra_gins, device, runs_df, run, table_key], api_visibility="private"
        )
        run.change(
            dashboard.page_fresh, run, page_outputs, api_name="run_page", concurrency_limit=None, show_progress="hidden"
        )
        timer.tick(
            dashboard.tick,
            [run, fingerprints, table_key],
            [runs_df, run, *page_outputs, table_key],
            api_visibility="private",
            concurrency_limit=None,
            show_progress="hidden",
        )
        runs_df.select(dashboard.select_from_table, None, run, api_visibility="private")
        launch_button.click(
            dashboard.launch,
            [gin_file, extra_gins, overrides, device, run_name, allow_outside],
            [launch_msg, run, tabs],
            api_name="launch",
            show_progress="minimal",
        )
        stop_button.click(dashboard.stop, run, stop_msg, api_name="stop", concurrency_limit=None)
        run.change(lambda: "", None, stop_msg, api_visibility="private", show_progress="hidden")
        video_choice.input(lambda v: v, video_choice, video, api_visibility="private")
        plot_choice.input(lambda v: v, plot_choice, plot, api_visibility="private")
        gpu_refresh.click(lambda: gr.update(choices=dashboard.device_choices()), None, device, api_name="devices")
        aim_button.click(dashboard.aim_link, None, aim_html, api_name="aim", show_progress="minimal")
        gr.api(dashboard.runs_table_rows, api_name="runs")
        gr.api(dashboard.follow_log, api_name="follow_log", concurrency_limit=None)
    demo.dashboard = dashboard  # for main()/tests: demo.dashboard.aim.stop()
    return demo


def build_demo(runs_dir: str | Path, **kwargs) -> gr.Blocks:
    """The dashboard's Blocks over ``runs_dir`` (``kwargs`` go to ``Dashboard``)."""
    return build_blocks(Dashboard(runs_dir, **kwargs))
