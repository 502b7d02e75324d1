"""Names that become file names stay file names: what a run or sweep writes stays under its output folder."""

from __future__ import annotations

import re


def safe_filename(name: str, fallback: str = "run") -> str:
    """``name`` as one path component: letters, digits, ``.``, ``_``, ``-`` (others become ``_``), no leading dot.

    >>> safe_filename("../../etc/passwd")
    'etc_passwd'
    >>> safe_filename("sweep: σ 0.5")
    'sweep_0.5'
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    s = re.sub(r"\.{2,}", ".", s)
    return s[:100] or fallback
