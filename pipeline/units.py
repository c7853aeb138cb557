"""How durations and sizes are written for people: the one formatter of each."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """`3d 4h 5m`, `4h 5m` or `5m 6s`."""
    days, rem = divmod(int(max(seconds, 0)), 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


def format_size(n: float) -> str:
    """Decimal units, as object stores and disks count: `1.41 MB`, `6.36 GB`."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
