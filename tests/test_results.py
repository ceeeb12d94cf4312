"""Run files: strict JSON with inf/NaN round-tripped, atomic run.json, torn lines, schema versions."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import harness.results as results
from harness.results import (RECORD_FIELDS, SCHEMA_VERSION, RunFileError, RunWriter, case_key, clean, device_class,
                             num, read_records, read_run, write_json_atomic)

CONTRACT_FIELDS = ("schema_version", "scenario", "family", "params", "seed", "strategy", "strategy_spec", "device",
                   "outcome", "reason", "metrics", "seconds")


def _record(i: int, **kw) -> dict:
    r = {"schema_version": SCHEMA_VERSION, "scenario": "s", "case": f"s[i={i}]", "family": "reduction",
         "params": {"i": i}, "seed": 0, "strategy": "fp16", "strategy_spec": "compute=fp16", "device": "cpu",
         "outcome": "pass", "reason": "ok", "metrics": {"rel_err": 2.0**-i}, "seconds": 0.5}
    r.update(kw)
    return r


def test_record_fields_are_the_contract() -> None:
    assert RECORD_FIELDS == CONTRACT_FIELDS


def test_clean_makes_strict_json_and_num_reads_it_back() -> None:
    obj = {"a": math.inf, "b": -math.inf, "c": math.nan, "d": (1, 2.5), 3: {"x": [math.inf]}, "p": Path("x/y"),
           "n": None, "t": True}
    c = clean(obj)
    assert c == {"a": "inf", "b": "-inf", "c": "nan", "d": [1, 2.5], "3": {"x": ["inf"]}, "p": "x/y", "n": None,
                 "t": True}
    back = json.loads(json.dumps(c, allow_nan=False))  # strict JSON: no bare Infinity/NaN
    assert (num(back["a"]), num(back["b"]), num(back["d"][1])) == (math.inf, -math.inf, 2.5)
    assert math.isnan(num(back["c"])) and math.isnan(num(None)) and num(7) == 7.0


def test_write_json_atomic_writes_whole_files(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"x": math.inf, "y": [1, 2]})
    assert json.loads(p.read_text()) == {"x": "inf", "y": [1, 2]}
    assert [f.name for f in tmp_path.iterdir()] == ["run.json"]  # the temporary file was renamed


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"status": "running"})

    def torn_dump(obj, f, **kw):  # writes half a document, then the process "dies"
        f.write('{"status": "comp')
        raise KeyboardInterrupt

    monkeypatch.setattr(results.json, "dump", torn_dump)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(p, {"status": "complete"})
    assert json.loads(p.read_text()) == {"status": "running"}


def test_run_writer_streams_records_and_closes_with_a_summary(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "r", {"config": {"tier": "quick"}})
    head = json.loads((tmp_path / "r" / "run.json").read_text())
    assert (head["status"], head["schema_version"]) == ("running", SCHEMA_VERSION)
    w.append(_record(1, metrics={"rel_err": math.inf}))
    # each record is on disk as soon as it is appended, before close
    assert json.loads((tmp_path / "r" / "records.jsonl").read_text().splitlines()[0])["metrics"] == {"rel_err": "inf"}
    w.append(_record(2))
    w.close({"records": 2})
    header, recs = read_run(tmp_path / "r")
    assert (header["status"], header["summary"], header["config"]) == ("complete", {"records": 2}, {"tier": "quick"})
    assert [r["params"]["i"] for r in recs] == [1, 2] and num(recs[0]["metrics"]["rel_err"]) == math.inf
    assert all(set(CONTRACT_FIELDS) <= set(r) for r in recs)


def _write_run(d: Path, lines: list[str], header: dict | None = None) -> Path:
    d.mkdir()
    (d / "run.json").write_text(json.dumps(header if header is not None else {"schema_version": SCHEMA_VERSION}))
    (d / "records.jsonl").write_text("".join(lines))
    return d


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    good = [json.dumps(_record(i)) + "\n" for i in (1, 2)]
    d = _write_run(tmp_path / "r", good + [json.dumps(_record(3))[:40]])
    with pytest.warns(UserWarning, match=r"records.jsonl:3: skipping a torn or corrupted record line"):
        _, recs = read_run(d)
    assert [r["params"]["i"] for r in recs] == [1, 2]


def test_a_line_that_is_not_an_object_is_skipped(tmp_path: Path) -> None:
    d = _write_run(tmp_path / "r", [json.dumps(_record(1)) + "\n", "[1, 2]\n", "\n"])
    with pytest.warns(UserWarning, match=":2: skipping a line that is not a JSON object"):
        recs = list(read_records(d / "records.jsonl"))
    assert len(recs) == 1


def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    d = _write_run(tmp_path / "a", [json.dumps(_record(1)) + "\n"], header={"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(RunFileError, match=f"schema version {SCHEMA_VERSION + 1}, this harness reads {SCHEMA_VERSION}"):
        read_run(d)
    d = _write_run(tmp_path / "b", [json.dumps(_record(1, schema_version=0)) + "\n"])
    with pytest.raises(RunFileError, match="a record has schema version 0"):
        read_run(d)
    assert issubclass(RunFileError, ValueError)  # the CLI turns it into one line and exit 2


def test_unusable_directories_are_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(RunFileError, match="not a run directory"):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="no records.jsonl"):
        read_run(tmp_path / "empty")
    d = _write_run(tmp_path / "bad", [json.dumps(_record(1)) + "\n"])
    (d / "run.json").write_text('{"schema_version": 1,')
    with pytest.raises(RunFileError, match="unreadable run header"):
        read_run(d)


def test_device_class_and_case_key() -> None:
    assert device_class({"environment": {"device": "cpu"}}) == "cpu"
    assert device_class({"environment": {"device": "cuda", "gpu": "NVIDIA H200"}}) == "cuda:NVIDIA H200"
    assert case_key(_record(3)) == "s[i=3]#0|fp16"


# -- the read side: schema checks, streaming -------------------------------------------------------
def test_every_record_is_checked_with_its_file_and_line(tmp_path: Path) -> None:
    lines = [json.dumps(_record(i)) + "\n" for i in (1, 2)] + [json.dumps(_record(3, outcome="fine")) + "\n"]
    d = _write_run(tmp_path / "r", lines)
    it = results.iter_run_records(d)
    assert [next(it)["params"]["i"], next(it)["params"]["i"]] == [1, 2]  # read as they come, before line 3
    with pytest.raises(RunFileError, match=r"records.jsonl:3: record field 'outcome' is \"fine\"; expected one of "
                                           r"pass, diverged"):
        next(it)
    assert issubclass(RunFileError, results.InputError) and issubclass(results.InputError, ValueError)


@pytest.mark.parametrize("edit, message", [
    ({"outcome": None}, "'outcome' is null"), ({"strategy": 16}, "'strategy' is 16"),
    ({"metrics": [0.5]}, "'metrics' is a JSON array"), ({"schema_version": "1"}, 'schema_version is "1"'),
    ({"schema_version": True}, "schema_version is true"), ({"seed": 0.5}, "'seed' is 0.5; expected an integer"),
    ({"margin": "wide"}, "'margin' is \"wide\""), ({"expected": "pass"}, "'expected' is \"pass\""),
])
def test_check_record_names_the_field_and_what_is_allowed(edit: dict, message: str) -> None:
    with pytest.raises(RunFileError, match=re.escape(f"here:7: ") + ".*" + re.escape(message)):
        results.check_record(_record(1, **edit), "here:7")
    results.check_record(_record(1, margin="inf", bound=2.0**-8), "here:7")  # non-finite numbers as strings are fine


def test_a_record_nested_100k_deep_is_one_error_not_a_recursion(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    d = _write_run(tmp_path / "r", [json.dumps(_record(1)) + "\n", '{"x": ' + deep + "}\n"])
    with pytest.raises(RunFileError, match="records.jsonl:2: JSON nested too deep"):
        read_run(d)


def test_the_reader_is_a_generator_that_holds_one_record_at_a_time(tmp_path: Path) -> None:
    """Memory flat in the record count, checked structurally: while the 500th record is handed out, the
    earlier ones are gone (nothing in the reader keeps them)."""
    import gc
    import weakref

    d = _write_run(tmp_path / "r", [json.dumps(_record(i)) + "\n" for i in range(500)])
    it = results.iter_run_records(d)
    assert iter(it) is it and not isinstance(it, (list, tuple))
    refs = []
    for r in it:
        box = type("Rec", (dict,), {})(r)  # a dict subclass can be weakly referenced; drop the original
        refs.append(weakref.ref(box))
        del r, box
    gc.collect()
    assert len(refs) == 500 and sum(ref() is not None for ref in refs) == 0


def test_iter_object_members_streams_a_json_object_in_small_chunks() -> None:
    import io

    doc = {"kind": "k", "cases": {f"c{i}#0|fp16": {"outcome": "pass", "metrics": {"rel_err": 1.5 * i}} for i in range(50)},
           "tail": [1, 2.5e-300, "x"], "n": 123456789}
    text = json.dumps(doc, indent=1)
    for chunk in (1, 3, 64, 1 << 20):  # every value cut at every position somewhere
        got = list(results.iter_object_members(io.StringIO(text), "cases", chunk=chunk))
        top = {k: v for inner, k, v in got if inner is None}
        inner = {k: v for i, k, v in got if i == "cases"}
        assert top == {"kind": "k", "cases": {}, "tail": [1, 2.5e-300, "x"], "n": 123456789}
        assert inner == doc["cases"]
    with pytest.raises(json.JSONDecodeError):
        list(results.iter_object_members(io.StringIO(text[:-5]), "cases"))
    with pytest.raises(ValueError, match="not a JSON object"):
        list(results.iter_object_members(io.StringIO("[1, 2]"), "cases"))
