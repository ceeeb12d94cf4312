"""``compile=yes``: a model trained through ``torch.compile`` (TorchDynamo + Inductor).

Compiled kernels fuse elementwise work and keep intermediates in FP32 registers where eager mode rounds
each one to the tensor's dtype, and they reorder reductions: the numbers differ from eager, and a
compiled strategy that fails where its eager twin passes is a finding. What is compiled is the model's
forward (in place: parameter names and the module itself stay as they are) and, through
AOTAutograd, its backward; the loss, the scaler and the optimizer run eagerly. Dynamo's caches are
reset before each model is compiled, so nothing compiled for one case is reused by (or counts against
the recompilation limit of) the next.

The cost is kept visible: :class:`CompileStats` counts the compilations and the seconds spent in them
(Dynamo's start and end callbacks), which the record keeps apart from the run's time.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CompileStats", "compile_model", "missing_reason"]


@dataclass
class CompileStats:
    """Compilations of one run: how many, seconds in them (tracing, lowering, C++/Triton builds)."""

    models: int = 0
    compilations: int = 0
    seconds: float = 0.0
    _start: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models, "compilations": self.compilations, "seconds": round(self.seconds, 3)}


#: The stats the process's compile callbacks add to: the run that compiled last (one run at a time per
#: worker process).
_CURRENT: list[CompileStats] = []


def _on_start(*_: Any) -> None:
    if _CURRENT:
        _CURRENT[0]._start.append(time.perf_counter())


def _on_end(*_: Any) -> None:
    if _CURRENT and _CURRENT[0]._start:
        st = _CURRENT[0]
        st.seconds += time.perf_counter() - st._start.pop()
        st.compilations += 1


def _callbacks() -> bool:
    """Register the timing callbacks (``torch._dynamo.reset()`` clears them: called after each reset);
    False where this torch has none."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return False
    for register, cb in ((callback_handler.register_start_callback, _on_start),
                         (callback_handler.register_end_callback, _on_end)):
        if cb not in (callback_handler.start_callbacks + callback_handler.end_callbacks):
            register(cb)
    return True


def missing_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None where it can."""
    import torch._dynamo
    if not torch._dynamo.is_dynamo_supported():
        return (f"compile=yes: torch.compile does not support Python {sys.version_info.major}."
                f"{sys.version_info.minor} with torch {torch.__version__}")
    if device.type == "cpu":
        from torch._inductor import config
        cxx = config.cpp.cxx[-1] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if not any(shutil.which(c) for c in filter(None, (cxx, "g++", "c++", "clang++"))):
            return "compile=yes: Inductor needs a C++ compiler on the CPU (g++ or clang++) and none is on PATH"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        if not has_triton():
            return "compile=yes: Inductor needs Triton on CUDA; pip install triton"
    return None


def compile_model(model: torch.nn.Module, stats: CompileStats | None = None) -> CompileStats:
    """Compile ``model``'s forward in place after resetting Dynamo; returns the stats
    its compilations add to (``stats``, where a run compiles more than one model)."""
    import torch._dynamo
    from torch._inductor import config
    # compile in this process: a pool of compile workers would leave threads and processes behind, and the
    # harness forks its case workers (a fork taken while another thread holds a lock can hang)
    config.compile_threads = 1
    torch._dynamo.reset()  # a fresh cache per model: nothing leaks from the last case's graphs or guards
    stats = stats if stats is not None else CompileStats()
    stats.models += 1
    if _callbacks():
        _CURRENT[:] = [stats]
    inner = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)
    # the compiled frame is this function, not ``model.compile()``'s ``Module._call_impl``: Dynamo skips a
    # frame whose code lives in torch.nn, so a model that is only torch.nn containers (an nn.Sequential)
    # would compile nothing; from here it inlines them
    model.forward = torch.compile(forward)  # type: ignore[method-assign]
    return stats
