"""A clear error when MuJoCo cannot render offscreen (no or broken OpenGL backend)."""

from __future__ import annotations

import os

# Debian packages that provide each MUJOCO_GL backend.
PACKAGES = {"egl": "libegl1 libgl1-mesa-dri", "osmesa": "libosmesa6", "glfw": "libglfw3 (and a display)"}

_checked: set[str] = set()


def check_gl_backend() -> None:
    """Import MuJoCo and make (and free) a 1x1 offscreen context with the MUJOCO_GL backend, once
    per process and backend; on any failure raise one RuntimeError line naming MUJOCO_GL and the
    Debian package to install. Call it before anything imports MuJoCo: the import itself loads
    the backend, and fails deep inside PyOpenGL when it is missing."""
    backend = os.environ.get("MUJOCO_GL", "")
    if backend in _checked:
        return
    try:
        if backend not in PACKAGES:
            raise ValueError(f"MUJOCO_GL must be one of {sorted(PACKAGES)}")
        import mujoco

        context = mujoco.GLContext(1, 1)
        context.free()
    except Exception as error:  # noqa: BLE001 - whatever broke, the fix is the same
        raise RuntimeError(
            f"MuJoCo cannot render offscreen with MUJOCO_GL={backend or '<unset>'} ({type(error).__name__}: "
            f"{error}); use MUJOCO_GL=egl (Debian: apt-get install {PACKAGES['egl']}) or MUJOCO_GL=osmesa "
            f"(Debian: apt-get install {PACKAGES['osmesa']})"
        ) from None
    _checked.add(backend)
