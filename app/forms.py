"""The dashboard's launch form: gin files, overrides, run names, the command a launch runs, and
the message a failed dry run shows. No gradio, no torch: tested directly.

Everything the dashboard acts on stays inside the runs folder: ``confined_path`` is the one check
for the run folders it launches, stops and shows, and for the folders that overrides make a run
write to (``write_locations``). Overrides parse through ``reflow_exp.gin_config``, as the run does.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_DIR = REPO_ROOT / "gin"
# Bindings the dashboard sets itself (from the Name field and --runs-dir).
RESERVED_BINDINGS = {"run.name": "the Run name field", "run.runs_dir": "the dashboard's --runs-dir"}
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Parameters that name a folder a run writes into: an override may point them only inside the runs
# folder, unless the launch form's "allow writes outside runs/" is on.


@functools.cache
def write_locations() -> dict[str, str]:
    """The bindings that name a folder a run writes to (``"sandbox_source.root": why``): every
    configurable parameter annotated ``WritesFolder`` (``reflow_exp.config_types``), the one
    registry, read from gin's registry once the jobs are imported (torch: the first call takes
    seconds)."""
    from reflow_exp import config_types, gin_config, run  # noqa: F401  run: registers every configurable

    return config_types.write_locations(gin_config.registered_configurables())


class LaunchError(ValueError):
    """Bad input from the launch form; the message says what is wrong and what to do."""


def shown(text: str, limit: int = 80) -> str:
    """``repr(text)`` cut to ``limit`` characters with the full length: an error message quotes a
    form field, but a 1 MB field must not come back whole."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


# -- gin files -------------------------------------------------------------------------------


def list_gin_files(gin_dir: Path = GIN_DIR) -> list[str]:
    """Every ``*.gin`` under ``gin_dir`` (recursively), as posix paths relative to it, sorted
    with top-level files first (``base.gin``, then ``sandbox/...``, ``smolvla/...``)."""
    gin_dir = Path(gin_dir)
    if not gin_dir.is_dir():
        return []
    files = [p.relative_to(gin_dir).as_posix() for p in gin_dir.rglob("*.gin") if p.is_file()]
    return sorted(files, key=lambda f: (f.count("/"), f))


def resolve_gin_file(name: str, gin_dir: Path = GIN_DIR) -> Path:
    """Check a gin file chosen in the form and return its absolute path inside ``gin_dir``.

    Accepts ``sandbox/tiny.gin`` or ``gin/sandbox/tiny.gin``.

    Raises:
        LaunchError: empty, outside ``gin_dir`` (absolute paths, ``..``, symlinks out), not a
            ``.gin`` file, or missing.
    """
    text = (name or "").strip()
    if not text:
        raise LaunchError("Choose a gin file.")
    if "\x00" in text:  # the OS refuses such a path with a ValueError, not a missing file
        raise LaunchError(f"Gin file {shown(text)} holds a NUL byte: pick one of the listed files.")
    gin_dir = Path(gin_dir).resolve()
    if os.path.isabs(text) or text.startswith("~"):
        raise LaunchError(f"Gin file {text!r} is outside gin/: pick one of the listed files (paths relative to gin/).")
    relative = text[len("gin/") :] if text.startswith("gin/") else text
    path = (gin_dir / relative).resolve()
    if not path.is_relative_to(gin_dir):
        raise LaunchError(f"Gin file {shown(text)} is outside gin/: pick one of the listed files.")
    if path.suffix != ".gin":
        raise LaunchError(f"{shown(text)} is not a .gin file.")
    if not path.is_file():
        raise LaunchError(f"Unknown gin file {shown(text)}: no such file in gin/. Pick one of the listed files.")
    return path


# -- overrides -------------------------------------------------------------------------------


def parse_overrides(text: str | None) -> list[str]:
    """One gin binding per line (``Trainer.steps = 100``) → the list of bindings.

    Blank lines and ``#`` comments are skipped. Each line must be a single binding gin can parse
    (``[scope/]configurable.parameter = value``); includes, imports and macros are refused here,
    as are ``run.name`` and ``run.runs_dir`` (set by the dashboard).

    Raises:
        LaunchError: naming the line number and the line.
    """
    from gin import config_parser
    from reflow_exp import gin_config  # light: gin only, no registry lookups, no torch

    bindings = []
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"Override line {number} ({shown(line)})"
        if "=" not in line:
            raise LaunchError(f"{where}: expected `configurable.parameter = value`, e.g. `Trainer.steps = 100`.")
        try:
            statements = gin_config.statements(line + "\n", label=where)
        except gin_config.ConfigError as e:
            raise LaunchError(
                f"{where}: not a valid gin binding ({str(e).split('gin syntax error: ')[-1]}). "
                "Write `configurable.parameter = value`; values are Python literals: quote strings, "
                "close brackets."
            ) from None
        if len(statements) != 1 or not isinstance(statements[0], config_parser.BindingStatement):
            raise LaunchError(
                f"{where}: only bindings `configurable.parameter = value` are allowed here "
                "(no include or import; put those in a gin file)."
            )
        stmt = statements[0]
        if not stmt.arg_name:
            raise LaunchError(f"{where}: `{stmt.selector}` has no parameter; write `configurable.parameter = value`.")
        key = f"{stmt.selector}.{stmt.arg_name}"
        if not stmt.scope and key in RESERVED_BINDINGS:
            raise LaunchError(f"{where}: {key} is set by {RESERVED_BINDINGS[key]}; remove this line.")
        bindings.append(line)
    return bindings


