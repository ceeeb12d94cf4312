"""Run files: a header (``run.json``) and one record per case (``records.jsonl``).

``records.jsonl`` is appended and flushed as each case finishes, so an interrupted run loses nothing
already done; a torn last line is detected on read and skipped with a warning. ``run.json`` is
written by atomic replace, so it is either absent or whole. Non-finite numbers are stored as the
strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON); :func:`num` reads them back.

Views read a run one record at a time (:func:`iter_run_records`, :class:`RunRecords`), each record checked
against the schema (:mod:`harness.results_schema`), so a hostile line is one error naming its file and
line, and memory does not grow with the run. A user's mistake is an :class:`InputError` (exit 2).

This module imports nothing else of the harness but its schema: reports and the gate are pure functions
of run files.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator

__all__ = ["SCHEMA_VERSION", "OUTCOMES", "FAILURES", "ERROR_METRICS", "SEVERITY", "tally", "case_seed_key", "case_key",
           "RECORD_FIELDS", "RunWriter", "read_run", "read_header", "check_new_out", "read_records", "RunRecords",
           "iter_run_records", "num", "finite", "is_number", "clean", "environment", "device_class",
           "write_json_atomic", "InputError", "RunFileError", "check_record", "iter_object_members", "RunLock",
           "LOCK_FILE", "named_os_error"]

from .results_schema import (ERROR_METRICS, OUTCOMES, SCHEMA_VERSION, InputError, RunFileError, check_header,
                             check_record, finite, is_number, iter_object_members)

FAILURES = tuple(o for o in OUTCOMES if o not in ("pass", "unsupported"))
#: How bad an outcome is, for the gate: higher is worse.
SEVERITY = {"pass": 0, "unsupported": 0, "diverged": 1, "underflow": 2, "stalled": 3, "overflow": 4,
            "scale_exhausted": 5, "error": 6}


def tally(by_strategy: dict, by_family: dict, record: dict[str, Any]) -> None:
    """Count one record's outcome per strategy and per (family, strategy), in place."""
    s, f, o = record["strategy"], record["family"], record["outcome"]
    counts = by_strategy.setdefault(s, {})
    counts[o] = counts.get(o, 0) + 1
    fam = by_family.setdefault(f, {}).setdefault(s, {})
    fam[o] = fam.get(o, 0) + 1
RECORD_FIELDS = ("schema_version", "scenario", "family", "params", "seed", "strategy", "strategy_spec", "device",
                 "outcome", "reason", "metrics", "seconds")


