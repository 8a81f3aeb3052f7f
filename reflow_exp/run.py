"""Run one configured job::

    python -m reflow_exp.run --gin_file gin/sandbox/teacher.gin [--gin_file G ...] \\
        [--gin_param 'Trainer.steps=100' ...] [--dry_run]

Gin files are found relative to the working directory or the repo's ``gin/`` folder (so are
their ``include``s). The whole config is checked before anything is built or written: syntax,
unknown configurables/parameters/references, undefined macros, parameters whose Python default
is ``gin.REQUIRED`` but that no binding sets, and literal values whose type does not fit the
parameter's annotation (``reflow_exp.config_types``). Problems exit with code 2 and name file and
line, before the run folder exists.

Exit codes: 0 done, 1 the job failed (status.json in the run folder says why), 2 config error,
3 another process has the run folder open (nothing written), 130 interrupted (resumable).

Then ``run.*`` (see ``reflow_exp.rundir.run_settings``) picks the job and the run folder
``<run.runs_dir>/<run.name>``; the job is called as ``job(run_dir)``, or as
``job(None, dry_run=True)`` under ``--dry_run`` (which writes nothing).

No configurables live here: this module runs as ``__main__``, and a configurable defined in it
would be registered twice (PITFALLS.md).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import importlib.util  # noqa: F401  gin's resource_reader uses importlib.util (PITFALLS.md)
import inspect
import logging
import os
import signal
import sys
import threading
import tokenize
import traceback
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import gin
from gin import config_parser

from reflow_exp import config_types
from reflow_exp import distributed, jobs, rundir, trainer, tracking  # noqa: F401  register the configurables

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
EXIT_CONFIG_ERROR = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_RUN_LOCKED = 3  # another process has the run folder open

gin.add_config_file_search_path(str(GIN_DIR))  # for gin's own `include` resolution


class ConfigError(Exception):
    """A problem in the gin config; the message names file and line where known."""


class Config(NamedTuple):
    """A parsed, validated gin config."""

    text: str  # the gin files and bindings as given (→ config.gin)
    hparams: dict  # final bindings as nested plain values (→ Aim hparams)


def main(argv: list[str] | None = None) -> int:
    """Parse and check the gin config, then run the job. Returns the process exit code."""
    args = _parse_args(argv)
    gin.clear_config()
    try:
        config = load_config(args.gin_file, args.gin_param)
        settings = rundir.run_settings()
    except (ConfigError, TypeError, ValueError) as e:  # run_settings raises the latter for bad run.*
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    try:
        distributed.check_devices()  # a wrong GPU index fails here, before the run folder exists
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if args.dry_run:
        return _dry_run(settings)

    try:
        distributed.start(settings.dist_timeout_s)
    except distributed.UnreachableError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    try:
        return _open_and_run(settings, config)
    finally:
        distributed.stop()


def _open_and_run(settings: rundir.RunSettings, config: Config) -> int:
    """Open the run folder (rank 0; the other processes share it) and run the job in it."""
    try:
        run = _open_run(settings, config)
    except rundir.RunLocked as e:  # another process has this run folder open; nothing was written
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_LOCKED
    with run:
        print(f"Job {_name(settings.job)} in {run.path} on {distributed.describe()}")
        run.save_operative_config()
        code, message = _run_job(settings, run)
        run.save_operative_config()
        run.record_exit(_STATUS.get(code, "failed"), code, message)
    return code


_STATUS = {0: "finished", EXIT_INTERRUPTED: "interrupted"}


def _run_job(settings: rundir.RunSettings, run: rundir.RunDir) -> tuple[int, str]:
    """Run the job; returns (exit code, one-line reason for status.json)."""
    try:
        with _sigterm_as_keyboard_interrupt():
            rundir.seed_everything(settings.seed)  # last, so nothing before shifts the stream
            settings.job(run)
    except KeyboardInterrupt:
        print("Interrupted; the run resumes from its last checkpoint if started again.", file=sys.stderr)
        return EXIT_INTERRUPTED, "interrupted"
    except trainer.TrainingDiverged as e:  # a known end: the message says it all, no traceback
        print(f"error: {_reason(e)}", file=sys.stderr)
        return EXIT_JOB_FAILED, _reason(e)
    except Exception as e:
        traceback.print_exc()  # into log.txt too: the tee is still installed
        return EXIT_JOB_FAILED, f"{type(e).__name__}: {_reason(e)}"
    return 0, ""


def _reason(error: Exception) -> str:
    """The error's message without the "In call to configurable ..." lines gin appends."""
    return str(error).split("\n  In call to configurable")[0]


