"""GPU paths: the Tensor-Core profile measured on the device, the Triton tile, FP8 GEMMs native against
emulated, the tensor_core scenarios through the engine, the throughput benchmark, and the trade-off table.

Tests marked ``cuda`` need a CUDA device and are skipped without one (no conftest needed); the rest
check the CPU halves of the same tools.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.values.formats import FORMATS
from harness.values.fp8 import AmaxHistory, E4M3, E5M2, fp8_matmul, quantize_fp8

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
triton_ok = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
sm89 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                          reason="needs FP8 Tensor Cores (sm_89+)")


# -- the device profile --------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@triton_ok
def test_device_profile_is_complete_and_predicts_the_device() -> None:
    from harness.device.device_profile import FIELDS, PROBED_FORMATS, device_profile
    res = device_profile("cuda", PROBED_FORMATS, "triton")
    assert set(res["formats"]) == set(PROBED_FORMATS)
    for fmt, p in res["formats"].items():
        if "unsupported" in p:
            assert fmt == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9), (fmt, p)
            continue
        assert "error" not in p, p
        assert p["notes"] == [], (fmt, p["notes"])
        assert all(p[f] is not None for f in FIELDS if f != "input_rounding" or fmt == "tf32"), (fmt, p)
        assert p["extra_bits"] == p["alignment_bits"] - p["accumulator_bits"]
        assert p["c_fused"] is True  # the Triton tile accumulates into C
        # the model built from the measured parameters reproduces random inner products bit for bit
        assert p["model_agreement"] == 1.0, (fmt, p)
        if fmt in ("fp16", "bf16", "tf32"):  # 16-bit and TF32 inputs: an FP32 accumulator
            assert p["accumulator_bits"] == 24 and p["output_fp32"] is True
    assert res["seconds"] < 30


@pytest.mark.cuda
@cuda
def test_seed_global_on_cuda_draws_what_torch_manual_seed_draws() -> None:
    from harness.core.scenario import seed_global
    dev = torch.device("cuda")
    torch.manual_seed(5)
    want = torch.randn(64, device=dev), torch.randn(4)
    torch.manual_seed(6)
    seed_global(5, dev)
    got = torch.randn(64, device=dev), torch.randn(4)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.cuda
@cuda
def test_cublas_profile_sees_the_same_tensor_cores() -> None:
    from harness.device.device_profile import device_profile
    tri = device_profile("cuda", ("fp16", "bf16"), "triton")["formats"]
    cub = device_profile("cuda", ("fp16", "bf16"), "cublas")["formats"]
    for fmt in ("fp16", "bf16"):
        for f in ("block_size", "alignment_bits", "accumulator_bits", "alignment_rounding", "products_exact"):
            assert cub[fmt][f] == tri[fmt][f], (fmt, f)
        assert cub[fmt]["c_fused"] is None  # a library may add C in an epilogue: not probed


@pytest.mark.cuda
@cuda
@triton_ok
def test_triton_tile_computes_c_plus_ab() -> None:
    from harness.values._triton_dot import dot_acc
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, 128, device="cuda", generator=g).half()
    b = torch.randn(128, 64, device="cuda", generator=g).half()
    c = torch.randn(64, 64, device="cuda", generator=g)
    d = dot_acc(a, b, c)
    ref = c.double() + a.double() @ b.double()
    assert float((d.double() - ref).norm() / ref.norm()) < 2.0 ** -20  # FP32-accumulated, exact products


@pytest.mark.cuda
@cuda
@triton_ok
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "tf32", "fp8_e4m3"])
def test_sequential_tensor_core_gemm_is_the_measured_model(fmt: str) -> None:
    """The K-loop Triton GEMM (the tc_long_dot 'tensor_core' path) over K=1024, 16 to 128 fused steps,
    is reproduced bit for bit by the model built from the probes' measurements."""
    from harness.values import _triton_dot
    from harness.device.device_profile import _DTYPES, device_profile, model_from_profile
    from harness.device.tc_probes import random_operands
    if fmt == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 Tensor Cores (sm_89+)")
    model = model_from_profile(fmt, device_profile("cuda", (fmt,), "triton")["formats"][fmt])
    assert model is not None
    a, b, _ = random_operands(FORMATS[fmt], 1024, torch.Generator().manual_seed(5), with_c=False)
    dtype = getattr(torch, _DTYPES[fmt])
    d = _triton_dot.gemm(a.cuda().to(dtype), b.cuda().to(dtype), tf32=fmt == "tf32").cpu()
    assert torch.equal(d, model(a, b, torch.zeros(64, 64)))


