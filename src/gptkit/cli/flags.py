"""What the command groups share for reading flags: the error for flags that cannot be honoured, durations, sizes."""

from __future__ import annotations

import math
import re

from ..errors import GptkitError

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(GptkitError):
    """Flags that do not go together, or a flag's value that cannot be read."""


def seconds(text: str, flag: str) -> float:
    """A duration flag's value in seconds: a number of seconds, or one with a unit (`600`, `600s`, `10m`, `1.5h`)."""
    match = re.fullmatch(r"(\S+?)([smh]?)", str(text).strip())
    try:
        value = float(match[1]) * UNITS[match[2]]
    except (TypeError, ValueError):  # no match, or not a number
        value = math.nan
    if not 0 < value < math.inf:
        raise UsageError(f"{flag} must be a positive duration: seconds or a number with s, m or h (600, 600s, 10m, "
                         f"1h), got {text!r}")
    return value


def byte_size(text: str, flag: str) -> int:
    """A size flag's value in bytes: a number of bytes, or one with a unit (`2G`, `512M`, `64k`, `1.5GB`)."""
    match = re.fullmatch(r"(\S+?)([kmgt]?)b?", str(text).strip().lower())
    try:
        value = float(match[1]) * BYTES[match[2]]
    except (TypeError, ValueError):
        value = math.nan
    if not 1 <= value < math.inf:
        raise UsageError(f"{flag} must be a size: bytes or a number with K, M, G or T (2G, 512M), got {text!r}")
    return int(value)
