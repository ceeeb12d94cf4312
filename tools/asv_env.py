"""asv bookkeeping for this project: register the machine, and tidy result files.

``python tools/asv_env.py machine [--name NAME]``
    Writes this machine's entry into asv's machine file (``~/.asv-machine.json``): asv's own fields
    (os without its release, arch, cpu, num_cpu, RAM in GiB) plus ``gpu``, ``torch`` and ``cuda``, which
    asv copies into the ``params`` of every result file it saves, so each result says what it ran on.
    The name defaults to the hardware (``nvidia-h200``, ``cpu-amd-epyc-2c``), not the host name, so runs
    on like machines share one history. Prints the name (pass it to ``asv run --machine``).

``python tools/asv_env.py tidy [--results-dir results/asv] [--python X.Y]``
    With ``environment_type: existing`` asv names the environment after the interpreter's absolute path
    (``existing-py_home_me_proj_.venv_bin_python``) and stores that path in the result file. ``tidy``
    renames such results to ``existing-py<X.Y>`` (the running interpreter's version), so committed
    results hold no local path and results from different checkouts of one commit land in one file
    (benchmarks of the newer file replace the older's, the others are kept).

Exit 0 on success, 2 with one line on bad input.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness of this checkout

from harness.cli import Parser  # noqa: E402


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(name: str | None = None) -> dict[str, str]:
    """asv's machine fields for this machine, plus gpu, torch and cuda (all strings)."""
    import torch
    from asv.machine import Machine

    from harness.results import environment
    info = {k: str(v) for k, v in Machine.get_defaults().items()}
    # asv splits its graphs by every field: keep out what changes between sessions on like machines
    # (the kernel release; RAM that a VM reports as it grows)
    info["os"] = info["os"].split()[0]
    info["ram"] = f"{round(int(info['ram']) / 2**30)} GiB" if info["ram"].isdigit() else info["ram"]
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    info.update(gpu=str(env.get("gpu") or "none"), torch=str(env["torch"]), cuda=str(env.get("cuda") or "none"))
    if env.get("gpu"):
        default = _slug(env["gpu"])
    else:
        default = f"cpu-{_slug(info['cpu'])[:40]}-{info['num_cpu']}c"
    info["machine"] = name or default
    return info


def register(name: str | None = None) -> str:
    """Save this machine's info in asv's machine file; returns the machine name."""
    from asv.machine import MachineCollection
    info = machine_info(name)
    MachineCollection.save(info["machine"], info)
    return info["machine"]


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable asv result file ({exc})") from None


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(new)
    for key in ("results", "durations"):
        out[key] = {**(old.get(key) or {}), **(new.get(key) or {})}
    return out


def tidy(results_dir: Path, python: str | None = None) -> list[tuple[Path, Path]]:
    """Rename results of path-named existing environments (see module doc); returns (old, new) paths."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    env_name = f"existing-py{python}"
    moved = []
    for machine in sorted(p for p in results_dir.iterdir() if (p / "machine.json").is_file()):
        for path in sorted(machine.glob("*.json")):
            if path.name == "machine.json":
                continue
            d = _load(path)
            if not str(d.get("env_name", "")).startswith("existing-py_"):
                continue
            d["env_name"], d["python"] = env_name, python
            d.setdefault("params", {})["python"] = python
            target = machine / f"{d['commit_hash'][:8]}-{env_name}.json"
            if target.is_file():
                d = _merge(_load(target), d)
            target.write_text(json.dumps(d) + "\n")
            path.unlink()
            moved.append((path, target))
    return moved



def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="tools/asv_env.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    m = sub.add_parser("machine", help="register this machine for asv (GPU, torch and CUDA recorded)")
    m.add_argument("--name", default=None, help="machine name (default: from the GPU or CPU model)")
    t = sub.add_parser("tidy", help="rename path-named existing-environment results")
    t.add_argument("--results-dir", type=Path, default=Path("results/asv"))
    t.add_argument("--python", default=None, metavar="X.Y", help="version for the new names (default: this one's)")
    try:
        args = p.parse_args(argv)
        if args.command == "machine":
            if args.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
                raise ValueError(f"--name {args.name!r}: use letters, digits, '.', '_' or '-' (it names a folder)")
            print(register(args.name))
            return 0
        if not args.results_dir.is_dir():
            raise ValueError(f"--results-dir {args.results_dir}: no such directory (run asv first)")
        if args.python is not None and not re.fullmatch(r"\d+\.\d+", args.python):
            raise ValueError(f"--python {args.python!r}: give a version like 3.12")
        for old, new in tidy(args.results_dir, args.python):
            print(f"{os.path.relpath(old, args.results_dir)} -> {os.path.relpath(new, args.results_dir)}")
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
