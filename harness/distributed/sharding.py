"""The matrix sharded over torchrun ranks: cases claimed from the store, costliest first; records streamed
to per-rank shard files; rank 0 merges them in single-process order (see the package doc)."""
from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch.distributed as dist

from ..run.engine import BOOKKEEPING_S, RunConfig, Summary, _done_keys, _record, _runner, default_out_dir, \
    resume_config, SUMMED_STATS, run_header, run_stats
from ..run.rundir import check_size, matrix_keys, resumed_header
from ..run.guard import sigterm_as_interrupt
from ..results import RunFileError, RunLock, RunWriter, case_seed_key, clean, named_os_error, read_header, read_run
from ..core.scenario import Case, cases, count_cases
from ..judge.verdict import Verdict
from .group import MULTICAST_OFF, Group, barrier, init_group

__all__ = ["COSTS_ENV", "SHARDS", "cost_hints", "claim_order", "ShardFile", "merge_shard_lines", "run_sharded",
           "merge_run"]

#: A run directory the cost hints are read from (or ``none``), instead of the newest matching run.
COSTS_ENV = "MP_HARNESS_COSTS"
SHARDS = "shards"


def cost_hints(device_type: str, tier: str, root: Path = Path("results/runs")) -> tuple[dict[str, float], str | None]:
    """Seconds per case key (``case#seed``) from an earlier run, and where they came from.

    ``$MP_HARNESS_COSTS`` names the run directory (``none``: no hints); otherwise the newest finished
    run under ``root`` with the same device type and tier. Hints only order the work, never the output."""
    chosen = os.environ.get(COSTS_ENV)
    if chosen is not None and chosen.lower() in ("", "none", "off"):
        return {}, None
    if chosen:
        source = Path(chosen)
    else:
        source = next((h.parent for h in sorted(root.glob("*/run.json"), key=lambda q: q.stat().st_mtime, reverse=True)
                       if _matches(h, device_type, tier)), None)
        if source is None:
            return {}, None
    try:
        _, recs = read_run(source)
    except (RunFileError, OSError) as exc:
        raise ValueError(f"${COSTS_ENV}={chosen}: {exc}" if chosen else str(exc)) from None
    costs: dict[str, float] = {}
    for r in recs:
        key = case_seed_key(r)
        costs[key] = costs.get(key, 0.0) + float(r.get("seconds") or 0.0)
    return costs, str(source)


def _matches(head_path: Path, device_type: str, tier: str) -> bool:
    """Whether a ``run.json`` is a finished run on ``device_type`` at ``tier`` (unreadable: no)."""
    try:
        head = read_header(head_path.parent)
    except RunFileError:
        return False
    c = head.get("config", {})
    return head.get("status") == "complete" and c.get("device") == device_type and c.get("tier") == tier


def claim_order(keys: Sequence[str], hints: dict[str, float]) -> list[int]:
    """Indices of the cases in the order ranks claim them: costliest first by the hints (longest
    processing time first), cases without a hint before all others, ties in matrix order."""
    return sorted(range(len(keys)), key=lambda i: (-hints.get(keys[i], math.inf), i))


