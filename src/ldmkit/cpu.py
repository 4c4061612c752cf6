"""What this CPU can do, as Linux reports it."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """The feature flags of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
                          []))
