"""The optional C accelerator (``lbsync/_ctfast.c``, docs/kernel.md), loaded in one place.

``CTFAST`` is the extension module, or None when it is not built (a pure-Python install) or
``LBSYNC_NO_ACCEL`` is set to anything but "" or "0" (same-run A/B comparisons). Every user
keeps its pure-Python code and falls back to it whenever a C function declines (returns None).
"""

from __future__ import annotations

import os
from typing import Any


def _load() -> Any:
    if os.environ.get("LBSYNC_NO_ACCEL", "") not in ("", "0"):
        return None
    try:
        from lbsync import _ctfast
    except ImportError:  # not built: the Python code does everything
        return None
    return _ctfast


CTFAST: Any = _load()
