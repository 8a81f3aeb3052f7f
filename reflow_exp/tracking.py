"""Aim tracking. The only module that imports ``aim`` (lazily: a disabled tracker costs nothing).

One Aim run per run folder. The Aim repo defaults to the runs folder (the run folder's parent),
so ``aim up --repo runs`` shows every run. The Aim run hash is stored in the run folder
(``aim_run_hash.txt``), so a resumed run keeps appending to the same Aim run.

Aim facts this module works around (see PITFALLS.md):
- values must be native Python types (``np.float32`` raises): everything goes through ``float``;
- the SDK's terminal capture and system tracking wrap stdout/start threads: both off, our own
  tee in ``RunDir`` keeps the log;
- at interpreter exit Aim's cleanup starts a thread, which Python 3.12 refuses: we close
  explicitly and run Aim's remaining cleanup inline at exit instead;
- on a full disk Aim's close fails or blocks forever in RocksDB's flush (ignoring Ctrl-C), and so
  does Aim's finalizer of each storage object when it is garbage collected: ``close`` runs in a
  daemon thread and gives up after ``close_timeout_s``; an Aim run that did not close is kept
  referenced (never collected), and the process must end with ``os._exit`` (``close_hung()``),
  because Aim's exit cleanup would block the same way.
"""

from __future__ import annotations

import atexit
import gc
import numbers
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import gin
from reflow_exp.config_types import WritesFolder
from reflow_exp.files import deep_merge, json_safe

HASH_FILE = "aim_run_hash.txt"
CLOSE_TIMEOUT_S = 30.0

_unclosed: list = []  # Aim runs that did not close: collecting one would block in its finalizer
_storage_blocked = threading.Event()


class TrackerCloseError(RuntimeError):
    """Aim's run did not close: it failed or timed out (a full disk blocks its RocksDB flush)."""


def storage_blocked() -> None:
    """Say the disk is full. From now on, every Aim storage object the garbage collector frees
    runs a finalizer that blocks its thread forever in RocksDB's flush (Aim's ``RocksAutoClean``,
    a ``weakref.finalize``), and Aim's exit cleanup does the same. So: no automatic garbage
    collection for the rest of the process, which must end with ``os._exit`` (``close_hung``)."""
    gc.disable()
    _storage_blocked.set()


def close_hung() -> bool:
    """Whether Aim's storage may block this process's exit (``storage_blocked`` was called, or an
    Aim run did not close): end the process with ``os._exit`` after flushing its output."""
    return bool(_unclosed) or _storage_blocked.is_set()


