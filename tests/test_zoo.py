"""The zoo: registry, data, models that learn, libraries missing here, the command and its table, regimes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.core.execution import Execution
from harness.core.strategy import PRESETS
from harness.models import zoo, zoo_data
from harness.models.user_model import load_spec, train_trajectory
from harness.results import read_run

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")


# -- registry and libraries ----------------------------------------------------------------------------------
def test_registry_names_and_unknown_names() -> None:
    names = zoo.names()
    assert names[:7] == ["gpt2", "llama", "bert", "t5", "vit", "convnext", "resnet50"]
    assert {"llama-highlr", "llama-highlr-qknorm", "gpt2-qk1000"} <= set(names)
    with pytest.raises(ValueError, match="unknown zoo model 'gtp2'; did you mean gpt2"):
        zoo.get("gtp2")
    with pytest.raises(ValueError, match="registered twice"):
        zoo.register(zoo.ZOO["gpt2"])
    with pytest.raises(ValueError, match="unknown size 'huge'; sizes: tiny, base"):
        zoo.parse_target("gpt2@huge")
    assert zoo.parse_target("llama") == ("llama", "tiny") and zoo.parse_target("llama@base") == ("llama", "base")


@pytest.mark.parametrize("name, lib", [("vit", "timm"), ("convnext", "timm"), ("resnet50", "torchvision")])
def test_missing_library_is_unsupported_with_the_install_line(name: str, lib: str) -> None:
    try:
        __import__(lib)
        pytest.skip(f"{lib} imports here; this checks a machine without it")
    except Exception:  # noqa: BLE001  (not installed, or a CUDA build that fails to import)
        pass
    why = zoo.unsupported(name, "tiny", CPU)
    assert why is not None and lib in why and "pip install 'mp-harness[zoo]'" in why
    with pytest.raises(ValueError, match=f"zoo model {name}: unsupported here: {lib}"):
        zoo.factory(name)


def test_broken_import_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that is installed but fails to import (torchvision built for CUDA on a CPU machine)."""
    real = zoo.importlib.import_module

    def fake(name: str):
        if name == "torchvision":
            raise OSError("libcudart.so.13: cannot open shared object file")
        return real(name)
    zoo.library_missing.cache_clear()
    monkeypatch.setattr(zoo.importlib, "import_module", fake)
    try:
        why = zoo.library_missing("torchvision")
    finally:
        zoo.library_missing.cache_clear()
    assert why == ("torchvision is installed but its import fails (OSError: libcudart.so.13: cannot open shared "
                   "object file): reinstall it for this torch, pip install 'mp-harness[zoo]'")


def test_base_convolutional_models_do_not_run_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "library_missing", lambda lib: None)
    assert zoo.unsupported("resnet50", "base", CPU) == zoo.CPU_CONV
    assert zoo.unsupported("convnext", "tiny", CPU) is None
    assert zoo.unsupported("resnet50", "base", torch.device("cuda")) is None
    assert zoo.unsupported("gpt2", "base", CPU) is None
    assert zoo.unsupported("gpt2-qk1000", "base", CPU) == "gpt2-qk1000 has no 'base' size (sizes: tiny)"


# -- data ----------------------------------------------------------------------------------------------------
def test_markov_tokens_follow_the_table_and_are_seeded() -> None:
    chain = zoo_data.MarkovChain(vocab=32, seed=3, successors=4)
    a, b = chain.tokens(4, 16, seed=3, step=5), chain.tokens(4, 16, seed=3, step=5)
    assert torch.equal(a, b) and not torch.equal(a, chain.tokens(4, 16, seed=3, step=6))
    for row in a:
        for x, y in zip(row[:-1].tolist(), row[1:].tolist()):
            assert y in chain.next[x].tolist()
    assert chain.floor == math.log(4)