@pytest.mark.cuda
@cuda
def test_device_profile_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "harness.device.device_profile", "--format", "fp16", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    from harness.device.device_profile import device_profile
    assert data["formats"]["fp16"] == device_profile("cuda", ("fp16",), "triton")["formats"]["fp16"]
    assert f"block_size              {data['formats']['fp16']['block_size']}" in proc.stdout


# -- FP8 GEMMs: native _scaled_mm against the emulation ------------------------------------------------------------
@pytest.mark.cuda
@sm89
@pytest.mark.parametrize("delayed", [False, True])
def test_fp8_matmul_native_agrees_with_emulated(delayed: bool) -> None:
    """Same FP8 inputs and scales both ways: the native GEMM's Tensor-Core accumulation and the FP32
    emulation differ by accumulation rounding only. FP8 Tensor Cores may keep as few as 14 bits per step
    (the device profile measures it; the model of such a unit gives 2e-4 here), so 2^-9 bounds that with
    room and still catches a wrong scale, layout or FP8 format (errors of 2^-3 and more)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    a0 = torch.randn(128, 256, device="cuda", generator=g)
    b0 = torch.randn(256, 64, device="cuda", generator=g) * 0.05
    outs, grads = [], []
    calls = {"n": 0}
    real = torch._scaled_mm

    def counting(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        return real(*args, **kw)

    for native in (True, False):
        calls["n"] = 0
        hist = AmaxHistory()
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        torch._scaled_mm = counting
        try:
            for _ in range(2):  # the second call uses the amax history when delayed
                a.grad = b.grad = None
                y = fp8_matmul(a, b, "mm", hist, delayed=delayed, native=native, out_dtype=torch.float32)
                (y * torch.linspace(-1, 1, 64, device="cuda")).sum().backward()
        finally:
            torch._scaled_mm = real
        # native: the forward GEMM and the two backward GEMMs went through _scaled_mm, twice; emulated: none
        assert hist.fallbacks == 0 and calls["n"] == (6 if native else 0)
        outs.append(y.detach())
        grads.append((a.grad.clone(), b.grad.clone()))
    rel = lambda x, r: float((x - r).norm() / r.norm())  # noqa: E731
    assert rel(outs[0], outs[1]) < 2.0 ** -9
    assert rel(grads[0][0], grads[1][0]) < 2.0 ** -9 and rel(grads[0][1], grads[1][1]) < 2.0 ** -9
    assert rel(outs[1], a0 @ b0) < 0.1  # and both are FP8 approximations of the FP32 product


def test_quantize_fp8_keeps_overflow_non_finite() -> None:
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 500.0, -1e6, 3.0])
    assert quantize_fp8(x, E4M3, 1.0).float().tolist()[3:] == [448.0, -448.0, 3.0]
    assert torch.isnan(quantize_fp8(x, E4M3, 1.0).float()[:3]).all()  # E4M3 has no inf: NaN, never 448
    e5 = quantize_fp8(x, E5M2, 1.0).float().tolist()
    assert e5[:2] == [float("inf"), -float("inf")] and e5[4] == -FORMATS["fp8_e5m2"].max


def _fp8_inputs(dtype: torch.dtype, fmax: float) -> torch.Tensor:
    """Random values across FP8's whole range (normal, subnormal, past max, exact ties) plus inf and NaN."""
    g = torch.Generator().manual_seed(7)
    mag = torch.exp2(torch.empty(4096).uniform_(-24, 18, generator=g))  # 2^-24 .. 2^18: under and past fmax
    x = mag * torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0)
    ties = torch.tensor([1.0625, 1.1875, -2.125, fmax * 1.0001, -fmax, 2.0 ** -9 * 1.5, 2.0 ** -17])  # halfway
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    return torch.cat([special, ties, x]).to(dtype)  # first: every view of the test holds them


