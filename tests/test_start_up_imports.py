"""Start-up: ``--help`` and a kept ``list`` import no torch; the kept listing is the listing, bit for bit,
and is keyed by what it comes from (harness.listing, harness.cli.command_index)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import listing
from harness.cli import COMMAND_MODULES, command_index

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import sys, runpy\nsys.argv = ['harness'] + sys.argv[1:]\ntry:\n    runpy.run_module('harness', "
         "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('IMPORTED', sorted(m for m in sys.modules if "
         "m.split('.')[0] in ('torch', 'transformers', 'triton', 'torchao')), file=sys.stderr)")


def _run(args: list[str], cache: str) -> tuple[str, list[str]]:
    env = dict(os.environ, MP_HARNESS_CACHE=cache, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next(x for x in p.stderr.splitlines() if x.startswith("IMPORTED"))
    return p.stdout, eval(line[len("IMPORTED "):])  # noqa: S307  (our own repr of a list of names)


@pytest.mark.parametrize("args", [["--help"], ["gate", "--help"], ["report", "--help"]])
def test_help_imports_no_torch(args: list[str]) -> None:
    out, imported = _run(args, "off")
    assert imported == [] and "usage:" in out


def test_help_lists_every_command_with_its_help_line() -> None:
    out, _ = _run(["--help"], "off")
    index = command_index()
    assert {m for m, _ in index.values()} == set(COMMAND_MODULES)  # every command module read without import
    for name, (_, help_line) in index.items():
        assert name in out and help_line.split()[0] in out


def test_kept_listing_is_the_listing_and_imports_no_torch(tmp_path: Path) -> None:
    fresh, imported = _run(["list"], "off")
    assert "torch" in imported
    _run(["list"], str(tmp_path))  # fills the cache
    kept, imported = _run(["list"], str(tmp_path))
    assert kept == fresh and imported == []
    kept_json, imported = _run(["list", "--json"], str(tmp_path))
    assert imported == [] and kept_json == _run(["list", "--json"], "off")[0]
    assert json.loads(kept_json)[0]["name"]


def test_listing_key_follows_torch_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MP_HARNESS_CACHE", str(tmp_path))
    listing.store("text", "[]")
    assert listing.load(False) == "text" and listing.load(True) == "[]"
    real = listing.importlib.metadata.version
    monkeypatch.setattr(listing.importlib.metadata, "version", lambda name: "0.0" if name == "torch" else real(name))
    assert listing.load(False) is None
