"""Byte sizes as people read them, in binary units (the units limits are set in)."""

from rich.filesize import pick_unit_and_suffix

_UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]


def binary_size(size: float) -> str:
    """134217728 -> '128 MiB', 1536 -> '1.5 KiB', 100 -> '100 bytes'."""
    unit, suffix = pick_unit_and_suffix(int(size), _UNITS, 1024)
    if unit == 1:
        return f"{int(size)} bytes"
    return f"{size / unit:,.4g} {suffix}"