@pytest.mark.cuda
@cuda
@triton_ok
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_quantize_equals_the_pytorch_expression_bit_for_bit(fmt: str, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.values.fp8 as fp8
    f = FORMATS[fmt]
    x = _fp8_inputs(dtype, f.max).cuda()
    n = x.numel() - x.numel() % 16
    row_major, col_major = x.reshape(-1, 1), x[:n].reshape(16, -1).t()
    for scale in (1.0, 3.0, 2.0 ** -7):
        s = torch.tensor(scale, device="cuda")
        for view in (row_major, col_major):
            assert fp8._fused(view, f, s) is not None  # both layouts take the kernel
            got = quantize_fp8(view, f, s)
            monkeypatch.setattr(fp8, "FUSED_QUANTIZE", False)
            want = quantize_fp8(view, f, s)
            monkeypatch.setattr(fp8, "FUSED_QUANTIZE", True)
            assert got.shape == view.shape and got.stride() == view.stride()  # column-major stays so
            g, w = got.float(), want.float()
            assert torch.equal(torch.isnan(g), torch.isnan(w))  # NaN where the expression has NaN
            same = ~torch.isnan(w)
            gb, wb = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
            assert torch.equal(gb[same.contiguous()], wb[same.contiguous()])  # the same bits elsewhere
            assert torch.equal(torch.isinf(g), torch.isinf(w))  # +-inf kept in E5M2
            assert bool(torch.isinf(w).any()) == (f.name == "fp8_e5m2")


@pytest.mark.cuda
@cuda
def test_amax_is_one_pass_and_propagates_nan() -> None:
    from harness.values.fp8 import _amax
    x = torch.randn(1000, device="cuda", dtype=torch.bfloat16) * 7
    assert _amax(x).item() == x.abs().amax().item()
    x[17] = float("nan")
    assert torch.isnan(_amax(x))
    x[17] = -float("inf")
    assert _amax(x).item() == float("inf")


# -- the tensor_core scenarios through the engine ---------------------------------------------------------------
@pytest.mark.cuda
@cuda
@triton_ok
def test_tensor_core_family_runs_on_the_gpu(tmp_path: Path) -> None:
    from harness.run.engine import RunConfig, run_matrix
    from harness.core.scenario import discover
    from harness.core.strategy import resolve
    scen = discover().select(families=["tensor_core"])
    strategies = resolve(["fp32", "tf32", "fp16", "bf16"] + (["fp8-tensorwise"]
                         if torch.cuda.get_device_capability() >= (8, 9) else []))
    out, _summary, _stats = run_matrix(RunConfig(scen, strategies, torch.device("cuda"), tier="quick",
                                                 out=tmp_path / "run"))
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert recs and not [r for r in recs if r["outcome"] == "error"], \
        [(r["case"], r["strategy"], r["reason"]) for r in recs if r["outcome"] == "error"]
    # tc_profile measures the device and compares nothing: `unsupported` ("not judged"), its profile kept;
    # FP32 GEMMs have no Tensor-Core path to profile, and the record says so instead (seen on an H100)
    profiles = [r for r in recs if r["scenario"] == "tc_profile"]
    assert profiles and all(r["outcome"] == "unsupported" and r["reason"].startswith("not judged")
                            for r in profiles), [r["reason"] for r in profiles]
    for r in profiles:
        m = r["metrics"]
        if r["strategy"] == "fp32":
            assert m.get("profile") is None and "do not run on Tensor Cores" in m["profile_note"], m
        else:
            assert m["profile"]["format"] in ("tf32", "fp16", "bf16", "fp8_e4m3"), m
    # every other outcome is the declared one (pass where nothing is declared): FP8's narrow accumulator diverges
    wrong = [(r["case"], r["strategy"], r["outcome"], r["reason"]) for r in recs if r["scenario"] != "tc_profile"
             and r["outcome"] != ((r.get("expected") or {}).get("outcome") or "pass")]
    assert not wrong, wrong
    from harness.device.device_profile import device_profile
    prof = {r["strategy"]: r["metrics"]["profile"] for r in recs if r["scenario"] == "tc_profile"}
    assert prof["fp32"] is None
    for strategy, fmt in (("fp16", "fp16"), ("bf16", "bf16"), ("tf32", "tf32")):
        assert prof[strategy] == device_profile("cuda", (fmt,), "triton")["formats"][fmt]  # the profile itself
    dots = [r for r in recs if r["scenario"] == "tc_long_dot" and r["strategy"] == "fp32"]
    assert len(dots) == 2 and all(r["metrics"]["rel_err"] < 1e-5 for r in dots)  # library and tensor_core


# -- throughput ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_gpu_throughput_quick_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    kinds = {(r["kind"], r["name"]) for r in data["rows"] if "tflops" in r}
    assert {("gemm", "fp16"), ("gemm", "bf16"), ("block", "bf16"), ("train", "bf16")} <= kinds
    n = data["sizes"]["gemm"]
    for r in (r for r in data["rows"] if "tflops" in r):
        assert r["ms"] > 0 and r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert r["share"] == pytest.approx(r["tflops"] / r["ceiling_tflops"])
        assert r["ceiling_tflops"] == data["ceilings_tflops"][r["format"]]
        assert r["sm_clock_mhz"] > 0 and r["power_w"] > 0  # read through NVML while the calls ran
        if r["kind"] == "gemm":
            assert r["flops"] == 2.0 * n ** 3
    regimes = {(r["name"], r["regime"]) for r in data["rows"] if r["kind"] == "gemm"}
    assert {("fp16", "burst"), ("fp16", "sustained"), ("bf16", "burst"), ("bf16", "sustained")} <= regimes


# -- the trade-off table (pure: runs anywhere) ---------------------------------------------------------------------
def _rec(strategy: str, compute: str, family: str, outcome: str) -> dict:
    return {"schema_version": 1, "scenario": "s", "case": "s", "family": family, "params": {}, "seed": 0,
            "strategy": strategy, "strategy_spec": f"compute={compute},apply=autocast", "device": "cuda",
            "outcome": outcome, "reason": "", "metrics": {}, "seconds": 0.0}


def test_tradeoff_table_joins_speed_and_failures(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import tradeoff
    from harness.results import RunWriter
    rows = [{"kind": "gemm", "name": n, "format": f, "tflops": t, "share": t / c}
            for n, f, t, c in (("fp32", "fp32", 50.0, 51.0), ("fp16", "fp16", 700.0, 755.0),
                               ("bf16", "bf16", 750.0, 786.0), ("fp8-e4m3", "fp8", 1300.0, 1394.0),
                               ("fp8-e4m3-fastacc", "fp8", 1390.0, 1394.0))]
    rows.insert(1, {"kind": "gemm", "name": "fp16", "format": "fp16", "tflops": 745.0, "share": 745 / 755,
                    "regime": "burst"})  # not what a training run sustains: the table ignores it
    rows += [{"kind": "train", "name": "fp32", "format": "fp32", "tflops": 40.0, "share": 0.8},
             {"kind": "train", "name": "fp16", "format": "fp16", "tflops": 400.0, "share": 0.53}]
    tp = tmp_path / "t.json"
    tp.write_text(json.dumps({"environment": {"gpu": "G"}, "rows": rows}))
    w = RunWriter(tmp_path / "run", {"environment": {"device": "cuda", "gpu": "G"}})
    for r in ([_rec("fp16", "fp16", "reduction", "diverged")] * 3 + [_rec("fp16-dynamic", "fp16", "training", "pass")]
              + [_rec("bf16", "bf16", "reduction", "pass")] * 2 + [_rec("fp8-tensorwise", "fp8", "reduction",
                                                                          "unsupported")]):
        w.append(r)
    w.close({})
    md, js = tmp_path / "t.md", tmp_path / "t.out.json"
    assert tradeoff.main(["--throughput", str(tp), "--run", str(tmp_path / "run"), "--markdown", str(md),
                          "--out", str(js)]) == 0
    s = json.loads(js.read_text())["formats"]
    assert (s["fp16"]["failures"], s["fp16"]["judged"], s["fp16"]["gemm_tflops"]) == (3, 4, 700.0)
    assert s["fp16"]["strategies"] == ["fp16", "fp16-dynamic"] and s["fp16"]["train_tflops"] == 400.0
    assert (s["bf16"]["failures"], s["bf16"]["judged"], s["fp8"]["judged"]) == (0, 2, 0)
    assert s["fp8"]["gemm_tflops"] == 1300.0  # the _scaled_mm row the strategies use, not fast-accum
    tables, _ = tradeoff.tradeoff(json.loads(tp.read_text()), [_rec("fp16", "fp16", "reduction", "pass")])
    assert tables[0].rows[0][:3] == ["fp16", "700 (93%)", "14.0x"] and tables[0].rows[0][5] == "10.0x"
    assert "fp16" in md.read_text() and "14.0x" in md.read_text()


def test_tradeoff_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import tradeoff
    assert tradeoff.main(["--throughput", str(tmp_path / "none.json"), "--run", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.cuda
@cuda
def test_cuda_execution_sets_and_restores_the_gemm_flags() -> None:
    from harness.core.execution import Execution, _flags, _set_flags
    from harness.core.strategy import parse
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = _flags()
    try:
        # start from the opposite of what each strategy asks for, so that no assertion holds by default
        _set_flags(tf32=False, reduced=True, cudnn_tf32=False, bf16_reduced=True)
        with Execution(parse("tf32"), "cuda").autocast():
            assert m.allow_tf32 and c.allow_tf32
            assert not m.allow_fp16_reduced_precision_reduction and not m.allow_bf16_reduced_precision_reduction
        _set_flags(tf32=True, reduced=True, cudnn_tf32=True, bf16_reduced=True)
        state = _flags()
        with Execution(parse("fp32"), "cuda").autocast():
            assert not m.allow_tf32 and not c.allow_tf32
            assert not m.allow_fp16_reduced_precision_reduction and not m.allow_bf16_reduced_precision_reduction
        assert _flags() == state  # all four restored
        _set_flags(tf32=True, reduced=False, cudnn_tf32=True, bf16_reduced=False)
        state = _flags()
        with pytest.raises(RuntimeError):
            with Execution(parse("compute=fp16,reduction=reduced"), "cuda").autocast():
                assert m.allow_fp16_reduced_precision_reduction and m.allow_bf16_reduced_precision_reduction
                assert not m.allow_tf32 and not c.allow_tf32
                raise RuntimeError("scenario failed")
        assert _flags() == state  # restored after an exception too
    finally:
        _set_flags(**saved)


@pytest.mark.cuda
@cuda
def test_a_gemm_outside_autocast_runs_under_the_strategy_s_tf32_setting(tmp_path: Path, temp_scenarios: list) -> None:
    from conftest import add_scenario
    from harness.run.engine import RunConfig, run_matrix
    from harness.core.scenario import Output, Scenario
    from harness.core.strategy import PRESETS
    seen: list[tuple[bool, bool]] = []

    def run(ex, inp, p) -> Output:  # noqa: ANN001
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        x = ex.act(inp["x"])
        return Output(value=x @ x.T)  # outside ex.autocast()

    s = add_scenario(temp_scenarios, Scenario(name="t_bare_gemm_cuda", family="reduction", description="d",
                                              grid={"k": [0]}, inputs=lambda p, g: {"x": torch.rand(64, 64, generator=g)},
                                              run=run, n=lambda p: 64, devices=("cuda",)))
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    run_matrix(RunConfig([s], [PRESETS["fp32"], PRESETS["tf32"]], torch.device("cuda"), out=tmp_path / "r"))
    # the reference's FP32, FP64 and FP32 rerun, then the fp32 and tf32 strategies
    assert seen == [(False, False)] * 4 + [(True, True)], seen
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # restored
