"""What the per-layer diagnosis costs, and that a plain run pays nothing for it.

Times :func:`harness.models.user_model.train_trajectory` on the example model three ways, per training step:

* ``plain``: no probe (what ``run`` and ``check-model`` do for every strategy);
* ``probe-protocol``: a probe that attaches nothing (the cost of the hook points themselves);
* ``diagnosis``: :class:`harness.models.diagnose.LayerProbe`, forward hooks on every module plus tensor hooks
  on every output and parameter, each checking for inf/NaN (what only failing strategies get).

It also counts the hooks present on the trained copy in a plain run (0: nothing is attached)::

    python bench/hooks_overhead.py [--size small|large] [--device cpu|cuda] [--steps N] [--repeats R]

Prints one line per (strategy, mode): the median wall and CPU time per training step over the
repeats (the modes interleaved, so a change in the machine's load hits each alike), and the ratio to
``plain``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.third_party_model import factory  # noqa: E402
from harness.models.diagnose import LayerProbe  # noqa: E402
from harness.core.execution import Execution  # noqa: E402
from harness.core.strategy import PRESETS  # noqa: E402
from harness.run.timing import sync  # noqa: E402
from harness.models.user_model import Probe, load_spec, train_trajectory  # noqa: E402


class CountingProbe(Probe):
    """Attaches nothing; records how many hooks the trained copy carries when training starts."""

    def __init__(self) -> None:
        self.hooks = -1

    def attach(self, model: torch.nn.Module) -> None:
        self.hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                         for m in model.modules()) + sum(len(p._backward_hooks or {}) for p in model.parameters())


def per_step(spec, strategy: str, device: torch.device, steps: int, probe) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per training attempt."""
    ex = Execution(PRESETS[strategy], device)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = train_trajectory(ex, spec, steps, probe=probe)
    sync(device)
    n = max(1, out.extra["attempts"])
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategy", action="append", default=[])
    args = ap.parse_args()
    device = torch.device(args.device)
    spec = load_spec(lambda: factory(args.size), name=f"third_party_model-{args.size}")
    modes = {"plain": lambda: None, "probe-protocol": CountingProbe, "diagnosis": LayerProbe}
    print(f"# {spec.name} on {device} ({torch.get_num_threads()} threads), {args.steps} steps, modes interleaved, "
          f"median of {args.repeats}; {sum(p.numel() for p in spec.model.parameters())} parameters, "
          f"{sum(1 for _ in spec.model.modules())} modules")
    for strategy in args.strategy or ["fp16-dynamic", "bf16"]:
        per_step(spec, strategy, device, 1, None)  # warm up kernels and allocator
        wall: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        hooks = None
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every mode alike
            for mode, make in modes.items():
                probe = make()
                w, c = per_step(spec, strategy, device, args.steps, probe)
                wall[mode].append(w)
                cpu[mode].append(c)
                if isinstance(probe, CountingProbe):
                    hooks = probe.hooks
        base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
        for mode in modes:
            w, c = statistics.median(wall[mode]), statistics.median(cpu[mode])
            extra = f"  hooks on the trained copy: {hooks}" if mode == "probe-protocol" else ""
            print(f"{strategy:14s} {mode:15s} wall {1000 * w:9.2f} ms/step x{w / base_w:.2f}   "
                  f"cpu {1000 * c:9.2f} ms/step x{c / base_c:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
