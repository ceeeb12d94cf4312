"""Bad input at every entry point (``run``, ``report``, ``gate``, ``check-model``): exactly one line on
stderr naming what was wrong and what is allowed, exit 2, no traceback, and nothing written (every file
under the test's directory is byte-for-byte what it was, and no file or folder appeared).

Each case runs ``harness.cli.main`` (what ``python -m harness`` calls) in this process on run files made
from the golden runs; docs/reliability.md lists them with what happens.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

from harness.cli import main
from harness.gate import make_baseline
from harness.results import SCHEMA_VERSION, read_run, write_json_atomic

GOLDEN = Path(__file__).parent / "golden"

MODULES = {
    "bi_broken": "import torch\nraise RuntimeError('bi_broken fails at import')\n",
    "bi_duplicate": ("from harness.core.scenario import Output, Scenario, register\n"
                     "register(Scenario(name='update_swamping', family='reduction', description='d', grid={},\n"
                     "                  inputs=lambda p, g: {}, run=lambda ex, i, p: Output()))\n"),
    "bi_badfamily": ("from harness.core.scenario import Output, Scenario, register\n"
                     "register(Scenario(name='bi_x', family='reductions', description='d', grid={},\n"
                     "                  inputs=lambda p, g: {}, run=lambda ex, i, p: Output()))\n"),
    "bi_factories": '''
import torch
from torch import nn

NOT_CALLABLE = 3


def raises():
    raise RuntimeError("no weights here")


def returns_list():
    return [nn.Linear(2, 1)]


def missing_keys():
    return {"model": nn.Linear(2, 1)}


def not_a_module():
    return {"model": "resnet", "batch": lambda i: (torch.ones(1, 2),), "loss": lambda m, b: m(b[0]).sum()}


def frozen():
    m = nn.Linear(2, 1).requires_grad_(False)
    return {"model": m, "batch": lambda i: (torch.ones(1, 2),), "loss": lambda m, b: m(b[0]).sum()}


def vector_loss():
    return {"model": nn.Linear(2, 3), "batch": lambda i: (torch.ones(1, 2),), "loss": lambda m, b: m(b[0])}


def string_loss():
    return {"model": nn.Linear(2, 3), "batch": lambda i: (torch.ones(1, 2),), "loss": lambda m, b: "low"}


def tensor_batch():
    return {"model": nn.Linear(2, 1), "batch": lambda i: torch.ones(1, 2), "loss": lambda m, b: m(b[0]).sum()}


def loss_not_callable():
    return {"model": nn.Linear(2, 1), "batch": lambda i: (torch.ones(1, 2),), "loss": 0.5}


def good():
    x = torch.linspace(-1, 1, 8).reshape(4, 2)
    return {"model": nn.Linear(2, 1), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).pow(2).mean()}
''',
}


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user modules above, importable by name for the duration of this module."""
    d = tmp_path_factory.mktemp("bi_mods")
    for name, src in MODULES.items():
        (d / f"{name}.py").write_text(src)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    for name in MODULES:
        sys.modules.pop(name, None)


def _copy_run(src: str, dst: Path, header=None, records=None) -> Path:
    """A copy of a golden run; ``header(h)`` / ``records(lines)`` may change it."""
    shutil.copytree(GOLDEN / src, dst)
    if header:
        h = json.loads((dst / "run.json").read_text())
        header(h)
        (dst / "run.json").write_text(json.dumps(h))
    if records:
        lines = (dst / "records.jsonl").read_text().splitlines(keepends=True)
        (dst / "records.jsonl").write_text("".join(records(lines)))
    return dst