def check_write_locations(bindings: list[str], runs_dir: Path, repo_root: Path) -> None:
    """Refuse overrides that make a run write outside ``runs_dir`` (see ``write_locations``).

    Values are paths relative to ``repo_root`` (the runs' working directory) or absolute;
    ``None`` (the default location) is fine.

    Raises:
        LaunchError: naming the binding, the folder and the option that allows it.
    """
    from reflow_exp import gin_config

    for line in bindings:
        (stmt,) = gin_config.parse_bindings(line + "\n", label=line)
        key = f"{stmt.selector.rsplit('.', 1)[-1]}.{stmt.arg_name}"  # module-qualified selectors too
        locations = write_locations()
        if key not in locations or stmt.value is None:
            continue
        if not isinstance(stmt.value, str) or stmt.value.startswith(("@", "%")):
            raise LaunchError(f"Override {line!r}: {key} must be a quoted folder path.")
        try:
            confined_path(runs_dir, stmt.value, base=repo_root, what=f"{key} ({locations[key]})")
        except LaunchError as e:
            raise LaunchError(
                f"Override {line!r}: {e} Put it inside the runs folder, or tick "
                '"Allow writes outside runs/" on the launch form.'
            ) from None


def confined_path(runs_dir: Path, path: str | Path, *, base: Path | None = None, what: str = "Path") -> Path:
    """``path`` resolved (relative to ``base``, default ``runs_dir``; ``~`` expanded, ``..`` and
    symlinks followed) when it lies inside ``runs_dir``: the one confinement check of the
    dashboard, for run folders (launch, stop, show) and for folders overrides write to.

    Raises:
        LaunchError: it points outside ``runs_dir``.
    """
    root = Path(runs_dir).resolve()
    resolved = (Path(base or root) / Path(os.path.expanduser(str(path)))).resolve()
    if not resolved.is_relative_to(root):
        raise LaunchError(f"{what} {str(path)!r} resolves to {resolved}, outside the runs folder {root}.")
    return resolved


def run_folder(runs_dir: Path, name: str) -> Path:
    """The folder of run ``name``: a plain name (``check_run_name``) inside ``runs_dir``, also
    after following symlinks (``confined_path``).

    Raises:
        LaunchError: a bad name, or a folder that leads outside ``runs_dir``.
    """
    path = confined_path(runs_dir, check_run_name(name), what="Run folder")
    if path == Path(runs_dir).resolve():
        raise LaunchError(f"Run name {name!r} names the runs folder itself.")
    return path


# -- run names and commands ------------------------------------------------------------------


def check_run_name(name: str) -> str:
    """A plain folder name: letters, digits, ``.``, ``_``, ``-`` (not starting with a dot).

    Raises:
        LaunchError: otherwise.
    """
    text = (name or "").strip()
    if not RUN_NAME_RE.match(text):
        raise LaunchError(
            f"Run name {shown(text)} is not allowed: use letters, digits, '.', '_' or '-' "
            "(up to 100, starting with a letter or digit)."
        )
    return text


def default_run_name(runs_dir: Path, now: float | None = None) -> str:
    """A ``YYYYmmdd-HHMMSS`` timestamp, suffixed ``-2``, ``-3``... if that folder exists."""
    base = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    name, n = base, 1
    while (Path(runs_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def gin_string(value: str) -> str:
    """A Python/gin string literal for ``value`` (paths and names)."""
    return json.dumps(str(value))


def build_command(
    gin_files: list[str],
    overrides: list[str],
    name: str,
    runs_dir: Path,
    *,
    python: str = sys.executable,
    dry_run: bool = False,
) -> list[str]:
    """``python -m reflow_exp.run --gin_file ... --gin_param ... --gin_param run.name=... ``.

    ``gin_files`` as passed (relative to the repo root, e.g. ``gin/sandbox/tiny.gin``); the
    run name and runs folder go last, so they win over the gin files.
    """
    cmd = [python, "-m", "reflow_exp.run"]
    for f in gin_files:
        cmd += ["--gin_file", f]
    for binding in overrides:
        cmd += ["--gin_param", binding]
    cmd += ["--gin_param", f"run.name = {gin_string(name)}", "--gin_param", f"run.runs_dir = {gin_string(runs_dir)}"]
    if dry_run:
        cmd.append("--dry_run")
    return cmd


def config_error_message(stderr: str, stdout: str = "") -> str:
    """What to show for a failed ``--dry_run``: the ``error: ...`` lines, or the last line of a
    traceback (the exception and its message), never the whole traceback."""
    lines = [line.rstrip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [
        line[len("error: ") :] if line.startswith("error: ") else line for line in lines if line.startswith("error:")
    ]
    if errors:
        # `error:` may be followed by continuation lines (one problem per line).
        start = next(i for i, line in enumerate(lines) if line.startswith("error:"))
        rest = [line for line in lines[start + 1 :] if not line.startswith(("Traceback", "  File "))]
        return "\n".join([errors[0], *rest]).strip()
    if any(line.startswith("Traceback") for line in lines):
        last = next((line for line in reversed(lines) if not line.startswith(" ")), lines[-1])
        return last.strip()
    tail = lines[-5:] or [line for line in (stdout or "").splitlines() if line.strip()][-5:]
    return "\n".join(tail) or "the dry run failed without a message"
