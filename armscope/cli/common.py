"""Argument types shared by the ``armscope`` subcommands (the checks on values live in the domain modules)."""
from __future__ import annotations

from armscope.core.argtypes import number


def int_in(lo: int, hi: float = float("inf")):
    return number(lo, hi, integer=True)


THREADS = int_in(1, 256)
SEED = int_in(0, 2**32 - 1)


def crop_size(text: str) -> int:
    """--crop: 0 (no crop: whole images) or 16..16384 pixels."""
    return 0 if text.strip() == "0" else int_in(16, 16384)(text)