class ShardFile:
    """One rank's stream: a ``claim`` line when it starts a case, then one line per record."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "w", buffering=1)

    def _write(self, obj: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(clean(obj), separators=(",", ":")) + "\n")
            self._f.flush()
        except OSError as exc:  # a full disk: say which file
            raise named_os_error(exc, self.path) from exc

    def claim(self, index: int, slots: list[int], key: str, rank: int, host: str) -> None:
        self._write({"claim": index, "slots": slots, "case": key, "rank": rank, "host": host})

    def record(self, index: int, slot: int, rec: dict[str, Any]) -> None:
        self._write({"slot": [index, slot], "record": rec})

    def release(self, index: int) -> None:
        """The rank was stopped (SIGTERM, SIGINT) inside this case: not a failure of the case."""
        self._write({"released": index})

    def close(self) -> list[str]:
        """Close the stream (again: no-op) and return its lines."""
        if not self._f.closed:
            self._f.close()
        return self.path.read_text().splitlines()


def merge_shard_lines(lines: Iterable[str]) -> tuple[dict[tuple[int, int], tuple[dict, str]],
                                                       list[tuple[int, int, dict]]]:
    """(record, its JSON text as the shard holds it) by slot (case index, strategy index), and (case
    index, strategy index, claim) for every claimed slot without a record whose rank died (a rank that
    was stopped releases its case: its missing slots are left for ``run --resume``). The text is what
    ``records.jsonl`` gets, without encoding the record again.

    Sorting the slots gives matrix order, the order a single process writes. A torn line (a rank killed
    mid-write) is skipped with a warning; a slot recorded twice keeps its first record."""
    recs: dict[tuple[int, int], tuple[dict[str, Any], str]] = {}
    claims: dict[int, dict[str, Any]] = {}
    released: set[int] = set()
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn("skipping a torn shard line (a rank stopped while writing it)", stacklevel=2)
            continue
        if "claim" in obj:
            claims.setdefault(int(obj["claim"]), obj)
        elif "slot" in obj:
            recs.setdefault((int(obj["slot"][0]), int(obj["slot"][1])), (obj["record"], _record_text(line)))
        elif "released" in obj:
            released.add(int(obj["released"]))
    missing = [(i, j, c) for i, c in sorted(claims.items()) if i not in released for j in c["slots"]
               if (i, j) not in recs]
    return recs, missing


def _record_text(line: str) -> str:
    """The record's JSON inside a shard line ``{"slot":[i,j],"record":{...}}`` (the record comes last)."""
    start = line.index('"record":') + len('"record":')
    return line[start:].strip()[:-1].strip()


def _ordered(recs: dict[tuple[int, int], tuple[dict, str]], lost: list[tuple[int, int, dict]], cfg: RunConfig,
             all_cases: list[Case]) -> list[tuple[dict[str, Any], str | None]]:
    """(record, its JSON text or None) in matrix order, with an ``error`` record for every claimed slot
    that has none."""
    merged: dict[tuple[int, int], tuple[dict[str, Any], str | None]] = dict(recs)
    for i, j, claim in lost:
        why = (f"rank {claim.get('rank')} on {claim.get('host')} stopped while running this case (its process "
               "ended before the record was written); its log says why")
        merged[(i, j)] = (_record(all_cases[i], cfg.strategies[j], cfg.device, Verdict("error", why), {}, 0.0, {}),
                          None)
    return [merged[k] for k in sorted(merged)]


def run_sharded(cfg: RunConfig, progress: Callable[[int, int, str], None] | None = None,
                resume: bool = False) -> tuple[Path, Summary, dict[str, Any]] | None:
    """Run the matrix of ``cfg`` on this rank's share of the cases; on rank 0 return what
    :func:`harness.run.engine.run_matrix` returns (directory, summary, stats), elsewhere None.

    Call it in every process torchrun started (``python -m harness run`` does when ``WORLD_SIZE`` > 1)."""
    g = init_group(cfg.device)
    try:
        with sigterm_as_interrupt():
            return _run_sharded(replace(cfg, device=g.device), g, progress, resume)
    finally:
        dist.destroy_process_group()


def _lead(cfg: RunConfig, g: Group, all_cases: list[Case], resume: bool,
          env: dict[str, Any]) -> tuple[dict[str, Any], RunWriter, list[dict]]:
    """Rank 0: the run directory, its writer, earlier records (resume) and the plan every rank follows."""
    out = Path(cfg.out or default_out_dir(cfg.device))
    lock = RunLock(out)  # held by rank 0 for the whole session (released when its writer closes)
    try:
        return _lead_locked(cfg, g, all_cases, resume, env, out, lock)
    except BaseException:
        lock.release()
        raise