def test_masked_and_seq2seq_batches() -> None:
    chain = zoo_data.MarkovChain(vocab=64, seed=0, reserved=16)
    ids, labels = zoo_data.masked(chain, 8, 32, seed=0, step=0, mask_id=63)
    masked = ids == 63
    assert masked.any() and torch.equal(masked, labels != zoo_data.IGNORE)
    assert int(labels[masked].max()) < 16 and int(ids[~masked].max()) < 16  # the chain never emits [MASK]
    src, tgt = zoo_data.seq2seq(chain, 2, 8, seed=0, step=1)
    assert src.shape == tgt.shape == (2, 8) and int(tgt[0, 0]) in chain.next[int(src[0, -1])].tolist()


def test_images_carry_class_dependent_means() -> None:
    x, y = zoo_data.images(classes=2, batch=256, size=8, seed=0, step=0)
    assert x.shape == (256, 3, 8, 8) and x.dtype == torch.float32
    means = torch.stack([x[y == c].mean(0) for c in (0, 1)])
    # the two class patterns have unit RMS each; noise averages out over ~128 images per class
    assert float((means[0] - means[1]).pow(2).mean().sqrt()) > 0.5


# -- the models learn ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
def test_fp32_loss_falls(name: str) -> None:
    spec = load_spec(f"zoo:{name}")
    losses = train_trajectory(Execution(PRESETS["fp32"], CPU), spec, 16).losses
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < losses[0] - 0.2, losses


def test_seed_changes_the_weights_and_reproduces_them() -> None:
    a, b, c = (dict(load_spec("zoo:gpt2", seed=s).model.named_parameters()) for s in (0, 0, 1))
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


