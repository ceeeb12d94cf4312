"""pytest plugin: the harness's cases as test items, and robustness assertions for your own tests.

Installed with the package (entry point ``pytest11``: ``harness = "harness.pytest_plugin"``) and off
unless asked for: without ``--harness`` it adds its options and the ``harness_check`` fixture, imports
nothing heavy (no torch) and changes nothing else. With it, every registered case becomes an item::

    pytest --harness --harness-scenario 'softmax*' --harness-strategy fp16 --harness-strategy bf16 -m harness
    # items: harness::softmax_long[n=4096,scale=30]-fp16-cpu ...

An unexpected failure fails the item with the verdict's reason; a declared expected failure
(``Scenario.expected``) is an xfail (one that passes is an XPASS, not strict; a *different* failure
than the declared one fails); an unsupported strategy is a skip. ``--junitxml`` works as for any run,
with the outcome, reason and key metrics as properties of each test case. References are computed once
per case with the engine's :class:`~harness.run.reference.ReferenceCache` and reused by its strategies.

In your own tests::

    def test_my_softmax_under_fp16(harness_check):
        harness_check(my_softmax, {"x": torch.randn(8, 4096) * 30}, "fp16", n=2)

or call :func:`assert_robust` directly.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import pytest

__all__ = ["assert_robust", "CaseFailure", "ExpectedFailure", "harness_check"]

METRICS_SHOWN = ("rel_err", "grad_rel_err", "loss_divergence", "underflow_frac", "grad_underflow_frac", "nonfinite")


class CaseFailure(AssertionError):
    """A case failed and no declared expected failure covers it."""


class ExpectedFailure(AssertionError):
    """A case failed exactly as its scenario declares (an xfail)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("harness", "mp-harness: mixed-precision robustness cases as tests")
    g.addoption("--harness", action="store_true", help="add every registered case x strategy as a test item")
    g.addoption("--harness-scenario", action="append", default=[], metavar="GLOB", help="scenario name glob")
    g.addoption("--harness-family", action="append", default=[], metavar="F", help="scenario family")
    g.addoption("--harness-strategy", action="append", default=[], metavar="NAME-or-SPEC",
                help="strategy preset or spec (default: all presets)")
    g.addoption("--harness-device", default="auto", metavar="cpu|cuda|auto", help="default: auto")
    g.addoption("--harness-tier", default="quick", metavar="TIER", help="quick, full, recipes or all (default: quick)")
    g.addoption("--harness-seeds", default="1", metavar="N", help="seeds per case (default 1)")
    g.addoption("--harness-import", action="append", default=[], metavar="MODULE",
                help="import a module that registers more scenarios")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("harness", False):
        config.addinivalue_line("markers", "harness: a case of the mp-harness matrix (added by --harness)")
        config.pluginmanager.register(_Cases(config), "harness-cases")


class _Cases:
    """The part of the plugin that exists only under ``--harness``."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.runner: _Runner | None = None

    @pytest.hookimpl(tryfirst=True)  # before -k / -m / --deselect look at the items
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        try:
            cases, strategies, device = _select(config)
        except ValueError as exc:
            raise pytest.UsageError(f"--harness: {exc}") from None
        self.runner = _Runner(device)
        matrix = _Matrix.from_parent(session, name="harness", nodeid="harness")
        matrix.spec = (cases, strategies, self.runner, int(config.getoption("harness_seeds")) > 1)
        # collected through the public hooks, so that the terminal, junitxml and -k see the items
        session.ihook.pytest_collectstart(collector=matrix)
        rep = session.ihook.pytest_make_collect_report(collector=matrix)
        session.ihook.pytest_collectreport(report=rep)
        items.extend(x for x in rep.result if isinstance(x, pytest.Item))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.runner is not None and self.runner.refs.computed:
            r = self.runner.refs
            terminalreporter.write_line(f"harness: {r.computed} references computed, {r.reused} reused")


def _select(config: pytest.Config) -> tuple[list, list, Any]:
    from .run.engine import select_matrix
    from .core.scenario import cases
    seeds = config.getoption("harness_seeds")
    if not str(seeds).isdigit() or int(seeds) < 1:
        raise ValueError(f"--harness-seeds {seeds!r}: a whole number >= 1")
    tier = config.getoption("harness_tier")
    scenarios, strategies, device = select_matrix(
        tier, config.getoption("harness_device"), config.getoption("harness_strategy"),
        config.getoption("harness_import"), config.getoption("harness_scenario"), config.getoption("harness_family"))
    return cases(scenarios, tier, int(seeds)), strategies, device


class _Runner:
    """Runs cases through the engine, keeping the current case's inputs and reference."""

    def __init__(self, device: Any) -> None:
        from .run.reference import ReferenceCache
        self.device = device
        self.refs = ReferenceCache()
        self._case: Any = None
        self._inputs: tuple[dict, BaseException | None] = ({}, None)

    def run(self, case: Any, strategy: Any) -> dict[str, Any]:
        from .run.engine import _input_error, case_inputs, run_case
        if self._case is None or self._case.key != case.key:
            if self._case is not None:
                self.refs.drop(self._case, self.device)
            self._case = case
            self._inputs = case_inputs(case, self.device)
        inputs, exc = self._inputs
        if exc is not None:
            return _input_error(case, strategy, self.device, exc)
        return run_case(case, strategy, self.device, inputs, self.refs)[0]


