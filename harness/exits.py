"""Exit codes of ``python -m harness``, and which exception means which.

| code | meaning |
|---|---|
| 0 | done (``gate``: no regression; ``check-model``: every strategy passed) |
| 1 | the answer is "worse": ``gate`` found a regression, ``check-model`` a failing strategy |
| 2 | bad input: the user's mistake, one line saying what, what is allowed and how to fix it |
| 3 | internal error: a fault of the harness; one line naming the file that holds the traceback |
| 4 | the system failed: disk full, an I/O error, out of memory; one line naming the path where known |
| 130 | interrupted (Ctrl-C); records written so far are kept |

**Which errors are bad input.** An :class:`~harness.results.InputError` (``cli.UsageError`` and
``results.RunFileError`` are ones) always is. A plain ``ValueError`` or ``TypeError`` is bad input only
when a ``raise`` statement in the harness's own code raised it (the innermost frame of its traceback
is a harness source line that says ``raise``): the project's rule is "ValueError/TypeError for user input",
so those are deliberate. The same types raised inside numpy, torch or the standard library, or by an
operation that failed in harness code (``float(None)``, ``len(5)``), are faults: exit 3. ``OSError`` is
bad input when it is about a path the user gave (missing, not permitted, a folder for a file), and a
system failure (4) when the disk is full or the device failed. Everything else is exit 3.
"""
from __future__ import annotations

import errno
import linecache
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import TracebackType

from .results_schema import InputError

__all__ = ["OK", "WORSE", "BAD_INPUT", "INTERNAL", "SYSTEM", "INTERRUPTED", "is_bad_input", "is_system_failure",
           "write_crash_report", "CRASH_DIR_ENV"]

OK, WORSE, BAD_INPUT, INTERNAL, SYSTEM, INTERRUPTED = 0, 1, 2, 3, 4, 130
#: Where traceback files go: this environment variable's folder, else the system's temporary folder.
CRASH_DIR_ENV = "MP_HARNESS_CRASH_DIR"
_HARNESS = Path(__file__).resolve().parent
_RAISE = re.compile(r"\braise\b")
_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM}


def _innermost(tb: TracebackType | None) -> TracebackType | None:
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _raised_here(exc: BaseException) -> bool:
    """Whether a ``raise`` statement in a harness source file raised ``exc``."""
    tb = _innermost(exc.__traceback__)
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    if _HARNESS not in path.parents:
        return False
    code = linecache.getline(str(path), tb.tb_lineno).split("#")[0]
    return bool(_RAISE.search(code))


def is_system_failure(exc: BaseException) -> bool:
    """Disk full, quota, I/O error, file too large, out of memory: neither the user's nor the harness's fault."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in _SYSTEM_ERRNOS)


def is_bad_input(exc: BaseException) -> bool:
    """Whether ``exc`` is the user's mistake (exit 2), by the rule in the module doc."""
    if isinstance(exc, InputError):
        return True
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, UnicodeError):
        return _raised_here(exc)
    return isinstance(exc, OSError) and not is_system_failure(exc)


def write_crash_report(exc: BaseException, argv: list[str]) -> Path | None:
    """Write ``exc``'s traceback, the command and the versions to a new file; its path, or None if even
    that failed (the traceback then goes to stderr)."""
    from . import __version__
    folder = os.environ.get(CRASH_DIR_ENV) or tempfile.gettempdir()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = (f"mp-harness {__version__}, Python {sys.version.split()[0]}\ncommand: python -m harness "
            f"{' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc)))
    try:
        fd, name = tempfile.mkstemp(prefix=f"mp-harness-crash-{stamp}-", suffix=".txt", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        sys.stderr.write(text)
        return None