@gin.configurable
class Tracker:
    """Logs hyper-parameters, metrics, texts and images of one run to Aim.

    Args:
        run_dir: the run folder (holds ``aim_run_hash.txt``).
        repo: Aim repo folder; None → the runs folder, i.e. ``run_dir.parent``.
        experiment: Aim experiment name (groups runs in the UI).
        run_name: Aim run name; None → the run folder's name.
        enabled: False makes every method a no-op (and never imports aim).
        close_timeout_s: how long ``close`` waits for Aim to finish writing; a full disk blocks it
            forever otherwise.
    """

    def __init__(
        self,
        run_dir: Annotated[str | Path, WritesFolder("the Aim run hash is written there")],
        repo: Annotated[str | Path | None, WritesFolder("the Aim repo is written there")] = None,
        experiment: str = "reflow_exp",
        run_name: str | None = None,
        enabled: bool = True,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ):
        if not close_timeout_s > 0:
            raise ValueError(f"Tracker.close_timeout_s must be > 0 seconds, got {close_timeout_s!r}")
        self.close_timeout_s = float(close_timeout_s)
        self.run_dir = Path(run_dir)
        self.repo = Path(repo) if repo is not None else self.run_dir.parent
        self.enabled = enabled
        self._run = None
        if not enabled:
            return

        import aim

        _init_repo(self.repo)
        hash_file = self.run_dir / HASH_FILE
        run_hash = hash_file.read_text().strip() if hash_file.exists() else None
        settings = dict(
            repo=str(self.repo), experiment=experiment, system_tracking_interval=None, capture_terminal_logs=False
        )
        try:
            self._run = aim.Run(run_hash=run_hash, **settings)  # None → new run; else resume it
        except aim.sdk.errors.MissingRunError:  # the folder moved to another runs dir, or the repo went
            print(f"Aim run {run_hash} is not in {self.repo}; logging to a new Aim run")
            self._run = aim.Run(**settings)
        _run_aim_cleanup_inline_at_exit()
        self._run.name = run_name or self.run_dir.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        hash_file.write_text(self._run.hash + "\n")

    @property
    def run_hash(self) -> str | None:
        """The Aim run hash (None when disabled)."""
        return self._run.hash if self._run is not None else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Merge ``params`` into the run's ``hparams`` (nested dicts of native Python values)."""
        if self._run is None:
            return
        current = self._run.get("hparams") or {}
        self._run["hparams"] = deep_merge(dict(current), json_safe(params))

    def log_text(self, name: str, text: str, step: int | None = None) -> None:
        """Track a text (e.g. the operative gin config); step None → Aim's next step."""
        if self._run is None:
            return
        import aim

        self._run.track(aim.Text(text), name=name, step=step)

    def track(self, name: str, value: Any, step: int, context: Mapping[str, Any] | None = None) -> None:
        """Track one scalar; numpy/torch scalars are converted to float."""
        if self._run is None:
            return
        self._run.track(_scalar(name, value), name=name, step=int(step), context=json_safe(context or {}))

    def track_image(self, name: str, image: Any, step: int, context: Mapping[str, Any] | None = None) -> None:
        """Track an image: a PIL image, an image file (an animated GIF stays animated), or an
        ``(H, W[, C])`` uint8 / [0, 1] float numpy array."""
        if self._run is None:
            return
        import aim
        import numpy as np
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
            image = Image.fromarray(image)
        animated = getattr(image, "n_frames", 1) > 1
        self._run.track(
            aim.Image(image, format="gif" if animated else "png"),
            name=name,
            step=int(step),
            context=json_safe(context or {}),
        )

    def close(self) -> None:
        """Finalise the Aim run (safe to call twice), waiting at most ``close_timeout_s``.

        Aim's close runs in a daemon thread, which also drops the last reference to the run: on a
        full disk both block in RocksDB's flush (the close, and the finalizer of each storage object
        freed), in C++, where neither a timeout nor Ctrl-C reaches them.

        Raises:
            TrackerCloseError: Aim failed or did not finish in time; ``close_hung()`` is now True.
        """
        if self._run is None:
            return
        owned, self._run = [self._run], None  # the thread takes the only reference
        if _storage_blocked.is_set():
            _unclosed.append(owned[0])  # never freed: its storage's finalizers would block
        errors: list[BaseException] = []

        def close() -> None:
            try:
                owned.pop().close()
            except BaseException as e:  # reported in the caller's thread
                errors.append(e)

        closer = threading.Thread(target=close, name="aim-close", daemon=True)
        closer.start()
        closer.join(self.close_timeout_s)
        if closer.is_alive() or errors:
            _unclosed.append(errors)  # their tracebacks hold Aim storage objects
            why = f"{type(errors[0]).__name__}: {errors[0]}" if errors else f"no answer in {self.close_timeout_s:g} s"
            raise TrackerCloseError(
                f"the Aim run in {self.repo} did not close ({why}); is its disk full? Its last values may be lost"
            )


def _scalar(name: str, value: Any) -> float:
    """``value`` as a Python float (Aim rejects numpy/torch scalars)."""
    if hasattr(value, "item"):  # numpy / torch scalars and 1-element tensors
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


def _run_aim_cleanup_inline_at_exit() -> None:
    """Aim's atexit hook runs its cleanup in a new thread, which Python 3.12 forbids at shutdown
    ("can't create new thread at interpreter shutdown"); run the same cleanup inline instead.

    Aim offers no switch for this. Without it every run ends with that RuntimeError printed at exit
    and Aim's cleanup skipped; `Tracker.close()` still finalises our own run first."""
    from aim.ext.cleanup import AutoClean

    atexit.unregister(AutoClean.cleanup)
    atexit.unregister(AutoClean._cleanup)
    atexit.register(AutoClean._cleanup)


def _init_repo(path: Path) -> None:
    """Create the Aim repo at `path` once, under a file lock: two runs starting together in a fresh
    runs folder would otherwise both create `.aim`, and the second, finding it half made (no VERSION
    yet), fails with a bare RuntimeError from Aim."""
    from aim.sdk.repo import Repo, RepoStatus
    from filelock import FileLock

    path.mkdir(parents=True, exist_ok=True)
    with FileLock(path / ".aim.lock"):
        if Repo.check_repo_status(str(path)) == RepoStatus.MISSING:
            Repo.from_path(str(path), init=True)
