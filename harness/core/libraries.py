"""The optional libraries whose recipes strategies drive (``lib=`` in a spec): where they come from,
whether and which version is installed, and the line that installs them.

Only package metadata is read here (nothing is imported), so asking costs nothing and a missing
library is an answer, never an ``ImportError``. The code that drives a library lives in
:mod:`harness.recipes`, one module per library, imported only by a run that uses it.

>>> LIBRARIES["torchao"].install
"pip install 'torchao>=0.18'"
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass

__all__ = ["Library", "LIBRARIES", "RecipeUnsupported", "installed", "missing_reason", "version"]


class RecipeUnsupported(Exception):
    """A library recipe cannot run what a scenario or model built (an optimizer it has no equivalent
    for, a GEMM shape its kernels refuse; the reason says which and how to fix it): recorded as
    ``unsupported``, never as an error of the scenario."""


@dataclass(frozen=True)
class Library:
    """An optional dependency: the import name, the distribution name, the oldest version supported."""

    module: str
    dist: str
    minimum: str
    what: str

    @property
    def install(self) -> str:
        return f"pip install '{self.dist}>={self.minimum}'"


#: ``lib=`` values (besides ``none``, the harness's own implementation) and what each drives.
LIBRARIES: dict[str, Library] = {
    "torchao": Library("torchao", "torchao", "0.18", "float8 training (tensorwise, rowwise, rowwise_with_gw_hp), "
                       "MX formats, AdamW with BF16 stochastic rounding, 8-bit AdamW"),
    "optimi": Library("optimi", "torch-optimi", "0.3", "optimizers with Kahan-compensated BF16 updates"),
    "bnb": Library("bitsandbytes", "bitsandbytes", "0.45", "8-bit optimizer states"),
}


def _parse(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def version(lib: str) -> str | None:
    """The installed version of ``lib`` (a ``lib=`` value), or None when it is not installed."""
    spec = LIBRARIES[lib]
    if importlib.util.find_spec(spec.module) is None:
        return None
    try:
        return importlib.metadata.version(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed(lib: str) -> bool:
    v = version(lib)
    return v is not None and _parse(v) >= _parse(LIBRARIES[lib].minimum)


def missing_reason(lib: str) -> str | None:
    """Why ``lib`` cannot drive a recipe here (not installed, or too old), with the install line; None if it can."""
    if lib not in LIBRARIES:
        raise ValueError(f"unknown library {lib!r}; libraries: {', '.join(LIBRARIES)}")
    v = version(lib)
    spec = LIBRARIES[lib]
    if v is None:
        return f"{spec.dist} is not installed: {spec.install} (or pip install 'mp-harness[recipes]')"
    if _parse(v) < _parse(spec.minimum):
        return f"{spec.dist} {v} is older than {spec.minimum}: {spec.install}"
    return None