def _files(tmp: Path) -> Path:
    """Everything the cases point at, under ``tmp``."""
    run = _copy_run("cpu_small", tmp / "run")
    _copy_run("h200_small", tmp / "gpu")
    (tmp / "empty").mkdir()
    (tmp / "afile").write_text("not a run\n")
    header, records = read_run(run)
    base = make_baseline(header, records, "run")
    write_json_atomic(tmp / "base.json", base)
    text = (tmp / "base.json").read_text()
    (tmp / "garbage.json").write_text("<<< not json >>>\n")
    (tmp / "truncated.json").write_text(text[: len(text) // 2])
    (tmp / "list.json").write_text("[1, 2, 3]\n")
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    write_json_atomic(tmp / "base_v2.json", dict(base, schema_version=SCHEMA_VERSION + 1))
    write_json_atomic(tmp / "base_gpu.json", make_baseline(*read_run(tmp / "gpu"), "gpu"))
    (tmp / "headless").mkdir()
    shutil.copy(run / "records.jsonl", tmp / "headless" / "records.jsonl")
    _copy_run("cpu_small", tmp / "badhead")
    (tmp / "badhead" / "run.json").write_text('{"schema_version": 1, "environm')  # truncated
    _copy_run("cpu_small", tmp / "allgarb", records=lambda ls: ["garbage\n", "{not json\n", "\x00\x01\n"])
    _copy_run("cpu_small", tmp / "v2run", header=lambda h: h.update(schema_version=SCHEMA_VERSION + 1))
    _copy_run("cpu_small", tmp / "v2rec", records=lambda ls: [json.dumps(dict(json.loads(line),
                                                                               schema_version=2)) + "\n" for line in ls])
    _copy_run("cpu_small", tmp / "foreign", records=lambda ls: ['{"schema_version": 1, "hello": "world"}\n'])
    _copy_run("cpu_small", tmp / "interrupted", header=lambda h: h.update(status="interrupted"))
    for name, edit in HOSTILE_RECORDS.items():  # the third record edited, the others left whole
        _copy_run("cpu_small", tmp / name, records=lambda ls, e=edit: [*ls[:2], _edit_line(ls[2], e), *ls[3:]])
    deep = "[" * 100_000 + "]" * 100_000
    _copy_run("cpu_small", tmp / "deeprec", records=lambda ls: [*ls[:2], f'{{"schema_version": 1, "x": {deep}}}\n'])
    _copy_run("cpu_small", tmp / "deephead", header=lambda h: h.update(environment={}))
    (tmp / "deephead" / "run.json").write_text(f'{{"schema_version": 1, "config": {deep}}}')
    for key, value in (("environment", [1, 2]), ("config", "quick"), ("schema_version", "1"), ("summary", 3)):
        _copy_run("cpu_small", tmp / f"head_{key}", header=lambda h, k=key, v=value: h.update({k: v}))
    for name, edit in HOSTILE_BASELINES.items():
        b = json.loads(text)
        edit(b["cases"])
        (tmp / f"{name}.json").write_text(json.dumps(b))
    (tmp / "base_deep.json").write_text(text.replace('"cases": {', f'"cases": {{"x#0|fp32": {deep},', 1))
    (tmp / "base_strschema.json").write_text(text.replace('"schema_version": 1', '"schema_version": "1"', 1))
    return tmp


def _edit_line(line: str, edit) -> str:
    r = json.loads(line)
    edit(r)
    return json.dumps(r) + "\n"


def _set(**kv):
    return lambda r: r.update(kv)


def _drop(key: str):
    return lambda r: r.pop(key)


#: Records a view must refuse with the file and line (records.jsonl:3), never count or crash on.
HOSTILE_RECORDS = {
    "rec_no_outcome": _drop("outcome"), "rec_no_strategy": _drop("strategy"), "rec_no_family": _drop("family"),
    "rec_null_outcome": _set(outcome=None), "rec_unknown_outcome": _set(outcome="fine"),
    "rec_list_outcome": _set(outcome=["pass"]), "rec_list_strategy": _set(strategy=["fp16"]),
    "rec_list_family": _set(family=["reduction"]), "rec_metrics_list": _set(metrics=[1, 2]),
    "rec_metrics_str": _set(metrics="rel_err 0.1"), "rec_str_schema": _set(schema_version="1"),
    "rec_relerr_str": lambda r: r["metrics"].update(rel_err="small"), "rec_reference_list": _set(reference=[1]),
    "rec_bound_str": _set(bound="tight"), "rec_margin_list": _set(margin=[0.5]),
    # nested fields the HTML plots draw (the third golden record is a scaled-gradient case with a window)
    "rec_window_list": _set(window=[1]), "rec_per_tensor_str": lambda r: r["window"].update(per_tensor="w"),
    "rec_per_tensor_lo": lambda r: r["window"]["per_tensor"]["w"].pop("lo"),
    "rec_hist_counts": lambda r: r["window"]["log2_hist"].update(counts=[1, -2]),
    "rec_hist_formats": lambda r: r["window"]["log2_hist"]["formats"].update(fp16={"max": "big"}),
    "rec_scaler_list": lambda r: r["metrics"].update(scaler=[2.0]),
    "rec_trajectory": lambda r: r["metrics"].update(scaler={"trajectory": [1.0, "x"]}),
}
#: Baselines whose cases have the wrong shape (the first case edited).
HOSTILE_BASELINES = {
    "base_case_list": lambda c: c.update({next(iter(c)): [1, 2]}),
    "base_case_outcome": lambda c: next(iter(c.values())).update(outcome="fine"),
    "base_case_metrics": lambda c: next(iter(c.values())).update(metrics="low"),
    "base_case_relerr": lambda c: next(iter(c.values()))["metrics"].update(rel_err=[0.1]),
    "base_case_bound": lambda c: next(iter(c.values())).update(bound={"x": 1}),
}


ONE = ["--scenario", "softmax_long", "--strategy", "fp32", "--device", "cpu", "--quiet"]
NEW = ["--out", "{t}/new"]  # a run directory that must not be created
CM = ["--device", "cpu", "--strategy", "fp32", "--steps", "1", "--out", "{t}/new"]

# id: (argv with {t} for the test's directory, fragments the one stderr line must contain)
CASES: dict[str, tuple[list[str], list[str]]] = {
    # run: names, specs, numbers
    "run-unknown-scenario": (["run", "--scenario", "softmax_lon", "--strategy", "fp32", *NEW],
                             ["unknown scenario 'softmax_lon'", "did you mean softmax_long", "harness list"]),
    "run-unknown-family": (["run", "--family", "reductions", *NEW], ["unknown family 'reductions'",
                                                                     "families: reduction, tiny_gradient"]),
    "run-unknown-strategy": (["run", "--strategy", "fp61", "--scenario", "softmax_long", *NEW],
                             ["unknown strategy 'fp61'", "did you mean fp16", "presets: fp32"]),
    "run-spec-unknown-key": (["run", "--strategy", "compute=fp16,speed=max", *ONE, *NEW],
                             ["unknown strategy key 'speed'", "keys: compute, apply"]),
    "run-spec-bad-format": (["run", "--strategy", "compute=fp12", *ONE, *NEW],
                            ["compute='fp12' is not allowed", "choose one of fp64, fp32"]),
    "run-spec-unbalanced": (["run", "--strategy", "compute=fp16,scaler=static(2", *ONE, *NEW],
                            ["unbalanced parentheses"]),
    "run-spec-negative-scale": (["run", "--strategy", "compute=fp16,scaler=static(-1)", *ONE, *NEW],
                                ["loss scale must be a number from 2^-149 to 3.4e38", "got -1"]),
    # scaler values past their range: OverflowError or "cannot convert float NaN to integer" before
    "run-spec-interval-inf": (["run", "--strategy", "compute=fp16,scaler=dynamic(interval=inf)", *ONE, *NEW],
                              ["scaler interval must be a whole number from 1 to 2^31-1, got 'inf'"]),
    "run-spec-interval-1e400": (["run", "--strategy", "compute=fp16,scaler=dynamic(interval=1e400)", *ONE, *NEW],
                                ["scaler interval: '1e400' is too large for a float"]),
    "run-spec-hysteresis-inf": (["run", "--strategy", "compute=fp16,scaler=dynamic(hysteresis=inf)", *ONE, *NEW],
                                ["scaler hysteresis must be a whole number from 1 to 2^31-1"]),
    "run-spec-interval-nan": (["run", "--strategy", "compute=fp16,scaler=dynamic(interval=nan)", *ONE, *NEW],
                              ["scaler interval must be a whole number from 1 to 2^31-1, got 'nan'"]),
    "run-spec-gradscaler-2e200": (["run", "--strategy", "compute=fp16,scaler=gradscaler(init=2^200)", *ONE, *NEW],
                                  ["scaler init must be a number from 2^-149 to 3.4e38", "got 2^200"]),
    "run-spec-duplicate-scaler-key": (["run", "--strategy", "compute=fp16,scaler=dynamic(init=2^10,init=2^20)",
                                       *ONE, *NEW], ["scaler key 'init' given twice"]),
    "run-seeds-0": (["run", "--seeds", "0", *ONE, *NEW], ["--seeds", "must be >= 1, got 0"]),
    "run-seeds-negative": (["run", "--seeds", "-1", *ONE, *NEW], ["--seeds", "must be >= 1, got -1"]),
    "run-seeds-abc": (["run", "--seeds", "abc", *ONE, *NEW], ["--seeds", "'abc' is not a whole number"]),
    "run-timeout-negative": (["run", "--timeout", "-1", *ONE, *NEW], ["--timeout", "must be a number of seconds from 0 (no deadline) to 604800 (a week), got -1"]),
    "run-timeout-nan": (["run", "--timeout", "nan", *ONE, *NEW], ["--timeout", "must be a number of seconds from 0 (no deadline) to 604800 (a week), got nan"]),
    "run-unknown-tier": (["run", "--tier", "medium", *ONE, *NEW], ["unknown tier 'medium'", "tiers: quick, full"]),
    "run-unknown-device": (["run", "--device", "tpu", "--scenario", "softmax_long", *NEW],
                           ["unknown device 'tpu'", "use cpu, cuda or auto"]),
    # run: files and directories
    "run-out-existing-run": (["run", *ONE, "--out", "{t}/run"], ["--out {t}/run: already holds a run",
                                                                 "--resume {t}/run"]),
    "run-out-is-a-file": (["run", *ONE, "--out", "{t}/afile"], ["--out {t}/afile: exists and is not a directory"]),
    "run-resume-empty-dir": (["run", "--resume", "{t}/empty"], ["--resume {t}/empty: no run.json there"]),
    "run-resume-a-file": (["run", "--resume", "{t}/afile"], ["--resume {t}/afile: no run.json there"]),
    "run-resume-missing": (["run", "--resume", "{t}/nope"], ["--resume {t}/nope: no run.json there"]),
    "run-resume-garbage-header": (["run", "--resume", "{t}/badhead"], ["run.json is not a harness run header"]),
    "run-resume-other-schema": (["run", "--resume", "{t}/v2run"], ["run.json has schema version 2",
                                                                   "start a new run"]),
    "run-resume-other-schema-records": (["run", "--resume", "{t}/v2rec"], ["a record has schema version 2"]),
    "run-resume-garbage-records": (["run", "--resume", "{t}/allgarb"], ["no line of records.jsonl is a readable"]),
    "run-resume-foreign-records": (["run", "--resume", "{t}/foreign"], ["a record lacks case, seed, strategy"]),
    "run-resume-with-filters": (["run", "--resume", "{t}/run", "--strategy", "fp16"],
                                ["--resume takes the matrix (--strategy) from the run directory", "drop --strategy"]),
    # run: user modules
    "run-import-missing": (["run", "--import", "bi_no_such_module", *ONE, *NEW],
                           ["--import bi_no_such_module: cannot import it", "No module named 'bi_no_such_module'"]),
    "run-import-raises": (["run", "--import", "bi_broken", *ONE, *NEW],
                          ["--import bi_broken: cannot import it (RuntimeError: bi_broken fails at import)"]),
    "run-import-duplicate": (["run", "--import", "bi_duplicate", *ONE, *NEW],
                             ["--import bi_duplicate: scenario 'update_swamping' is registered twice"]),
    "run-import-bad-family": (["run", "--import", "bi_badfamily", *ONE, *NEW],
                              ["unknown family 'reductions'", "families: reduction"]),
    # report
    "report-missing-dir": (["report", "{t}/nope"], ["{t}/nope: not a run directory"]),
    "report-a-file": (["report", "{t}/afile"], ["{t}/afile: not a run directory"]),
    "report-no-records": (["report", "{t}/empty"], ["{t}/empty: no records.jsonl"]),
    "report-garbage-header": (["report", "{t}/badhead"], ["{t}/badhead/run.json: unreadable run header"]),
    "report-garbage-records": (["report", "{t}/allgarb", "--markdown", "{t}/r.md"],
                               ["none of its 3 lines is a readable record"]),
    "report-other-schema": (["report", "{t}/v2run"], ["schema version 2, this harness reads 1"]),
    "report-other-schema-records": (["report", "{t}/v2rec"], ["a record has schema version 2"]),
    "report-three-dirs": (["report", "{t}/run", "{t}/run", "{t}/run"], ["one run directory or two", "got 3"]),
    "report-html-is-a-dir": (["report", "{t}/run", "--html", "{t}/empty"], ["--html {t}/empty: is a directory"]),
    # gate: run files
    "gate-missing-dir": (["gate", "{t}/nope", "--baseline", "{t}/base.json"], ["{t}/nope: not a run directory"]),
    "gate-a-file": (["gate", "{t}/afile", "--baseline", "{t}/base.json"], ["{t}/afile: not a run directory"]),
    "gate-no-records": (["gate", "{t}/empty", "--baseline", "{t}/base.json"], ["no records.jsonl"]),
    "gate-no-header": (["gate", "{t}/headless", "--baseline", "{t}/base.json"], ["no run.json with an environment"]),
    "gate-garbage-header": (["gate", "{t}/badhead", "--baseline", "{t}/base.json"], ["unreadable run header"]),
    "gate-garbage-records": (["gate", "{t}/allgarb", "--baseline", "{t}/base.json"],
                             ["none of its 3 lines is a readable record"]),
    "gate-other-schema-run": (["gate", "{t}/v2run", "--baseline", "{t}/base.json"], ["schema version 2"]),
    # gate: baselines
    "gate-baseline-missing": (["gate", "{t}/run", "--baseline", "{t}/nope.json"],
                              ["baseline {t}/nope.json does not exist", "--update"]),
    "gate-baseline-is-a-dir": (["gate", "{t}/run", "--baseline", "{t}/empty"],
                               ["baseline {t}/empty is a directory", "pass the baseline's JSON file"]),
    "gate-baseline-garbage": (["gate", "{t}/run", "--baseline", "{t}/garbage.json"], ["unreadable", "--update"]),
    "gate-baseline-truncated": (["gate", "{t}/run", "--baseline", "{t}/truncated.json"], ["unreadable"]),
    "gate-baseline-binary": (["gate", "{t}/run", "--baseline", "{t}/binary.json"], ["{t}/binary.json: unreadable"]),
    "gate-baseline-not-a-baseline": (["gate", "{t}/run", "--baseline", "{t}/list.json"],
                                     ["is not a harness baseline"]),
    "gate-baseline-other-schema": (["gate", "{t}/run", "--baseline", "{t}/base_v2.json"],
                                   ["has schema version 2, this harness writes 1"]),
    "gate-baseline-other-device": (["gate", "{t}/run", "--baseline", "{t}/base_gpu.json"],
                                   ["is for device class 'cuda:NVIDIA H200'", "but the run is 'cpu'"]),
    "gate-update-baseline-is-a-dir": (["gate", "{t}/run", "--baseline", "{t}/empty", "--update"],
                                      ["--baseline {t}/empty is a directory", "{t}/empty/cpu.json"]),
    "report-markdown-unwritable": (["report", "{t}/run", "--markdown", "{t}/afile/r.md"],
                                   ["{t}/afile", "check the path and its permissions"]),
    "gate-update-incomplete-run": (["gate", "{t}/interrupted", "--baseline", "{t}/base.json", "--update"],
                                   ["run status is 'interrupted', not 'complete'"]),
    "gate-update-garbage-run": (["gate", "{t}/allgarb", "--baseline", "{t}/base.json", "--update"],
                                ["none of its 3 lines is a readable record"]),
    # gate: thresholds
    "gate-factor-negative": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-factor", "-1"],
                             ["--error-factor -1: must be > 1"]),
    "gate-factor-nan": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-factor", "nan"],
                        ["--error-factor nan: must be > 1"]),
    "gate-factor-inf": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-factor", "inf"],
                        ["--error-factor inf: must be > 1 and finite"]),
    "gate-factor-abc": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-factor", "abc"],
                        ["'abc' is not a number"]),
    "gate-floor-negative": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-floor", "-0.1"],
                            ["--error-floor -0.1", "in [0, 1]"]),
    "gate-floor-nan": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--error-floor", "nan"],
                       ["--error-floor nan", "in [0, 1]"]),
    "gate-margin-one": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--rate-margin", "1"],
                        ["--rate-margin 1", "in [0, 1)"]),
    "gate-margin-nan": (["gate", "{t}/run", "--baseline", "{t}/base.json", "--rate-margin", "nan"],
                        ["--rate-margin nan"]),
    # check-model
    "cm-steps-0": (["check-model", "bi_factories:good", "--steps", "0"], ["--steps", "must be >= 1, got 0"]),
    "cm-steps-abc": (["check-model", "bi_factories:good", "--steps", "abc"], ["'abc' is not a whole number"]),
    "cm-no-colon": (["check-model", "bi_factories", *CM], ["expected MODULE:FACTORY"]),
    "cm-missing-module": (["check-model", "bi_nope:good", *CM], ["cannot import module 'bi_nope'"]),
    "cm-missing-factory": (["check-model", "bi_factories:nope", *CM], ["has no 'nope'", "callables there: frozen"]),
    "cm-not-callable": (["check-model", "bi_factories:NOT_CALLABLE", *CM], ["is a int, not callable"]),
    "cm-factory-raises": (["check-model", "bi_factories:raises", *CM],
                          ["the factory raised RuntimeError: no weights here"]),
    "cm-not-a-dict": (["check-model", "bi_factories:returns_list", *CM],
                      ["the factory returned list; expected a dict with keys model"]),
    "cm-missing-keys": (["check-model", "bi_factories:missing_keys", *CM], ["lacks batch, loss"]),
    "cm-model-not-a-module": (["check-model", "bi_factories:not_a_module", *CM],
                              ["model is a str; expected a torch.nn.Module"]),
    "cm-no-trainable-params": (["check-model", "bi_factories:frozen", *CM], ["no trainable parameters"]),
    "cm-loss-not-callable": (["check-model", "bi_factories:loss_not_callable", *CM], ["loss is a float, not callable"]),
    "cm-loss-not-scalar": (["check-model", "bi_factories:vector_loss", *CM],
                           ["loss(model, batch) returned a tensor of shape (1, 3)", "expected a scalar"]),
    "cm-loss-a-string": (["check-model", "bi_factories:string_loss", *CM], ["loss(model, batch) returned a str"]),
    "cm-batch-not-a-tuple": (["check-model", "bi_factories:tensor_batch", *CM],
                             ["batch(0) returned Tensor; expected a tuple"]),
    "cm-unknown-strategy": (["check-model", "bi_factories:good", "--strategy", "fp17", "--device", "cpu"],
                            ["unknown strategy 'fp17'"]),
    "cm-out-existing-run": (["check-model", "bi_factories:good", "--device", "cpu", "--steps", "1", "--out", "{t}/run"],
                            ["--out {t}/run: already holds a run"]),
    "cm-out-is-a-file": (["check-model", "bi_factories:good", "--device", "cpu", "--out", "{t}/afile"],
                         ["--out {t}/afile: exists and is not a directory"]),
    # the command line itself
    "unknown-command": (["bogus"], ["invalid choice: 'bogus'"]),
    # hostile run files: one line naming the file and line, for report and gate alike
    "deep-record": (["report", "{t}/deeprec"], ["{t}/deeprec/records.jsonl:3: JSON nested too deep"]),
    "deep-record-gate": (["gate", "{t}/deeprec", "--baseline", "{t}/base.json"], ["records.jsonl:3: JSON nested too deep"]),
    "deep-header": (["report", "{t}/deephead"], ["{t}/deephead/run.json: unreadable run header (nested too deep)"]),
    "head-environment": (["report", "{t}/head_environment"], ["run.json: 'environment' is a JSON array; expected an object"]),
    "head-environment-gate": (["gate", "{t}/head_environment", "--baseline", "{t}/base.json"], ["'environment' is a JSON array"]),
    "head-config": (["report", "{t}/head_config"], ["run.json: 'config' is \"quick\"; expected an object"]),
    "head-summary": (["report", "{t}/head_summary"], ["run.json: 'summary' is 3; expected an object"]),
    "head-str-schema": (["report", "{t}/head_schema_version"],
                        ["run.json: schema_version is \"1\", expected the integer 1"]),
    "base-deep": (["gate", "{t}/run", "--baseline", "{t}/base_deep.json"], ["base_deep.json: unreadable (nested too deep)"]),
    "base-str-schema": (["gate", "{t}/run", "--baseline", "{t}/base_strschema.json"],
                        ["has schema version '1', this harness writes 1"]),
    "base-case-list": (["gate", "{t}/run", "--baseline", "{t}/base_case_list.json"], ["is a JSON list, expected an object"]),
    "base-case-outcome": (["gate", "{t}/run", "--baseline", "{t}/base_case_outcome.json"],
                          ["outcome 'fine' is not one of pass, diverged"]),
    "base-case-metrics": (["gate", "{t}/run", "--baseline", "{t}/base_case_metrics.json"], ["metrics is a JSON str"]),
    "base-case-relerr": (["gate", "{t}/run", "--baseline", "{t}/base_case_relerr.json"], ["metrics.rel_err is [0.1]"]),
    "base-case-bound": (["gate", "{t}/run", "--baseline", "{t}/base_case_bound.json"], ["bound is {'x': 1}"]),
}
_RECORD_MESSAGES = {
    "rec_no_outcome": "record field 'outcome' missing; expected one of pass, diverged",
    "rec_no_strategy": "record field 'strategy' missing", "rec_no_family": "record field 'family' missing",
    "rec_null_outcome": "record field 'outcome' is null; expected one of pass",
    "rec_unknown_outcome": "record field 'outcome' is \"fine\"; expected one of pass, diverged, overflow",
    "rec_list_outcome": "record field 'outcome' is a JSON array", "rec_list_strategy": "'strategy' is a JSON array",
    "rec_list_family": "'family' is a JSON array", "rec_metrics_list": "'metrics' is a JSON array; expected an object",
    "rec_metrics_str": "'metrics' is \"rel_err 0.1\"; expected an object",
    "rec_str_schema": "schema_version is \"1\", expected the integer 1",
    "rec_relerr_str": "metrics.rel_err is \"small\"; expected a number", "rec_reference_list": "'reference' is a JSON array",
    "rec_bound_str": "'bound' is \"tight\"; expected a number", "rec_margin_list": "'margin' is a JSON array",
    "rec_window_list": "'window' is a JSON array; expected an object",
    "rec_per_tensor_str": "window.per_tensor is \"w\"; expected an object",
    "rec_per_tensor_lo": "window.per_tensor.w is a JSON object; expected an object with lo and hi",
    "rec_hist_counts": "window.log2_hist is a JSON object; expected an object with an integer lo, a list of counts",
    "rec_hist_formats": "window.log2_hist.formats.fp16 is a JSON object; expected an object of positive numbers",
    "rec_scaler_list": "metrics.scaler is a JSON array; expected an object",
    "rec_trajectory": "metrics.scaler.trajectory is a JSON array; expected a list of numbers",
}
for _name, _msg in _RECORD_MESSAGES.items():
    for _cmd in ("report", "gate"):
        CASES[f"{_cmd}-{_name}"] = ([_cmd, f"{{t}}/{_name}", *(["--baseline", "{t}/base.json"] if _cmd == "gate" else [])],
                                   [f"{{t}}/{_name}/records.jsonl:3: ", _msg])
