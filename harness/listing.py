"""``python -m harness list`` without importing torch: the listing kept on disk, keyed by the source it
comes from.

The scenario listing is a pure function of the ``harness`` and ``suites`` sources (the modules discovery
imports), torch's and Python's versions. The first ``list`` imports everything and keeps both of its
outputs (text and ``--json``) under the SHA-256 of those (:mod:`harness.cachedir`); a later ``list`` whose
key matches prints them without importing torch (seconds of start-up). ``--import MODULE`` always
discovers: the user's modules are not in the key.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

from . import cachedir

__all__ = ["load", "store"]


def _key() -> str:
    h = hashlib.sha256()
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = ""
    h.update(f"{sys.version}|{torch_version}|".encode())
    roots = [Path(__file__).resolve().parent]
    spec = importlib.util.find_spec("suites")  # finds, does not import
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            h.update(str(p).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def _path() -> Path | None:
    where = cachedir.cache_dir()
    return where / f"list-{_key()}.json" if where is not None else None


def load(as_json: bool) -> str | None:
    """The kept listing (``--json`` or text) whose key matches, or None."""
    try:
        path = _path()
        if path is None or not path.exists():
            return None
        kept = json.loads(path.read_text())
        return kept["json" if as_json else "text"]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or torn: list the slow way
        return None


def store(text: str, as_json: str) -> None:
    """Keep both outputs of ``list``; a cache that cannot be written is skipped silently (only a speed-up)."""
    try:
        path = _path()
        if path is not None:
            data = json.dumps({"text": text, "json": as_json}).encode()
            cachedir.write_atomic(path, lambda f: f.write(data))
    except OSError:
        pass