def _open_run(settings: rundir.RunSettings, config: Config) -> rundir.RunDir | rundir.WorkerRun:
    """Rank 0 (or the only process) opens the run folder; the others wait for it, then share it."""
    if distributed.is_main():
        run = rundir.RunDir(settings.path, seed=settings.seed, config_text=config.text, hparams=config.hparams)
        distributed.barrier()
        return run
    distributed.barrier()  # rank 0 has created the folder (and resumed or started its Aim run)
    return rundir.WorkerRun(settings.path, seed=settings.seed)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reflow_exp.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gin_file", action="append", required=True, help="gin file (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="binding like 'Trainer.steps=10'")
    parser.add_argument("--dry_run", action="store_true", help="parse, check and summarise; write nothing")
    return parser.parse_args(argv)


def _dry_run(settings: rundir.RunSettings) -> int:
    state = "exists: would resume" if settings.path.exists() else "would be created"
    print(f"Dry run: job {_name(settings.job)}, run folder {settings.path} ({state}); nothing is written.")
    print(f"Device: {distributed.describe()}")
    print(gin.config_str())
    if not _accepts_dry_run(settings.job):
        print(f"Job {_name(settings.job)} has no dry_run parameter; not called.")
        return 0
    try:
        rundir.seed_everything(settings.seed)
        settings.job(None, dry_run=True)
    except Exception:
        traceback.print_exc()
        return EXIT_JOB_FAILED
    return 0


