"""Isolation of one scenario run: nothing a run does may reach the next run or the next case.

A case's inputs are built once and handed to the reference's FP32 and FP64 runs and to every
strategy's run, all in one process. :func:`isolated` wraps each of those runs (``Scenario.execute``)
and each ``inputs()`` call, and checks two kinds of side effect when the run ends:

* **Inputs.** Every tensor of the inputs (top level, inside lists, tuples and dicts, and the
  parameters and buffers of an ``nn.Module``) is compared bit for bit with a pristine copy taken when
  the inputs were built (:class:`CaseInputs`), and its ``requires_grad`` and ``.grad`` with the
  pristine ones. The bitwise comparison is what catches writes the version counter does not see
  (``x.data.mul_()``, ``x.numpy()[:] = ...``, ``x.data = ...``); ``_version`` only says, for the
  message, whether autograd saw the write. Each run also gets its own containers (the dict and any
  nested list or dict), so rebinding a key (``inp["x"] = ...``) reaches no other run.
* **Global state** (:data:`STATE`): default dtype, grad mode, the deterministic-algorithms switch,
  cuDNN's enabled/benchmark/deterministic, the TF32 and reduced-precision switches (the legacy flags
  and the ``fp32_precision`` settings that ``torch.set_float32_matmul_precision`` writes, CPU oneDNN's
  included), autocast (CPU and CUDA, dtype and cache), the scaled-dot-product-attention backends, the
  CPU thread count and flush-to-zero. A run is compared with the state it started in.

Whatever changed is restored, so the next run starts as if nothing happened, and the run itself fails
with :class:`SideEffect` naming what it changed: its result was computed in a state no other run
shares, and a silent restore would hide a scenario bug that corrupts every run after it. The torch
random number generators (CPU, and CUDA's where CUDA is initialised) are restored silently: drawing
random numbers is no bug. Python's ``random`` and NumPy's generators are not covered.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["SideEffect", "CaseInputs", "isolated", "STATE", "global_state"]


class SideEffect(RuntimeError):
    """A scenario run changed its inputs or the process's global state (now restored)."""


# -- global state -----------------------------------------------------------------------------------
def _attr(obj: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(obj, name)), (lambda v: setattr(obj, name, v))


_TINY, _ONE = 5e-324, 1.0  # the smallest subnormal double; names, so that Python does not fold the product


def _flush_denormal() -> bool:
    """Whether this thread flushes subnormals (``torch.set_flush_denormal`` sets the CPU's FTZ/DAZ bits,
    which Python's own float arithmetic obeys too: 50 ns instead of a tensor op's 5 us)."""
    return _TINY * _ONE == 0.0


