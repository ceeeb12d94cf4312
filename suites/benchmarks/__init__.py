"""asv benchmarks of the harness (see docs/asv.md): thin ``time_*``, ``peakmem_*`` and ``track_*`` over the
engine, its executions and its quick matrix.

asv imports this package on its own (as ``benchmarks``), from a temporary working directory, so the
project root is put on ``sys.path`` here. It is appended, not prepended: a ``PYTHONPATH`` set through
``ASV_PYTHONPATH`` (``tools/asv_history.sh`` points it at a worktree of an older commit) comes first, so
the harness of that commit is what gets measured. Importing this package registers no scenario and
costs nothing; ``harness.core.scenario.discover`` skips it.
"""
from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