def _lead_locked(cfg: RunConfig, g: Group, all_cases: list[Case], resume: bool, env: dict[str, Any], out: Path,
                 lock: RunLock) -> tuple[dict[str, Any], RunWriter, list[dict]]:
    if resume and any((out / SHARDS).glob("*.jsonl")):
        merge_run(out, lock)  # fold in what an interrupted sharded session left behind
    labels = [s.label for s in cfg.strategies]
    done, previous = _done_keys(out, matrix_keys(all_cases, labels)) if resume else (set(), [])
    todo = [(i, [j for j, s in enumerate(cfg.strategies) if (c.key, s.label) not in done])
            for i, c in enumerate(all_cases)]
    todo = [t for t in todo if t[1]]
    hints, source = cost_hints(cfg.device.type, cfg.tier, out.parent)
    plan = [todo[k] for k in claim_order([all_cases[i].key for i, _ in todo], hints)]
    header = resumed_header(out, env, {"timeout": cfg.timeout}) if resume else run_header(cfg, len(all_cases), env)
    header["distributed"] = {"world_size": g.world, "backend": g.backend, "cost_hints": source,
                             "schedule": "costliest first" if hints else "matrix order",
                             "env": {k: os.environ.get(k) for k in MULTICAST_OFF}}
    writer = RunWriter(out, header, append=resume, lock=lock)
    return ({"out": str(out), "token": uuid.uuid4().hex[:12], "plan": plan, "previous": len(previous),
             "total": len(all_cases) * len(cfg.strategies)}, writer, previous)


