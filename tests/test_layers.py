"""The layers' imports run one way (README, "Layout"): every import of every module under harness/, at module
level or inside a function, is checked against the table below. The modules are parsed (``ast``), never
imported, so this needs no torch.

A package is ``harness/<name>/`` or a top-level module ``harness/<name>.py``; ``harness`` is the package's own
``__init__`` (``__version__``, the lazy ``harness.check_model``) and ``suites`` the scenario definitions. Imports
by name through ``importlib`` are not seen: ``cli`` imports its command modules that way (``COMMAND_MODULES``),
which is why the table lets it import ``gate`` and ``models``.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "harness"

#: What each package may import, anywhere in its modules (besides itself, the standard library and third parties).
ALLOWED: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in {
    # the layers that run torch, bottom up
    "values": (),
    "core": ("values",),
    "recipes": ("core", "values"),
    "judge": ("core", "values", "results"),  # results: the names of outcomes, failures and error metrics
    "device": ("core", "values"),
    "run": ("core", "values", "judge", "results", "cachedir", "harness"),
    "distributed": ("core", "values", "judge", "results", "run"),
    # on top
    "models": ("core", "values", "judge", "run", "results", "report"),
    "expectations": ("core", "cli"),
    "pytest_plugin": ("core", "run"),
    "cli": ("core", "run", "distributed", "models", "gate", "report", "results", "results_schema", "exits",
            "listing"),
    "__main__": ("cli",),
    # the views and their helpers: no torch layer
    "report": ("results",),
    "gate": ("baseline", "report", "results"),
    "baseline": ("results",),
    "results": ("results_schema", "harness"),
    "results_schema": (),
    "exits": ("results_schema", "harness"),
    "listing": ("cachedir",),
    "cachedir": (),
    "harness": (),
}.items()}

#: Imports allowed only inside a function of the one module named: (package, imported package) -> {module: why}.
LAZY: dict[tuple[str, str], dict[str, str]] = {
    ("core", "recipes"): {
        "harness.core.execution": "Execution.matmul runs torchao's float8 GEMM when the strategy says lib=torchao",
        "harness.core.gemm_routing": "_torchao_convert lets torchao convert the linear layers (lib=torchao)",
        "harness.core.strategy": "_compile_missing asks the torch_compile recipe whether compile=yes can run",
    },
    ("core", "suites"): {"harness.core.scenario": "discover() scans the suites package to register its scenarios"},
    ("run", "recipes"): {"harness.run.training": "a library's optimizer or torch.compile, only for a run naming it"},
    ("models", "cli"): {m: "the command's argument types, where the command is added" for m in
                        ("harness.models.fix", "harness.models.model_check", "harness.models.zoo_run")},
    ("distributed", "cli"): {"harness.distributed.__main__": "the launcher's parser and argument types"},
    ("harness", "models"): {"harness": "harness.check_model on first use: `import harness` stays free of torch"},
}

#: The views run where torch is absent (reports and the gate on a laptop): none imports torch at module level
#: (``results.environment``, which only a run calls, imports it inside).
VIEWS = ("report", "gate", "baseline", "results", "results_schema")


def package_of(module: str) -> str:
    """``harness.core.strategy`` -> ``core``, ``harness.gate`` -> ``gate``, ``harness`` -> ``harness``,
    ``suites.reduction`` -> ``suites``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "harness" and len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=None)
def _parse(source: str) -> ast.Module:
    return ast.parse(source)  # every test reads the same files: parse each once


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """(absolute name, line, inside a function) of every import in ``source``, relative ones resolved;
    ``from X import y`` names ``X.y`` where that is a module in ``known``, else ``X``."""
    tree = _parse(source)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")[:len(module.split(".")) - child.level + is_package]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in known else base, child.lineno, lazy))
            visit(child, inner)
    visit(tree, False)
    return found


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import of ``sources`` (``{module: (source, is_package)}``) the tables above forbid, one line each."""
    known = set(sources)
    bad = []
    for module, (source, is_package) in sorted(sources.items()):
        pkg = package_of(module)
        if pkg not in ALLOWED:
            bad.append(f"{module}: package {pkg!r} is not in the layer table (tests/test_layers.py ALLOWED)")
            continue
        for name, line, lazy in imports(module, source, is_package, known):
            target = package_of(name)
            if pkg in VIEWS and target == "torch" and not lazy:
                bad.append(f"{module}:{line} imports torch at module level (a view runs where torch is absent)")
            if name.split(".")[0] not in ("harness", "suites"):
                continue  # the standard library or a third party
            if target == pkg or target in ALLOWED[pkg]:
                continue
            why = LAZY.get((pkg, target), {}).get(module)
            if why and lazy:
                continue
            allowed = ", ".join(sorted(ALLOWED[pkg])) or "no other harness package"
            where = " at module level (allowed only inside a function)" if why else ""
            bad.append(f"{module}:{line} imports {name}{where}; {pkg} may import: {allowed}")
    return bad


def harness_sources() -> dict[str, tuple[str, bool]]:
    """``{module: (source, is_package)}`` of every module under harness/."""
    out = {}
    for path in sorted(HARNESS.rglob("*.py")):
        parts = list(path.relative_to(HARNESS.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path.read_text(encoding="utf-8"), is_package)
    return out


def test_harness_imports_follow_the_layers() -> None:
    assert violations(harness_sources()) == []


def test_every_lazy_exception_is_still_used() -> None:
    """A listed exception no module needs any more is removed, so the table (and the README) stay true."""
    sources = harness_sources()
    used = {(package_of(m), package_of(name), m) for m, (src, pkg) in sources.items()
            for name, _, lazy in imports(m, src, pkg, set(sources)) if lazy}
    stale = [(a, b, m) for (a, b), modules in LAZY.items() for m in modules if (a, b, m) not in used]
    assert stale == []


@pytest.mark.parametrize("module, source, expect", [
    ("harness.values.x", "import harness.core.strategy\n", "harness.values.x:1 imports harness.core.strategy"),
    ("harness.values.x", "def f():\n    from ..core import strategy\n", "harness.values.x:2 imports harness.core"),
    ("harness.values.x", "from .. import __version__\n", "harness.values.x:1 imports harness;"),
    ("harness.core.execution", "from ..recipes import torchao_float8\n", "at module level"),
    ("harness.core.keep", "def f():\n    from ..recipes import torch_compile\n", "harness.core.keep:2 imports"),
    ("harness.core.x", "from ..judge import verdict\n", "core may import: values"),
    ("harness.report.x", "import torch\n", "harness.report.x:1 imports torch"),
    ("harness.report.x", "from ..core import strategy\n", "harness.report.x:1 imports harness.core"),
    ("harness.newpkg.x", "import os\n", "package 'newpkg' is not in the layer table"),
])
def test_a_forbidden_import_is_reported(module: str, source: str, expect: str) -> None:
    sources = harness_sources()
    sources[module] = (source, False)
    bad = violations(sources)
    assert len(bad) == 1 and expect in bad[0], bad


def test_relative_imports_resolve_to_absolute_names() -> None:
    known = {"harness.values.fp8", "harness.values"}
    src = "from . import fp8\nfrom .fp8 import E4M3\nfrom ..core.strategy import parse\nfrom .. import __version__\n"
    assert [n for n, _, _ in imports("harness.values.mx", src, False, known)] == [
        "harness.values.fp8", "harness.values.fp8", "harness.core.strategy", "harness"]
    assert imports("harness.values", "from .fp8 import E4M3\n", True, known)[0][0] == "harness.values.fp8"
