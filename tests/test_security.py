"""Security and hygiene: no unsafe deserialization or shell in the sources, and every string from a run
(scenario names, reasons, params, strategies: a user module or a copied run file can hold anything) is
escaped in the HTML and Markdown reports."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.results import case_key, read_run

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("harness", "suites", "tools", "bench", "examples")

#: pattern -> why it is refused. ``torch.load(`` is allowed only with ``weights_only=True`` on the same call.
FORBIDDEN = {
    r"\bimport\s+pickle\b|\bfrom\s+pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|\bmarshal\.loads?\b":
        "pickle-like deserialization runs code from the file",
    r"\bshell\s*=\s*True\b": "a shell interprets the command line",
    r"(?<![\w.])eval\s*\(": "eval runs data as code",
    r"(?<![\w.])exec\s*\(": "exec runs data as code",
    r"\bos\.system\s*\(|\bos\.popen\s*\(": "a shell interprets the command line",
    r"\byaml\.load\s*\((?![^)]*SafeLoader)": "yaml.load without SafeLoader builds arbitrary objects",
}


def _sources() -> list[Path]:
    return sorted(p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*.py"))


def _code(text: str) -> str:
    """The text with comments and string literals blanked out (the scan looks at code, not prose)."""
    import io
    import tokenize
    lines = [list(line) for line in text.splitlines(keepends=True)]
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                (r0, c0), (r1, c1) = tok.start, tok.end
                for r in range(r0, r1 + 1):
                    row = lines[r - 1]
                    lo, hi = (c0 if r == r0 else 0), (c1 if r == r1 else len(row))
                    row[lo:hi] = [" " if ch != "\n" else ch for ch in row[lo:hi]]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return text
    return "".join("".join(row) for row in lines)


def test_the_scan_covers_the_sources() -> None:
    files = _sources()
    assert len(files) > 40 and any(p.parts[-3:] == ("harness", "run", "engine.py") for p in files)


def test_the_scanner_finds_what_it_looks_for() -> None:
    """A scan that cannot fail proves nothing: each pattern catches its example, and prose does not trip it."""
    bad = ["import pickle", "subprocess.run(cmd, shell=True)", "eval(text)", "exec(code)", "os.system('ls')",
           "yaml.load(f)", "torch.load(path)", "torch.load(path, map_location='cpu')"]
    for line in bad:
        assert _violations(line), line
    for line in ["x = 1  # never eval(x) or shell=True", "s = 'pickle'", "torch.load(p, weights_only=True)",
                 "model.eval()", "evaluate(x)"]:
        assert not _violations(line), line


def _violations(text: str) -> list[str]:
    code = _code(text)
    found = [f"{why}: {m.group(0)!r}" for pat, why in FORBIDDEN.items() for m in re.finditer(pat, code)]
    for m in re.finditer(r"\btorch\.load\s*\(", code):  # the call's arguments, up to its closing parenthesis
        depth, i = 1, m.end()
        while i < len(code) and depth:
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        if not re.search(r"weights_only\s*=\s*True", code[m.end():i]):
            found.append("torch.load without weights_only=True unpickles arbitrary objects")
    return found


def test_no_unsafe_deserialization_shell_or_eval_in_the_sources() -> None:
    problems = {str(p.relative_to(ROOT)): v for p in _sources() if (v := _violations(p.read_text()))}
    assert problems == {}


# -- hostile strings in reports -----------------------------------------------------------------------
SCRIPT = "<script>alert(1)</script>"
HOSTILE = f"{SCRIPT} | pipes | `tick` ](javascript:alert(2)) *bold* _u_ \n second line"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden CPU run with hostile strings in scenario names, case ids, reasons, params and a strategy."""
    d = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(Path(__file__).parent / "golden" / "cpu_small", d)
    header, records = read_run(d)
    out = []
    for i, r in enumerate(records):
        if i % 2 == 0:
            r["scenario"] = r["case"] = f"{SCRIPT}|x{i}"
            r["params"] = {"<b>k</b>": HOSTILE, "n": i}
            r["reason"] = HOSTILE
        if r["strategy"] == "fp16":
            r["strategy"] = "fp16|`<img src=x onerror=alert(3)>`"
        if i % 3 == 0 and r["outcome"] != "pass":
            r["expected"] = {"outcome": r["outcome"], "reason": HOSTILE}
        out.append(r)
    assert len({case_key(r) for r in out}) == len(out)
    header["config"]["scenarios"] = [SCRIPT]
    header["environment"]["cpu"] = HOSTILE
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    (d / "run.json").write_text(json.dumps(header))
    return d


@pytest.fixture(scope="module")
def rendered(hostile_run: Path) -> tuple[str, str]:
    html, md = hostile_run.parent / "r.html", hostile_run.parent / "r.md"
    assert main(["report", str(hostile_run), "--html", str(html), "--markdown", str(md)]) == 0
    return html.read_text(), md.read_text()


def test_html_escapes_every_string_from_the_run(rendered: tuple[str, str]) -> None:
    page = rendered[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the hostile names are shown, escaped
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>k</b>" not in page
    assert not re.search(r"""(href|src)\s*=\s*["']?\s*javascript:""", page, re.I)
    assert not re.search(r"<[^>]*\bonerror\s*=", page, re.I)  # no attribute injected into a tag


def test_markdown_cells_cannot_break_the_table_or_inject_markup(rendered: tuple[str, str]) -> None:
    md = rendered[1]
    assert "&lt;script&gt;" in md and SCRIPT not in md and "<img" not in md
    assert not re.search(r"(?<!\\)\]\(javascript:", md)  # no link formed
    assert not re.search(r"(?<!\\)`", md)  # no code span opened
    tables = 0
    for block in re.split(r"\n\s*\n", md):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if not rows:
            continue
        tables += 1
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
        assert len(widths) == 1, block  # every row has the header's number of cells
    assert tables >= 4
    assert md.count("second line") > 0 and not any(line.startswith(" second line") for line in md.splitlines())
