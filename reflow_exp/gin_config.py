"""Loading and checking a gin config, before anything is built or written.

Gin itself reports syntax errors, unknown configurables, parameters and references, and missing
includes, naming file and line; its message is shown as is. Two checks gin lacks are added here:
parameters whose Python default is ``gin.REQUIRED`` but that no binding sets (gin notices only when
the configurable is called, deep inside a job), and literal values whose type does not fit the
parameter's annotation (``reflow_exp.config_types``); undefined macros, which gin reports without a
location, are named with theirs. ``run.py`` and the dashboard (its overrides form) both parse through
this module. Light to import: gin only, no torch.
"""

from __future__ import annotations

import collections
import importlib.util  # noqa: F401  gin's resource_reader uses importlib.util (PITFALLS.md)
import inspect
import logging
import os
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gin
from gin import config_parser
from reflow_exp import config_types

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
gin.add_config_file_search_path(str(GIN_DIR))  # for gin's own `include` resolution


class ConfigError(Exception):
    """A problem in the gin config; the message names file and line where known."""


class Config(NamedTuple):
    """A parsed, validated gin config."""

    text: str  # the gin files and bindings as given (→ config.gin)
    hparams: dict  # final bindings as nested plain values (→ Aim hparams)


def load_config(gin_files: list[str], gin_params: list[str]) -> Config:
    """Parse ``gin_files`` then ``gin_params`` into gin's global config (finalized) and check it.

    Raises:
        ConfigError: naming file and line, before anything is built.
    """
    paths, texts, bindings = [], [], []
    for given in gin_files:
        path = find_gin_file(given)
        if path is None:
            raise ConfigError(f"cannot find gin file {given!r} (looked in {os.getcwd()} and {GIN_DIR})")
        paths.append(str(path))
        texts.append(f"# ---- --gin_file {given}\n{path.read_text()}")
        bindings += _file_bindings(path, including=[])
    if gin_params:
        texts.append("# ---- --gin_param\n" + "\n".join(gin_params) + "\n")
        bindings += parse_bindings("\n".join(gin_params) + "\n", label="--gin_param")

    undefined = _undefined_macros(bindings)  # before gin's parse, whose message for them has no location
    if undefined:
        raise ConfigError("\n".join(undefined))
    root_logger = logging.getLogger()
    root_logger.addFilter(_quiet_gin_search)
    try:
        gin.parse_config_files_and_bindings(paths, gin_params, finalize_config=True)
    except Exception as e:  # gin's own message names the file and line
        raise ConfigError(f"gin config: {e}") from None
    finally:
        root_logger.removeFilter(_quiet_gin_search)

    problems = _missing_required(bindings) + _wrong_types(bindings)
    if problems:
        raise ConfigError("\n".join(problems))
    return Config(text="\n".join(texts), hparams=_hparams(bindings))


def find_gin_file(name: str) -> Path | None:
    """Resolve like gin: absolute, else relative to the cwd, else to the repo's gin/ folder."""
    candidates = [Path(name)] if os.path.isabs(name) else [Path(name), GIN_DIR / name]
    return next((p for p in candidates if p.is_file()), None)


def parse_bindings(text: str, label: str) -> list[config_parser.BindingStatement]:
    """The binding statements of gin source `text` (no includes followed, nothing registered or
    imported); references and macros become `Ref` / `Macro` markers. `label` names the source in
    syntax errors (a file path, or ``--gin_param``)."""
    return [stmt for stmt in statements(text, label) if isinstance(stmt, config_parser.BindingStatement)]


class Ref(NamedTuple):
    scoped_selector: str
    evaluate: bool

    def __repr__(self) -> str:
        return f"@{self.scoped_selector}{'()' if self.evaluate else ''}"


class Macro(NamedTuple):
    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


class _MarkerDelegate(config_parser.ParserDelegate):
    """Parses references and macros into plain markers: no registry lookups."""

    def configurable_reference(self, scoped_selector, evaluate):
        return Ref(scoped_selector, evaluate)

    def macro(self, name):
        return Macro(name)


def statements(source: str | Path, label: str) -> list:
    """Every statement of a gin file (a Path) or text; syntax errors as ConfigError at file:line."""
    try:
        if isinstance(source, Path):
            with open(source, encoding="utf-8") as f:  # f.name becomes Location.filename
                return list(config_parser.ConfigParser(f, _MarkerDelegate()))
        return list(config_parser.ConfigParser(source, _MarkerDelegate()))
    except SyntaxError as e:
        if e.filename:
            where, text = f"{e.filename}:{e.lineno}", f"\n    {(e.text or '').rstrip()}"
        else:  # --gin_param
            where, text = f"{label} {(e.text or '').strip()!r}", ""
        raise ConfigError(f"{where}: gin syntax error: {e.msg}{text}") from None
    except tokenize.TokenError as e:  # Python 3.12's tokenizer: unclosed brackets, strings
        line = e.args[1][0] if len(e.args) > 1 else "?"
        raise ConfigError(f"{label}:{line}: gin syntax error: {e.args[0]}") from None