def _run_sharded(cfg: RunConfig, g: Group, progress: Callable[[int, int, str], None] | None,
                 resume: bool) -> tuple[Path, Summary, dict[str, Any]] | None:
    check_size(count_cases(cfg.scenarios, cfg.tier, cfg.seeds), len(cfg.strategies), cfg.max_records, BOOKKEEPING_S)
    all_cases = cases(cfg.scenarios, cfg.tier, cfg.seeds)  # a list: ranks address cases by index
    barrier(g.store, g.world, f"mp-harness/start/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    writer, previous = None, []
    box: list[Any] = [None]
    runner, isolation, env = _runner(cfg, [], None)  # this rank supervises workers of its own
    if g.rank == 0:
        try:
            box[0], writer, previous = _lead(cfg, g, all_cases, resume, env)
        except BaseException:
            runner.close()
            raise
        if hasattr(runner, "close_fds"):  # the workers must not hold the run directory's lock
            runner.close_fds += (writer.lock.fileno(), writer.fileno())
        box[0]["progress"] = progress is not None  # only then do ranks count records in the store
    dist.broadcast_object_list(box, src=0)
    plan = box[0]
    out = Path(plan["out"])
    counter = dist.PrefixStore(f"mp-harness/{plan['token']}", g.store)
    shard = ShardFile(out / SHARDS / f"{plan['token']}-rank-{g.rank:05d}.jsonl")
    summary = Summary()
    t0, claimed, current = time.perf_counter(), 0, None
    try:
        while (k := counter.add("next", 1) - 1) < len(plan["plan"]):
            current, slots = plan["plan"][k]
            case = all_cases[current]
            shard.claim(current, slots, case.key, g.rank, g.host)
            claimed += 1
            slot_of = {cfg.strategies[j].label: j for j in slots}
            for rec in runner.records([(case, [cfg.strategies[j] for j in slots])]):
                summary.add(rec)
                shard.record(current, slot_of[rec["strategy"]], rec)
                if plan["progress"]:  # a store round trip per record: skipped when nobody shows it
                    done = counter.add("done", 1)
                    if progress is not None and g.rank == 0:
                        progress(plan["previous"] + done, plan["total"], f"{case.id} {rec['strategy']}")
            current = None
        lines, busy = shard.close(), time.perf_counter() - t0
        barrier(counter, g.world, "finished")  # no rank enters the gather while another still works
        if progress is not None and g.rank == 0:  # the other ranks' last records, counted after rank 0's
            progress(plan["previous"] + counter.add("done", 0), plan["total"], "all ranks done")
    except KeyboardInterrupt:
        runner.close()
        if current is not None:
            shard.release(current)
        shard.close()
        if writer is not None:
            writer.close({"note": f"stopped: the records are in {SHARDS}/; `python -m harness.distributed merge "
                                  f"{out}` collects them"}, status="interrupted")
        raise
    runner.close()
    mine = run_stats(busy, runner.parts(), summary.records, summary.records, resume,  # this rank's busy time
                     workers=getattr(runner, "size", 1))
    mine.update(rank=g.rank, host=g.host, device=str(cfg.device), cases=claimed, isolation=isolation)
    gathered: list[Any] | None = [None] * g.world if g.rank == 0 else None
    dist.gather_object({"lines": lines, "stats": mine}, gathered, dst=0)
    result = _finish(cfg, all_cases, writer, previous, gathered, t0, resume) if g.rank == 0 else None
    ok = [result is not None]
    dist.broadcast_object_list(ok, src=0)
    if ok[0]:  # the merged run is written: this session's shard files are redundant now
        for f in [shard.path] + (sorted((out / SHARDS).glob(f"{plan['token']}-*")) if g.rank == 0 else []):
            f.unlink(missing_ok=True)
        try:
            (out / SHARDS).rmdir()
        except OSError:  # not empty: another rank's file, or an earlier session's left for `merge`
            pass
    return result


def _finish(cfg: RunConfig, all_cases: list[Case], writer: RunWriter, previous: list[dict], gathered: list[Any],
            t0: float, resume: bool) -> tuple[Path, Summary, dict[str, Any]]:
    """Rank 0: every rank's shard merged in matrix order into one run directory."""
    recs, lost = merge_shard_lines(line for part in gathered for line in part["lines"])
    merged = _ordered(recs, lost, cfg, all_cases)
    summary = _append(writer, previous, merged)
    ranks = [part["stats"] for part in gathered]
    summed = {k: sum(r[k] for r in ranks) for k in SUMMED_STATS}
    summary.seconds_in_scenarios = summed["seconds_in_scenarios"]
    summary.seconds_building_inputs = summed["seconds_building_inputs"]
    ran = sum(r["records_this_session"] for r in ranks)
    per_record = sum(r["bookkeeping_ms_per_record"] * r["records_this_session"] for r in ranks) / max(ran, 1)
    stats = {**run_stats(time.perf_counter() - t0, summed, summary.records, ran, resume, per_record),
             "world_size": len(ranks), "lost_records": len(lost), "ranks": ranks}
    writer.close({**summary.as_dict(), **stats})
    return writer.dir, summary, stats


def _append(writer: RunWriter, previous: list[dict], new: list[tuple[dict, str | None]]) -> Summary:
    """Write ``new`` (record, its JSON text or None) after ``previous`` (already in the file); the summary
    of both."""
    summary = Summary.of(previous)
    for r, text in new:
        writer.append(r, text)
        summary.add(r)
    return summary


def merge_run(out: Path, lock: RunLock | None = None) -> dict[str, Any]:
    """Fold the shard files of a sharded run that did not finish into its ``records.jsonl``.

    Records already there are kept; a case whose rank died gets an ``error`` record for each strategy
    it had not finished; cases nobody finished stay missing (``run --resume DIR`` runs them) and
    ``run.json`` says ``interrupted``. Run it where the run ran, with every host's shard files copied
    into ``DIR/shards/``. Returns counts for the command line. Holds the directory's lock (``lock``:
    the caller's, kept; else its own for the merge)."""
    out = Path(out)
    held = lock or RunLock(out)
    try:
        return _merge(out, held)
    finally:
        if lock is None:
            held.release()


def _merge(out: Path, lock: RunLock) -> dict[str, Any]:
    cfg = resume_config(out)
    files = sorted((out / SHARDS).glob("*.jsonl"))
    if not files:
        raise ValueError(f"{out}: no shard files in {out / SHARDS}; nothing to merge")
    all_cases = cases(cfg.scenarios, cfg.tier, cfg.seeds)
    recs, lost = merge_shard_lines(line for f in files for line in f.read_text().splitlines())
    done, previous = _done_keys(out)
    new = [(r, t) for r, t in _ordered(recs, lost, cfg, all_cases)
           if (case_seed_key(r), r["strategy"]) not in done]
    header = {k: v for k, v in read_header(out).items() if k not in ("status", "summary", "schema_version")}
    writer = RunWriter(out, header, append=True, lock=lock, release_lock=False)
    summary = _append(writer, previous, new)
    missing = len(all_cases) * len(cfg.strategies) - summary.records
    counts = {"shard_files": len(files), "merged": len(new), "lost_records": len(lost), "missing_records": missing}
    writer.close({**summary.as_dict(), **counts}, status="complete" if missing == 0 else "interrupted")
    for f in files:
        f.unlink()
    return counts


