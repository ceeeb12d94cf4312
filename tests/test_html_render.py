"""The HTML report opened in headless Chromium: the plots are in the rendered DOM and the page is not blank.

Chromium comes from Debian's ``chromium`` package; the fixture installs it with apt-get when it is
missing and skips, naming the reason, only when that fails.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.cli import main

GOLDEN = Path(__file__).parent / "golden" / "cpu_small"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _find() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _find()
    if exe is None and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            except (OSError, subprocess.SubprocessError) as exc:
                pytest.skip(f"chromium is not installed and `{' '.join(cmd)}` failed: {exc}")
            if done.returncode != 0:
                pytest.skip(f"chromium is not installed and `{' '.join(cmd)}` failed: "
                            f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        exe = _find()
    if exe is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    return exe


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", str(GOLDEN), "--html", str(path)]) == 0
    return path


def _chromium(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True,
                          text=True, timeout=180)


def test_the_rendered_dom_holds_every_plot(chromium, page, tmp_path):
    done = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    dom = done.stdout
    assert done.returncode == 0 and dom.startswith("<!DOCTYPE html>") or "<html" in dom[:200], done.stderr[-500:]
    figures = re.findall(r"<figure>(.*?)</figure>", dom, re.S)
    assert len(figures) == 7 and all(f.lstrip().startswith("<svg") for f in figures)
    # each plot drew marks: paths (bars, lines, markers; the heatmap is an image) and text (ticks, labels)
    assert all(f.count("<path") + f.count("<image") >= 5 and f.count("<text") >= 10 for f in figures)
    for title in ("Failure rate per strategy and family", "FP16 against BF16", "Error against reduction length",
                  "Gradient magnitudes against the formats' ranges", "Loss-scale trajectories",
                  "Per-layer loss-scale windows", "Failing cases"):
        assert f"<h2>{title.replace(chr(39), '&#x27;')}</h2>" in dom or f"<h2>{title}</h2>" in dom


def test_the_screenshot_is_not_blank(chromium, page, tmp_path):
    import numpy as np
    from PIL import Image
    shot = tmp_path / "shot.png"
    done = _chromium(chromium, tmp_path, "--window-size=1000,1600", f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-500:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 1600)
    px = np.asarray(img, dtype=np.int32).reshape(-1, 3)
    ink = float((px.sum(axis=1) < 600).mean())  # anything clearly darker than the page's background
    colours = len(np.unique(px, axis=0))
    assert ink > 0.03 and colours > 200, (ink, colours)
    r, g, b = px.T
    # the plots are in colour: the FP16 blue and BF16 red bars of the first plot are on screen
    assert ((b > 150) & (r < 100)).sum() > 500 and ((r > 180) & (g < 90) & (b < 90)).sum() > 500