class _Matrix(pytest.Collector):
    """The cases x strategies of the selection (made by the collection hook, not found in files)."""

    spec: tuple = ([], [], None, False)

    def collect(self) -> list[pytest.Item]:
        cases, strategies, runner, seeds = self.spec
        return [HarnessItem.from_parent(self, name=f"{c.id}{f'#{c.seed}' if seeds else ''}-{st.label}-"
                                                   f"{runner.device.type}", case=c, strategy=st, runner=runner)
                for c in cases for st in strategies]


class HarnessItem(pytest.Item):
    """One (case, strategy, device) of the matrix."""

    def __init__(self, *, case: Any, strategy: Any, runner: _Runner, **kw: Any) -> None:
        super().__init__(**kw)
        self.case, self.strategy, self.runner = case, strategy, runner
        self.add_marker("harness")
        self.extra_keyword_matches.add(case.scenario.family)  # -k reduction selects a family
        exp = case.scenario.expected(strategy.label, case.params, runner.device.type)
        if exp is not None and exp.outcome not in ("pass", "unsupported"):
            self.add_marker(pytest.mark.xfail(reason=f"declared {exp.outcome}: {exp.reason}", raises=ExpectedFailure,
                                              strict=False))

    def setup(self) -> None:
        _junit_name(self)

    def runtest(self) -> None:
        rec = self.runner.run(self.case, self.strategy)
        self.user_properties += [("outcome", rec["outcome"]), ("reason", rec["reason"])]
        self.user_properties += [(k, rec["metrics"][k]) for k in METRICS_SHOWN if k in (rec.get("metrics") or {})]
        _raise_for(rec, f"{self.case.id} under {self.strategy.label} on {self.runner.device.type}")

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, (CaseFailure, ExpectedFailure)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"harness case {self.name}"


