"""check-model's reference kept on disk (harness.run.refcache): computed once, reused bit for bit, computed
afresh whenever anything in its key differs (the model's source, its size, the updates), a corrupt file
recomputed with a warning, never a crash; and the fused training step (harness.run.fused)."""
from __future__ import annotations

import importlib
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench.same_records import compare
from conftest import same_bits
from harness.cli import main
from harness.models.model_check import check_model
from harness.run import fused, refcache

MODEL = '''
import torch
LR = {lr}
WIDTH = {width}

def factory():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, 1))
    x = torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(1))
    return {{"model": model, "batch": lambda i: (x * (1 + i),), "loss": lambda m, b: m(b[0]).pow(2).mean(),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=LR)}}
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A model module of its own; ``write(lr, width)`` (re)writes it as a fresh process would see it."""
    name = f"refcache_model_{tmp_path.name.replace('-', '_')}"
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / f"{name}.py"

    def write(lr: float = 0.05, width: int = 4) -> str:
        path.write_text(textwrap.dedent(MODEL.format(lr=lr, width=width)))
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        monkeypatch.setattr(refcache, "_IMPORTED", time.time() + 1)  # as a fresh process: file older than it
        return f"{name}:factory"
    return write


def _check(target: str, out: Path, cache, steps: int = 2):
    res = check_model(target, ["bf16"], steps=steps, device="cpu", out=out, diagnose=False, cache=cache)
    summary = json.loads((res.out / "run.json").read_text())["summary"]
    return res, summary["references_computed"]


def test_reference_is_computed_once_reused_and_fresh_when_the_model_changes(user_module, tmp_path: Path,
                                                                            capfd) -> None:
    cache = tmp_path / "cache"
    target = user_module()
    _, computed = _check(target, tmp_path / "a", cache)
    assert computed == 1 and len(list(cache.glob("reference-*.pt"))) == 1
    _, computed = _check(target, tmp_path / "b", cache)
    assert computed == 0  # read from disk
    assert compare(tmp_path / "a", tmp_path / "b") == []  # the same records, bit for bit, apart from timings
    target = user_module(lr=0.1)  # the model's source changed: a fresh reference, kept next to the old one
    _, computed = _check(target, tmp_path / "c", cache)
    assert computed == 1 and len(list(cache.glob("reference-*.pt"))) == 2
    assert compare(tmp_path / "a", tmp_path / "c") != []
    _, computed = _check(target, tmp_path / "d", cache, steps=3)  # other updates: another key
    assert computed == 1 and len(list(cache.glob("reference-*.pt"))) == 3
    newest = max(cache.glob("reference-*.pt"), key=lambda f: f.stat().st_mtime_ns)
    newest.write_bytes(b"not a reference")  # corrupt: ignored with a note, recomputed, rewritten
    capfd.readouterr()
    _, computed = _check(target, tmp_path / "e", cache, steps=3)
    assert computed == 1 and "ignored" in capfd.readouterr().err
    assert compare(tmp_path / "d", tmp_path / "e") == []
    assert newest.read_bytes() != b"not a reference"


def test_no_cache_keeps_nothing(user_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_HARNESS_CACHE", str(tmp_path / "cache"))
    _, computed = _check(user_module(), tmp_path / "a", False)
    assert computed == 1 and not (tmp_path / "cache").exists()


def test_size_from_the_environment_is_another_key(user_module, tmp_path: Path) -> None:
    """Same source, another model (as a factory that reads its size from the environment): the weights'
    hash is in the key."""
    target = user_module(width=4)
    spec_a = importlib.import_module(target.split(":")[0]).factory()
    target = user_module(width=4)
    mod = importlib.import_module(target.split(":")[0])
    mod.WIDTH = 6  # the same file, another model
    from harness.models.user_model import factory_of, load_spec
    a = refcache.model_identity(factory_of(target), load_spec(lambda: spec_a))
    b = refcache.model_identity(factory_of(target), load_spec(target))
    assert a["factory_source"] == b["factory_source"] and a["weights"] != b["weights"]


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MP_HARNESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert refcache.cache_dir() == tmp_path / "xdg" / "mp-harness"
    monkeypatch.setenv("MP_HARNESS_CACHE", str(tmp_path / "env"))
    assert refcache.cache_dir() == tmp_path / "env"
    with refcache.configured(tmp_path / "opt"):
        assert refcache.cache_dir() == tmp_path / "opt"
    with refcache.configured(False):
        assert refcache.cache_dir() is None
    assert refcache.cache_dir() == tmp_path / "env"


def test_cli_cache_options_are_exclusive(capsys) -> None:
    assert main(["check-model", "examples.third_party_model:factory", "--cache", "x", "--no-cache"]) == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [2.0**16, 1.0, 0.25, 2.0**-149])
def test_fused_unscale_and_check_is_bit_for_bit_the_per_tensor_loop(scale: float) -> None:
    """Against ``g * inv`` and ``isfinite`` tensor by tensor, with inf/NaN injected, an overflow that only the
    product has (scale < 1), and a subnormal scale whose inverse is inf."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(5, 3, generator=g) * 1e3, torch.randn(7, generator=g), torch.full((4,), 2.0**127)]
    cases = [base, [t.clone() for t in base[:2]] + [torch.tensor([1.0, float("nan")])],
             [t.clone() for t in base[:2]] + [torch.tensor([float("inf")])], [t.clone() for t in base[:2]]]
    for grads in cases:
        scale_t = torch.tensor(scale, dtype=torch.float32)
        inv = scale_t.double().reciprocal().float()
        want = [t * inv for t in grads]
        want_inf = not all(bool(torch.isfinite(t).all()) for t in want)
        got = [t.clone() for t in grads]
        found = fused.unscale_and_check(got, inv, scale)
        assert bool(found.item()) == want_inf
        for a, b in zip(got, want):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_read_back_is_one_copy_of_every_value() -> None:
    assert fused.read_back(torch.tensor(1.5, dtype=torch.float16), torch.ones(1), torch.tensor([2.0**-24])) == \
        [1.5, 1.0, 2.0**-24]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scale", [2.0**16, 0.25, 2.0**-149])
def test_fused_unscale_and_check_on_cuda_matches_the_cpu(scale: float) -> None:
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(257, 33, generator=g) * 1e3, torch.full((9,), 2.0**127), torch.tensor([1.0, float("nan")])]
    for k in range(len(grads) + 1):
        cpu = [t.clone() for t in grads[:k + 1]]
        dev = [t.cuda() for t in cpu]
        inv = torch.tensor(scale, dtype=torch.float32).double().reciprocal().float()
        a = fused.unscale_and_check(cpu, inv, scale)
        b = fused.unscale_and_check(dev, inv.cuda(), scale)
        assert float(a) == float(b.cpu())
        assert all(same_bits(x, y) for x, y in zip(cpu, dev))  # NaN payloads differed on an H100


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradscaler_scale_known_on_the_host_matches_the_device() -> None:
    """fp16-gradscaler on CUDA with overflows and growth: the CPU copy of GradScaler's state never disagrees
    with the device's (Trainer raises where it would), and the trace backs off and grows."""
    from harness.core.execution import Execution
    from harness.core.strategy import resolve
    from harness.models.user_model import load_spec, train_trajectory

    def factory() -> dict:
        torch.manual_seed(0)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        return {"model": torch.nn.Linear(8, 8), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).pow(2).sum(),
                "optimizer": lambda ps: torch.optim.SGD(ps, lr=1e-6)}

    # 2^24 overflows FP16's gradients; GradScaler backs off to 2^13, then grows every 2 updates and backs off
    (s,) = resolve(["fp16-gradscaler,scaler=gradscaler(init=2^24,interval=2)"])
    out = train_trajectory(Execution(s, torch.device("cuda")), load_spec(factory), 12)
    assert "backoff" in out.trace.events and "grow" in out.trace.events


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_import_before_forking_leaves_cuda_to_the_workers() -> None:
    """check-model imports torch._dynamo in the parent before forking; that must not start CUDA there (a
    parent that started the driver cannot fork workers that use CUDA)."""
    import subprocess
    code = ("import torch; from harness.models import model_check; model_check._import_before_forking(); "
            "print(torch.cuda.is_initialized())")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def _probe_model(size: str, seed: int) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    return {"model": model, "batch": lambda i: (x * (1 + i),), "loss": lambda m, b: m(b[0]).pow(2).mean()}


def test_zoo_targets_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``zoo:NAME[@SIZE]`` has no module named ``zoo``: its factory is the zoo's. With the cache on, the
    key was read off the target as ``MODULE:FACTORY`` and every record of a zoo model was an error (no
    module named 'zoo'), in check-model's own process and in the zoo command's workers alike."""
    from harness.models import zoo
    from harness.models.user_model import factory_of
    m = zoo.ZooModel("cache-probe", "torch", "regression", "a test model", _probe_model, ("tiny",))
    monkeypatch.setitem(zoo.ZOO, m.name, m)
    assert factory_of("zoo:cache-probe@tiny") == ("harness.models.zoo", "cache-probe@tiny")
    cache = tmp_path / "cache"
    res, computed = _check("zoo:cache-probe", tmp_path / "a", cache)
    assert computed == 1 and [r["outcome"] for r in res.records] == ["pass"]
    res, computed = _check("zoo:cache-probe", tmp_path / "b", cache)
    assert computed == 0 and [r["outcome"] for r in res.records] == ["pass"]
    monkeypatch.setenv("MP_HARNESS_CACHE", str(cache))
    assert main(["zoo", "--model", "cache-probe", "--strategy", "bf16", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "zoo")]) == 0
    records = [json.loads(line) for line in (tmp_path / "zoo" / "cache-probe" / "records.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["pass"]
