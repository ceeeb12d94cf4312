"""Where the harness keeps what it computed once and can reuse (imports no torch: ``list`` reads it).

``--cache DIR`` (:func:`configure`), else ``$MP_HARNESS_CACHE``, else ``$XDG_CACHE_HOME/mp-harness``
(``~/.cache/mp-harness``); ``--no-cache`` or ``MP_HARNESS_CACHE=off`` turns every cache off. What is kept:
check-model's references (:mod:`harness.run.refcache`) and the scenario listing (:mod:`harness.listing`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["OFF", "ENV", "configure", "cache_dir", "write_atomic"]

#: The value of ``MP_HARNESS_CACHE`` (or of :func:`configure`) that turns the cache off.
OFF = "off"
ENV = "MP_HARNESS_CACHE"

_configured: str | None = None  # set by --cache / --no-cache; forked workers inherit it


def configure(where: str | Path | None) -> None:
    """``--cache DIR`` (a path), ``--no-cache`` (:data:`OFF`), or None for the default location."""
    global _configured
    _configured = None if where is None else str(where)


def configured_value() -> str | None:
    """What :func:`configure` set (None: nothing)."""
    return _configured


def cache_dir() -> Path | None:
    """The directory things are kept in, or None where the cache is off."""
    where = _configured or os.environ.get(ENV) or None
    if where == OFF:
        return None
    if where:
        return Path(where).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mp-harness"


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it to ``path``: a reader sees the
    old file or the whole new one, never half of one. OSError propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
