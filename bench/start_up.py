"""What a fresh process pays before its work runs at full speed: the start-up every rank of a sharded run
pays again, and the single process pays once.

Each part runs in a new interpreter, as a rank starts:

1. ``phases``, timed one after another in one fresh process: ``import torch``; importing the harness and
   discovering the suites; on CUDA the context; ``import torch._dynamo`` (the first ``torch.optim``
   optimizer imports it: its methods are wrapped by ``torch._disable_dynamo``); on CUDA the first FP32
   GEMM (cuBLAS), the first convolution forward and backward (cuDNN) and, where the GPU has FP8 Tensor
   Cores, the first FP8 GEMM of the harness (Triton's fused quantization and ``torch._scaled_mm``);
2. ``commands``: ``python -m harness --help`` and ``list`` (its listing computed, then kept: :mod:`harness.listing`),
   each in a fresh process;
3. ``case``: one case (``--case``, its first parameters) under every strategy, twice in another fresh
   process: cold (the first work after the imports) and warm. Cold minus warm is what that case's first
   run pays for start-up.

Usage: ``python bench/start_up.py [--device cuda|cpu] [--case NAME] [--tier full] [--json FILE]``
(default case: ``train_transformer`` on CUDA, ``update_swamping`` on the CPU).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CASE = {"cuda": "train_transformer", "cpu": "update_swamping"}


def _phases(device: str) -> list[list]:
    """[name, seconds] of each start-up phase, in a process that has imported nothing yet."""
    rows: list[list] = []

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        rows.append([name, time.perf_counter() - t])

    timed("import torch", lambda: importlib.import_module("torch"))
    import torch

    def harness():
        from harness.core.scenario import discover
        discover()
    timed("import the harness, discover the suites", harness)
    from harness.run.timing import sync
    dev = torch.device(device)
    if dev.type == "cuda":
        timed("CUDA context", lambda: (torch.zeros(1, device=dev), sync(dev)))
    timed("import torch._dynamo (the first optimizer)", lambda: importlib.import_module("torch._dynamo"))
    if dev.type != "cuda":
        return rows
    a = torch.randn(256, 256, device=dev)
    timed("first FP32 GEMM (cuBLAS)", lambda: (a @ a, sync(dev)))
    x = torch.randn(8, 3, 16, 16, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    timed("first convolution, forward and backward (cuDNN)",
          lambda: (torch.nn.functional.conv2d(x, w).sum().backward(), sync(dev)))
    from harness.core.execution import Execution
    from harness.core.strategy import PRESETS, tensor_core_support
    if tensor_core_support("fp8", dev) is None:
        ex = Execution(PRESETS["fp8-tensorwise"], dev)
        timed("first FP8 GEMM (Triton quantization, _scaled_mm)", lambda: (ex.matmul(a, a), sync(dev)))
    return rows


def _case(device: str, name: str, tier: str) -> dict:
    """Seconds of one case under every strategy, cold then warm, in a fresh process."""
    from harness.run.engine import Summary, run_case_records, select_matrix
    from harness.run.reference import ReferenceCache
    from harness.core.scenario import cases
    scenarios, strategies, dev = select_matrix(tier, device, [], scenario_globs=[name])
    case = cases(scenarios, tier, 1)[0]
    out: dict = {"case": case.id, "strategies": len(strategies)}
    for run in ("cold", "warm"):
        t = time.perf_counter()
        list(run_case_records(case, strategies, dev, ReferenceCache(), Summary(), None))
        out[run] = time.perf_counter() - t
    return out


def _child(args: list[str]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise SystemExit(f"start_up.py {' '.join(args)} exited {proc.returncode}:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def commands() -> list[list]:
    """[command, seconds] of ``python -m harness --help`` and ``list`` in fresh processes: ``list`` with its
    listing not kept yet (``cache off``: it imports torch and the suites) and kept (what every later
    ``list`` pays)."""
    import tempfile
    rows: list[list] = []
    with tempfile.TemporaryDirectory() as cache:
        for label, args, where in (("--help", ["--help"], "off"), ("list, cache off", ["list"], "off"),
                                   ("list, filling the cache", ["list"], cache), ("list, cache kept", ["list"], cache)):
            env = dict(os.environ, MP_HARNESS_CACHE=where)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            rows.append([f"python -m harness {label}", time.perf_counter() - t])
    return rows


def measure(device: str, case: str | None, tier: str) -> dict:
    """Every part, each in a fresh interpreter."""
    case = case or DEFAULT_CASE["cuda" if device.startswith("cuda") else "cpu"]
    phases = _child(["--child", "phases", "--device", device])
    return {"device": device, "phases": phases["rows"], "commands": commands(),
            "case": _child(["--child", "case", "--device", device, "--case", case, "--tier", tier])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda where there is one")
    ap.add_argument("--case", default=None, help="a scenario name (its first case is run)")
    ap.add_argument("--tier", default="full", choices=("quick", "full"))
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the numbers here")
    ap.add_argument("--child", choices=("phases", "case"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device is None:  # asked here, not in the children whose start-up is measured
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif a.device == "cuda" and a.child is None:
        import torch
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here (leave --device out, or pass cpu)")
    if a.child == "phases":
        print(json.dumps({"rows": _phases(a.device)}))
        return 0
    if a.child == "case":
        print(json.dumps(_case(a.device, a.case, a.tier)))
        return 0
    res = measure(a.device, a.case, a.tier)
    print(f"a fresh process on {a.device}, phase by phase:")
    for name, s in res["phases"]:
        print(f"  {s:7.3f} s  {name}")
    print("commands, each in a fresh process:")
    for name, sec in res["commands"]:
        print(f"  {sec:7.3f} s  {name}")
    c = res["case"]
    print(f"{c['case']} under {c['strategies']} strategies in another fresh process: cold {c['cold']:.2f} s, "
          f"warm {c['warm']:.2f} s: its first run pays {c['cold'] - c['warm']:+.2f} s")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
