"""The Tensor-Core profile of the GPU at hand: the directed tests of :mod:`harness.device.tc_probes`, run on it.

:func:`device_profile` runs every probe for FP16, BF16, TF32 and FP8 E4M3 inputs through a GEMM on the
device (``triton``: one ``tl.dot`` tile accumulating into C; ``cublas``: what torch's GEMMs call) and
returns the profile per format (the keys are listed in :mod:`harness.device.tc_probes`), measured once per
process and reused. Nothing here knows any GPU model.

Run ``python -m harness.device.device_profile [--backend triton|cublas|all] [--format F]... [--out FILE]`` on a
GPU for a table and JSON; on any machine, ``--model block=8,alignment_bits=27`` profiles the CPU model
:class:`~harness.device.tensor_core_model.TensorCoreModel` instead (a demonstration of the probes).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.strategy import tensor_core_support
from .tc_probes import FIELDS, PROBED_FORMATS, model_from_profile, profile_format
from .tensor_core_model import MatMul, TensorCoreModel

__all__ = ["PROBED_FORMATS", "BACKENDS", "FIELDS", "device_matmul", "device_profile", "device_info",
           "model_from_profile", "profile_format", "render_table", "main"]

BACKENDS = ("triton", "cublas")


# -- the device ----------------------------------------------------------------------------------------
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "tf32": "float32", "fp8_e4m3": "float8_e4m3fn"}


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


def device_matmul(fmt: str, backend: str = "triton", device: str = "cuda") -> MatMul:
    """A ``matmul(a, b, c)`` running on ``device``'s Tensor Cores for input format ``fmt``.

    ``triton``: one ``tl.dot(a, b, acc)`` tile with the accumulator loaded from C (C inside the fused
    sum). ``cublas``: ``torch.mm(..., out_dtype=float32)`` (``torch._scaled_mm`` with unit scales for
    FP8, TF32 through the cuBLAS TF32 flag); C is added afterwards in FP32, as the library's epilogue
    may do, so the probes keep C at zero there."""
    dtype = getattr(torch, _DTYPES[fmt])
    dev = torch.device(device)
    if backend == "triton":
        try:
            from ..values import _triton_dot
        except ImportError as exc:
            raise ValueError(f"backend triton needs the triton package ({exc}); use --backend cublas") from None

        def mm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            (m, k), n = a.shape, b.shape[1]
            bm, bn, bk = _pow2(m, 64), _pow2(n, 64), _pow2(k, 32)
            pa, pb, pc = torch.zeros(bm, bk), torch.zeros(bk, bn), torch.zeros(bm, bn)
            pa[:m, :k], pb[:k, :n], pc[:m, :n] = a, b, c
            d = _triton_dot.dot_acc(pa.to(dev).to(dtype), pb.to(dev).to(dtype), pc.to(dev), tf32=fmt == "tf32")
            return d[:m, :n].cpu()
        return mm
    if backend == "cublas":
        def mm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            A, B = a.to(dev).to(dtype), b.to(dev).to(dtype)
            if fmt == "fp8_e4m3":
                one = torch.ones((), dtype=torch.float32, device=dev)
                d = torch._scaled_mm(A, B.t().contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
                d = d[0] if isinstance(d, tuple) else d
            elif fmt == "tf32":
                saved = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = True
                try:
                    d = A @ B
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = saved
            else:
                d = torch.mm(A, B, out_dtype=torch.float32)
            return (d + c.to(dev)).cpu()
        return mm
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _support(fmt: str, device: torch.device) -> str | None:
    """Why ``fmt`` cannot be probed on ``device`` (None when it can)."""
    return tensor_core_support(fmt, device)


@functools.lru_cache(maxsize=None)
def _cached(fmt: str, backend: str, device: str) -> str:
    dev = torch.device(device)
    why = _support(fmt, dev)
    if why:
        return json.dumps({"format": fmt, "backend": backend, "unsupported": why})
    try:
        return json.dumps(profile_format(device_matmul(fmt, backend, device), fmt, backend))
    except Exception as exc:  # one format failing leaves the others measured; the record says why
        return json.dumps({"format": fmt, "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:400]})


def device_info(device: str = "cuda") -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}")
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def device_profile(device: str = "cuda", formats: Sequence[str] = PROBED_FORMATS,
                   backend: str = "triton") -> dict[str, Any]:
    """The measured profile of ``device`` per input format (computed once per process and reused: a
    profile holds what was found, and ``seconds`` what this call took)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: the Tensor-Core probes need a CUDA device (none here); "
                         "use --model to profile the CPU model instead")
    t0 = time.perf_counter()
    out = {f: json.loads(_cached(f, backend, str(torch.device(device)))) for f in formats}
    return {"device": device_info(device), "backend": backend, "formats": out,
            "seconds": round(time.perf_counter() - t0, 3)}


# -- presentation and command line -------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return "?"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def render_table(result: dict[str, Any]) -> str:
    """The profile as a plain-text table: one row per property, one column per format."""
    fmts = list(result["formats"])
    rows = [["property", *fmts]]
    for f in FIELDS:
        rows.append([f, *(_cell(result["formats"][x].get(f)) if "unsupported" not in result["formats"][x]
                          and "error" not in result["formats"][x] else "-" for x in fmts)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for x in fmts:
        p = result["formats"][x]
        for key in ("unsupported", "error"):
            if key in p:
                lines.append(f"{x}: {key}: {p[key]}")
        lines += [f"{x}: {n}" for n in p.get("notes", [])]
    if "seconds" in result:  # what this call took (formats measured earlier in the process are reused)
        lines.append(f"seconds: {result['seconds']}")
    return "\n".join(lines)


def _parse_model(text: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--model part {part!r} must be key=value")
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in TensorCoreModel.__dataclass_fields__ or key == "fmt":
            raise ValueError(f"--model: unknown parameter {key!r}; parameters: "
                             f"{', '.join(k for k in TensorCoreModel.__dataclass_fields__ if k != 'fmt')}")
        kw[key] = {"true": True, "false": False, "yes": True, "no": False}.get(val.lower(), val)
        if key in ("block", "alignment_bits", "accumulator_bits"):
            kw[key] = int(val)
    return kw


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.device.device_profile",
                                description="Measure the numerical behaviour of the Tensor Cores")
    p.add_argument("--format", action="append", default=[], metavar="F", help=f"any of {', '.join(PROBED_FORMATS)}")
    p.add_argument("--backend", default="triton", choices=BACKENDS + ("all",))
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, metavar="K=V,...", help="profile the CPU model with these parameters")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the profile as JSON")
    args = p.parse_args(argv)
    try:
        formats = args.format or list(PROBED_FORMATS)
        for f in formats:
            if f not in PROBED_FORMATS:
                raise ValueError(f"unknown format {f!r}; choose from {', '.join(PROBED_FORMATS)}")
        if args.model is not None:
            kw = _parse_model(args.model)
            results = [{"device": {"model": kw}, "backend": "model", "formats": {
                f: profile_format(TensorCoreModel(f, **kw), f, "model") for f in formats}}]
        else:
            backends = BACKENDS if args.backend == "all" else (args.backend,)
            results = [device_profile(args.device, formats, b) for b in backends]
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(f"== {r['backend']} on {r['device'].get('gpu', 'the CPU model')}")
        print(render_table(r))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
