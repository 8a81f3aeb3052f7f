"""How the dashboard shows runs: status pills, headers, messages and the runs table (HTML and
data frames, no gradio)."""

from __future__ import annotations

import html

import pandas as pd

from app.runs import RunInfo, vlm_load_count

STATUS_COLORS = {
    "running": "#2563eb",
    "stopping": "#d97706",
    "finished": "#16a34a",
    "failed": "#dc2626",
    "stopped": "#a16207",
    "unknown": "#6b7280",
}
STATUS_ICONS = {"running": "●", "stopping": "◐", "finished": "✔", "failed": "✖", "stopped": "■", "unknown": "?"}
RUN_COLUMNS = ["Run", "Status", "Device", "Started", "Step", "Last loss"]


def message_html(kind: str, text: str, detail: str = "") -> str:
    icon = {"error": "✖", "ok": "✔", "info": "…"}.get(kind, "")
    body = html.escape(text)
    if "\n" in text:
        first, rest = text.split("\n", 1)
        body, detail = html.escape(first), rest + ("\n" + detail if detail else "")
    extra = f"<pre>{html.escape(detail)}</pre>" if detail else ""
    return f'<div class="msg msg-{kind}">{icon} {body}{extra}</div>'


def status_pill(status: str, detail: str = "") -> str:
    color = STATUS_COLORS.get(status, STATUS_COLORS["unknown"])
    title = f' title="{html.escape(detail)}"' if detail else ""
    return (
        f'<span class="pill status-{status}" style="background:{color}"{title}>'
        f"{STATUS_ICONS.get(status, '')} {status}</span>"
    )


def vlm_badge(count: int | None) -> str:
    """Green at exactly one VLM load, red otherwise, grey while unknown."""
    if count is None:
        return '<span class="pill grey" id="vlm-load" data-count="">VLM loads: —</span>'
    color = "green" if count == 1 else "red"
    title = "the VLM was loaded once" if count == 1 else "expected exactly one VLM load per run"
    return f'<span class="pill {color}" id="vlm-load" data-count="{count}" title="{title}">VLM loaded {count}×</span>'


def run_header(info: RunInfo | None, summary: dict, rows: list[dict]) -> tuple[str, str]:
    """(header HTML with name + status, VLM badge HTML)."""
    if info is None:
        return (
            '<div class="run-head"><span class="run-name">No run selected</span></div>'
            '<div class="run-meta">Launch a run on the left, or pick one in the runs table.</div>',
            vlm_badge(None),
        )
    meta = [info.device, f"started {info.started_text}", f"step {info.step_text}", f"last loss {info.loss_text}"]
    if info.detail:
        meta.append(info.detail)
    head = (
        f'<div class="run-head"><span class="run-name">{html.escape(info.name)}</span>'
        f"{status_pill(info.status, info.detail)}</div>"
        f'<div class="run-meta">{html.escape(" · ".join(meta))}</div>'
    )
    return head, vlm_badge(vlm_load_count(summary, rows))


def train_stats_html(summary: dict, info: RunInfo | None) -> str:
    train = summary.get("train") or {}
    items = []
    if info is not None:
        items.append(("Run folder", str(info.path)))
    for key, label, fmt in (
        ("first_loss", "First loss", "{:.4g}"),
        ("last_loss", "Last loss", "{:.4g}"),
        ("steps_per_s", "Steps / s", "{:.2f}"),
        ("steps", "Steps", "{}"),
    ):
        if isinstance(train.get(key), (int, float)):
            items.append((label, fmt.format(train[key])))
    for key, label in (("teacher_checkpoint", "Teacher checkpoint"), ("student_checkpoint", "Student checkpoint")):
        if summary.get(key):
            items.append((label, str(summary[key])))
    straight = (summary.get("offline") or {}).get("straightness") or {}
    for head, value in straight.items():
        if isinstance(value, (int, float)):
            items.append((f"Straightness ({head})", f"{value:.4f}"))
    if not items:
        return '<div class="empty-note">No training summary yet.</div>'
    cells = "".join(f'<div class="k">{html.escape(k)}</div><div>{html.escape(v)}</div>' for k, v in items)
    return f'<div class="stats">{cells}</div>'


def runs_frame(runs: list[RunInfo]):
    """The runs table as a pandas Styler (status coloured)."""
    df = pd.DataFrame(
        [
            [
                r.name,
                f"{STATUS_ICONS.get(r.status, '')} {r.status}",
                r.device,
                r.started_short,
                r.step_text,
                r.loss_text,
            ]
            for r in runs
        ],
        columns=RUN_COLUMNS,
    )
    if df.empty:
        return df

    def color(value: str) -> str:
        status = value.split(" ", 1)[-1]
        return f"color: {STATUS_COLORS.get(status, '#6b7280')}; font-weight: 600"

    return df.style.map(color, subset=["Status"])


def points_frame(points: list[dict]) -> pd.DataFrame:
    """Long format for gr.LinePlot; typed even when empty (an untyped frame makes the plot's
    axes nominal and the lines never show)."""
    return pd.DataFrame(
        {
            "step": pd.Series([p["step"] for p in points], dtype="int64"),
            "value": pd.Series([p["value"] for p in points], dtype="float64"),
            "series": pd.Series([str(p["series"]) for p in points], dtype="object"),
        }
    )


# -- the app ---------------------------------------------------------------------------------
