"""Scenarios: one declarative entry each, a registry, and discovery of the suites.

A scenario says what it demonstrates, its parameter grid (a ``quick`` subset and the ``full`` grid),
how to build inputs from a seed, how to run under an :class:`~harness.core.execution.Execution`, the
reduction length ``n`` its error bound uses, and which strategies are expected to fail and why.
Adding one is one ``register(Scenario(...))`` call in one module under ``suites/``; users register
their own from their own module (``run --import mymodule``).
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import itertools
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from .isolation import isolated
from .scaling import ScaleTrace

__all__ = ["Scenario", "Output", "Case", "Tolerance", "Expect", "REGISTRY", "register", "FAMILIES",
           "discover", "cases", "iter_cases", "count_cases", "case_id", "seed_generator"]

FAMILIES = ("reduction", "tiny_gradient", "exploding_loss", "weight_update", "accumulation", "training",
            "tensor_core", "distributed")
#: ``quick`` runs each scenario's quick grid; the others its full grid, and differ in their default strategies
#: (:func:`harness.core.strategy.tier_presets`): ``full`` the contract's presets (the default GPU run),
#: ``recipes`` the FP8/FP4 recipes next to BF16, ``all`` every preset.
TIERS = ("quick", "full", "recipes", "all")


@dataclass
class Output:
    """What a scenario returns: any of a primary value, unscaled gradients, a loss curve, a scaler trace.

    ``value`` and ``grads`` are compared with the reference's; ``kappa`` is the problem's condition
    number on these inputs (it multiplies the error bound); ``extra`` holds numbers for the record.
    """

    value: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] | None = None
    losses: list[float] | None = None
    trace: ScaleTrace | None = None
    kappa: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tolerance:
    """A declared change to the default error bound, with its reason.

    ``factor`` multiplies the bound; ``underflow_budget`` is the lost fraction of non-zero gradients
    tolerated. (A scenario whose reduction ran on a truncating accumulator says so per case, in
    ``Output.extra["truncating"]``.)"""

    reason: str
    factor: float = 1.0
    underflow_budget: float | None = None


@dataclass(frozen=True)
class Expect:
    """An expected outcome for the strategies matching ``strategies`` (glob patterns), with the reason.

    ``when`` optionally narrows it to some parameter values: a callable ``params -> bool``."""

    strategies: tuple[str, ...]
    outcome: str
    reason: str
    when: Callable[[dict], bool] | None = None
    device: str | None = None

    def applies(self, strategy: str, params: dict, device: str) -> bool:
        """Whether ``strategy`` (a preset name or spec) is declared here. A library's preset also matches
        as the recipe it runs: ``torchao-fp8-rowwise`` as ``fp8-rowwise`` (so ``fp8*`` covers both)."""
        if self.device and self.device != device:
            return False
        names = (strategy, *_without_library(strategy))
        if not any(fnmatch.fnmatchcase(n, p) for n in names for p in self.strategies):
            return False
        return self.when is None or bool(self.when(params))


def _without_library(name: str) -> tuple[str, ...]:
    """``name`` without a leading ``LIB-`` of a library preset (``torchao-fp8-rowwise`` -> ``fp8-rowwise``)."""
    from .strategy import LIBS
    return tuple(name[len(lib) + 1:] for lib in LIBS[1:] if name.startswith(lib + "-"))


@dataclass(frozen=True)
class Scenario:
    """A declarative scenario (see module doc). ``run(ex, inputs, params) -> Output``;
    ``inputs(params, generator) -> dict`` builds FP32 tensors on the CPU; ``n(params)`` is the
    reduction length. ``nonfinite_reference`` is the reason why the reference itself may hold inf/NaN
    (an overflow the scenario means to show); without it a case whose reference is non-finite under
    FP32 and FP64 is an ``error`` for every strategy: nothing can be judged against it."""

    name: str
    family: str
    description: str
    grid: dict[str, list]
    inputs: Callable[[dict, torch.Generator], dict]
    run: Callable[..., Output]
    n: Callable[[dict], int] = lambda p: 1
    quick: dict[str, list] | None = None
    tolerance: Tolerance | None = None
    expect: tuple[Expect, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")
    version: int = 1
    #: ``(ex, inputs, params, k) -> Output``: the run from weights moved one ulp (directions from seed
    #: ``k``); a training scenario gives it, and its reference measures FP32's own sensitivity with it
    perturbed: Callable[..., Output] | None = None
    nonfinite_reference: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"scenario {self.name!r}: unknown family {self.family!r}; families: {', '.join(FAMILIES)}")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"scenario name {self.name!r} must be letters, digits, '_' or '-'")
        if self.nonfinite_reference is not None and not str(self.nonfinite_reference).strip():
            raise ValueError(f"scenario {self.name!r}: nonfinite_reference must be the reason why the reference "
                             "may be inf/NaN (a non-empty string), or None")

    def params(self, tier: str = "full") -> list[dict]:
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
        grid = dict(self.grid)
        if tier == "quick" and self.quick:
            grid.update(self.quick)
        keys = list(grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]

    def expected(self, strategy: str, params: dict, device: str) -> Expect | None:
        for e in self.expect:
            if e.applies(strategy, params, device):
                return e
        return None

    def execute(self, ex: Any, inputs: dict, params: dict, perturb: int | None = None) -> Output:
        """``run`` (or, with ``perturb``, ``perturbed`` from weights moved one ulp in directions drawn from
        that seed) under the strategy's GEMM flags for the whole call (a GEMM or convolution outside
        ``ex.autocast()`` too: the reference's FP32 runs and every strategy's run alike), isolated
        (:func:`harness.core.isolation.isolated`: a run that changes its inputs or global state raises
        ``SideEffect``, and what it changed is restored), checked to return an :class:`Output`."""
        if perturb is not None and self.perturbed is None:
            raise ValueError(f"scenario {self.name} declares no perturbed run")
        during = f"its {ex.strategy.name or ex.strategy.compute} run" + (f" (perturbed {perturb})"
                                                                          if perturb is not None else "")
        with ex.gemm_flags(), isolated(self.name, during, inputs) as own:  # inside the flags: sees the run's own
            out = self.run(ex, own, params) if perturb is None else self.perturbed(ex, own, params, perturb)
        if not isinstance(out, Output):
            raise TypeError(f"scenario {self.name}.run returned {type(out).__name__}, expected harness.Output")
        return out

    def summary(self) -> dict:
        return {"name": self.name, "family": self.family, "description": self.description,
                "grid": self.grid, "quick": self.quick or {}, "version": self.version,
                **({"nonfinite_reference": self.nonfinite_reference} if self.nonfinite_reference else {})}


class Registry:
    """Name -> Scenario. Duplicate names raise; unknown names suggest the nearest ones."""

    def __init__(self) -> None:
        self._items: dict[str, Scenario] = {}

    def add(self, s: Scenario) -> Scenario:
        if s.name in self._items:
            raise ValueError(f"scenario {s.name!r} is registered twice; rename one of them")
        self._items[s.name] = s
        return s

    def get(self, name: str) -> Scenario:
        if name not in self._items:
            near = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            raise ValueError(f"unknown scenario {name!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                             + " (`python -m harness list` shows them all)")
        return self._items[name]

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def __iter__(self) -> Iterator[Scenario]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def select(self, globs: Iterable[str] = (), families: Iterable[str] = ()) -> list[Scenario]:
        """Scenarios matching any name glob and any family (all when none given); a glob or family
        that matches nothing is an error naming the choices."""
        globs, families = list(globs), list(families)
        for f in families:
            if f not in FAMILIES:
                near = difflib.get_close_matches(f, FAMILIES, n=2)
                raise ValueError(f"unknown family {f!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                                 + f" (families: {', '.join(FAMILIES)})")
        out = [s for s in self if (not families or s.family in families)]
        if globs:
            for g in globs:
                if not any(fnmatch.fnmatchcase(s.name, g) for s in self):
                    self.get(g)  # raises with suggestions
            out = [s for s in out if any(fnmatch.fnmatchcase(s.name, g) for g in globs)]
        return out


REGISTRY = Registry()


def register(s: Scenario) -> Scenario:
    """Add a scenario to the global registry (call at import time of a suite module)."""
    return REGISTRY.add(s)


_DISCOVERED = False


def discover(extra_modules: Iterable[str] = ()) -> Registry:
    """Import every module of the ``suites`` package (scanned, never listed by hand), then the user's.

    A user module that cannot be imported raises ``ValueError`` naming it and the import error."""
    global _DISCOVERED
    if not _DISCOVERED:
        import suites
        for info in pkgutil.iter_modules(suites.__path__, "suites."):
            if not info.name.split(".")[-1].startswith("_") and info.name != "suites.benchmarks":  # asv, no scenarios
                importlib.import_module(info.name)
        _DISCOVERED = True
    for mod in extra_modules:
        try:
            importlib.import_module(mod)
        except ValueError as exc:  # e.g. a duplicate scenario name
            raise ValueError(f"--import {mod}: {exc}") from None
        except SystemExit as exc:  # exit() at import time would end the harness with nothing run
            raise ValueError(f"--import {mod}: the module called sys.exit({exc.code!r}) while being imported; a "
                             "scenario module must only define and register scenarios") from None
        except Exception as exc:
            raise ValueError(f"--import {mod}: cannot import it ({type(exc).__name__}: {exc}); pass an importable "
                             "module name (on sys.path or PYTHONPATH), e.g. --import mypkg.scenarios") from None
    return REGISTRY


@dataclass(frozen=True)
class Case:
    scenario: Scenario
    params: dict
    seed: int

    @property
    def id(self) -> str:
        return case_id(self.scenario.name, self.params)

    @property
    def key(self) -> str:
        return f"{self.id}#{self.seed}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def case_id(name: str, params: dict) -> str:
    """``softmax_long[n=65536,scale=10]``: the readable id used in records, tests and gates."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={_fmt(v)}' for k, v in params.items())}]"


def cases(scenarios: Iterable[Scenario], tier: str, seeds: int) -> list[Case]:
    return list(iter_cases(scenarios, tier, seeds))


def iter_cases(scenarios: Iterable[Scenario], tier: str, seeds: int) -> Iterator[Case]:
    """The cases of :func:`cases`, in the same order, one at a time (a run of a billion seeds holds one)."""
    for s in scenarios:
        for p in s.params(tier):
            for seed in range(seeds):
                yield Case(s, p, seed)


def count_cases(scenarios: Iterable[Scenario], tier: str, seeds: int) -> int:
    """``len(cases(...))`` without building them."""
    return sum(len(s.params(tier)) for s in scenarios) * seeds


def seed_global(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for a run on ``device``: the CPU generator, and CUDA's on CUDA. (In a
    process that never used CUDA, ``torch.manual_seed`` queues the CUDA seeding with a captured stack on
    every call: 0.2 to 1 ms each, a few percent of a CPU run.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def seed_generator(case: Case) -> torch.Generator:
    """A CPU generator seeded from the case's name, params and seed: the same inputs on every device."""
    digest = hashlib.sha256(case.key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
