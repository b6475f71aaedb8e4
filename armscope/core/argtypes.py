"""argparse ``type`` functions shared by ``armscope`` and ``armscope bridge``.

Why: a bad number should be refused by argparse, which names the option
("argument --duration: must be >= 0, got '-5'"), before a command opens a
display or spends minutes; NaN and infinity are never valid.
"""
from __future__ import annotations

import argparse
import math


def number(lo: float, hi: float = math.inf, *, integer: bool = False, above: bool = False):
    """A finite number within [lo, hi] (``above``: > lo); ``integer`` parses an int."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (above and value == lo) or value > hi:
            show = (lambda v: str(int(v))) if integer else (lambda v: f"{v:g}")
            bound = f"> {show(lo)}" if above else f">= {show(lo)}"
            raise argparse.ArgumentTypeError(f"must be {bound}" + (f" and <= {show(hi)}" if hi < math.inf else "")
                                             + f", got {text!r}")
        return value
    return parse