def _accepts_dry_run(job: Any) -> bool:
    params = inspect.signature(job).parameters.values()
    return any(p.name == "dry_run" or p.kind is p.VAR_KEYWORD for p in params)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", repr(fn))


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so the Aim run and log are closed (SIGTERM skips atexit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- loading and checking the gin config ------------------------------------------------------


def load_config(gin_files: list[str], gin_params: list[str]) -> Config:
    """Parse ``gin_files`` then ``gin_params`` into gin's global config (finalized) and check it.

    Raises:
        ConfigError: naming file and line, before anything is built.
    """
    scanner = _Scanner()
    paths, texts = [], []
    for given in gin_files:
        path = _find_gin_file(given)
        if path is None:
            raise ConfigError(f"cannot find gin file {given!r} (looked in {os.getcwd()} and {GIN_DIR})")
        paths.append(str(path))
        texts.append(f"# ---- --gin_file {given}\n{path.read_text()}")
        scanner.scan_file(path)
    if gin_params:
        texts.append("# ---- --gin_param\n" + "\n".join(gin_params) + "\n")
        scanner.scan_params(gin_params)

    undefined = scanner.undefined_macros()  # gin's own message for these names no file
    if undefined:
        raise ConfigError("\n".join(undefined))
    # The scan caught the usual mistakes with exact locations; gin's own parse checks the rest.
    root_logger = logging.getLogger()
    root_logger.addFilter(_quiet_gin_search)
    try:
        gin.parse_config_files_and_bindings(paths, gin_params, finalize_config=True)
    except Exception as e:  # any failure to parse is a config error; gin's message has the location
        raise ConfigError(f"gin config: {e}") from None
    finally:
        root_logger.removeFilter(_quiet_gin_search)

    problems = scanner.missing_required() + scanner.wrong_types()
    if problems:
        raise ConfigError("\n".join(problems))
    return Config(text="\n".join(texts), hparams=scanner.hparams())


def _quiet_gin_search(record: logging.LogRecord) -> bool:
    """Drop gin's "Path not found" errors: it logs one for every search path it tries before
    the one that has the included file (the scan already reported files that really miss)."""
    return not record.getMessage().startswith("Path not found")


def _find_gin_file(name: str) -> Path | None:
    """Resolve like gin: absolute, else relative to the cwd, else to the repo's gin/ folder."""
    candidates = [Path(name)] if os.path.isabs(name) else [Path(name), GIN_DIR / name]
    return next((p for p in candidates if p.is_file()), None)


class _Ref(NamedTuple):
    scoped_selector: str
    evaluate: bool

    def __repr__(self) -> str:
        return f"@{self.scoped_selector}{'()' if self.evaluate else ''}"


class _Macro(NamedTuple):
    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


class _MarkerDelegate(config_parser.ParserDelegate):
    """Parses references and macros into plain markers: no registry lookups while scanning."""

    def configurable_reference(self, scoped_selector, evaluate):
        return _Ref(scoped_selector, evaluate)

    def macro(self, name):
        return _Macro(name)


class _Scanner:
    """Reads gin sources statement by statement (following includes) with gin's own parser,
    keeping every binding with its location, so errors can name file and line."""

    def __init__(self):
        self.bindings: list[config_parser.BindingStatement] = []
        self._dynamic_registration = False  # `from __gin__ import dynamic_registration` seen
        self._including: list[Path] = []  # the include chain, to report cycles

    def scan_file(self, path: Path) -> None:
        if path.resolve() in self._including:
            chain = " -> ".join(str(p) for p in [*self._including, path.resolve()])
            raise ConfigError(f"gin include cycle: {chain}")
        self._including.append(path.resolve())
        with open(path, encoding="utf-8") as f:  # f.name becomes Location.filename
            self._scan(config_parser.ConfigParser(f, _MarkerDelegate()), label=str(path))
        self._including.pop()

    def scan_params(self, params: list[str]) -> None:
        self._scan(config_parser.ConfigParser("\n".join(params) + "\n", _MarkerDelegate()), label="--gin_param")

    def _scan(self, parser: config_parser.ConfigParser, label: str) -> None:
        try:
            for stmt in parser:
                if isinstance(stmt, config_parser.IncludeStatement):
                    path = _find_gin_file(stmt.filename)
                    if path is None:
                        raise ConfigError(
                            f"{_where(stmt.location)}: cannot find included gin file {stmt.filename!r} "
                            f"(looked in {os.getcwd()} and {GIN_DIR})"
                        )
                    self.scan_file(path)
                elif isinstance(stmt, config_parser.ImportStatement):
                    self._import(stmt)
                elif isinstance(stmt, config_parser.BindingStatement):
                    self._check(stmt)
                    self.bindings.append(stmt)
                # BlockDeclaration: its bindings follow as BindingStatements.
        except SyntaxError as e:
            if e.filename:
                where, text = f"{e.filename}:{e.lineno}", f"\n    {(e.text or '').rstrip()}"
            else:  # --gin_param
                where, text = f"{label} {(e.text or '').strip()!r}", ""
            raise ConfigError(f"{where}: gin syntax error: {e.msg}{text}") from None
        except tokenize.TokenError as e:  # Python 3.12's tokenizer: unclosed brackets, strings
            line = e.args[1][0] if len(e.args) > 1 else "?"
            raise ConfigError(f"{label}:{line}: gin syntax error: {e.args[0]}") from None

    def _import(self, stmt: config_parser.ImportStatement) -> None:
        if stmt.module.startswith("__gin__."):
            self._dynamic_registration = True
            return
        try:
            importlib.import_module(stmt.module)
        except ImportError as e:
            raise ConfigError(f"{_where(stmt.location)}: cannot import {stmt.module!r}: {e}") from None

    def _check(self, stmt: config_parser.BindingStatement) -> None:
        """Unknown configurable, parameter or reference → ConfigError at this statement."""
        if not stmt.arg_name or self._dynamic_registration:
            return  # a macro definition; or selectors that only gin's dynamic registration resolves
        fn = self._configurable(stmt.selector, stmt.location)
        params = inspect.signature(fn).parameters
        if stmt.arg_name not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(
                f"{_where(stmt.location)}: {stmt.selector} has no parameter {stmt.arg_name!r}; "
                f"its parameters are: {', '.join(params) or '(none)'}"
            )
        for ref in _found(stmt.value, _Ref):
            self._configurable(ref.scoped_selector.split("/")[-1], stmt.location)

    @staticmethod
    def _configurable(selector: str, location: config_parser.Location) -> Any:
        try:
            return gin.get_configurable(selector)
        except (ValueError, KeyError) as e:
            if "mbiguous" in str(e):  # a partial selector matching several configurables
                raise ConfigError(f"{_where(location)}: {e}") from None
            raise ConfigError(
                f"{_where(location)}: no configurable {selector!r} is registered. Check the spelling, "
                "or import the module that defines it (reflow_exp.jobs imports all jobs)."
            ) from None

    def missing_required(self) -> list[str]:
        """Messages for ``gin.REQUIRED`` parameters that no binding sets.

        Checked for ``run`` and every configurable that is bound or referenced, in the scope it
        is used in (a scoped binding ``teacher/Head.x`` counts for ``@teacher/Head`` and for
        unscoped uses, which may be called inside a scope at run time).
        """
        bound: dict[Any, set[tuple[str, str]]] = collections.defaultdict(set)
        uses: dict[tuple[str, Any], tuple[str, config_parser.Location | None]] = {}

        def use(scope: str, selector: str, location) -> None:
            try:
                fn = gin.get_configurable(selector)
            except (ValueError, KeyError):
                return  # only resolvable with dynamic registration; gin checks it at call time
            uses.setdefault((scope, fn), (selector, location))

        for stmt in self.bindings:
            if not stmt.arg_name:
                continue
            use(stmt.scope, stmt.selector, stmt.location)
            with contextlib.suppress(ValueError, KeyError):
                bound[gin.get_configurable(stmt.selector)].add((stmt.scope, stmt.arg_name))
            for ref in _found(stmt.value, _Ref):
                *ref_scope, selector = ref.scoped_selector.split("/")
                # A scoped reference replaces the scope; an unscoped one runs in the binding's.
                use("/".join(ref_scope) or stmt.scope, selector, stmt.location)
        use("", "run", None)  # run.py always calls run_settings

        problems = []
        for (scope, fn), (selector, location) in uses.items():
            for arg in _required_params(fn):
                if _is_bound(bound[fn], scope, arg):
                    continue
                key = f"{scope}/{selector}.{arg}" if scope else f"{selector}.{arg}"
                where = f"{_where(location)}: " if location else ""
                problems.append(f"{where}{key} is required; add `{key} = ...` to a gin file or pass --gin_param")
        return problems

    def wrong_types(self) -> list[str]:
        """Messages for literal values that do not fit the bound parameter's annotation."""
        problems = []
        for stmt in self.bindings:
            if not stmt.arg_name or self._dynamic_registration:
                continue
            with contextlib.suppress(ValueError, KeyError):
                expected = config_types.annotation(gin.get_configurable(stmt.selector), stmt.arg_name)
                problem = config_types.type_problem(stmt.value, expected, _is_marker)
                if problem:
                    problems.append(f"{_where(stmt.location)}: {stmt.selector}.{stmt.arg_name}: {problem}")
        return problems

    def undefined_macros(self) -> list[str]:
        """Messages for ``%NAME`` uses that no ``NAME = ...`` defines (gin would fail at run time)."""
        defined = {stmt.selector for stmt in self.bindings if not stmt.arg_name}
        return [
            f"{_where(stmt.location)}: macro %{macro.name} is not defined; add `{macro.name} = ...` to a gin file"
            for stmt in self.bindings
            for macro in _found(stmt.value, _Macro)
            if macro.name not in defined and not macro.name.startswith("gin.")  # %gin.REQUIRED
        ]

    def hparams(self) -> dict:
        """Final bindings as ``{"Trainer": {"lr": 1e-4}, "teacher/Head": {...}}`` of plain values."""
        out: dict[str, dict] = {}
        for stmt in self.bindings:  # in parse order: later bindings override earlier ones
            if stmt.arg_name:
                key = f"{stmt.scope}/{stmt.selector}" if stmt.scope else stmt.selector
                out.setdefault(key, {})[stmt.arg_name] = _plain(stmt.value)
            else:
                out.setdefault("macros", {})[stmt.selector] = _plain(stmt.value)
        return out


def _required_params(fn: Any) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items() if p.default is gin.REQUIRED]


def _is_bound(bound: set[tuple[str, str]], scope: str, arg: str) -> bool:
    if not scope:
        return any(a == arg for _, a in bound)
    parts = scope.split("/")
    return any(("/".join(parts[:i]), arg) in bound for i in range(len(parts) + 1))


def _found(value: Any, kind: type) -> Iterator[Any]:
    """Every marker of `kind` (`_Ref` or `_Macro`) inside a parsed value, nested containers included
    (both markers are tuples themselves, so they are never walked into)."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _found(v, kind)
    elif isinstance(value, (list, tuple)) and not isinstance(value, (_Ref, _Macro)):
        for v in value:
            yield from _found(v, kind)


def _is_marker(value: Any) -> bool:
    return isinstance(value, (_Ref, _Macro))


def _plain(value: Any) -> Any:
    if isinstance(value, (_Ref, _Macro)):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _where(location: config_parser.Location) -> str:
    if location.filename:
        return f"{location.filename}:{location.line_num}"
    return f"--gin_param {location.line_content.strip()!r}"


if __name__ == "__main__":
    sys.exit(main())