def _junit_name(item: pytest.Item) -> None:
    """Name the junitxml test case by the item's name: pytest reads ``[...]`` as a trailing parameter
    list and would append a ``]`` to ``case[params]-strategy-device``. Uses what pytest's own
    ``record_xml_attribute`` fixture uses; if that moves, the default name stays."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:
        return
    xml = item.config.stash.get(xml_key, None)
    if xml is not None:
        # pytest >= 9 keys its reporters by the structured id, older ones by the nodeid string
        xml.node_reporter(getattr(item, "id", item.nodeid)).add_attribute("name", item.name)


def _raise_for(rec: dict[str, Any], what: str) -> None:
    """Nothing for a pass; skip for unsupported; ExpectedFailure / CaseFailure for a failure."""
    outcome, reason = rec["outcome"], rec["reason"]
    if outcome == "pass":
        return
    if outcome == "unsupported":
        pytest.skip(f"{what}: unsupported: {reason}")
    exp = (rec.get("expected") or {}).get("outcome")
    msg = f"{what}: {outcome}: {reason}"
    if exp == outcome:
        raise ExpectedFailure(f"{msg} (declared: {rec['expected'].get('reason')})")
    if exp:
        msg += f" (declared expected {exp}, got {outcome})"
    if rec.get("traceback"):
        msg += "\n" + rec["traceback"]
    raise CaseFailure(msg)


# -- assertions for users' own tests ------------------------------------------------------------------
def _as_kwargs(inputs: Any) -> tuple[dict[str, Any], bool]:
    """Inputs as a dict, and whether they are positional (a tensor or a tuple) or keyword (a dict)."""
    import torch
    if isinstance(inputs, torch.Tensor):
        return {"0": inputs}, True
    if isinstance(inputs, (tuple, list)):
        return {str(i): v for i, v in enumerate(inputs)}, True
    if isinstance(inputs, dict):
        return dict(inputs), False
    raise TypeError(f"inputs must be a tensor, a tuple of them or a dict name -> tensor, not {type(inputs).__name__}")


def _make_run(fn: Callable, positional: bool, loss: Callable | None, steps: int) -> Callable:
    import copy

    import torch

    from .core.batches import map_tensors
    from .core.execution import route_linears
    from .core.scenario import Output
    from .run.training import Trainer

    def call(f: Callable, args: dict) -> Any:
        return f(*args.values()) if positional else f(**args)

    def prepare(ex: Any, v: Any) -> Any:
        """An argument as the strategy hands it over: a Module copied, stored and routed as ``fn`` is; tensors,
        however deep in tuples, lists and dicts, in the activation format (FP64 in the reference)."""
        if isinstance(v, torch.nn.Module):
            return route_linears(copy.deepcopy(v).to(ex.device, ex.param_dtype), ex)
        return map_tensors(ex.act, v)

    def run(ex: Any, inp: dict, params: dict) -> Any:
        args = {k: prepare(ex, v) for k, v in inp.items()}
        model = prepare(ex, fn) if isinstance(fn, torch.nn.Module) else fn
        with torch.no_grad(), ex.autocast():
            value = call(model, args)
        out = Output(value=_primary(value).float())
        if loss is not None:
            trainer = Trainer(ex, model)
            res = trainer.train(lambda m, batch: loss(call(m, dict(zip(args, batch)))), lambda i: tuple(inp.values()),
                                steps)
            out.grads, out.losses = res.first_grads, res.losses
            out.trace = res.trace if ex.strategy.scaler.kind != "none" else None
        return out
    return run


def _primary(value: Any) -> Any:
    """The tensor of ``fn``'s output that is judged: the output itself, a model output's ``logits``
    (Hugging Face's ``ModelOutput``, or any object with that field), else the first floating tensor of a
    dict, tuple or list (timm and torchvision models return tensors)."""
    import torch
    if isinstance(value, torch.Tensor):
        return value
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (tuple, list)) else []
    found = next((v for v in items if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if found is None:
        raise TypeError(f"fn returned a {type(value).__name__} with no floating tensor to judge; return a tensor, "
                        "an object with .logits, or a dict/tuple holding one")
    return found


def assert_robust(fn: Callable, inputs: Any, strategy: Any, *, device: str = "cpu", n: int = 1,
                  factor: float = 1.0, loss: Callable | None = None, steps: int = 1) -> dict[str, Any]:
    """Assert that ``fn(inputs)`` under ``strategy`` matches its FP32 reference within the harness's bound.

    ``fn`` is a function of the inputs or a ``torch.nn.Module`` (copied, stored and routed as the
    strategy says); ``inputs`` a tensor, a tuple (positional) or a dict (keyword) of FP32 tensors (nested
    in lists and dicts too; Module arguments are copied and stored like ``fn``), handed to ``fn`` in the
    strategy's activation format (FP64 in the reference). Of ``fn``'s output the tensor itself is judged,
    or a model output's ``.logits`` (Hugging Face), or the first floating tensor of a dict or tuple; ``n`` is the reduction length the bound uses,
    ``factor`` a declared loosening of it. With ``loss`` (a function of ``fn``'s output returning a
    scalar), ``fn`` must be a Module and ``steps`` training steps run under the strategy, loss scaler
    included; gradients, losses and the scale trajectory are judged too.

    Returns the record (``outcome``, ``reason``, ``metrics``...). Raises ``AssertionError`` with the
    verdict's reason when the outcome is not ``pass``; skips (pytest) when the strategy is unsupported
    on ``device``, never passing silently.

    >>> import torch
    >>> assert_robust(torch.softmax, (torch.randn(4, 64), -1), "bf16", n=2)["outcome"]
    'pass'
    """
    import torch

    from .run.engine import _inputs, resolve_device, run_case
    from .run.reference import ReferenceCache
    from .core.scenario import Case, Scenario, Tolerance
    from .core.strategy import Strategy, parse

    st = strategy if isinstance(strategy, Strategy) else parse(str(strategy))
    dev = resolve_device(device)
    kwargs, positional = _as_kwargs(inputs)
    if loss is not None and not isinstance(fn, torch.nn.Module):
        raise TypeError("loss= trains fn, so fn must be a torch.nn.Module")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", getattr(fn, "__name__", type(fn).__name__)) or "fn"
    scenario = Scenario(name=name, family="training" if loss else "reduction",
                        description="assert_robust", grid={}, inputs=lambda p, g: dict(kwargs),
                        run=_make_run(fn, positional, loss, steps), n=lambda p: n,
                        tolerance=Tolerance("declared by the caller of assert_robust", factor) if factor != 1 else None)
    case = Case(scenario, {}, 0)
    rec, _ = run_case(case, st, dev, _inputs(case, dev), ReferenceCache())
    _raise_for(rec, f"{name} under {st.label} on {dev.type}")
    return rec


@pytest.fixture
def harness_check(request: pytest.FixtureRequest) -> Callable[..., dict[str, Any]]:
    """:func:`assert_robust` on the device of ``--harness-device`` (default auto: CUDA when present)."""
    device = request.config.getoption("harness_device", "auto")

    def check(fn: Callable, inputs: Any, strategy: Any, **kw: Any) -> dict[str, Any]:
        kw.setdefault("device", device)
        return assert_robust(fn, inputs, strategy, **kw)
    return check