# -- the command ---------------------------------------------------------------------------------------------
def test_check_model_zoo_target(capsys, tmp_path: Path) -> None:
    code = main(["check-model", "zoo:gpt2", "--strategy", "fp32", "--strategy", "bf16", "--steps", "3",
                 "--seed", "2", "--device", "cpu", "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert code == 0, text
    header, records = read_run(tmp_path / "run")
    assert [(r["scenario"], r["params"], r["outcome"]) for r in records] == \
        [("zoo-gpt2_tiny", {"steps": 3, "seed": 2}, "pass")] * 2  # zoo:gpt2 is zoo:gpt2@tiny, as the zoo names it
    assert header["config"]["imports"] == ["harness.models.zoo"]
    assert json.loads((tmp_path / "run" / "diagnosis.json").read_text())["seed"] == 2
    assert main(["check-model", "zoo:gtp2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown zoo model 'gtp2'; did you mean gpt2" in err and err.count("\n") == 1


def test_zoo_command_table_and_report(capsys, tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    code = main(["zoo", "--model", "llama", "--model", "resnet50", "--strategy", "fp32", "--strategy", "bf16",
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--markdown", str(tmp_path / "t.md")])
    text = capsys.readouterr().out
    assert code == 0, text
    summary = json.loads((out / "zoo.json").read_text())
    llama, resnet = summary["models"]
    assert (llama["model"], llama["size"], llama["outcome"]) == ("llama", "tiny", "pass")
    assert [r["strategy"] for r in llama["records"]] == ["fp32", "bf16"]
    assert (out / "llama" / "records.jsonl").is_file()
    if zoo.library_missing("torchvision"):
        assert resnet["outcome"] == "unsupported" and "mp-harness[zoo]" in resnet["reason"]
        assert not (out / "resnet50").exists()
    table = (tmp_path / "t.md").read_text()
    assert "| model | size | fp32 | bf16 |" in table and "| llama | tiny | pass " in table
    assert main(["zoo", "--report", str(out), "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == table  # a pure function of zoo.json
    assert main(["zoo", "--report", str(tmp_path)]) == 2
    assert "no zoo.json" in capsys.readouterr().err


# -- on the GPU (the lead runs these: timm and torchvision import there) ---------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "vit", "convnext", "resnet50"])
def test_every_model_builds_and_learns_on_cuda(name: str) -> None:
    why = zoo.unsupported(name, "tiny", "cuda")
    assert why is None, why  # the GPU machine has the [zoo] extra
    spec = load_spec(f"zoo:{name}")
    losses = train_trajectory(Execution(PRESETS["fp32"], torch.device("cuda")), spec, 16).losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


@pytest.mark.cuda
@cuda
def test_zoo_command_on_cuda_tiny(tmp_path: Path, capsys) -> None:
    code = main(["zoo", "--size", "tiny", "--model", "gpt2", "--model", "vit", "--model", "resnet50",
                 "--model", "gpt2-qk1000", "--strategy", "fp32", "--strategy", "fp16-dynamic", "--strategy", "bf16",
                 "--steps", "4", "--device", "cuda", "--out", str(tmp_path / "zoo")])
    capsys.readouterr()
    summary = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    by = {e["model"]: e for e in summary["models"]}
    assert all(e["outcome"] != "unsupported" for e in by.values()), by
    for name in ("gpt2", "vit", "resnet50"):
        assert {r["strategy"]: r["outcome"] for r in by[name]["records"]}["fp32"] == "pass"
    qk = {r["strategy"]: r["outcome"] for r in by["gpt2-qk1000"]["records"]}
    assert qk["fp32"] == "pass" and qk["fp16-dynamic"] in ("stalled", "overflow") and code == 1


@pytest.mark.cuda
@cuda
def test_the_zoo_on_cuda_keeps_check_models_workers(tmp_path: Path) -> None:
    """The zoo once asked torch for the GPU's name before its first model: that starts CUDA in the parent,
    and every check-model after it ran in-process, unprotected. A fresh process, as users run it."""
    from conftest import run_cli
    res = run_cli("zoo", "--size", "tiny", "--model", "gpt2", "--strategy", "fp32", "--steps", "2", "--device", "cuda",
                  "--out", str(tmp_path / "zoo"))
    assert res.rc == 0, res.stderr
    summary = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    run = json.loads((tmp_path / "zoo" / "gpt2" / "run.json").read_text())
    assert "worker process" in run["summary"]["isolation"], run["summary"]["isolation"]
    assert summary["gpu"] == run["environment"]["gpu"] == torch.cuda.get_device_name(0)


def test_a_model_check_model_refuses_is_a_row_and_the_zoo_goes_on(tmp_path: Path, monkeypatch) -> None:
    from harness.models import zoo_run
    real = zoo.factory

    def broken(name: str, size: str = "tiny", seed=None) -> dict:
        if name == "llama":
            raise RuntimeError("CUDA out of memory")
        return real(name, size, seed)
    monkeypatch.setattr(zoo, "factory", broken)
    summary = zoo_run.run_zoo(["llama", "t5"], ["fp32"], steps=1, device="cpu", out=tmp_path / "z")
    llama, t5 = summary["models"]
    assert llama["outcome"] == "error" and "RuntimeError: CUDA out of memory" in llama["reason"]
    assert t5["outcome"] == "pass"
    assert "| llama | tiny | error: " in zoo_run.zoo_table(summary)


def test_a_model_whose_strategies_all_are_unsupported_is_not_a_pass(tmp_path: Path, monkeypatch) -> None:
    """Nothing compared is nothing passed: with torchao missing, a model checked only under torchao's recipe
    has no judged record, and its row says unsupported with the install line (it said pass)."""
    from harness.core import libraries
    from harness.models import zoo_run
    monkeypatch.setattr(libraries, "version", lambda lib: None)
    summary = zoo_run.run_zoo(["llama", "gpt2"], ["torchao-fp8-rowwise"], steps=1, device="cpu", out=tmp_path / "z")
    for e in summary["models"]:
        assert e["outcome"] == "unsupported" and [r["outcome"] for r in e["records"]] == ["unsupported"]
        assert e["reason"].startswith("no strategy ran here: torchao is not installed: pip install")
    assert "| llama | tiny | unsupported: no strategy ran here: torchao is not installed" in zoo_run.zoo_table(summary)
    both = zoo_run.run_zoo(["llama"], ["torchao-fp8-rowwise", "bf16"], steps=1, device="cpu", out=tmp_path / "b")
    assert both["models"][0]["outcome"] == "pass"  # one strategy judged and passing: the row passes


def test_zoo_and_check_model_with_the_reference_cache_on_as_users_run_them(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests keep the disk cache off (conftest); users have it on by default. With it on, every record of
    a zoo model was an error once (the cache key read ``zoo:gpt2`` as a module named ``zoo``). Here: the real
    commands in fresh processes with the cache on: the zoo fills it, check-model of the same model reuses it."""
    from conftest import run_cli
    monkeypatch.setenv("MP_HARNESS_CACHE", str(tmp_path / "cache"))  # the child processes inherit it
    zoo_run = run_cli("zoo", "--model", "gpt2", "--strategy", "bf16", "--steps", "2", "--device", "cpu", "--out",
                      str(tmp_path / "zoo"))
    assert zoo_run.rc == 0, zoo_run.stderr
    check = run_cli("check-model", "zoo:gpt2", "--strategy", "bf16", "--strategy", "fp16-dynamic", "--steps", "2",
                    "--device", "cpu", "--out", str(tmp_path / "cm"))
    assert check.rc == 0, check.stderr
    for run, computed in ((tmp_path / "zoo" / "gpt2", 1), (tmp_path / "cm", 0)):
        records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        assert records and all(r["outcome"] == "pass" for r in records), [r["reason"] for r in records]
        summary = json.loads((run / "run.json").read_text())["summary"]
        assert summary["references_computed"] == computed and "worker process" in summary["isolation"]


def test_an_interrupted_zoo_is_completed_and_nothing_is_lost(tmp_path: Path, monkeypatch) -> None:
    """A second zoo into the same --out keeps the models the first judged (their rows and run directories
    untouched), runs again a model the first could not run (`unsupported`: its library missing then), moves
    a model cut off midway aside and runs it again, and refuses other settings in one line. Before, the
    second run rewrote zoo.json with only its own models and every kept model was an error (its run
    directory already held a run)."""
    from harness.models import zoo_run
    out = tmp_path / "z"
    real = zoo.unsupported
    monkeypatch.setattr(zoo, "unsupported", lambda name, size, dev: "not here" if name == "t5" else real(name, size, dev))
    first = zoo_run.run_zoo(["llama", "t5"], ["fp32"], steps=1, device="cpu", out=out)
    assert [(e["model"], e["outcome"]) for e in first["models"]] == [("llama", "pass"), ("t5", "unsupported")]
    monkeypatch.setattr(zoo, "unsupported", real)  # the library is there now
    before = (out / "llama" / "records.jsonl").read_bytes()
    (out / "bert").mkdir()
    (out / "bert" / "records.jsonl").write_text("{}\n")  # bert was cut off: a partial run directory
    seen: list[str] = []
    second = zoo_run.run_zoo(["llama", "t5", "bert"], ["fp32"], steps=1, device="cpu", out=out,
                             progress=seen.append)
    assert [(e["model"], e["outcome"]) for e in second["models"]] == [("llama", "pass"), ("t5", "pass"),
                                                                       ("bert", "pass")]
    assert second["models"][0] == first["models"][0] and (out / "llama" / "records.jsonl").read_bytes() == before
    assert (out / "bert.interrupted" / "records.jsonl").read_text() == "{}\n"
    assert sum("done in the earlier run" in s for s in seen) == 1 and any("moved to bert.interrupted" in s for s in seen)
    assert [e["model"] for e in zoo_run.read_summary(out)["models"]] == ["llama", "t5", "bert"]
    with pytest.raises(ValueError, match=r"other settings \(steps 1 there, 2 here\)"):
        zoo_run.run_zoo(["llama"], ["fp32"], steps=2, device="cpu", out=out)