def clean(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings, tuples lists, other objects their str()."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


def num(x: Any) -> float:
    """A number from a run file (``"inf"`` and friends included); None becomes NaN."""
    if x is None:
        return math.nan
    return float(x)


def named_os_error(exc: OSError, path: Path) -> OSError:
    """``exc`` with the file it was about: a failed ``write`` (disk full) names none by itself."""
    if exc.filename:
        return exc
    return type(exc)(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry, not only the file's data)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself was synced
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` whole or not at all (temporary file, fsync, rename, fsync of the folder);
    an OSError names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(clean(obj), f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # leave nothing half-written behind: the old file, or none
        tmp.unlink(missing_ok=True)
        raise named_os_error(exc, path) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return (out.stdout.strip() or None) if out.returncode == 0 else None  # outside a checkout git echoes "HEAD"
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware a run depends on (harness, git commit, torch, CUDA, GPU, CPU, Python)."""
    import torch
    from . import __version__
    env: dict[str, Any] = {
        "harness": __version__, "git_commit": _git_commit(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": device,
        "gpu": None, "driver": None, "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def device_class(header: dict) -> str:
    """``cpu``, or ``cuda:<GPU name>``: runs are only compared within one class."""
    env = header.get("environment", {})
    if env.get("device") == "cuda":
        return f"cuda:{env.get('gpu')}"
    return "cpu"


#: The lock file inside a run directory: held (``flock``) by the one process writing the run.
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run directory for the life of a run or a resume (created if needed).

    A second process gets ValueError at once (bad input: one line, exit 2), naming the holder's pid.
    The lock is the kernel's (``flock``): it ends with the process, however that ends."""

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise ValueError(f"{self.dir}: another harness process (pid {holder}) is writing this run directory; "
                             "wait for it to finish, or pass another --out") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class RunWriter:
    """Writes a run directory: the header now, each record as it finishes, the summary at the end.

    It holds the directory's :class:`RunLock` (its own, or ``lock``) until :meth:`close` (which keeps a
    given ``lock`` when ``release_lock`` is false: its caller goes on writing the directory). A new run
    creates ``records.jsonl`` exclusively: a run directory is never written over. Records are flushed
    one by one and fsynced by :meth:`sync` (after each case) and :meth:`close`; an OSError (a full
    disk) names the file."""

    def __init__(self, directory: Path, header: dict[str, Any], append: bool = False,
                 lock: RunLock | None = None, release_lock: bool = True) -> None:
        self.dir = Path(directory)
        self.lock = lock or RunLock(self.dir)
        self._release = release_lock or lock is None
        self.header = dict(header, schema_version=SCHEMA_VERSION)
        self.path = self.dir / "records.jsonl"
        try:
            try:
                self._f = open(self.path, "a" if append else "x", buffering=1)
            except FileExistsError:
                raise ValueError(f"--out {self.dir}: already holds a run; use --resume {self.dir} to complete it, "
                                 "or pass a new directory") from None
            write_json_atomic(self.dir / "run.json", dict(self.header, status="running"))
        except BaseException:
            if lock is None:
                self.lock.release()
            raise

    def fileno(self) -> int:
        return self._f.fileno()

    def append(self, record: dict[str, Any], text: str | None = None) -> None:
        """One record; ``text``: its JSON as written before (a shard file's), written as it is."""
        try:
            self._f.write((json.dumps(clean(record), separators=(",", ":")) if text is None else text) + "\n")
            self._f.flush()
        except OSError as exc:
            raise named_os_error(exc, self.path) from exc

    def sync(self) -> None:
        """Make the records written so far durable (the end of a case)."""
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise named_os_error(exc, self.path) from exc

    def close(self, summary: dict[str, Any], status: str = "complete") -> None:
        """Close the records (fsynced) and write ``run.json`` with ``status`` and ``summary``; the lock
        is released even where this fails. Where the records cannot be closed the run is ``interrupted``."""
        failed: OSError | None = None
        try:
            if not self._f.closed:
                try:
                    self.sync()
                finally:
                    self._f.close()
        except OSError as exc:
            failed, status = named_os_error(exc, self.path), "interrupted"
        try:
            write_json_atomic(self.dir / "run.json", dict(self.header, status=status, summary=summary))
        finally:
            if self._release:
                self.lock.release()
        if failed is not None:
            raise failed


def _numbered_records(path: Path, skipped: list[str] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a ``records.jsonl``; torn or corrupted lines are reported through
    ``skipped`` (a list) or as warnings. A line nested too deep to parse is a RunFileError, not a skip."""
    path = Path(path)

    def skip(text: str) -> None:
        if skipped is None:
            warnings.warn(text, stacklevel=4)
        else:
            skipped.append(text)

    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skip(f"{path}:{i}: skipping a torn or corrupted record line")
                continue
            except RecursionError:
                raise RunFileError(f"{path}:{i}: JSON nested too deep to read; this line was not written by the "
                                   "harness: delete it or restore the file") from None
            if not isinstance(rec, dict):
                skip(f"{path}:{i}: skipping a line that is not a JSON object")
                continue
            yield i, rec


def read_records(path: Path, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of a ``records.jsonl``, unvalidated; a torn or corrupted line is skipped with a warning (or,
    when ``skipped`` is a list, with the warning's text appended to it instead)."""
    for _, rec in _numbered_records(path, skipped):
        yield rec


def check_new_out(out: Path | str | None, resumable: bool = False) -> None:
    """Refuse an ``--out`` a new run must not write to: a file, or a directory that already holds a run
    (``resumable``: say that ``--resume`` completes it). None (the default directory) is fine."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; pass a new or existing directory")
    if (out / "records.jsonl").exists():  # never write over an earlier run
        hint = f"use --resume {out} to complete it, or pass a new directory" if resumable else "pass a new directory"
        raise InputError(f"--out {out}: already holds a run; {hint}")


def read_header(directory: Path | str) -> dict[str, Any]:
    """The ``run.json`` header of a run directory ({} where there is none yet); raises RunFileError with a
    one-line reason for a folder that is no run directory or a header that cannot be read or is of
    another schema (see :func:`harness.results_schema.check_header`)."""
    d = Path(directory)
    if not d.is_dir():
        raise RunFileError(f"{d}: not a run directory (expected a folder with run.json and records.jsonl)")
    head_path = d / "run.json"
    if not (d / "records.jsonl").is_file():
        raise RunFileError(f"{d}: no records.jsonl; pass a directory written by `python -m harness run`")
    header: dict[str, Any] = {}
    if head_path.is_file():
        try:
            header = json.loads(head_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as exc:
            why = "nested too deep" if isinstance(exc, RecursionError) else exc
            raise RunFileError(f"{head_path}: unreadable run header ({why}); re-run or restore the file") from None
        check_header(header, str(head_path))
    return header


#: Messages about skipped lines held back until a readable record shows the file is no garbage.
_HELD_WARNINGS = 20


def iter_run_records(directory: Path | str) -> Iterator[dict[str, Any]]:
    """The records of a run directory one at a time, each checked against the schema
    (:func:`check_record`; a RunFileError names the file and line). Memory does not grow with the run.

    A torn or corrupted line is skipped with a warning; a file with no readable record at all is a
    RunFileError (its warnings are then not shown: the one error line says it all)."""
    rec_path = Path(directory) / "records.jsonl"
    held: list[str] = []
    n_skipped = n_read = 0
    for i, rec in _numbered_records(rec_path, held):
        check_record(rec, f"{rec_path}:{i}")
        if held:
            n_skipped += len(held)
            for text in held[:_HELD_WARNINGS]:
                warnings.warn(text, stacklevel=2)
            held.clear()
        n_read += 1
        yield rec
    if held and not n_read:
        raise RunFileError(f"{rec_path}: none of its {len(held)} lines is a readable record (the file is "
                           "corrupted); re-run, or restore the file from a copy")
    for text in held[:max(0, _HELD_WARNINGS - n_skipped)]:
        warnings.warn(text, stacklevel=2)


class RunRecords:
    """The records of a run directory as an iterable that streams the file again on each iteration
    (:func:`iter_run_records`), for views that need more than one pass without holding the run."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter_run_records(self.directory)


def read_run(directory: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records) of a run directory, the records checked and held in a list; raises RunFileError
    with a one-line reason. Views stream with :func:`iter_run_records` instead."""
    header = read_header(directory)
    return header, list(iter_run_records(directory))


def case_seed_key(r: dict[str, Any]) -> str:
    """The case a record belongs to, with its seed: ``softmax_long[n=4096]#0`` (as ``Case.key``)."""
    return f"{r.get('case', r.get('scenario'))}#{r.get('seed')}"


def case_key(r: dict[str, Any]) -> str:
    """Identity of a record across runs: case id, seed, strategy."""
    return f"{case_seed_key(r)}|{r.get('strategy')}"