def _file_bindings(path: Path, including: list[Path]) -> list[config_parser.BindingStatement]:
    """The bindings of a gin file and, in order, of the files it includes."""
    if path.resolve() in including:
        chain = " -> ".join(str(p) for p in [*including, path.resolve()])
        raise ConfigError(f"gin include cycle: {chain}")
    bindings = []
    for stmt in statements(path, label=str(path)):
        if isinstance(stmt, config_parser.IncludeStatement):
            included = find_gin_file(stmt.filename)
            if included is None:  # gin says so too, but only after it has tried every search path
                raise ConfigError(
                    f"{_where(stmt.location)}: cannot find included gin file {stmt.filename!r} "
                    f"(looked in {os.getcwd()} and {GIN_DIR})"
                )
            bindings += _file_bindings(included, [*including, path.resolve()])
        elif isinstance(stmt, config_parser.BindingStatement):
            bindings.append(stmt)
    return bindings


def _quiet_gin_search(record: logging.LogRecord) -> bool:
    """Drop gin's "Path not found" errors: it logs one for every search path it tries before
    the one that has the included file (files that really miss were reported above)."""
    return not record.getMessage().startswith("Path not found")


def registered_configurables() -> dict[str, Any]:
    """Every configurable gin knows (name -> function or class), from gin's registry (gin has no
    public listing); call after importing the modules that define them."""
    from gin import config as gin_registry

    return {c.name: c.wrapped for _, c in gin_registry._REGISTRY.items()}


def _configurable(selector: str) -> Any | None:
    """The function or class bound to `selector`; None when only gin's dynamic registration
    resolves it (gin checked it while parsing)."""
    try:
        return gin.get_configurable(selector)
    except (ValueError, KeyError):
        return None


def _missing_required(bindings: list[config_parser.BindingStatement]) -> list[str]:
    """Messages for ``gin.REQUIRED`` parameters that no binding sets.

    Checked for ``run`` and every configurable that is bound or referenced, in the scope it is used
    in (a scoped binding ``teacher/Head.x`` counts for ``@teacher/Head`` and for unscoped uses, which
    may be called inside a scope at run time).
    """
    bound: dict[Any, set[tuple[str, str]]] = collections.defaultdict(set)
    uses: dict[tuple[str, Any], tuple[str, config_parser.Location | None]] = {}

    def use(scope: str, selector: str, location) -> None:
        fn = _configurable(selector)
        if fn is not None:
            uses.setdefault((scope, fn), (selector, location))

    for stmt in bindings:
        if not stmt.arg_name:
            continue
        use(stmt.scope, stmt.selector, stmt.location)
        fn = _configurable(stmt.selector)
        if fn is not None:
            bound[fn].add((stmt.scope, stmt.arg_name))
        for ref in _found(stmt.value, Ref):
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


def _wrong_types(bindings: list[config_parser.BindingStatement]) -> list[str]:
    """Messages for literal values that do not fit the bound parameter's annotation (type, range)."""
    problems = []
    for stmt in bindings:
        fn = _configurable(stmt.selector) if stmt.arg_name else None
        if fn is None:
            continue
        expected = config_types.annotation(fn, stmt.arg_name)
        problem = config_types.type_problem(stmt.value, expected, lambda value: isinstance(value, (Ref, Macro)))
        problem = problem or config_types.range_problem(fn, stmt.arg_name, stmt.value)
        if problem:
            problems.append(f"{_where(stmt.location)}: {stmt.selector}.{stmt.arg_name}: {problem}")
    return problems


def _undefined_macros(bindings: list[config_parser.BindingStatement]) -> list[str]:
    """Messages for ``%NAME`` uses that no ``NAME = ...`` defines (gin names no location for them)."""
    defined = {stmt.selector for stmt in bindings if not stmt.arg_name}
    return [
        f"{_where(stmt.location)}: macro %{macro.name} is not defined; add `{macro.name} = ...` to a gin file"
        for stmt in bindings
        for macro in _found(stmt.value, Macro)
        if macro.name not in defined and not macro.name.startswith("gin.")  # %gin.REQUIRED
    ]


def _hparams(bindings: list[config_parser.BindingStatement]) -> dict:
    """Final bindings as ``{"Trainer": {"lr": 1e-4}, "teacher/Head": {...}}`` of plain values."""
    out: dict[str, dict] = {}
    for stmt in bindings:  # in parse order: later bindings override earlier ones
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
    """Every marker of `kind` (`Ref` or `Macro`) inside a parsed value, nested containers included
    (both markers are tuples themselves, so they are never walked into)."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _found(v, kind)
    elif isinstance(value, (list, tuple)) and not isinstance(value, (Ref, Macro)):
        for v in value:
            yield from _found(v, kind)


def _plain(value: Any) -> Any:
    if isinstance(value, (Ref, Macro)):
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