CASES["report-two-runs-hostile-second"] = (["report", "{t}/run", "{t}/rec_unknown_outcome"],
                                           ["rec_unknown_outcome/records.jsonl:3: record field 'outcome'"])
CASES["gate-update-hostile"] = (["gate", "{t}/rec_metrics_list", "--baseline", "{t}/newbase/b.json", "--update"],
                                ["rec_metrics_list/records.jsonl:3: "])


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, modules: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    t = _files(tmp_path)
    argv, fragments = CASES[case]
    before = _snapshot(t)
    rc = main([a.replace("{t}", str(t)) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for frag in fragments:
        assert frag.replace("{t}", str(t)) in lines[0], (frag, lines[0])
    assert _snapshot(t) == before  # nothing created, nothing changed, nothing half-written


def test_the_fixture_files_are_valid_where_the_cases_need_them(tmp_path: Path, modules: Path, capsys) -> None:
    """The cases fail for the reason they name: the same commands on good files succeed."""
    t = _files(tmp_path)
    assert main(["gate", str(t / "run"), "--baseline", str(t / "base.json")]) == 0
    assert main(["report", str(t / "run")]) == 0
    assert main(["gate", str(t / "gpu"), "--baseline", str(t / "base_gpu.json")]) == 0
    capsys.readouterr()