def _state_table() -> list[tuple[str, Callable[[], Any], Callable[[Any], None]]]:
    """(name, getter, setter) of every switch :func:`isolated` restores, in restoring order: the
    ``fp32_precision`` settings before the legacy TF32 flags that read from them."""
    b = torch.backends
    t: list[tuple[str, Callable[[], Any], Callable[[Any], None]]] = [
        ("default dtype", torch.get_default_dtype, torch.set_default_dtype),
        ("grad mode", torch.is_grad_enabled, torch.set_grad_enabled),
        ("deterministic algorithms",
         lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
        ("cudnn.enabled", *_attr(b.cudnn, "enabled")),
        ("cudnn.benchmark", *_attr(b.cudnn, "benchmark")),
        ("cudnn.deterministic", *_attr(b.cudnn, "deterministic")),
    ]
    # torch >= 2.9 keeps TF32 per backend in ``fp32_precision`` and refuses to read a legacy flag that
    # disagrees with it; the legacy matmul precision is restored first (it writes the CUDA and oneDNN matmul
    # settings), then the per-backend settings, then the legacy flags, each only where it still differs
    t.append(("float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision))
    precision = [("", b), ("cuda.matmul.", b.cuda.matmul), ("cudnn.", b.cudnn),
                 ("cudnn.conv.", getattr(b.cudnn, "conv", None)), ("cudnn.rnn.", getattr(b.cudnn, "rnn", None)),
                 ("mkldnn.", b.mkldnn), ("mkldnn.matmul.", getattr(b.mkldnn, "matmul", None)),
                 ("mkldnn.conv.", getattr(b.mkldnn, "conv", None)), ("mkldnn.rnn.", getattr(b.mkldnn, "rnn", None))]
    t += [(f"{p}fp32_precision", *_attr(o, "fp32_precision")) for p, o in precision
          if o is not None and hasattr(o, "fp32_precision")]
    m = b.cuda.matmul
    t += [(f"cuda.matmul.{f}", *_attr(m, f)) for f in ("allow_tf32", "allow_fp16_reduced_precision_reduction",
                                                        "allow_bf16_reduced_precision_reduction",
                                                        "allow_fp16_accumulation") if hasattr(m, f)]
    t.append(("cudnn.allow_tf32", *_attr(b.cudnn, "allow_tf32")))
    for dev in ("cpu", "cuda"):
        t.append((f"autocast {dev}", lambda d=dev: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)),
                  lambda v, d=dev: (torch.set_autocast_enabled(d, v[0]), torch.set_autocast_dtype(d, v[1]))))
    t.append(("autocast cache", torch.is_autocast_cache_enabled, torch.set_autocast_cache_enabled))
    for k in ("flash", "mem_efficient", "math", "cudnn"):
        get, put = getattr(b.cuda, f"{k}_sdp_enabled", None), getattr(b.cuda, f"enable_{k}_sdp", None)
        if get is not None and put is not None:
            t.append((f"{k} sdp", get, put))
    t += [("cpu threads", torch.get_num_threads, torch.set_num_threads),
          ("flush denormal", _flush_denormal, torch.set_flush_denormal)]
    return t


#: The global switches a run must leave as it found them (see module doc).
STATE = _state_table()


def global_state() -> dict[str, Any]:
    """The current value of every switch of :data:`STATE` (a getter that raises reads as its error)."""
    out: dict[str, Any] = {}
    for name, get, _ in STATE:
        try:
            out[name] = get()
        except (RuntimeError, ValueError) as exc:  # e.g. a mixed legacy/new TF32 setting refuses to be read
            out[name] = f"unreadable ({type(exc).__name__})"
    return out


def _unreadable(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("unreadable")


def _restore_state(saved: dict[str, Any]) -> list[str]:
    """Set every switch back to ``saved``; returns ``"name was -> now"`` for each one that had changed
    (read before anything is restored: restoring one switch can move another that reads from it)."""
    after = global_state()
    changed = [f"{name} {saved[name]} -> {after[name]}" for name in saved if after[name] != saved[name]]
    if not changed:
        return []
    for name, get, put in STATE:
        try:
            now = get()
        except (RuntimeError, ValueError):
            now = None  # unreadable now (a mixed legacy/new TF32 setting): set it
        if now != saved[name] and not _unreadable(saved[name]):
            try:
                put(saved[name])
            except (RuntimeError, ValueError, TypeError) as exc:
                changed.append(f"{name} could not be restored ({exc})")
    return changed


@dataclass
class _Rng:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def save(cls) -> "_Rng":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.default_generator.get_state(), cuda)

    def restore(self) -> None:
        torch.default_generator.set_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


# -- inputs ------------------------------------------------------------------------------------------
def _tensors(obj: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in ``obj``: itself, inside lists, tuples and dicts, and a module's
    parameters and buffers."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(obj, torch.nn.Module):
        for k, v in obj.state_dict(keep_vars=True).items():
            yield f"{path}.{k}", v


def _fresh_containers(obj: Any) -> Any:
    """``obj`` with new dicts and lists, the same tensors (and the same tuples: they cannot change)."""
    if isinstance(obj, dict):
        return {k: _fresh_containers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fresh_containers(v) for v in obj]
    return obj


@dataclass(frozen=True)
class _Pristine:
    value: torch.Tensor
    requires_grad: bool


def _pristine(inputs: dict) -> dict[str, _Pristine]:
    return {p: _Pristine(t.detach().clone(), t.requires_grad) for p, t in _tensors(inputs, "")}


class CaseInputs(dict):
    """A case's inputs, with a pristine copy of each tensor taken once, when they were built: what every
    run's inputs are checked against and restored from."""

    def __init__(self, inputs: dict) -> None:
        super().__init__(inputs)
        self.pristine = _pristine(self)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals the same NaN, -0 differs from +0), shape and dtype included."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point() and a.element_size() in _BITS:
        a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
    return torch.equal(a, b)


def _input_changes(inputs: dict, pristine: dict[str, _Pristine], versions: dict[str, int]) -> list[str]:
    """What happened to each input tensor that no longer matches its pristine copy (restored here)."""
    changes = []
    for path, t in _tensors(inputs, ""):
        p = pristine.get(path)
        if p is None:
            continue
        what = []
        if not _same_bits(t.detach(), p.value):
            seen = t._version != versions.get(path, t._version)
            what.append(f"`{path}` in place" if seen else f"`{path}` behind autograd's version counter "
                                                           "(through .data, .numpy() or another view)")
        if t.requires_grad != p.requires_grad:
            what.append(f"`{path}`'s requires_grad ({p.requires_grad} -> {t.requires_grad})")
        if t.grad is not None:
            what.append(f"`{path}`'s .grad (a backward pass accumulated into it)")
        if what:
            changes += what
            with torch.no_grad():
                t.grad = None
                t.requires_grad_(p.requires_grad)
                t.data = p.value.clone()
    return changes


@contextlib.contextmanager
def isolated(scenario: str, during: str, inputs: dict | None = None) -> Iterator[dict]:
    """Run the body as one isolated run of ``scenario`` (``during`` names it for the message, e.g.
    ``its fp16 run``); yields the inputs the run gets (fresh containers, the same tensors).

    On exit every input tensor and every switch of :data:`STATE` is back as it was and the RNG state is
    restored; a run that had changed any of them raises :class:`SideEffect` saying what (unless it
    raised already: its own exception is then the record's reason)."""
    inputs = {} if inputs is None else inputs
    pristine = inputs.pristine if isinstance(inputs, CaseInputs) else _pristine(inputs)
    versions = {p: t._version for p, t in _tensors(inputs, "")}
    state, rng = global_state(), _Rng.save()
    failed = False
    try:
        yield _fresh_containers(inputs)
    except BaseException:
        failed = True
        raise
    finally:
        rng.restore()
        changed_state = _restore_state(state)
        changed_inputs = _input_changes(inputs, pristine, versions)
        if not failed and (changed_state or changed_inputs):
            raise SideEffect(_message(scenario, during, changed_inputs, changed_state))


def _message(scenario: str, during: str, changed_inputs: list[str], changed_state: list[str]) -> str:
    parts = []
    if changed_inputs:
        parts.append(f"modified its input {', '.join(changed_inputs)} during {during} (restored; every run of a "
                     "case gets the same inputs: work on a copy, x = inp['x'].clone())")
    if changed_state:
        parts.append(f"left global state changed after {during}: {'; '.join(changed_state)} (restored; undo what "
                     "a run sets, e.g. in a with-block)")
    return f"scenario {scenario} " + "; it also ".join(parts)
